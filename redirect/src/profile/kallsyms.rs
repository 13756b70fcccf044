//! A symbol table parsed from `/proc/kallsyms` text.
//!
//! Lines have the form `address type name` for the core kernel and
//! `address type name\t[module]` for module symbols (also `[bpf]`, `[__builtin__ftrace]`
//! and the like for generated code). The text is read from the SVM, which runs the identical
//! kernel with `nokaslr`, so its addresses are also those of a GVM booted with `nokaslr`
//! ([`SymbolTable::slid`] gives a KASLR GVM's).
//!
//! # Per-cpu symbols
//!
//! Per-cpu variables are listed with their *per-cpu offset* (the offset from a CPU's per-cpu
//! base, `__per_cpu_offset[cpu]`), not an address: x86-64 SMP kernels link `.data..percpu`
//! at address 0, and with `CONFIG_KALLSYMS_ABSOLUTE_PERCPU` (the pinned kernel has it) they
//! are shown with type `A`. This module classifies a symbol as per-cpu when it is a core
//! kernel symbol (no `[module]`) whose value lies in the lower, non-kernel half of the
//! address space (below 2^47: no kernel code or data can live there, so the value can only be
//! an offset) and, when the table lists `__per_cpu_end`, does not exceed it. The type letter
//! is not relied upon (kernels without ABSOLUTE_PERCPU print `D`/`d`/`B`/`b`), but it is
//! kept in [`Symbol::kind`]. Per-cpu symbols are looked up with
//! [`SymbolTable::percpu_offset`] and never returned by [`SymbolTable::symbolize`].
//!
//! # Hostile text
//!
//! Lines longer than [`MAX_LINE`] bytes and lines that do not have exactly the shape above
//! are ignored (and counted); the number of symbols is capped at [`MAX_SYMBOLS`]. Text where
//! every address is zero (a reader without `CAP_SYSLOG` under `kptr_restrict`) is rejected,
//! since it would otherwise produce a table of wrong answers.

use std::fmt;

use thiserror::Error;

use crate::kaslr::{KERNEL_IMAGE_SIZE, SLIDE_ALIGN};
use crate::view::START_KERNEL_MAP;

/// Longest line accepted: a 512-byte symbol name (KSYM_NAME_LEN) plus address, type and a
/// module name fit well within this.
pub const MAX_LINE: usize = 1024;
/// Longest symbol name accepted (KSYM_NAME_LEN in 6.1).
pub const MAX_NAME: usize = 512;
/// Longest module name accepted (MODULE_NAME_LEN is 56; generated code uses longer tags).
pub const MAX_MODULE: usize = 64;
/// Most symbols kept (the pinned kernel with modules loaded has a few hundred thousand).
pub const MAX_SYMBOLS: usize = 4_000_000;
/// Default bound on the distance between an address and the symbol that names it in
/// [`SymbolTable::symbolize`]; beyond it the address is considered unknown.
pub const MAX_SYMBOL_OFFSET: u64 = 1 << 20;
/// Start of the kernel half of the x86-64 address space (48-bit canonical addresses).
const KERNEL_HALF: u64 = 0xffff_8000_0000_0000;
/// Per-cpu offsets are below this; anything at or above it is a real address.
const LOWER_HALF_END: u64 = 0x0000_8000_0000_0000;

/// Why kallsyms text could not be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KallsymsError {
    /// No line of the text is a well-formed symbol line.
    #[error("no symbols found in kallsyms text ({skipped} lines ignored)")]
    Empty {
        /// Non-blank lines ignored as malformed or too long.
        skipped: usize,
    },
    /// Every address is zero: the text was read without permission to see addresses.
    #[error(
        "every kallsyms address is zero: the text was read without permission to see \
         addresses (kptr_restrict); read /proc/kallsyms as root"
    )]
    AddressesHidden,
    /// The text has more than [`MAX_SYMBOLS`] symbols.
    #[error("kallsyms text has more than {MAX_SYMBOLS} symbols")]
    TooManySymbols,
}

/// One kallsyms entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Symbol {
    /// The address, or for a per-cpu symbol its per-cpu offset.
    pub addr: u64,
    /// The type letter (`T`, `t`, `D`, `A`, ...).
    pub kind: char,
    /// The symbol's name (at most [`MAX_NAME`] bytes).
    pub name: String,
    /// The module for module symbols (`[module]`), `None` for the core kernel.
    pub module: Option<String>,
    /// True for per-cpu variables (see the module documentation).
    pub percpu: bool,
}

impl Symbol {
    /// Global (upper-case type) symbols are preferred over local ones when names or
    /// addresses collide.
    fn rank(&self) -> (bool, bool) {
        (self.module.is_some(), !self.kind.is_ascii_uppercase())
    }
}

/// The answer of [`SymbolTable::symbolize`]: `name+offset [module]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SymbolRef<'a> {
    /// The nearest symbol's name.
    pub name: &'a str,
    /// Bytes from the symbol's value to the address (or per-cpu offset) named.
    pub offset: u64,
    /// The symbol's module, `None` for the core kernel.
    pub module: Option<&'a str>,
    /// The symbol itself.
    pub symbol: &'a Symbol,
}

impl fmt::Display for SymbolRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}+{:#x}", self.name, self.offset)?;
        if let Some(m) = self.module {
            write!(f, " [{m}]")?;
        }
        Ok(())
    }
}

/// A parsed kallsyms table.
#[derive(Debug, Clone, Default)]
pub struct SymbolTable {
    /// In input order.
    symbols: Vec<Symbol>,
    /// Indices sorted by (name, rank, input order).
    by_name: Vec<u32>,
    /// Indices of non-per-cpu symbols sorted by (address, rank, input order).
    by_addr: Vec<u32>,
    /// Indices of per-cpu symbols sorted by (offset, rank, input order).
    percpu_by_addr: Vec<u32>,
    skipped: usize,
}

/// Parses one line into (address, type, name, module); `None` for anything malformed.
fn parse_line(line: &str) -> Option<(u64, char, &str, Option<&str>)> {
    if line.len() > MAX_LINE {
        return None;
    }
    let mut fields = line.split_ascii_whitespace();
    let addr = fields.next()?;
    let kind = fields.next()?;
    let name = fields.next()?;
    let module = fields.next();
    if fields.next().is_some() {
        return None;
    }
    if addr.is_empty() || addr.len() > 16 || !addr.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let addr = u64::from_str_radix(addr, 16).ok()?;
    let mut chars = kind.chars();
    let kind = chars.next().filter(|c| c.is_ascii_graphic())?;
    if chars.next().is_some() {
        return None;
    }
    if name.len() > MAX_NAME || name.starts_with('[') {
        return None;
    }
    let module = match module {
        None => None,
        Some(m) => {
            let inner = m.strip_prefix('[')?.strip_suffix(']')?;
            if inner.is_empty() || inner.len() > MAX_MODULE || inner.contains(['[', ']']) {
                return None;
            }
            Some(inner)
        }
    };
    Some((addr, kind, name, module))
}

fn idx(i: usize) -> u32 {
    // The table holds at most MAX_SYMBOLS (< u32::MAX) entries.
    u32::try_from(i).unwrap_or(u32::MAX)
}

impl SymbolTable {
    /// Parses `/proc/kallsyms` text.
    pub fn parse(text: &str) -> Result<SymbolTable, KallsymsError> {
        Self::parse_bytes(text.as_bytes())
    }

    /// Parses `/proc/kallsyms` bytes; lines that are not UTF-8 are ignored.
    pub fn parse_bytes(text: &[u8]) -> Result<SymbolTable, KallsymsError> {
        let mut symbols = Vec::new();
        let mut skipped = 0usize;
        for line in text.split(|&c| c == b'\n') {
            if line.iter().all(|c| c.is_ascii_whitespace()) {
                continue;
            }
            let parsed = (line.len() <= MAX_LINE)
                .then(|| std::str::from_utf8(line).ok())
                .flatten()
                .and_then(parse_line);
            let Some((addr, kind, name, module)) = parsed else {
                skipped += 1;
                continue;
            };
            if symbols.len() >= MAX_SYMBOLS {
                return Err(KallsymsError::TooManySymbols);
            }
            symbols.push(Symbol {
                addr,
                kind,
                name: name.to_string(),
                module: module.map(str::to_string),
                percpu: false,
            });
        }
        if symbols.is_empty() {
            return Err(KallsymsError::Empty { skipped });
        }
        if symbols.iter().all(|s| s.addr == 0) {
            return Err(KallsymsError::AddressesHidden);
        }
        let percpu_end = symbols
            .iter()
            .find(|s| s.module.is_none() && s.name == "__per_cpu_end" && s.addr < LOWER_HALF_END)
            .map_or(LOWER_HALF_END - 1, |s| s.addr);
        for s in &mut symbols {
            s.percpu = s.module.is_none() && s.addr <= percpu_end && s.addr < LOWER_HALF_END;
        }
        Ok(Self::indexed(symbols, skipped))
    }

    /// The table of `symbols` (per-cpu flags set), with its lookup indices.
    fn indexed(symbols: Vec<Symbol>, skipped: usize) -> SymbolTable {
        let mut by_name: Vec<u32> = (0..symbols.len()).map(idx).collect();
        by_name.sort_by(|&a, &b| {
            let (sa, sb) = (&symbols[a as usize], &symbols[b as usize]);
            (sa.name.as_str(), sa.rank(), a).cmp(&(sb.name.as_str(), sb.rank(), b))
        });
        let by_addr_of = |percpu: bool| {
            let mut v: Vec<u32> = (0..symbols.len())
                .filter(|&i| symbols[i].percpu == percpu)
                .map(idx)
                .collect();
            v.sort_by_key(|&i| {
                let s = &symbols[i as usize];
                (s.addr, s.rank(), i)
            });
            v
        };
        let by_addr = by_addr_of(false);
        let percpu_by_addr = by_addr_of(true);
        SymbolTable {
            symbols,
            by_name,
            by_addr,
            percpu_by_addr,
            skipped,
        }
    }

    /// The table as a kernel moved by KASLR's virtual `slide` would list it: every core
    /// kernel symbol in the kernel-image map (1 GiB from `__START_KERNEL_map`: the image,
    /// and `.init.scratch` past `_end`) moved by `slide`; per-cpu offsets (they do not
    /// move), module symbols (another kernel's loads) and values outside the map (the
    /// fixmap, the vsyscall page) as they are. Measured: this is exactly what a KASLR boot
    /// of the pinned kernel lists, for all 82,655 core symbols (slide `0x20200000`,
    /// docs/ARCHITECTURE.md "KASLR"). `None` for a slide no kernel can have: not a
    /// multiple of [`SLIDE_ALIGN`], or not below [`KERNEL_IMAGE_SIZE`].
    pub fn slid(&self, slide: u64) -> Option<SymbolTable> {
        const MAP_END: u64 = START_KERNEL_MAP + KERNEL_IMAGE_SIZE;
        if !slide.is_multiple_of(SLIDE_ALIGN) || slide >= KERNEL_IMAGE_SIZE {
            return None;
        }
        let symbols = self
            .symbols
            .iter()
            .map(|s| {
                let mut s = s.clone();
                if s.module.is_none() && !s.percpu && (START_KERNEL_MAP..MAP_END).contains(&s.addr)
                {
                    // Below MAP_END (2^64 - 1 GiB) plus less than 1 GiB: no wrap.
                    s.addr += slide;
                }
                s
            })
            .collect();
        Some(Self::indexed(symbols, self.skipped))
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.symbols.len()
    }

    /// True if the table has no symbols (never the case for a parsed table).
    pub fn is_empty(&self) -> bool {
        self.symbols.is_empty()
    }

    /// Lines that were ignored as malformed or too long.
    pub fn skipped_lines(&self) -> usize {
        self.skipped
    }

    /// All symbols in input order.
    pub fn iter(&self) -> impl Iterator<Item = &Symbol> {
        self.symbols.iter()
    }

    fn sym(&self, i: u32) -> Option<&Symbol> {
        self.symbols.get(i as usize)
    }

    /// Every symbol called `name`, best first: core kernel before modules, global before
    /// local, then input order.
    pub fn get_all<'a>(&'a self, name: &str) -> impl Iterator<Item = &'a Symbol> + 'a {
        let name_of = |i: &u32| self.sym(*i).map_or("", |s| s.name.as_str());
        let start = self.by_name.partition_point(|i| name_of(i) < name);
        let end = self.by_name.partition_point(|i| name_of(i) <= name);
        self.by_name
            .get(start..end)
            .unwrap_or(&[])
            .iter()
            .filter_map(|&i| self.sym(i))
    }

    /// The preferred symbol called `name` (see [`SymbolTable::get_all`]).
    pub fn get(&self, name: &str) -> Option<&Symbol> {
        self.get_all(name).next()
    }

    /// The value of symbol `name`: an address, or for a per-cpu symbol its per-cpu offset
    /// (use [`SymbolTable::address`] / [`SymbolTable::percpu_offset`] to insist on one).
    pub fn lookup(&self, name: &str) -> Option<u64> {
        self.get(name).map(|s| s.addr)
    }

    /// The address of `name`, if it is an ordinary (not per-cpu) symbol.
    pub fn address(&self, name: &str) -> Option<u64> {
        self.get_all(name).find(|s| !s.percpu).map(|s| s.addr)
    }

    /// The per-cpu offset of `name`, if it is a per-cpu symbol.
    pub fn percpu_offset(&self, name: &str) -> Option<u64> {
        self.get_all(name).find(|s| s.percpu).map(|s| s.addr)
    }

    fn nearest<'a>(&'a self, sorted: &[u32], addr: u64, max_offset: u64) -> Option<SymbolRef<'a>> {
        let after = sorted.partition_point(|&i| self.sym(i).is_some_and(|s| s.addr <= addr));
        let prev = self.sym(*sorted.get(after.checked_sub(1)?)?)?;
        // The best-ranked symbol at that same address.
        let first = sorted.partition_point(|&i| self.sym(i).is_some_and(|s| s.addr < prev.addr));
        let symbol = self.sym(*sorted.get(first)?)?;
        let offset = addr.checked_sub(symbol.addr)?;
        (offset <= max_offset).then_some(SymbolRef {
            name: &symbol.name,
            offset,
            module: symbol.module.as_deref(),
            symbol,
        })
    }

    /// Names `addr` as `symbol+offset [module]`: the nearest symbol at or below it, within
    /// [`MAX_SYMBOL_OFFSET`]. Per-cpu symbols are not considered.
    pub fn symbolize(&self, addr: u64) -> Option<SymbolRef<'_>> {
        self.symbolize_within(addr, MAX_SYMBOL_OFFSET)
    }

    /// Like [`SymbolTable::symbolize`], with a caller-chosen bound on the offset.
    pub fn symbolize_within(&self, addr: u64, max_offset: u64) -> Option<SymbolRef<'_>> {
        self.nearest(&self.by_addr, addr, max_offset)
    }

    /// Names a per-cpu offset as `variable+offset`.
    pub fn symbolize_percpu(&self, offset: u64) -> Option<SymbolRef<'_>> {
        self.nearest(&self.percpu_by_addr, offset, MAX_SYMBOL_OFFSET)
    }

    /// The module whose symbol names `addr`, if `addr` is in the kernel half and the nearest
    /// symbol belongs to a module.
    pub fn module_of(&self, addr: u64) -> Option<&str> {
        if addr < KERNEL_HALF {
            return None;
        }
        self.symbolize(addr)?.module
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
0000000000000000 A fixed_percpu_data
0000000000000000 A __per_cpu_start
0000000000001000 A cpu_debug_store
000000000000b000 A gdt_page
0000000000021ac0 A current_task
0000000000021ac8 A cpu_current_top_of_stack
0000000000006000 A cpu_tss_rw
0000000000034000 A __per_cpu_end
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81000000 t startup_64
ffffffff81001000 T do_one_initcall
ffffffff81001200 t local_helper
ffffffff81001200 T global_at_same_addr
ffffffff81e00000 T entry_SYSCALL_64
ffffffff82000000 D __start_rodata
ffffffff82a00000 D init_task
ffffffff82a00000 d init_task
ffffffffc0000000 t rk_hook\t[rootkit]
ffffffffc0000100 T rk_init\t[rootkit]
ffffffffc0001000 t do_one_initcall\t[other]
ffffffffc0002000 t bpf_prog_abc\t[bpf]
";

    #[test]
    fn parses_lookups_and_percpu() {
        let t = SymbolTable::parse(SAMPLE).unwrap();
        assert_eq!(t.len(), 22);
        assert_eq!(t.skipped_lines(), 0);
        assert_eq!(t.lookup("_stext"), Some(0xffff_ffff_8100_0000));
        assert_eq!(t.lookup("current_task"), Some(0x21ac0));
        assert_eq!(t.percpu_offset("current_task"), Some(0x21ac0));
        assert_eq!(t.address("current_task"), None);
        assert_eq!(t.percpu_offset("_stext"), None);
        assert_eq!(t.percpu_offset("fixed_percpu_data"), Some(0));
        assert!(t.get("__per_cpu_end").unwrap().percpu);
        // Core kernel preferred over a module's same-named symbol; global over local.
        assert_eq!(t.lookup("do_one_initcall"), Some(0xffff_ffff_8100_1000));
        assert_eq!(t.get_all("do_one_initcall").count(), 2);
        assert_eq!(t.get("init_task").unwrap().kind, 'D');
        assert_eq!(t.get("rk_hook").unwrap().module.as_deref(), Some("rootkit"));
        assert_eq!(t.lookup("nope"), None);
        assert_eq!(t.lookup(""), None);
    }

    #[test]
    fn symbolizes_with_modules() {
        let t = SymbolTable::parse(SAMPLE).unwrap();
        let s = t.symbolize(0xffff_ffff_8100_1010).unwrap();
        assert_eq!(
            (s.name, s.offset, s.module),
            ("do_one_initcall", 0x10, None)
        );
        // At an address with several symbols the global one wins.
        assert_eq!(t.symbolize(0xffff_ffff_8100_0000).unwrap().name, "_stext");
        assert_eq!(
            t.symbolize(0xffff_ffff_8100_1200).unwrap().name,
            "global_at_same_addr"
        );
        let hook = t.symbolize(0xffff_ffff_c000_0042).unwrap();
        assert_eq!(hook.to_string(), "rk_hook+0x42 [rootkit]");
        assert_eq!(t.module_of(0xffff_ffff_c000_0180), Some("rootkit"));
        assert_eq!(t.module_of(0xffff_ffff_8100_0180), None);
        assert_eq!(t.module_of(0x1000), None);
        // Below every symbol, or too far past the last: unknown.
        assert_eq!(t.symbolize(0xffff_ffff_8000_0000), None);
        assert_eq!(
            t.symbolize(0xffff_ffff_c000_2000 + MAX_SYMBOL_OFFSET + 1),
            None
        );
        assert!(t.symbolize(u64::MAX).is_none());
        // Per-cpu offsets are never mistaken for addresses, and have their own lookup.
        assert_eq!(t.symbolize(0x21ac4), None);
        let p = t.symbolize_percpu(0x21ac4).unwrap();
        assert_eq!((p.name, p.offset), ("current_task", 4));
    }

    #[test]
    fn garbage_lines_are_ignored() {
        let long = format!("ffffffff81000000 T {}\n", "x".repeat(MAX_LINE));
        let text = format!(
            "{SAMPLE}\n\n   \nnot a line\nzz T bad_hex\n\
             ffffffff81000000 TT two_char_type\nffffffff81000000 T\n\
             ffffffff81000000 T a b c\n1ffffffff81000000 T too_long_addr\n\
             ffffffff81000000 T mod\t[]\nffffffff81000000 T mod\t[x\n\
             ffffffff81000000 T [name]\n{long}ffffffff81000000 T ok_after_garbage\r\n"
        );
        let t = SymbolTable::parse(&text).unwrap();
        assert_eq!(t.len(), 23);
        assert_eq!(t.skipped_lines(), 10);
        assert_eq!(t.lookup("ok_after_garbage"), Some(0xffff_ffff_8100_0000));
        let mut bytes = SAMPLE.as_bytes().to_vec();
        bytes.extend_from_slice(b"ffffffff81000000 T \xff\xfe\n");
        assert_eq!(SymbolTable::parse_bytes(&bytes).unwrap().skipped_lines(), 1);
    }

    #[test]
    fn empty_and_hidden_tables_are_errors() {
        assert_eq!(
            SymbolTable::parse("").unwrap_err(),
            KallsymsError::Empty { skipped: 0 }
        );
        assert_eq!(
            SymbolTable::parse("garbage\n").unwrap_err(),
            KallsymsError::Empty { skipped: 1 }
        );
        let hidden = "0000000000000000 T _stext\n0000000000000000 A current_task\n";
        assert_eq!(
            SymbolTable::parse(hidden).unwrap_err(),
            KallsymsError::AddressesHidden
        );
    }

    #[test]
    fn without_percpu_end_the_lower_half_is_percpu() {
        let t = SymbolTable::parse(
            "0000000000021ac0 D current_task\n00007fffffffffff d edge\nffffffff81000000 T _stext\n\
             0000000000001000 t modsym\t[m]\n",
        )
        .unwrap();
        assert_eq!(t.percpu_offset("current_task"), Some(0x21ac0));
        assert_eq!(t.percpu_offset("edge"), Some(0x7fff_ffff_ffff));
        assert_eq!(t.percpu_offset("_stext"), None);
        // Module symbols are never per-cpu.
        assert_eq!(t.percpu_offset("modsym"), None);
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut seed: u64 = 0xdead_beef_cafe_f00d;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let alphabet = b"0123456789abcdefABCDEF TtDdAa[]_\t\n\r\xff";
        for _ in 0..500 {
            let len = (rnd() % 400) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| alphabet[(rnd() as usize) % alphabet.len()])
                .collect();
            if let Ok(t) = SymbolTable::parse_bytes(&bytes) {
                for a in [0, 1, 0xffff_ffff_8100_0000, u64::MAX, rnd()] {
                    let _ = t.symbolize(a);
                    let _ = t.symbolize_percpu(a);
                    let _ = t.module_of(a);
                }
                let names: Vec<String> = t.iter().map(|s| s.name.clone()).collect();
                for n in names {
                    assert!(t.lookup(&n).is_some());
                }
            }
        }
    }
}
