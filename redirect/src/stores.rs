//! Which stores to the two unbacked pages the executor believes.
//!
//! A call ends when something stores to the sentinel page (the user stub: the system call
//! returned) or to the trap page (a patched-in trap, or the kernel stub: a kernel function
//! the executor called returned). Those pages are guest-physical addresses no memslot
//! backs, so the store exits to the VMM, which takes it for the call's result or stop.
//!
//! The GVM's page tables are part of the view's kernel half, so a hostile GVM can map some
//! kernel address of its own to either page and have a store through a pointer it planted
//! land there: a forged "the call returned 0" would commit the call's partial stores, a
//! forged trap would end it with a report of the GVM's choosing. So a store is believed
//! only when it comes from the one instruction that makes it — the stub's store, the
//! kernel stub's, or trap *i*'s patched-in store for slot *i* — with the view's page
//! tables loaded. The instruction is named by RIP, which KVM leaves either at the store
//! (not yet completed) or just past it (a completed MMIO write: `x86_emulate_instruction`
//! writes RIP back before it exits to user space), so both are accepted, nothing else.

use crate::traps::{self, Placed, Trap};
use crate::view::{View, ViewLayout, KERNEL_RETURN_SLOT, KSTUB_KVA};

/// Length of `movabs %rax, moffs64`, the store every site makes.
const STORE_LEN: u64 = 10;
/// Where the stub's store is: after its 2-byte `syscall`.
const STUB_STORE_OFFSET: u64 = 2;
/// CR3 bits that are not the table's address: PCID/flags, and the bit kernel page-table
/// isolation flips for the user half (the view's next page is its own, so accepting it
/// gives nothing away).
const CR3_NOT_ADDRESS: u64 = 0xfff | (1 << 12) | (1 << 63);

/// What a believed store means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Store {
    /// The stub stored RAX to the sentinel: the system call returned.
    Returned,
    /// The kernel stub stored RAX: a kernel function the executor called returned.
    KernelReturned,
    /// A trap's patched-in store: the call reached the trapped function.
    Trapped(Trap),
}

/// A store to the sentinel or trap page that did not come from its site.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForgedStore {
    /// The store came from an instruction that is not the page's (or the slot's) store.
    #[error(
        "a store to guest-physical {gpa:#x} ({what}) came from rip {rip:#x}, not from its \
         site at {site:#x}: the GVM's page tables map that page elsewhere; refused"
    )]
    NotFromItsSite {
        /// Which page or slot.
        what: &'static str,
        /// The stored-to guest-physical address.
        gpa: u64,
        /// The storing vCPU's RIP.
        rip: u64,
        /// The instruction that alone may make this store.
        site: u64,
    },
    /// The store was made with page tables other than the view's.
    #[error(
        "a store to guest-physical {gpa:#x} was made with cr3 {cr3:#x}, not the view's \
         {view_cr3:#x}; refused"
    )]
    OtherAddressSpace {
        /// The stored-to guest-physical address.
        gpa: u64,
        /// CR3 at the store.
        cr3: u64,
        /// The view's CR3.
        view_cr3: u64,
    },
    /// A store to either page where nothing stores: past the sentinel's first word, or to
    /// a trap-page slot no placed trap (nor the kernel stub) uses.
    #[error(
        "a store to guest-physical {gpa:#x} in {page}, where neither a stub nor a trap \
         stores; refused"
    )]
    Stray {
        /// The stored-to guest-physical address.
        gpa: u64,
        /// "the sentinel page" or "the trap page".
        page: &'static str,
    },
}

/// The sites whose stores end a call, for one view.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSites {
    sentinel_gpa: u64,
    trap_gpa: u64,
    view_cr3: u64,
    stub_store: u64,
    kstub_store: u64,
    /// Kernel-virtual address of each trap's store, by slot index.
    traps: Vec<Option<u64>>,
}

impl StoreSites {
    /// The sites of `view` (built in `layout`) with `traps` patched into its text.
    pub fn new(layout: &ViewLayout, view: &View, traps: &[Placed]) -> StoreSites {
        let mut sites = vec![None; traps::TRAPS.len()];
        for placed in traps {
            if let Some(slot) = sites.get_mut(placed.index) {
                *slot = Some(placed.address);
            }
        }
        StoreSites {
            sentinel_gpa: layout.sentinel_gpa,
            trap_gpa: layout.trap_gpa(),
            view_cr3: view.cr3,
            // The view's own stub address (a user PML4 slot, below 2^47): no wrap happens;
            // wrapping only so that no input can panic here.
            stub_store: view.stub_va.wrapping_add(STUB_STORE_OFFSET),
            kstub_store: KSTUB_KVA,
            traps: sites,
        }
    }

    /// Whether a store to `gpa` is one of the call-ending pages' at all.
    pub fn covers(&self, gpa: u64) -> bool {
        // `x - base < size` as one unsigned test: an address below `base` wraps to a huge
        // difference and is not covered. No address is derived from it.
        gpa.wrapping_sub(self.sentinel_gpa) < 0x1000 || gpa.wrapping_sub(self.trap_gpa) < 0x1000
    }

    /// What a store to `gpa` (one [`StoreSites::covers`]) made at `rip` with `cr3` means,
    /// or why it is not believed.
    pub fn believe(&self, gpa: u64, rip: u64, cr3: u64) -> Result<Store, ForgedStore> {
        if cr3 & !CR3_NOT_ADDRESS != self.view_cr3 & !CR3_NOT_ADDRESS {
            return Err(ForgedStore::OtherAddressSpace {
                gpa,
                cr3,
                view_cr3: self.view_cr3,
            });
        }
        // `site` is a trusted address (a stub or a trap in the trusted text); a wrap could
        // only make the comparison fail.
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
        if gpa == self.sentinel_gpa {
            return from("the sentinel", self.stub_store, Store::Returned);
        }
        if gpa.wrapping_sub(self.sentinel_gpa) < 0x1000 {
            return Err(ForgedStore::Stray {
                gpa,
                page: "the sentinel page",
            });
        }
        // As in `covers`: below the trap page the offset is huge and matches no slot.
        let offset = gpa.wrapping_sub(self.trap_gpa);
        if offset == KERNEL_RETURN_SLOT {
            return from(
                "the kernel stub's slot",
                self.kstub_store,
                Store::KernelReturned,
            );
        }
        if offset < 0x1000 {
            let slot = usize::try_from(offset / 8).ok();
            let site = slot.and_then(|i| self.traps.get(i).copied().flatten());
            if let (Some(trap), Some(site)) = (traps::trap_at(offset), site) {
                return from(trap_name(trap), site, Store::Trapped(trap));
            }
        }
        Err(ForgedStore::Stray {
            gpa,
            page: "the trap page",
        })
    }
}

fn trap_name(trap: Trap) -> &'static str {
    traps::TRAPS
        .iter()
        .find(|(t, _, _)| *t == trap)
        .map_or("a trap slot", |(_, name, _)| name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::traps::trap_code;
    use crate::view::{kstub_code, stub_code};

    const TEXT: u64 = 0xffff_ffff_8100_0000;

    fn sites() -> (StoreSites, ViewLayout, View) {
        let layout = ViewLayout::for_guest(0x2000_0000, (0x100_0000, 0x200_0000)).unwrap();
        let view = View {
            cr3: layout.window_gpa + 0x5000,
            stub_va: 1 << 39,
            sentinel_va: (1 << 39) + 0x1000,
            user_mappings: 0,
            tables: 0,
        };
        let placed = [
            Placed {
                index: 0,
                address: TEXT + 0x1230,
            },
            Placed {
                index: 6,
                address: TEXT + 0x9990,
            },
        ];
        (StoreSites::new(&layout, &view, &placed), layout, view)
    }

    #[test]
    fn the_sites_stores_are_believed_at_or_past_the_instruction() {
        let (s, layout, view) = sites();
        // The sites' instructions are the 10-byte stores this module assumes.
        assert_eq!(&stub_code(view.sentinel_va)[2..4], &[0x48, 0xa3]);
        assert_eq!(kstub_code()[..2], [0x48, 0xa3]);
        assert_eq!(trap_code(0)[..2], [0x48, 0xa3]);
        let stub_store = view.stub_va + 2;
        for rip in [stub_store, stub_store + 10] {
            assert_eq!(
                s.believe(layout.sentinel_gpa, rip, view.cr3),
                Ok(Store::Returned)
            );
        }
        let kslot = layout.trap_gpa() + KERNEL_RETURN_SLOT;
        assert_eq!(
            s.believe(kslot, KSTUB_KVA + 10, view.cr3),
            Ok(Store::KernelReturned)
        );
        assert_eq!(
            s.believe(layout.trap_gpa(), TEXT + 0x1230 + 10, view.cr3),
            Ok(Store::Trapped(Trap::Sleep))
        );
        assert_eq!(
            s.believe(layout.trap_gpa() + 48, TEXT + 0x9990, view.cr3 | 0x1000),
            Ok(Store::Trapped(Trap::Panic))
        );
    }

    #[test]
    fn a_store_from_anywhere_else_is_refused_naming_where_it_came_from() {
        let (s, layout, view) = sites();
        // The GVM mapped some kernel address to the sentinel, and a memcpy in the trusted
        // text stored through it: a forged "returned".
        let memcpy = TEXT + 0x4_0000;
        assert_eq!(
            s.believe(layout.sentinel_gpa, memcpy, view.cr3),
            Err(ForgedStore::NotFromItsSite {
                what: "the sentinel",
                gpa: layout.sentinel_gpa,
                rip: memcpy,
                site: view.stub_va + 2,
            })
        );
        // A forged trap: the slot of `panic`, stored from the sleep trap's site.
        let err = s
            .believe(layout.trap_gpa() + 48, TEXT + 0x1230 + 10, view.cr3)
            .unwrap_err();
        assert!(
            matches!(err, ForgedStore::NotFromItsSite { what: "panic", .. }),
            "{err}"
        );
        // Off by one past the store.
        assert!(s
            .believe(layout.sentinel_gpa, view.stub_va + 13, view.cr3)
            .is_err());
        // The kernel stub's slot from the user stub.
        assert!(s
            .believe(
                layout.trap_gpa() + KERNEL_RETURN_SLOT,
                view.stub_va + 12,
                view.cr3
            )
            .is_err());
    }

    #[test]
    fn slots_no_trap_uses_and_unaligned_stores_are_refused() {
        let (s, layout, view) = sites();
        // Slot 1 exists in TRAPS but was not placed in this view.
        assert_eq!(
            s.believe(layout.trap_gpa() + 8, TEXT + 0x1230, view.cr3),
            Err(ForgedStore::Stray {
                gpa: layout.trap_gpa() + 8,
                page: "the trap page"
            })
        );
        assert_eq!(
            s.believe(layout.trap_gpa() + 4, TEXT + 0x1230, view.cr3),
            Err(ForgedStore::Stray {
                gpa: layout.trap_gpa() + 4,
                page: "the trap page"
            })
        );
        assert_eq!(
            s.believe(layout.trap_gpa() + 0xff8, TEXT + 0x1230, view.cr3),
            Err(ForgedStore::Stray {
                gpa: layout.trap_gpa() + 0xff8,
                page: "the trap page"
            })
        );
        // Elsewhere in the sentinel page.
        assert_eq!(
            s.believe(layout.sentinel_gpa + 8, view.stub_va + 2, view.cr3),
            Err(ForgedStore::Stray {
                gpa: layout.sentinel_gpa + 8,
                page: "the sentinel page"
            })
        );
        assert!(s.covers(layout.sentinel_gpa + 8));
        assert!(s.covers(layout.trap_gpa() + 0xfff));
        assert!(!s.covers(layout.trap_gpa() + 0x1000));
        assert!(!s.covers(layout.sentinel_gpa - 1));
    }

    #[test]
    fn a_store_with_other_page_tables_is_refused() {
        let (s, layout, view) = sites();
        let gvm_cr3 = 0x0123_4000;
        assert_eq!(
            s.believe(layout.sentinel_gpa, view.stub_va + 12, gvm_cr3),
            Err(ForgedStore::OtherAddressSpace {
                gpa: layout.sentinel_gpa,
                cr3: gvm_cr3,
                view_cr3: view.cr3,
            })
        );
    }
}
