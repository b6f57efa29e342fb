//! Guest memory as the guest's code sees it: linear addresses through the guest's own page tables
//! (SDM 4.3 32-bit, 4.4 PAE, 4.5 4-level paging) down to guest-physical addresses, then to RAM.
//! Used where Keel emulates an instruction that names memory (string I/O, MMIO).

use crate::guest::GuestRam;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
}

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

fn read_u64(ram: &GuestRam, gpa: u64) -> Option<u64> {
    let b = ram.slice(gpa, 8)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    Some(u64::from_le_bytes(a))
}

fn read_u32(ram: &GuestRam, gpa: u64) -> Option<u64> {
    let b = ram.slice(gpa, 4)?;
    Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64)
}

/// A successful walk: the guest-physical address and the permissions of the whole path (a page
/// is writable or user-accessible only if every level says so, SDM 4.6), and where the entries
/// it used are (the leaf last), for their accessed and dirty flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    pub gpa: u64,
    pub writable: bool,
    pub user: bool,
    entries: [u64; 4],
    levels: usize,
}

/// Who makes a data access and how (SDM 4.6): a write or a read, in user mode (CPL 3) or
/// supervisor mode, and RFLAGS.AC, which lifts SMAP for explicit supervisor accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessKind {
    pub write: bool,
    pub user: bool,
    pub ac: bool,
}

/// A page fault to inject: error code bits P (0), W/R (1), U/S (2) as SDM 4.7 defines them; the
/// faulting linear address goes to CR2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    pub address: u64,
    pub error_code: u32,
}

const RW: u64 = 1 << 1;
const US: u64 = 1 << 2;
/// Accessed and dirty flags: bits 5 and 6 of every entry format (SDM 4.8).
const ACCESSED: u8 = 1 << 5;
const DIRTY: u8 = 1 << 6;
const CR0_WP: u64 = 1 << 16;
const CR4_SMAP: u64 = 1 << 21;

/// Walks the guest's page tables for `la`. `None` when an entry is not present, or a table lies
/// outside RAM.
pub fn walk(ram: &GuestRam, mode: &PagingMode, la: u64) -> Option<Walk> {
    if mode.cr0 & CR0_PG == 0 {
        return Some(Walk {
            gpa: la & 0xffff_ffff,
            writable: true,
            user: true,
            entries: [0; 4],
            levels: 0,
        });
    }
    let (mut writable, mut user) = (true, true);
    let (mut entries, mut levels) = ([0u64; 4], 0);
    let mut leaf = |at: u64, e: u64| {
        writable &= e & RW != 0;
        user &= e & US != 0;
        entries[levels] = at;
        levels += 1;
    };
    let gpa = if mode.efer & EFER_LMA != 0 {
        let mut table = mode.cr3 & ADDR_MASK;
        let mut found = None;
        for level in (1..=4u32).rev() {
            let shift = 12 + 9 * (level - 1);
            let at = table + ((la >> shift) & 511) * 8;
            let e = read_u64(ram, at)?;
            if e & PRESENT == 0 {
                return None;
            }
            leaf(at, e);
            if level == 1 || (level <= 3 && e & PAGE_SIZE_BIT != 0) {
                let page_mask = (1u64 << shift) - 1;
                found = Some((e & ADDR_MASK & !page_mask) | (la & page_mask));
                break;
            }
            table = e & ADDR_MASK;
        }
        found?
    } else if mode.cr4 & CR4_PAE != 0 {
        // PAE PDPTEs carry no R/W or U/S bits (SDM 4.4.1).
        let pdpte = read_u64(ram, (mode.cr3 & 0xffff_ffe0) + ((la >> 30) & 3) * 8)?;
        if pdpte & PRESENT == 0 {
            return None;
        }
        let at = (pdpte & ADDR_MASK) + ((la >> 21) & 511) * 8;
        let pde = read_u64(ram, at)?;
        if pde & PRESENT == 0 {
            return None;
        }
        leaf(at, pde);
        if pde & PAGE_SIZE_BIT != 0 {
            (pde & ADDR_MASK & !0x1f_ffff) | (la & 0x1f_ffff)
        } else {
            let at = (pde & ADDR_MASK) + ((la >> 12) & 511) * 8;
            let pte = read_u64(ram, at)?;
            if pte & PRESENT == 0 {
                return None;
            }
            leaf(at, pte);
            (pte & ADDR_MASK) | (la & 0xfff)
        }
    } else {
        let at = (mode.cr3 & 0xffff_f000) + ((la >> 22) & 1023) * 4;
        let pde = read_u32(ram, at)?;
        if pde & PRESENT == 0 {
            return None;
        }
        leaf(at, pde);
        if pde & PAGE_SIZE_BIT != 0 && mode.cr4 & CR4_PSE != 0 {
            (pde & 0xffc0_0000) | (la & 0x3f_ffff)
        } else {
            let at = (pde & 0xffff_f000) + ((la >> 12) & 1023) * 4;
            let pte = read_u32(ram, at)?;
            if pte & PRESENT == 0 {
                return None;
            }
            leaf(at, pte);
            (pte & 0xffff_f000) | (la & 0xfff)
        }
    };
    Some(Walk {
        gpa,
        writable,
        user,
        entries,
        levels,
    })
}

/// Translates a guest-linear address (no permission check).
pub fn translate(ram: &GuestRam, mode: &PagingMode, la: u64) -> Option<u64> {
    walk(ram, mode, la).map(|w| w.gpa)
}

/// Checks a data access the guest makes (or Keel makes for it, as in string I/O) the way its
/// MMU would, or says which page fault the guest should see instead (SDM 4.6.1: a write to a
/// read-only page faults in user mode, and in supervisor mode when CR0.WP = 1; a user access to
/// a supervisor page faults; with CR4.SMAP a supervisor access to a user page faults unless
/// RFLAGS.AC = 1). Protection keys (CR4.PKE) are not checked: Keel does not see the guest's PKRU.
fn check(ram: &GuestRam, mode: &PagingMode, la: u64, kind: AccessKind) -> Result<Walk, PageFault> {
    let code =
        |present: bool| (present as u32) | (kind.write as u32) << 1 | (kind.user as u32) << 2;
    let Some(w) = walk(ram, mode, la) else {
        return Err(PageFault {
            address: la,
            error_code: code(false),
        });
    };
    let write_denied = kind.write && !w.writable && (kind.user || mode.cr0 & CR0_WP != 0);
    let user_denied = kind.user && !w.user;
    let smap_denied = !kind.user && w.user && mode.cr4 & CR4_SMAP != 0 && !kind.ac;
    if write_denied || user_denied || smap_denied {
        return Err(PageFault {
            address: la,
            error_code: code(true),
        });
    }
    Ok(w)
}

/// Sets the accessed flag of every entry a walk used and, for a write, the dirty flag of the
/// leaf, as the CPU does for an access it makes (SDM 4.8). Keel's emulated accesses are the
/// guest's own: an OS that finds dirty pages by the D flag must see a page INS wrote as dirty.
fn mark_used(ram: &mut GuestRam, w: &Walk, write: bool) {
    let bytes = ram.bytes();
    for (i, &at) in w.entries[..w.levels].iter().enumerate() {
        let dirty = if write && i + 1 == w.levels { DIRTY } else { 0 };
        if let Some(b) = bytes.get_mut(at as usize) {
            *b |= ACCESSED | dirty;
        }
    }
}

/// The guest-physical bytes of one data access: a piece per 4 KiB page it touches (an access of
/// up to 8 bytes touches at most two).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pieces {
    /// (guest-physical address, length) of the bytes on each page, in address order.
    pieces: [(u64, u64); 2],
    count: usize,
}

impl Pieces {
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.pieces[..self.count].iter().copied()
    }
}

/// Translates every byte of a `len`-byte data access (1 to 8 bytes) at linear `la` with
/// [`check`]'s rules, page by page: an access that crosses a page boundary needs both pages
/// present and permitted before any byte moves, and its fault is that of the first page that
/// fails, CR2 = the first byte of the access on that page (SDM 4.7; the pages are not physically
/// contiguous in general). Once both pass, their entries get their accessed and dirty flags.
/// `linear_mask` is 0xffff_ffff outside 64-bit mode, where linear addresses wrap at 4 GiB
/// (SDM 3.4.4).
pub fn access_bytes(
    ram: &mut GuestRam,
    mode: &PagingMode,
    la: u64,
    len: u64,
    kind: AccessKind,
    linear_mask: u64,
) -> Result<Pieces, PageFault> {
    let la = la & linear_mask;
    let first = len.min(4096 - (la & 0xfff));
    let w1 = check(ram, mode, la, kind)?;
    let mut out = Pieces {
        pieces: [(w1.gpa, first), (0, 0)],
        count: 1,
    };
    let w2 = if first < len {
        let next = la.wrapping_add(first) & linear_mask;
        let w2 = check(ram, mode, next, kind)?;
        out.pieces[1] = (w2.gpa, len - first);
        out.count = 2;
        Some(w2)
    } else {
        None
    };
    for w in core::iter::once(w1).chain(w2) {
        mark_used(ram, &w, kind.write);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram(size: usize) -> GuestRam {
        let mem: &'static mut [u8] = alloc::vec![0u8; size].leak();
        // SAFETY: the leaked buffer belongs to this test alone.
        unsafe { GuestRam::new(mem, 0) }
    }

    fn put(ram: &mut GuestRam, gpa: u64, v: u64) {
        ram.bytes()[gpa as usize..gpa as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    fn access(
        ram: &GuestRam,
        mode: &PagingMode,
        la: u64,
        write: bool,
        user: bool,
    ) -> Result<u64, PageFault> {
        let kind = AccessKind {
            write,
            user,
            ac: false,
        };
        check(ram, mode, la, kind).map(|w| w.gpa)
    }

    /// 4-level paging: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000, all user and
    /// writable; PT entry 0 maps 0x9000 (user), entry 1 maps 0xa000 (supervisor).
    fn four_level(r: &mut GuestRam, cr4: u64) -> PagingMode {
        put(r, 0x1000, 0x2000 | 7);
        put(r, 0x2000, 0x3000 | 7);
        put(r, 0x3000, 0x4000 | 7);
        put(r, 0x4000, 0x9000 | 7);
        put(r, 0x4008, 0xa000 | 3);
        PagingMode {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4: CR4_PAE | cr4,
            efer: EFER_LMA,
        }
    }

    #[test]
    fn smap_stops_supervisor_accesses_to_user_pages_unless_ac_is_set() {
        // SDM 4.6.1: CR4.SMAP = 1, CPL < 3, RFLAGS.AC = 0: a data access to a user page faults
        // (P, W/R as the access); AC = 1 allows explicit accesses; supervisor pages are not
        // affected, nor user-mode accesses.
        let mut r = ram(1 << 20);
        let m = four_level(&mut r, CR4_SMAP);
        let kind = |write, user, ac| AccessKind { write, user, ac };
        let gpa = |res: Result<Walk, PageFault>| res.map(|w| w.gpa);
        assert_eq!(
            gpa(check(&r, &m, 0x10, kind(true, false, false))),
            Err(PageFault {
                address: 0x10,
                error_code: 0b011
            })
        );
        assert_eq!(
            gpa(check(&r, &m, 0x10, kind(false, false, false))),
            Err(PageFault {
                address: 0x10,
                error_code: 0b001
            })
        );
        assert_eq!(
            gpa(check(&r, &m, 0x10, kind(true, false, true))),
            Ok(0x9010)
        );
        assert_eq!(
            gpa(check(&r, &m, 0x10, kind(true, true, false))),
            Ok(0x9010)
        );
        assert_eq!(
            gpa(check(&r, &m, 0x1010, kind(true, false, false))),
            Ok(0xa010)
        );
        let no_smap = four_level(&mut r, 0);
        assert_eq!(
            gpa(check(&r, &no_smap, 0x10, kind(true, false, false))),
            Ok(0x9010)
        );
    }

    #[test]
    fn accesses_set_accessed_and_dirty_flags_once_both_pages_pass() {
        let mut r = ram(1 << 20);
        let m = four_level(&mut r, 0);
        let write = AccessKind {
            write: true,
            user: false,
            ac: false,
        };
        let read = AccessKind {
            write: false,
            ..write
        };
        let flags = |r: &mut GuestRam, at: usize| r.bytes()[at] & (ACCESSED | DIRTY);
        // A read sets A on all four levels, D nowhere.
        let p = access_bytes(&mut r, &m, 0x20, 4, read, u64::MAX).unwrap();
        assert_eq!(p.iter().collect::<alloc::vec::Vec<_>>(), [(0x9020, 4)]);
        for at in [0x1000, 0x2000, 0x3000, 0x4000] {
            assert_eq!(flags(&mut r, at), ACCESSED, "entry at {at:#x}");
        }
        // A word written across pages 0 and 1 (0x9fff, 0xa000): both leaves dirty.
        let p = access_bytes(&mut r, &m, 0xfff, 2, write, u64::MAX).unwrap();
        assert_eq!(
            p.iter().collect::<alloc::vec::Vec<_>>(),
            [(0x9fff, 1), (0xa000, 1)]
        );
        assert_eq!(flags(&mut r, 0x4000), ACCESSED | DIRTY);
        assert_eq!(flags(&mut r, 0x4008), ACCESSED | DIRTY);
        assert_eq!(flags(&mut r, 0x3000), ACCESSED, "D only in the leaf");
        // A write that faults on its second page (page 2 not present) marks nothing.
        let m = four_level(&mut r, 0); // the entries again, without A and D
        let p = access_bytes(&mut r, &m, 0x1fff, 2, write, u64::MAX);
        assert_eq!(
            p,
            Err(PageFault {
                address: 0x2000,
                error_code: 0b010
            })
        );
        assert_eq!(flags(&mut r, 0x4008), 0, "page 1's entry untouched");
    }

    #[test]
    fn four_level_with_2m_and_4k_pages() {
        let mut r = ram(1 << 20);
        // PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000: entry 0 is a 2M page at 0x400000,
        // entry 1 points to PT 0x4000 whose entry 5 maps 0x7000.
        put(&mut r, 0x1000, 0x2000 | 3);
        put(&mut r, 0x2000, 0x3000 | 3);
        put(&mut r, 0x3000, 0x40_0000 | 0x83);
        put(&mut r, 0x3008, 0x4000 | 3);
        put(&mut r, 0x4000 + 5 * 8, 0x7000 | 3);
        let m = PagingMode {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA | (1 << 8),
        };
        assert_eq!(translate(&r, &m, 0x1234), Some(0x40_1234));
        assert_eq!(translate(&r, &m, 0x20_5abc), Some(0x7abc));
        assert_eq!(translate(&r, &m, 0x20_6000), None, "not present");
        assert_eq!(translate(&r, &m, 1 << 39), None);
    }

    #[test]
    fn permissions_give_the_right_page_fault() {
        let mut r = ram(1 << 20);
        // 4-level: PML4 0x1000 -> PDPT 0x2000 -> PD 0x3000 -> PT 0x4000; page 0 read-only
        // supervisor, page 1 writable user, page 2 not present.
        put(&mut r, 0x1000, 0x2000 | 7);
        put(&mut r, 0x2000, 0x3000 | 7);
        put(&mut r, 0x3000, 0x4000 | 7);
        put(&mut r, 0x4000, 0x9000 | 1);
        put(&mut r, 0x4008, 0xa000 | 7);
        let wp = PagingMode {
            cr0: CR0_PG | CR0_WP | 1,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LMA,
        };
        assert_eq!(access(&r, &wp, 0x10, false, false), Ok(0x9010));
        assert_eq!(
            access(&r, &wp, 0x10, true, false),
            Err(PageFault {
                address: 0x10,
                error_code: 0b011
            })
        );
        assert_eq!(
            access(&r, &wp, 0x10, false, true),
            Err(PageFault {
                address: 0x10,
                error_code: 0b101
            })
        );
        assert_eq!(access(&r, &wp, 0x1010, true, true), Ok(0xa010));
        assert_eq!(
            access(&r, &wp, 0x2010, true, false),
            Err(PageFault {
                address: 0x2010,
                error_code: 0b010
            })
        );
        // Without CR0.WP the supervisor may write a read-only page.
        let nowp = PagingMode {
            cr0: CR0_PG | 1,
            ..wp
        };
        assert_eq!(access(&r, &nowp, 0x10, true, false), Ok(0x9010));
    }

    #[test]
    fn paging_off_and_32_bit() {
        let mut r = ram(1 << 20);
        let off = PagingMode {
            cr0: 1,
            cr3: 0,
            cr4: 0,
            efer: 0,
        };
        assert_eq!(translate(&r, &off, 0x1_0000_1234), Some(0x1234));
        // 32-bit paging: PD at 0x1000, entry 1 -> PT 0x2000, entry 2 -> 0x9000.
        r.bytes()[0x1004..0x1008].copy_from_slice(&(0x2003u32).to_le_bytes());
        r.bytes()[0x2008..0x200c].copy_from_slice(&(0x9003u32).to_le_bytes());
        let m = PagingMode {
            cr0: CR0_PG | 1,
            cr3: 0x1000,
            cr4: 0,
            efer: 0,
        };
        assert_eq!(translate(&r, &m, 0x40_2010), Some(0x9010));
    }
}
