//! A hand-written parser for BTF, the kernel's compact type format
//! (linux/Documentation/bpf/btf.rst).
//!
//! Layout of a BTF blob (little-endian): a header (magic `0xeB9F`, version 1, flags,
//! `hdr_len`, then offset/length of the type and string sections, relative to the end of the
//! header), a type section of `struct btf_type` records — 12 bytes each, `name_off`, `info`
//! (vlen in bits 0–15, kind in bits 24–28, kind_flag in bit 31) and `size_or_type` — each
//! followed by kind-specific data, and a string section of NUL-terminated names. Type ids
//! are record indices starting at 1; id 0 is `void`.
//!
//! Every kind is parsed far enough to skip it correctly; structs, unions, arrays, variables
//! and data sections are kept for lookups. The input is untrusted: the blob is fully
//! bounds-checked while parsing, and every lookup that follows type references (modifier
//! chains, nested anonymous members, arrays of arrays) is bounded in depth and work, so
//! cyclic or absurd type graphs give `None`, never a hang or a panic.

use thiserror::Error;

/// Magic number of a little-endian BTF blob.
pub const BTF_MAGIC: u16 = 0xeb9f;
const HEADER_MIN: usize = 24;
const TYPE_REC: usize = 12;
/// Longest modifier/typedef/array chain followed before giving up (real ones are < 10).
pub const MAX_TYPE_DEPTH: u32 = 32;
/// Deepest nesting of anonymous struct/union members searched (real ones are < 5).
pub const MAX_ANON_DEPTH: u32 = 16;
/// Most members examined by one member lookup (task_struct has a few hundred in total).
const MEMBER_BUDGET: u32 = 100_000;
/// Most components in a dotted member path.
const MAX_PATH_COMPONENTS: usize = 16;
/// Pointer size on the only supported target (x86-64); BTF does not record it.
pub const POINTER_SIZE: u64 = 8;
/// The data section holding per-cpu variables; their offsets in it are per-cpu offsets.
pub const PERCPU_SECTION: &str = ".data..percpu";

/// Why a BTF blob could not be parsed.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum BtfError {
    /// The blob is too short for a header; holds its length in bytes.
    #[error("BTF blob too short for a header ({0} bytes)")]
    TooShort(usize),
    /// The first two bytes are not [`BTF_MAGIC`]; holds them.
    #[error("bad BTF magic {0:#06x} (expected 0xeb9f)")]
    BadMagic(u16),
    /// The magic is byte-swapped: the blob is big-endian.
    #[error("big-endian BTF is not supported")]
    BigEndian,
    /// The header's version is not 1; holds it.
    #[error("unsupported BTF version {0} (expected 1)")]
    UnsupportedVersion(u8),
    /// The header length or a section's bounds do not fit the blob.
    #[error("bad BTF header: {0}")]
    BadHeader(String),
    /// A type record, or the data that follows it, runs past the type section.
    #[error("BTF type {id} truncated at type-section offset {offset:#x}")]
    Truncated {
        /// The id the record would have.
        id: u32,
        /// Byte offset of the record in the type section.
        offset: usize,
    },
    /// A type record has a kind this parser does not know (so it cannot be skipped).
    #[error("BTF type {id} has unknown kind {kind}")]
    UnknownKind {
        /// The record's type id.
        id: u32,
        /// The raw kind (bits 24–28 of `info`).
        kind: u8,
    },
    /// The string section does not start and end with a NUL byte.
    #[error("bad BTF string section: {0}")]
    BadStrings(String),
}

/// BTF type kinds (the number in each variant's doc is its `BTF_KIND_*` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Type id 0.
    Void,
    /// An integer type (1).
    Int,
    /// A pointer (2).
    Ptr,
    /// An array (3).
    Array,
    /// A struct (4).
    Struct,
    /// A union (5).
    Union,
    /// An enum with 32-bit values (6).
    Enum,
    /// A forward declaration of a struct or union (7).
    Fwd,
    /// A typedef (8).
    Typedef,
    /// The `volatile` qualifier (9).
    Volatile,
    /// The `const` qualifier (10).
    Const,
    /// The `restrict` qualifier (11).
    Restrict,
    /// A function; its type is a [`Kind::FuncProto`] (12).
    Func,
    /// A function prototype (13).
    FuncProto,
    /// A global variable (14).
    Var,
    /// A data section and the variables in it (15).
    Datasec,
    /// A floating-point type (16).
    Float,
    /// A declaration tag, from the `btf_decl_tag` attribute (17).
    DeclTag,
    /// A type tag, from the `btf_type_tag` attribute (18).
    TypeTag,
    /// An enum with 64-bit values (19).
    Enum64,
}

impl Kind {
    fn from_raw(kind: u8) -> Option<Kind> {
        Some(match kind {
            1 => Kind::Int,
            2 => Kind::Ptr,
            3 => Kind::Array,
            4 => Kind::Struct,
            5 => Kind::Union,
            6 => Kind::Enum,
            7 => Kind::Fwd,
            8 => Kind::Typedef,
            9 => Kind::Volatile,
            10 => Kind::Const,
            11 => Kind::Restrict,
            12 => Kind::Func,
            13 => Kind::FuncProto,
            14 => Kind::Var,
            15 => Kind::Datasec,
            16 => Kind::Float,
            17 => Kind::DeclTag,
            18 => Kind::TypeTag,
            19 => Kind::Enum64,
            _ => return None,
        })
    }

    /// Size of the kind-specific data that follows a record with `vlen`.
    fn trailing_len(self, vlen: u16) -> usize {
        let vlen = usize::from(vlen);
        match self {
            Kind::Int | Kind::Var | Kind::DeclTag => 4,
            Kind::Array => 12,
            Kind::Struct | Kind::Union | Kind::Datasec | Kind::Enum64 => 12 * vlen,
            Kind::Enum | Kind::FuncProto => 8 * vlen,
            _ => 0,
        }
    }

    /// Kinds that only qualify or rename another type (skipped by [`Btf::resolve`]).
    pub fn is_modifier(self) -> bool {
        matches!(
            self,
            Kind::Typedef | Kind::Volatile | Kind::Const | Kind::Restrict | Kind::TypeTag
        )
    }

    /// Structs and unions.
    pub fn is_composite(self) -> bool {
        matches!(self, Kind::Struct | Kind::Union)
    }
}

/// One parsed type record.
#[derive(Debug, Clone, Copy)]
struct RawType {
    kind: Kind,
    kind_flag: bool,
    vlen: u16,
    name_off: u32,
    /// Size (INT, ENUM, STRUCT, UNION, DATASEC, FLOAT, ENUM64) or referenced type id.
    size_or_type: u32,
    /// Index of the first entry in `Btf::members` (STRUCT, UNION, DATASEC) or in
    /// `Btf::arrays` (ARRAY); the INT encoding; the VAR linkage; the DECL_TAG component.
    extra: u32,
}

/// A struct/union member or a DATASEC variable record, as stored.
#[derive(Debug, Clone, Copy)]
struct RawMember {
    /// Member name (0 for an anonymous member); unused for DATASEC entries.
    name_off: u32,
    /// Member type, or the VAR type id of a DATASEC entry.
    type_id: u32,
    /// Raw member offset, or the variable's offset in its section.
    offset: u32,
    /// The variable's size (DATASEC entries only).
    size: u32,
}

#[derive(Debug, Clone, Copy)]
struct RawArray {
    elem: u32,
    nelems: u32,
}

/// A view of one type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeInfo<'a> {
    /// The type id.
    pub id: u32,
    /// What sort of type it is.
    pub kind: Kind,
    /// The type's name; `None` for anonymous types (and unreadable names).
    pub name: Option<&'a str>,
    /// `vlen`: the number of kind-specific entries (members, enumerators, parameters,
    /// section variables).
    pub vlen: u16,
    /// `kind_flag` (bit 31 of `info`); for structs and unions, members carry bitfield sizes.
    pub kind_flag: bool,
    /// Byte size for sized kinds, referenced type id for the others.
    pub size_or_type: u32,
}

/// One member of a struct or union.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Empty for anonymous members (nested anonymous structs and unions).
    pub name: String,
    /// Offset from the start of the enclosing struct, in bits.
    pub bit_offset: u64,
    /// Width of a bitfield member, 0 for ordinary members.
    pub bitfield_size: u32,
    /// The member's type id.
    pub type_id: u32,
}

/// A struct or union with its members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StructInfo {
    /// The type id.
    pub id: u32,
    /// The name; empty for an anonymous struct or union.
    pub name: String,
    /// True for a union.
    pub is_union: bool,
    /// Size in bytes.
    pub size: u64,
    /// The direct members, in declaration order (anonymous ones are not flattened).
    pub members: Vec<Member>,
}

/// Where a (possibly nested) member lies, relative to the outermost struct of the lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberLocation {
    /// Offset from the start of the outermost struct, in bits.
    pub bit_offset: u64,
    /// Width of a bitfield member in bits, 0 for ordinary members.
    pub bitfield_size: u32,
    /// The member's type id.
    pub type_id: u32,
}

impl MemberLocation {
    /// The byte offset, unless the member is a bitfield or does not start on a byte.
    pub fn byte_offset(&self) -> Option<u64> {
        (self.bitfield_size == 0 && self.bit_offset.is_multiple_of(8))
            .then_some(self.bit_offset / 8)
    }
}

/// A variable listed in a DATASEC (for vmlinux: the per-cpu variables of `.data..percpu`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VarInfo {
    /// The variable's name.
    pub name: String,
    /// Id of the VAR record.
    pub var_id: u32,
    /// Type of the variable.
    pub type_id: u32,
    /// Offset in the section (for `.data..percpu`, the per-cpu offset).
    pub offset: u64,
    /// Size in bytes, as the DATASEC records it.
    pub size: u64,
}

/// Parsed BTF. Owns a copy of its string section, so it outlives the input buffer.
#[derive(Debug, Clone)]
pub struct Btf {
    strings: Vec<u8>,
    /// Index = type id; entry 0 is `void`.
    types: Vec<RawType>,
    members: Vec<RawMember>,
    arrays: Vec<RawArray>,
}

fn rd_u16(b: &[u8], off: usize) -> Option<u16> {
    let s = b.get(off..off.checked_add(2)?)?;
    Some(u16::from_le_bytes([s[0], s[1]]))
}

fn rd_u32(b: &[u8], off: usize) -> Option<u32> {
    let s = b.get(off..off.checked_add(4)?)?;
    Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn idx(n: usize) -> u32 {
    // Vectors here are bounded by the blob size / 4, which the caller keeps below u32::MAX.
    u32::try_from(n).unwrap_or(u32::MAX)
}

impl Btf {
    /// Parses a BTF blob (e.g. the `.BTF` section of vmlinux, or `/sys/kernel/btf/vmlinux`).
    pub fn parse(bytes: &[u8]) -> Result<Btf, BtfError> {
        let magic = rd_u16(bytes, 0).ok_or(BtfError::TooShort(bytes.len()))?;
        if magic == BTF_MAGIC.swap_bytes() {
            return Err(BtfError::BigEndian);
        }
        if magic != BTF_MAGIC {
            return Err(BtfError::BadMagic(magic));
        }
        if bytes.len() < HEADER_MIN {
            return Err(BtfError::TooShort(bytes.len()));
        }
        if bytes.len() >= u32::MAX as usize {
            return Err(BtfError::BadHeader("blob larger than 4 GiB".into()));
        }
        let version = bytes[2];
        if version != 1 {
            return Err(BtfError::UnsupportedVersion(version));
        }
        let field = |off: usize| rd_u32(bytes, off).unwrap_or(0) as usize;
        let hdr_len = field(4);
        if hdr_len < HEADER_MIN || hdr_len > bytes.len() {
            return Err(BtfError::BadHeader(format!(
                "header length {hdr_len} (blob is {} bytes)",
                bytes.len()
            )));
        }
        let body = &bytes[hdr_len..];
        let section = |off: usize, len: usize, what: &str| -> Result<&[u8], BtfError> {
            off.checked_add(len)
                .and_then(|end| body.get(off..end))
                .ok_or_else(|| {
                    BtfError::BadHeader(format!(
                        "{what} section {off:#x}+{len:#x} exceeds the {:#x} bytes after the header",
                        body.len()
                    ))
                })
        };
        let type_sec = section(field(8), field(12), "type")?;
        let strings = section(field(16), field(20), "string")?;
        if strings.first().is_some_and(|&c| c != 0) || strings.last().is_some_and(|&c| c != 0) {
            return Err(BtfError::BadStrings(
                "the string section must start and end with a NUL byte".into(),
            ));
        }

        let mut types = vec![RawType {
            kind: Kind::Void,
            kind_flag: false,
            vlen: 0,
            name_off: 0,
            size_or_type: 0,
            extra: 0,
        }];
        let mut members = Vec::new();
        let mut arrays = Vec::new();
        let mut off = 0usize;
        while off < type_sec.len() {
            let id = idx(types.len());
            let truncated = BtfError::Truncated { id, offset: off };
            let rec = off
                .checked_add(TYPE_REC)
                .and_then(|end| type_sec.get(off..end))
                .ok_or(truncated.clone())?;
            let word = |i: usize| rd_u32(rec, i * 4).unwrap_or(0);
            let (name_off, info, size_or_type) = (word(0), word(1), word(2));
            let vlen = (info & 0xffff) as u16;
            let raw_kind = ((info >> 24) & 0x1f) as u8;
            let kind =
                Kind::from_raw(raw_kind).ok_or(BtfError::UnknownKind { id, kind: raw_kind })?;
            let data_start = off + TYPE_REC;
            let data_end = data_start
                .checked_add(kind.trailing_len(vlen))
                .filter(|&end| end <= type_sec.len())
                .ok_or(truncated)?;
            let data = &type_sec[data_start..data_end];
            let at = |i: usize| rd_u32(data, i).unwrap_or(0);
            let extra = match kind {
                Kind::Int | Kind::Var | Kind::DeclTag => at(0),
                Kind::Array => {
                    arrays.push(RawArray {
                        elem: at(0),
                        nelems: at(8),
                    });
                    idx(arrays.len() - 1)
                }
                Kind::Struct | Kind::Union => {
                    let first = idx(members.len());
                    members.extend(data.chunks_exact(12).map(|m| RawMember {
                        name_off: rd_u32(m, 0).unwrap_or(0),
                        type_id: rd_u32(m, 4).unwrap_or(0),
                        offset: rd_u32(m, 8).unwrap_or(0),
                        size: 0,
                    }));
                    first
                }
                Kind::Datasec => {
                    let first = idx(members.len());
                    members.extend(data.chunks_exact(12).map(|m| RawMember {
                        name_off: 0,
                        type_id: rd_u32(m, 0).unwrap_or(0),
                        offset: rd_u32(m, 4).unwrap_or(0),
                        size: rd_u32(m, 8).unwrap_or(0),
                    }));
                    first
                }
                // Enumerators and function parameters are not needed: skipped.
                _ => 0,
            };
            types.push(RawType {
                kind,
                kind_flag: info & (1 << 31) != 0,
                vlen,
                name_off,
                size_or_type,
                extra,
            });
            off = data_end;
        }
        Ok(Btf {
            strings: strings.to_vec(),
            types,
            members,
            arrays,
        })
    }

    /// Number of type ids, including `void` (valid ids are `0..len()`).
    pub fn len(&self) -> u32 {
        idx(self.types.len())
    }

    /// True if the blob declares no types besides `void`.
    pub fn is_empty(&self) -> bool {
        self.types.len() <= 1
    }

    /// The NUL-terminated string at `off` (`None` if out of range, empty or not UTF-8).
    fn str_at(&self, off: u32) -> Option<&str> {
        let rest = self.strings.get(usize::try_from(off).ok()?..)?;
        // The section ends with a NUL (checked by parse), so this always finds one.
        let end = rest.iter().position(|&c| c == 0)?;
        let s = std::str::from_utf8(&rest[..end]).ok()?;
        (!s.is_empty()).then_some(s)
    }

    /// True if the string at `off` is exactly `name` (cheap: no scan past `name.len()`).
    fn name_is(&self, off: u32, name: &str) -> bool {
        let Ok(start) = usize::try_from(off) else {
            return false;
        };
        let n = name.len();
        match start.checked_add(n) {
            Some(end) => {
                self.strings.get(start..end) == Some(name.as_bytes())
                    && self.strings.get(end) == Some(&0)
            }
            None => false,
        }
    }

    fn raw(&self, id: u32) -> Option<&RawType> {
        self.types.get(usize::try_from(id).ok()?)
    }

    fn raw_members(&self, t: &RawType) -> &[RawMember] {
        if !matches!(t.kind, Kind::Struct | Kind::Union | Kind::Datasec) {
            return &[];
        }
        let start = t.extra as usize;
        start
            .checked_add(usize::from(t.vlen))
            .and_then(|end| self.members.get(start..end))
            .unwrap_or(&[])
    }

    /// A view of type `id`.
    pub fn get(&self, id: u32) -> Option<TypeInfo<'_>> {
        let t = self.raw(id)?;
        Some(TypeInfo {
            id,
            kind: t.kind,
            name: self.str_at(t.name_off),
            vlen: t.vlen,
            kind_flag: t.kind_flag,
            size_or_type: t.size_or_type,
        })
    }

    /// The first type of `kind` called `name`.
    pub fn find(&self, kind: Kind, name: &str) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        self.types
            .iter()
            .position(|t| t.kind == kind && self.name_is(t.name_off, name))
            .map(idx)
    }

    /// The id of the struct (or, failing that, union) called `name`. When a name has
    /// several definitions, the first with members wins.
    pub fn struct_id(&self, name: &str) -> Option<u32> {
        if name.is_empty() {
            return None;
        }
        let mut first = None;
        for kind in [Kind::Struct, Kind::Union] {
            for (i, t) in self.types.iter().enumerate() {
                if t.kind == kind && self.name_is(t.name_off, name) {
                    if t.vlen > 0 {
                        return Some(idx(i));
                    }
                    first.get_or_insert(idx(i));
                }
            }
        }
        first
    }

    /// The struct (or union) called `name`, with its size and direct members.
    pub fn struct_by_name(&self, name: &str) -> Option<StructInfo> {
        self.struct_info(self.struct_id(name)?)
    }

    /// Struct or union `id` with its size and direct members.
    pub fn struct_info(&self, id: u32) -> Option<StructInfo> {
        let t = self.raw(id)?;
        if !t.kind.is_composite() {
            return None;
        }
        let members = self
            .raw_members(t)
            .iter()
            .map(|m| {
                let (bit_offset, bitfield_size) = member_bits(t, m);
                Member {
                    name: self.str_at(m.name_off).unwrap_or_default().to_string(),
                    bit_offset,
                    bitfield_size,
                    type_id: m.type_id,
                }
            })
            .collect();
        Some(StructInfo {
            id,
            name: self.str_at(t.name_off).unwrap_or_default().to_string(),
            is_union: t.kind == Kind::Union,
            size: u64::from(t.size_or_type),
            members,
        })
    }

    /// Follows typedefs and const/volatile/restrict/type-tag modifiers from `id` to the
    /// underlying type (0 for `void`). `None` for a bad id or a chain longer than
    /// [`MAX_TYPE_DEPTH`] (which includes every cycle).
    pub fn resolve(&self, id: u32) -> Option<u32> {
        let mut id = id;
        for _ in 0..=MAX_TYPE_DEPTH {
            let t = self.raw(id)?;
            if !t.kind.is_modifier() {
                return Some(id);
            }
            id = t.size_or_type;
        }
        None
    }

    /// Size in bytes of an object of type `id`: follows modifiers, multiplies out arrays,
    /// takes a variable's type. `None` for void, functions, forward declarations, bad ids,
    /// overflow and chains deeper than [`MAX_TYPE_DEPTH`].
    pub fn type_size(&self, id: u32) -> Option<u64> {
        let mut id = id;
        let mut factor: u64 = 1;
        for _ in 0..=MAX_TYPE_DEPTH {
            let t = self.raw(id)?;
            let size = match t.kind {
                Kind::Int
                | Kind::Struct
                | Kind::Union
                | Kind::Enum
                | Kind::Enum64
                | Kind::Float
                | Kind::Datasec => u64::from(t.size_or_type),
                Kind::Ptr => POINTER_SIZE,
                Kind::Array => {
                    let a = self.arrays.get(t.extra as usize)?;
                    factor = factor.checked_mul(u64::from(a.nelems))?;
                    id = a.elem;
                    continue;
                }
                Kind::Var => {
                    id = t.size_or_type;
                    continue;
                }
                k if k.is_modifier() => {
                    id = t.size_or_type;
                    continue;
                }
                _ => return None,
            };
            return factor.checked_mul(size);
        }
        None
    }

    /// Element type and element count of array type `id` (after resolving modifiers).
    pub fn array_info(&self, id: u32) -> Option<(u32, u64)> {
        let t = self.raw(self.resolve(id)?)?;
        if t.kind != Kind::Array {
            return None;
        }
        let a = self.arrays.get(t.extra as usize)?;
        Some((a.elem, u64::from(a.nelems)))
    }

    /// Finds member `name` of struct/union `id`, looking through nested anonymous structs
    /// and unions as C does.
    fn find_member(
        &self,
        id: u32,
        name: &str,
        depth: u32,
        budget: &mut u32,
    ) -> Option<MemberLocation> {
        if depth > MAX_ANON_DEPTH {
            return None;
        }
        let t = self.raw(self.resolve(id)?)?;
        if !t.kind.is_composite() {
            return None;
        }
        let members = self.raw_members(t);
        for m in members {
            *budget = budget.checked_sub(1)?;
            if self.name_is(m.name_off, name) {
                let (bit_offset, bitfield_size) = member_bits(t, m);
                return Some(MemberLocation {
                    bit_offset,
                    bitfield_size,
                    type_id: m.type_id,
                });
            }
        }
        for m in members {
            if self.str_at(m.name_off).is_some() {
                continue;
            }
            *budget = budget.checked_sub(1)?;
            if let Some(inner) = self.find_member(m.type_id, name, depth + 1, budget) {
                let (outer, _) = member_bits(t, m);
                return Some(MemberLocation {
                    bit_offset: outer.checked_add(inner.bit_offset)?,
                    ..inner
                });
            }
            if *budget == 0 {
                return None;
            }
        }
        None
    }

    /// Locates a member of struct `struct_name` by path: `"pid"`, a member of a nested
    /// anonymous struct/union (`"__state"`), or a dotted path through embedded (not
    /// pointed-to) structs such as `"thread.sp"` or `"thread_info.flags"`.
    pub fn member(&self, struct_name: &str, path: &str) -> Option<MemberLocation> {
        self.member_in(self.struct_id(struct_name)?, path)
    }

    /// Like [`Btf::member`], starting from type id `id`.
    pub fn member_in(&self, id: u32, path: &str) -> Option<MemberLocation> {
        let mut budget = MEMBER_BUDGET;
        let mut current = id;
        let mut total: u64 = 0;
        let mut found = None;
        for (i, part) in path.split('.').enumerate() {
            if part.is_empty() || i >= MAX_PATH_COMPONENTS {
                return None;
            }
            let loc = self.find_member(current, part, 0, &mut budget)?;
            total = total.checked_add(loc.bit_offset)?;
            current = loc.type_id;
            found = Some(MemberLocation {
                bit_offset: total,
                ..loc
            });
        }
        found
    }

    /// Byte offset of member `path` (see [`Btf::member`]) in struct `struct_name`; `None`
    /// if missing or a bitfield.
    pub fn member_offset(&self, struct_name: &str, path: &str) -> Option<u64> {
        self.member(struct_name, path)?.byte_offset()
    }

    /// The variables of the DATASEC called `section`.
    pub fn datasec_vars(&self, section: &str) -> Option<Vec<VarInfo>> {
        let t = self.raw(self.find(Kind::Datasec, section)?)?;
        Some(
            self.raw_members(t)
                .iter()
                .filter_map(|m| self.var_info(m))
                .collect(),
        )
    }

    fn var_info(&self, m: &RawMember) -> Option<VarInfo> {
        let var = self.raw(m.type_id)?;
        if var.kind != Kind::Var {
            return None;
        }
        Some(VarInfo {
            name: self.str_at(var.name_off)?.to_string(),
            var_id: m.type_id,
            type_id: var.size_or_type,
            offset: u64::from(m.offset),
            size: u64::from(m.size),
        })
    }

    /// Variable `name` of the DATASEC called `section`.
    pub fn datasec_var(&self, section: &str, name: &str) -> Option<VarInfo> {
        let t = self.raw(self.find(Kind::Datasec, section)?)?;
        self.raw_members(t).iter().find_map(|m| {
            let var = self.raw(m.type_id)?;
            (var.kind == Kind::Var && self.name_is(var.name_off, name))
                .then(|| self.var_info(m))
                .flatten()
        })
    }

    /// Per-cpu variable `name`: its offset is the per-cpu offset (x86-64 links
    /// `.data..percpu` at address 0), the same number `/proc/kallsyms` shows for it.
    pub fn percpu_var(&self, name: &str) -> Option<VarInfo> {
        self.datasec_var(PERCPU_SECTION, name)
    }
}

/// (bit offset, bitfield size) of member `m` of composite `t`.
fn member_bits(t: &RawType, m: &RawMember) -> (u64, u32) {
    if t.kind_flag {
        (u64::from(m.offset & 0x00ff_ffff), m.offset >> 24)
    } else {
        (u64::from(m.offset), 0)
    }
}

/// Helpers to build BTF blobs in tests (crate-visible so the profile tests can use them).
#[cfg(test)]
pub(crate) mod builder {
    use super::BTF_MAGIC;

    /// Accumulates types and strings; ids are assigned from 1 in `add` order.
    #[derive(Default)]
    pub(crate) struct BtfBuilder {
        pub(crate) types: Vec<u8>,
        pub(crate) strings: Vec<u8>,
        next_id: u32,
    }

    impl BtfBuilder {
        pub(crate) fn new() -> Self {
            BtfBuilder {
                types: Vec::new(),
                strings: vec![0],
                next_id: 1,
            }
        }

        pub(crate) fn str(&mut self, s: &str) -> u32 {
            if s.is_empty() {
                return 0;
            }
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(s.as_bytes());
            self.strings.push(0);
            off
        }

        /// Adds a raw record; returns its id.
        pub(crate) fn raw(
            &mut self,
            name: &str,
            kind: u8,
            vlen: u16,
            kflag: bool,
            size_or_type: u32,
            trailing: &[u32],
        ) -> u32 {
            let name_off = self.str(name);
            let info = u32::from(vlen) | (u32::from(kind) << 24) | (u32::from(kflag) << 31);
            for w in [name_off, info, size_or_type].iter().chain(trailing) {
                self.types.extend_from_slice(&w.to_le_bytes());
            }
            self.next_id += 1;
            self.next_id - 1
        }

        pub(crate) fn int(&mut self, name: &str, size: u32) -> u32 {
            self.raw(name, 1, 0, false, size, &[size * 8])
        }

        pub(crate) fn ptr(&mut self, to: u32) -> u32 {
            self.raw("", 2, 0, false, to, &[])
        }

        pub(crate) fn array(&mut self, elem: u32, index: u32, n: u32) -> u32 {
            self.raw("", 3, 0, false, 0, &[elem, index, n])
        }

        /// A struct (or union) with (name, type, bit offset) members.
        pub(crate) fn composite(
            &mut self,
            name: &str,
            union: bool,
            size: u32,
            members: &[(&str, u32, u32)],
        ) -> u32 {
            let mut trailing = Vec::new();
            for (n, ty, off) in members {
                trailing.push(self.str(n));
                trailing.push(*ty);
                trailing.push(*off);
            }
            let kind = if union { 5 } else { 4 };
            self.raw(name, kind, members.len() as u16, false, size, &trailing)
        }

        pub(crate) fn typedef(&mut self, name: &str, to: u32) -> u32 {
            self.raw(name, 8, 0, false, to, &[])
        }

        pub(crate) fn konst(&mut self, to: u32) -> u32 {
            self.raw("", 10, 0, false, to, &[])
        }

        pub(crate) fn var(&mut self, name: &str, ty: u32) -> u32 {
            self.raw(name, 14, 0, false, ty, &[1])
        }

        /// A DATASEC with (var id, offset, size) entries.
        pub(crate) fn datasec(&mut self, name: &str, vars: &[(u32, u32, u32)]) -> u32 {
            let trailing: Vec<u32> = vars.iter().flat_map(|(v, o, s)| [*v, *o, *s]).collect();
            self.raw(name, 15, vars.len() as u16, false, 0, &trailing)
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            let mut out = Vec::new();
            out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
            out.push(1);
            out.push(0);
            out.extend_from_slice(&24u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.types.len() as u32).to_le_bytes());
            out.extend_from_slice(&(self.strings.len() as u32).to_le_bytes());
            out.extend_from_slice(&self.types);
            out.extend_from_slice(&self.strings);
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::builder::BtfBuilder;
    use super::*;

    /// A miniature task_struct in the shape of 6.1's: thread_info first, an anonymous
    /// union holding `__state`-like members, an embedded thread struct, a bitfield.
    #[rustfmt::skip]
    fn sample() -> (Vec<u8>, u32) {
        let mut b = BtfBuilder::new();
        let ulong = b.int("long unsigned int", 8); // 1
        let uint = b.int("unsigned int", 4); // 2
        let chr = b.int("char", 1); // 3
        let ti = b.composite("thread_info", false, 16, &[("flags", ulong, 0), ("syscall_work", ulong, 64)]); // 4
        let anon_inner = b.composite("", false, 8, &[("__state", uint, 0), ("saved", uint, 32)]); // 5
        let anon_union = b.composite("", true, 8, &[("", anon_inner, 0), ("raw", ulong, 0)]); // 6
        let thread = b.composite("thread_struct", false, 32, &[("tls", ulong, 0), ("sp", ulong, 64), ("fsbase", ulong, 192)]); // 7
        let comm = b.array(chr, uint, 16); // 8
        let pid_t = b.typedef("pid_t", uint); // 9
        let cpid = b.konst(pid_t); // 10
        let ptr = b.ptr(ti); // 11
        let [n_ti, n_pid, n_comm, n_bits, n_thread, n_tip] =
            ["thread_info", "pid", "comm", "bits", "thread", "tip"].map(|n| b.str(n));
        let task = b.raw(
            "task_struct",
            4,
            7,
            true,
            96,
            &[
                n_ti, ti, 0,
                0, anon_union, 128,
                n_pid, cpid, 192,
                n_comm, comm, 256,
                n_bits, uint, (3 << 24) | 388,
                n_thread, thread, 512,
                n_tip, ptr, 640,
            ],
        ); // 12
        let v = b.var("current_task", ptr); // 13
        let v2 = b.var("cpu_number", uint); // 14
        b.datasec(PERCPU_SECTION, &[(v, 0x2_1ac0, 8), (v2, 0x2_1ae8, 4)]); // 15
        (b.build(), task)
    }

    #[test]
    fn structs_members_and_paths() {
        let (blob, task_id) = sample();
        let btf = Btf::parse(&blob).unwrap();
        assert_eq!(btf.len(), 16);
        let task = btf.struct_by_name("task_struct").unwrap();
        assert_eq!(task.id, task_id);
        assert_eq!(task.size, 96);
        assert_eq!(task.members.len(), 7);
        assert_eq!(task.members[0].name, "thread_info");
        assert_eq!(task.members[1].name, "");
        assert_eq!(task.members[4].bitfield_size, 3);
        assert_eq!(btf.member_offset("task_struct", "thread_info"), Some(0));
        assert_eq!(
            btf.member_offset("task_struct", "thread_info.flags"),
            Some(0)
        );
        assert_eq!(btf.member_offset("task_struct", "pid"), Some(24));
        assert_eq!(btf.member_offset("task_struct", "comm"), Some(32));
        // Two levels of anonymous nesting: union at 16, struct at 0 in it, saved at 4.
        assert_eq!(btf.member_offset("task_struct", "__state"), Some(16));
        assert_eq!(btf.member_offset("task_struct", "saved"), Some(20));
        assert_eq!(btf.member_offset("task_struct", "raw"), Some(16));
        assert_eq!(btf.member_offset("task_struct", "thread.sp"), Some(72));
        assert_eq!(btf.member_offset("task_struct", "thread.fsbase"), Some(88));
        // Bitfields have no byte offset but a bit location.
        assert_eq!(btf.member_offset("task_struct", "bits"), None);
        assert_eq!(btf.member("task_struct", "bits").unwrap().bit_offset, 388);
        // Paths never go through pointers; missing and malformed paths fail.
        assert_eq!(btf.member_offset("task_struct", "tip.flags"), None);
        assert_eq!(btf.member_offset("task_struct", "nope"), None);
        assert_eq!(btf.member_offset("task_struct", ""), None);
        assert_eq!(btf.member_offset("task_struct", "thread..sp"), None);
        assert_eq!(btf.member_offset("task_struct", "pid.x"), None);
        assert_eq!(btf.member_offset("no_such_struct", "pid"), None);
        // Sizes through typedef/const/arrays; resolve skips modifiers.
        let pid = btf.member("task_struct", "pid").unwrap();
        assert_eq!(btf.type_size(pid.type_id), Some(4));
        assert_eq!(
            btf.get(btf.resolve(pid.type_id).unwrap()).unwrap().name,
            Some("unsigned int")
        );
        let comm = btf.member("task_struct", "comm").unwrap();
        assert_eq!(btf.type_size(comm.type_id), Some(16));
        assert_eq!(btf.array_info(comm.type_id), Some((3, 16)));
        assert_eq!(btf.type_size(11), Some(8));
        assert_eq!(btf.type_size(0), None);
        assert_eq!(btf.resolve(0), Some(0));
        assert_eq!(btf.resolve(9999), None);
        assert_eq!(btf.get(9999), None);
        // Per-cpu variables.
        let v = btf.percpu_var("current_task").unwrap();
        assert_eq!((v.offset, v.size, v.type_id), (0x2_1ac0, 8, 11));
        assert_eq!(btf.percpu_var("cpu_number").unwrap().offset, 0x2_1ae8);
        assert_eq!(btf.percpu_var("nope"), None);
        assert_eq!(btf.datasec_vars(PERCPU_SECTION).unwrap().len(), 2);
        assert_eq!(btf.find(Kind::Typedef, "pid_t"), Some(9));
    }

    #[test]
    fn all_kinds_are_skipped_correctly() {
        let mut b = BtfBuilder::new();
        let int = b.int("int", 4); // 1 INT
        b.ptr(int); // 2 PTR
        b.array(int, int, 4); // 3 ARRAY
        b.composite("s", false, 4, &[("a", int, 0)]); // 4 STRUCT
        b.composite("u", true, 4, &[("a", int, 0), ("b", int, 0)]); // 5 UNION
        let (a, bb) = (b.str("A"), b.str("B"));
        b.raw("e", 6, 2, false, 4, &[a, 0, bb, 1]); // 6 ENUM
        b.raw("fwd", 7, 0, false, 0, &[]); // 7 FWD
        b.typedef("t", int); // 8 TYPEDEF
        b.raw("", 9, 0, false, int, &[]); // 9 VOLATILE
        b.konst(int); // 10 CONST
        b.raw("", 11, 0, false, 2, &[]); // 11 RESTRICT
        let x = b.str("x");
        let proto = b.raw("", 13, 2, false, int, &[x, int, 0, int]); // 12 FUNC_PROTO
        b.raw("f", 12, 0, false, proto, &[]); // 13 FUNC
        let v = b.var("v", int); // 14 VAR
        b.datasec(".data", &[(v, 0, 4)]); // 15 DATASEC
        b.raw("double", 16, 0, false, 8, &[]); // 16 FLOAT
        b.raw("tag", 17, 0, false, 4, &[u32::MAX]); // 17 DECL_TAG
        b.raw("user", 18, 0, false, 2, &[]); // 18 TYPE_TAG
        b.raw("e64", 19, 1, false, 8, &[a, 1, 2]); // 19 ENUM64
        b.int("after", 2); // 20
        let btf = Btf::parse(&b.build()).unwrap();
        assert_eq!(btf.len(), 21);
        let kinds: Vec<Kind> = (1..21).map(|i| btf.get(i).unwrap().kind).collect();
        #[rustfmt::skip]
        let expected = [
            Kind::Int, Kind::Ptr, Kind::Array, Kind::Struct, Kind::Union, Kind::Enum,
            Kind::Fwd, Kind::Typedef, Kind::Volatile, Kind::Const, Kind::Restrict,
            Kind::FuncProto, Kind::Func, Kind::Var, Kind::Datasec, Kind::Float,
            Kind::DeclTag, Kind::TypeTag, Kind::Enum64, Kind::Int,
        ];
        assert_eq!(kinds, expected);
        // The record after every kind still parses with the right name and size.
        assert_eq!(btf.get(20).unwrap().name, Some("after"));
        assert_eq!(btf.type_size(20), Some(2));
        assert_eq!(btf.type_size(3), Some(16));
        assert_eq!(btf.type_size(6), Some(4));
        assert_eq!(btf.type_size(9), Some(4));
        assert_eq!(btf.type_size(11), Some(8));
        assert_eq!(btf.type_size(14), Some(4));
        assert_eq!(btf.type_size(16), Some(8));
        assert_eq!(btf.type_size(18), Some(8));
        assert_eq!(btf.type_size(19), Some(8));
        assert_eq!(btf.type_size(7), None);
        assert_eq!(btf.type_size(13), None);
        assert_eq!(btf.resolve(18), Some(2));
        assert!(btf.struct_by_name("u").unwrap().is_union);
        assert_eq!(btf.member_offset("u", "b"), Some(0));
        assert_eq!(btf.datasec_var(".data", "v").unwrap().size, 4);
    }

    #[test]
    fn cyclic_and_deep_type_graphs_are_bounded() {
        let mut b = BtfBuilder::new();
        // 1 -> 2 -> 1: typedef cycle; 3 -> 3: const of itself; 4: array of itself.
        b.typedef("a", 2);
        b.typedef("b", 1);
        b.konst(3);
        b.array(4, 4, 2);
        // 5: a struct whose anonymous member is itself (and a lot of them).
        let me = 5;
        let members: Vec<(&str, u32, u32)> = (0..200).map(|_| ("", me, 0)).collect();
        b.composite("loop", false, 8, &members);
        // 6: a long but finite typedef chain (longer than MAX_TYPE_DEPTH).
        let int = b.int("int", 4); // 6
        let mut last = int;
        for i in 0..40 {
            last = b.typedef(&format!("t{i}"), last);
        }
        // Array whose size overflows u64.
        let big = b.array(int, int, u32::MAX);
        let huge = b.array(big, int, 1 << 20);
        let bigger = b.array(huge, int, u32::MAX);
        let btf = Btf::parse(&b.build()).unwrap();
        for id in 1..4 {
            assert_eq!(btf.resolve(id), None, "id {id}");
        }
        assert_eq!(btf.resolve(4), Some(4));
        for id in 1..5 {
            assert_eq!(btf.type_size(id), None, "id {id}");
        }
        let start = std::time::Instant::now();
        assert_eq!(btf.member_offset("loop", "x"), None);
        assert_eq!(btf.member_offset("loop", "x.y.z"), None);
        assert!(start.elapsed().as_secs() < 2);
        assert_eq!(btf.resolve(last), None);
        assert_eq!(btf.type_size(last), None);
        assert_eq!(btf.type_size(last - 20), Some(4));
        assert_eq!(
            btf.type_size(huge),
            Some(u64::from(u32::MAX) * 4 * (1 << 20))
        );
        assert_eq!(btf.type_size(bigger), None);
    }

    #[test]
    fn bad_headers_are_errors() {
        let (blob, _) = sample();
        assert_eq!(Btf::parse(&[]).err(), Some(BtfError::TooShort(0)));
        assert_eq!(Btf::parse(&blob[..10]).err(), Some(BtfError::TooShort(10)));
        assert_eq!(
            Btf::parse(&[0xeb, 0x9f, 1, 0]).err(),
            Some(BtfError::BigEndian)
        );
        assert_eq!(
            Btf::parse(b"ELF\0xxxx").err(),
            Some(BtfError::BadMagic(0x4c45))
        );
        let mut v2 = blob.clone();
        v2[2] = 2;
        assert_eq!(Btf::parse(&v2).err(), Some(BtfError::UnsupportedVersion(2)));
        let mut hdr = blob.clone();
        hdr[4] = 8;
        assert!(matches!(Btf::parse(&hdr), Err(BtfError::BadHeader(_))));
        let mut strlen = blob.clone();
        strlen[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Btf::parse(&strlen), Err(BtfError::BadHeader(_))));
        let mut badkind = blob.clone();
        badkind[24 + 7] = 25; // kind of type 1
        assert_eq!(
            Btf::parse(&badkind).err(),
            Some(BtfError::UnknownKind { id: 1, kind: 25 })
        );
        let mut nostrnul = blob.clone();
        let last = nostrnul.len() - 1;
        nostrnul[last] = b'x';
        assert!(matches!(
            Btf::parse(&nostrnul),
            Err(BtfError::BadStrings(_))
        ));
    }

    #[test]
    fn truncated_records_are_errors() {
        let mut b = BtfBuilder::new();
        b.composite("s", false, 4, &[("a", 0, 0), ("b", 0, 0)]);
        let mut blob = b.build();
        // Claim the struct has 3 members: its trailing data runs past the type section.
        blob[24 + 4] = 3;
        assert_eq!(
            Btf::parse(&blob).err(),
            Some(BtfError::Truncated { id: 1, offset: 0 })
        );
        // A type section that ends mid-record.
        let mut b = BtfBuilder::new();
        b.int("int", 4);
        b.types.extend_from_slice(&[1, 2, 3]);
        assert!(matches!(
            Btf::parse(&b.build()),
            Err(BtfError::Truncated { id: 2, .. })
        ));
    }

    #[test]
    fn garbage_never_panics() {
        let (blob, _) = sample();
        for len in 0..blob.len() {
            let _ = Btf::parse(&blob[..len]);
        }
        let mut seed: u64 = 0x1234_5678_9abc_def0;
        let mut rnd = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..3000 {
            let mut m = blob.clone();
            for _ in 0..1 + rnd() % 4 {
                let i = (rnd() as usize) % m.len();
                m[i] = rnd() as u8;
            }
            if let Ok(btf) = Btf::parse(&m) {
                for id in 0..btf.len() + 2 {
                    let _ = btf.type_size(id);
                    let _ = btf.resolve(id);
                    let _ = btf.struct_info(id);
                    let _ = btf.array_info(id);
                }
                for path in ["pid", "__state", "thread.sp", "thread_info.flags", "comm"] {
                    let _ = btf.member_offset("task_struct", path);
                }
                let _ = btf.percpu_var("current_task");
                let _ = btf.datasec_vars(PERCPU_SECTION);
            }
        }
    }
}
