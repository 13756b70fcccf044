//! Target `store_belief`: `redirect::stores::StoreSites::{new, covers, believe}` on
//! stores the GVM can aim anywhere (any guest-physical address, RIP and CR3), for layouts
//! `ViewLayout::for_guest` makes and views like `build_view`'s or raw.
//!
//! Promises checked besides "no panic": `believe` answers exactly as the rule in the
//! module's documentation says (a store is believed only with the view's CR3, modulo
//! PCID/flag bits and the PTI bit, to the sentinel from the stub's store, to the kernel
//! stub's slot from the kernel stub's store, to placed trap *i*'s slot from trap *i*'s
//! store — RIP at or just past the 10-byte store — and refused naming why otherwise);
//! a believed store is one `covers` accepts; `covers` is exactly the two pages.

use redirect::stores::{ForgedStore, Store, StoreSites};
use redirect::traps::{Placed, TRAPS};
use redirect::view::{View, ViewLayout, KERNEL_RETURN_SLOT, KSTUB_KVA};

use crate::codec::{Codec, Io};

const STORE_LEN: u64 = 10;
const CR3_NOT_ADDRESS: u64 = 0xfff | (1 << 12) | (1 << 63);

/// A placed trap: its index (any byte: out-of-range ones must be ignored) and address.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trap {
    /// Index in `TRAPS`.
    pub index: u8,
    /// The trapped function's address.
    pub address: u64,
}

impl Codec for Trap {
    fn io(&mut self, io: &mut Io<'_>) {
        io.u8(&mut self.index);
        io.u64(&mut self.address);
    }
}

/// One store: a kind and a raw value for each of its address, RIP and CR3.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// 0 raw; 1 in the sentinel page; 2 in the trap page; 3 a trap slot; 4 the kernel
    /// stub's slot; 5 the sentinel; 6 just below the trap page.
    pub gpa_kind: u8,
    /// See `gpa_kind`.
    pub gpa: u64,
    /// 0 raw; 1 near the stub's store; 2 near the kernel stub's; 3 near a placed trap's
    /// (which: `rip >> 8`); the low byte `% 24` is the distance from 4 bytes before it.
    pub rip_kind: u8,
    /// See `rip_kind`.
    pub rip: u64,
    /// 0 raw; 1 the view's with some non-address bits; 2 the view's with one bit flipped.
    pub cr3_kind: u8,
    /// See `cr3_kind`.
    pub cr3: u64,
}

impl Codec for Query {
    fn io(&mut self, io: &mut Io<'_>) {
        io.u8(&mut self.gpa_kind);
        io.u64(&mut self.gpa);
        io.u8(&mut self.rip_kind);
        io.u64(&mut self.rip);
        io.u8(&mut self.cr3_kind);
        io.u64(&mut self.cr3);
    }
}

/// A `store_belief` input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Case {
    /// Take `gvm_end` raw (else below 1 TiB).
    pub gvm_end_raw: bool,
    /// End of GVM RAM.
    pub gvm_end: u64,
    /// The text's first page (below 2 GiB) and length in pages.
    pub text: (u32, u16),
    /// Take the view's CR3 and stub address raw (else as `build_view` makes them).
    pub view_raw: bool,
    /// The view's CR3 (raw).
    pub view_cr3: u64,
    /// The stub's address (raw), or its user PML4 slot (`1 + n % 255`).
    pub stub: u64,
    /// The placed traps.
    pub traps: Vec<Trap>,
    /// The stores.
    pub queries: Vec<Query>,
}

impl Codec for Case {
    fn io(&mut self, io: &mut Io<'_>) {
        io.bool(&mut self.gvm_end_raw);
        io.u64(&mut self.gvm_end);
        io.u32(&mut self.text.0);
        io.u16(&mut self.text.1);
        io.bool(&mut self.view_raw);
        io.u64(&mut self.view_cr3);
        io.u64(&mut self.stub);
        io.list(&mut self.traps, 12);
        io.list(&mut self.queries, 24);
    }
}

/// Runs one input; how many stores were believed.
pub fn run(data: &[u8]) -> usize {
    check(&Case::decode(data))
}

/// Runs one case and checks every answer; how many stores were believed.
pub fn check(case: &Case) -> usize {
    let gvm_end = if case.gvm_end_raw {
        case.gvm_end
    } else {
        case.gvm_end % (1 << 40)
    };
    let start = (u64::from(case.text.0) % 0x8_0000) << 12;
    let text = (start, start + (u64::from(case.text.1) << 12));
    let Some(layout) = ViewLayout::for_guest(gvm_end, text) else {
        return 0;
    };
    let view = if case.view_raw {
        View {
            cr3: case.view_cr3,
            stub_va: case.stub,
            sentinel_va: case.stub.wrapping_add(0x1000),
            user_mappings: 0,
            tables: 0,
        }
    } else {
        let stub_va = (1 + case.stub % 255) << 39;
        View {
            cr3: layout.window_gpa,
            stub_va,
            sentinel_va: stub_va + 0x1000,
            user_mappings: 0,
            tables: 0,
        }
    };
    let placed: Vec<Placed> = case
        .traps
        .iter()
        .map(|t| Placed {
            index: usize::from(t.index) % (TRAPS.len() + 3),
            address: t.address,
        })
        .collect();
    let sites = StoreSites::new(&layout, &view, &placed);
    let sentinel = layout.sentinel_gpa;
    let trap_page = layout.trap_gpa();
    let stub_store = view.stub_va.wrapping_add(2);
    let mut believed = 0;
    for q in &case.queries {
        let gpa = match q.gpa_kind % 7 {
            0 => q.gpa,
            1 => sentinel + q.gpa % 0x1000,
            2 => trap_page + q.gpa % 0x1000,
            3 => trap_page + 8 * (q.gpa % 10),
            4 => trap_page + KERNEL_RETURN_SLOT,
            5 => sentinel,
            _ => trap_page - 1 - q.gpa % 0x2000,
        };
        // A site, from 4 bytes before it to 19 after (the store is 10 bytes long).
        let near = |site: u64| site.wrapping_add(((q.rip & 0xff) % 24).wrapping_sub(4));
        let rip = match q.rip_kind % 4 {
            0 => q.rip,
            1 => near(stub_store),
            2 => near(KSTUB_KVA),
            _ => match placed.len() {
                0 => q.rip,
                n => near(placed[(q.rip >> 8) as usize % n].address),
            },
        };
        let cr3 = match q.cr3_kind % 3 {
            0 => q.cr3,
            1 => view.cr3 | (q.cr3 & CR3_NOT_ADDRESS),
            _ => view.cr3 ^ (1 << (q.cr3 % 64)),
        };
        let covers = sites.covers(gpa);
        let in_page = |page: u64| gpa >= page && gpa - page < 0x1000;
        assert_eq!(
            covers,
            in_page(sentinel) || in_page(trap_page),
            "covers({gpa:#x})"
        );
        let got = sites.believe(gpa, rip, cr3);
        let want = rule(&layout, &view, &placed, gpa, rip, cr3);
        assert_eq!(
            got, want,
            "believe(gpa {gpa:#x}, rip {rip:#x}, cr3 {cr3:#x}) with {layout:x?}, {view:x?}, \
             {placed:x?}"
        );
        if got.is_ok() {
            assert!(covers, "believed a store to {gpa:#x} that covers refuses");
            believed += 1;
        }
    }
    believed
}

/// The rule, as the documentation of `redirect::stores` states it.
fn rule(
    layout: &ViewLayout,
    view: &View,
    placed: &[Placed],
    gpa: u64,
    rip: u64,
    cr3: u64,
) -> Result<Store, ForgedStore> {
    if cr3 & !CR3_NOT_ADDRESS != view.cr3 & !CR3_NOT_ADDRESS {
        return Err(ForgedStore::OtherAddressSpace {
            gpa,
            cr3,
            view_cr3: view.cr3,
        });
    }
    let from = |what: &'static str, site: u64, store: Store| {
        if rip == site || rip == site.wrapping_add(STORE_LEN) {
            Ok(store)
        } else {
            Err(ForgedStore::NotFromItsSite {
                what,
                gpa,
                rip,
                site,
            })
        }
    };
    if gpa == layout.sentinel_gpa {
        return from(
            "the sentinel",
            view.stub_va.wrapping_add(2),
            Store::Returned,
        );
    }
    if gpa > layout.sentinel_gpa && gpa - layout.sentinel_gpa < 0x1000 {
        return Err(ForgedStore::Stray {
            gpa,
            page: "the sentinel page",
        });
    }
    let trap_page = layout.trap_gpa();
    if gpa >= trap_page && gpa - trap_page < 0x1000 {
        let off = gpa - trap_page;
        if off == KERNEL_RETURN_SLOT {
            return from("the kernel stub's slot", KSTUB_KVA, Store::KernelReturned);
        }
        if off.is_multiple_of(8) {
            let index = (off / 8) as usize;
            // The last trap placed at an index is the one StoreSites keeps.
            let site = placed.iter().rev().find(|p| p.index == index);
            if let (Some((trap, name, _)), Some(site)) = (TRAPS.get(index), site) {
                return from(name, site.address, Store::Trapped(*trap));
            }
        }
    }
    Err(ForgedStore::Stray {
        gpa,
        page: "the trap page",
    })
}

/// Small valid cases: the stores unit tests' sites (believed and forged stores), and a
/// raw view.
pub fn seeds() -> Vec<(&'static str, Case)> {
    const TEXT: u64 = 0xffff_ffff_8100_0000;
    let q = |gpa_kind, gpa, rip_kind, rip, cr3_kind, cr3| Query {
        gpa_kind,
        gpa,
        rip_kind,
        rip,
        cr3_kind,
        cr3,
    };
    let base = Case {
        gvm_end: 0x2000_0000,
        text: (0x1000, 0x1000),
        stub: 0,
        traps: vec![
            Trap {
                index: 0,
                address: TEXT + 0x1230,
            },
            Trap {
                index: 6,
                address: TEXT + 0x9990,
            },
        ],
        queries: vec![
            q(5, 0, 1, 4, 1, 0),               // the stub's store: returned
            q(5, 0, 1, 14, 1, 0x1000),         // just past it, PTI bit: returned
            q(4, 0, 2, 14, 1, 0),              // the kernel stub: returned
            q(3, 0, 3, 4, 1, 0),               // the sleep trap
            q(3, 6, 3, (1 << 8) + 14, 1, 0),   // panic, past the store
            q(5, 0, 0, TEXT + 0x4_0000, 1, 0), // forged: a memcpy
            q(3, 6, 3, 14, 1, 0),              // forged trap: panic's slot from __schedule
            q(3, 1, 3, 4, 1, 0),               // a slot no trap uses
            q(5, 0, 1, 4, 0, 0x0123_4000),     // other page tables
            q(6, 0, 1, 4, 1, 0),               // below the trap page
        ],
        ..Case::default()
    };
    let mut raw = base.clone();
    raw.view_raw = true;
    raw.view_cr3 = 0x4000_5000;
    raw.stub = u64::MAX - 4;
    vec![("sites", base), ("raw-view", raw)]
}
