//! Guest memory as the guest's code sees it: linear addresses through the guest's own page tables
//! (SDM 4.3 32-bit, 4.4 PAE, 4.5 4- and 5-level paging) down to guest-physical addresses, then
//! to RAM. Used where Keel emulates an instruction that names memory (string I/O, MMIO).

use crate::guest::GuestRam;
use crate::vmx::{Guest64, GuestNat, Vmcs};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagingMode {
    pub cr0: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub efer: u64,
    /// MAXPHYADDR as the guest's CPUID reports it (leaf 0x80000008, EAX[7:0]): entry bits from
    /// there to 51 are reserved (SDM 4.1.4).
    pub maxphyaddr: u8,
}

impl PagingMode {
    /// The guest's paging mode from its VMCS state.
    pub fn of<V: Vmcs + ?Sized>(vmcs: &V, maxphyaddr: u8) -> Self {
        Self {
            cr0: vmcs.read(GuestNat::Cr0),
            cr3: vmcs.read(GuestNat::Cr3),
            cr4: vmcs.read(GuestNat::Cr4),
            efer: vmcs.read(Guest64::Ia32Efer),
            maxphyaddr,
        }
    }

    /// MAXPHYADDR in bits: 36 when CPUID does not report it (SDM 4.1.4), at most 52.
    fn physical_bits(&self) -> u32 {
        match self.maxphyaddr {
            0 => 36,
            m => u32::from(m).clamp(32, 52),
        }
    }
}

const CR0_PG: u64 = 1 << 31;
const CR4_PSE: u64 = 1 << 4;
const CR4_PAE: u64 = 1 << 5;
const CR4_LA57: u64 = 1 << 12;
const EFER_LMA: u64 = 1 << 10;
const PRESENT: u64 = 1;
const PAGE_SIZE_BIT: u64 = 1 << 7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

fn read_u64(ram: &GuestRam, gpa: u64) -> Option<u64> {
    ram.read_u64(gpa)
}

fn read_u32(ram: &GuestRam, gpa: u64) -> Option<u64> {
    ram.read_u32(gpa).map(u64::from)
}

/// A successful walk: the guest-physical address and the permissions of the whole path (a page
/// is writable or user-accessible only if every level says so, SDM 4.6), and where the entries
/// it used are (the leaf last), for their accessed and dirty flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Walk {
    pub gpa: u64,
    pub writable: bool,
    pub user: bool,
    entries: [u64; 5],
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

/// Why a walk found no translation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// An entry is not present.
    NotPresent,
    /// A present entry has a reserved bit set (SDM 4.7: #PF with P = 1 and RSVD = 1).
    Reserved,
    /// A paging structure lies outside the guest's RAM (at this guest-physical address): the
    /// CPU's own walk would take an EPT violation there, which Keel does not emulate.
    TableOutsideRam(u64),
}

/// Reserved bits of a present entry (SDM 4.4.2 Tables 4-8 to 4-11, 4.5.4 Tables 4-15 to 4-20):
/// address bits from MAXPHYADDR up to 51 everywhere, and bit 63 (XD) when EFER.NXE = 0;
/// `extra` adds the bits a given level and page size reserve.
fn reserved(mode: &PagingMode, e: u64, extra: u64) -> bool {
    const EFER_NXE: u64 = 1 << 11;
    let m = mode.physical_bits();
    let mut bits = ((1u64 << 52) - 1) & !((1u64 << m) - 1);
    if mode.efer & EFER_NXE == 0 {
        bits |= 1 << 63;
    }
    e & (bits | extra) != 0
}

/// Walks the guest's page tables for `la`.
pub fn walk(ram: &GuestRam, mode: &PagingMode, la: u64) -> Result<Walk, Miss> {
    if mode.cr0 & CR0_PG == 0 {
        return Ok(Walk {
            gpa: la & 0xffff_ffff,
            writable: true,
            user: true,
            entries: [0; 5],
            levels: 0,
        });
    }
    let (mut writable, mut user) = (true, true);
    let (mut entries, mut levels) = ([0u64; 5], 0);
    // Reads the entry at `at` (8 bytes if `wide`, else 4).
    let read = |at: u64, wide: bool| -> Result<u64, Miss> {
        if wide {
            read_u64(ram, at)
        } else {
            read_u32(ram, at)
        }
        .ok_or(Miss::TableOutsideRam(at))
    };
    // Entry `e` (read once, by `read`): present and without reserved bits (`extra` beyond the
    // common ones), or why not.
    let entry = |e: u64, wide: bool, extra: u64| -> Result<u64, Miss> {
        // 32-bit paging has 4-byte entries without high address bits or XD.
        let has_reserved = if wide {
            reserved(mode, e, extra)
        } else {
            e & extra != 0
        };
        if e & PRESENT == 0 {
            Err(Miss::NotPresent)
        } else if has_reserved {
            Err(Miss::Reserved)
        } else {
            Ok(e)
        }
    };
    let mut leaf = |at: u64, e: u64| {
        writable &= e & RW != 0;
        user &= e & US != 0;
        entries[levels] = at;
        levels += 1;
    };
    // Bits 20:13 of a 2 MiB page's entry, 29:13 of a 1 GiB page's.
    const LARGE_2M: u64 = 0x1f_e000;
    const LARGE_1G: u64 = 0x3fff_e000;
    let gpa = if mode.efer & EFER_LMA != 0 {
        let mut table = mode.cr3 & ADDR_MASK;
        let mut found = None;
        // 5-level paging (CR4.LA57) adds a PML5 above the PML4 (SDM 4.5.1).
        let top = if mode.cr4 & CR4_LA57 != 0 { 5 } else { 4 };
        for level in (1..=top).rev() {
            let shift = 12 + 9 * (level - 1);
            let at = table + ((la >> shift) & 511) * 8;
            // PS is reserved in a PML4E (and PML5E); bits 20:13 or 29:13 in a large page's entry.
            let e = read(at, true)?;
            let large = (2..=3).contains(&level) && e & PAGE_SIZE_BIT != 0;
            let extra = match (level, large) {
                (4 | 5, _) => PAGE_SIZE_BIT,
                (3, true) => LARGE_1G,
                (2, true) => LARGE_2M,
                _ => 0,
            };
            let e = entry(e, true, extra)?;
            leaf(at, e);
            if level == 1 || large {
                let page_mask = (1u64 << shift) - 1;
                found = Some((e & ADDR_MASK & !page_mask) | (la & page_mask));
                break;
            }
            table = e & ADDR_MASK;
        }
        found.ok_or(Miss::NotPresent)?
    } else if mode.cr4 & CR4_PAE != 0 {
        // PAE PDPTEs carry no R/W, U/S or XD bits: 2:1 and 8:5 are reserved (SDM 4.4.1).
        let at = (mode.cr3 & 0xffff_ffe0) + ((la >> 30) & 3) * 8;
        let pdpte = entry(read(at, true)?, true, 0x1e6 | 1 << 63)?;
        let at = (pdpte & ADDR_MASK) + ((la >> 21) & 511) * 8;
        let pde = read(at, true)?;
        let large = pde & PAGE_SIZE_BIT != 0;
        let pde = entry(pde, true, if large { LARGE_2M } else { 0 })?;
        leaf(at, pde);
        if large {
            (pde & ADDR_MASK & !0x1f_ffff) | (la & 0x1f_ffff)
        } else {
            let at = (pde & ADDR_MASK) + ((la >> 12) & 511) * 8;
            let pte = entry(read(at, true)?, true, 0)?;
            leaf(at, pte);
            (pte & ADDR_MASK) | (la & 0xfff)
        }
    } else {
        let at = (mode.cr3 & 0xffff_f000) + ((la >> 22) & 1023) * 4;
        let pde = read(at, false)?;
        let large = mode.cr4 & CR4_PSE != 0 && pde & PAGE_SIZE_BIT != 0;
        // A 4 MiB page's entry: bits 20:13 hold physical-address bits 39:32 (PSE-36) up to
        // MAXPHYADDR (at most 40); bits 21:(M - 19) are reserved (SDM 4.3, Table 4-4).
        let m = mode.physical_bits().min(40);
        let pde_reserved = if large {
            ((1u64 << 22) - 1) & !((1u64 << (m - 19)) - 1)
        } else {
            0
        };
        let pde = entry(pde, false, pde_reserved)?;
        leaf(at, pde);
        if large {
            let high = ((pde >> 13) & 0xff) << 32;
            (high | (pde & 0xffc0_0000) | (la & 0x3f_ffff)) & ((1u64 << m) - 1)
        } else {
            let at = (pde & 0xffff_f000) + ((la >> 12) & 1023) * 4;
            let pte = entry(read(at, false)?, false, 0)?;
            leaf(at, pte);
            (pte & 0xffff_f000) | (la & 0xfff)
        }
    };
    Ok(Walk {
        gpa,
        writable,
        user,
        entries,
        levels,
    })
}

/// Translates a guest-linear address (no permission check).
pub fn translate(ram: &GuestRam, mode: &PagingMode, la: u64) -> Option<u64> {
    walk(ram, mode, la).ok().map(|w| w.gpa)
}

/// Checks a data access the guest makes (or Keel makes for it, as in string I/O) the way its
/// MMU would, or says which page fault the guest should see instead (SDM 4.6.1: a write to a
/// read-only page faults in user mode, and in supervisor mode when CR0.WP = 1; a user access to
/// a supervisor page faults; with CR4.SMAP a supervisor access to a user page faults unless
/// RFLAGS.AC = 1). Protection keys (CR4.PKE) are not checked: Keel does not see the guest's PKRU.
pub fn check(ram: &GuestRam, mode: &PagingMode, la: u64, kind: AccessKind) -> Result<Walk, Fault> {
    let fault = |bits: u32| {
        Fault::Page(PageFault {
            address: la,
            error_code: bits | (kind.write as u32) << 1 | (kind.user as u32) << 2,
        })
    };
    let w = match walk(ram, mode, la) {
        Ok(w) => w,
        Err(Miss::NotPresent) => return Err(fault(0)),
        Err(Miss::Reserved) => return Err(fault(PF_P | PF_RSVD)),
        Err(Miss::TableOutsideRam(gpa)) => return Err(Fault::TableOutsideRam(gpa)),
    };
    let write_denied = kind.write && !w.writable && (kind.user || mode.cr0 & CR0_WP != 0);
    let user_denied = kind.user && !w.user;
    let smap_denied = !kind.user && w.user && mode.cr4 & CR4_SMAP != 0 && !kind.ac;
    if write_denied || user_denied || smap_denied {
        return Err(fault(PF_P));
    }
    Ok(w)
}

/// #PF error code bits (SDM 4.7): the page was present, a reserved bit was set.
const PF_P: u32 = 1;
const PF_RSVD: u32 = 1 << 3;

/// Why Keel cannot make a data access for the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The guest's CPU would raise this #PF.
    Page(PageFault),
    /// A paging structure lies outside RAM, at this guest-physical address (the CPU's walk
    /// would exit; Keel stops such a guest, `exits::ept`).
    TableOutsideRam(u64),
}

/// Sets the accessed flag of every entry a walk used and, for a write, the dirty flag of the
/// leaf, as the CPU does for an access it makes (SDM 4.8). Keel's emulated accesses are the
/// guest's own: an OS that finds dirty pages by the D flag must see a page INS wrote as dirty.
fn mark_used(ram: &mut GuestRam, w: &Walk, write: bool) {
    for (i, &at) in w.entries[..w.levels].iter().enumerate() {
        let dirty = if write && i + 1 == w.levels { DIRTY } else { 0 };
        // The walk read every entry from RAM, so each is there.
        let _ = ram.fetch_or_u8(at, ACCESSED | dirty);
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
) -> Result<Pieces, Fault> {
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
    ) -> Result<u64, Fault> {
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
            maxphyaddr: 40,
        }
    }

    fn read_at(r: &GuestRam, m: &PagingMode, la: u64) -> Result<u64, Fault> {
        let kind = AccessKind {
            write: false,
            user: false,
            ac: false,
        };
        check(r, m, la, kind).map(|w| w.gpa)
    }

    fn rsvd(address: u64) -> Result<u64, Fault> {
        // P | RSVD, a supervisor read.
        Err(Fault::Page(PageFault {
            address,
            error_code: 0b1001,
        }))
    }

    #[test]
    fn reserved_bits_in_an_entry_give_a_page_fault_with_rsvd() {
        // SDM 4.5.4 / 4.7: a present entry with a reserved bit set: #PF with P = 1, RSVD = 1.
        let mut r = ram(1 << 20);
        let mut m = four_level(&mut r, 0);
        assert_eq!(read_at(&r, &m, 0x10), Ok(0x9010));
        // An address bit at or above MAXPHYADDR (40).
        put(&mut r, 0x4000, 0x9000 | 7 | 1 << 40);
        assert_eq!(read_at(&r, &m, 0x10), rsvd(0x10));
        // XD is reserved while EFER.NXE = 0, and no obstacle to a data access with NXE = 1.
        put(&mut r, 0x4000, 0x9000 | 7 | 1 << 63);
        assert_eq!(read_at(&r, &m, 0x10), rsvd(0x10));
        m.efer |= 1 << 11;
        assert_eq!(read_at(&r, &m, 0x10), Ok(0x9010));
        // PS in a PML4E; bit 13 of a 2 MiB page's PDE.
        put(&mut r, 0x1000, 0x2000 | 7 | PAGE_SIZE_BIT);
        assert_eq!(read_at(&r, &m, 0x10), rsvd(0x10));
        put(&mut r, 0x1000, 0x2000 | 7);
        put(&mut r, 0x3008, 0x40_0000 | 7 | PAGE_SIZE_BIT | 1 << 13);
        assert_eq!(read_at(&r, &m, 0x20_0010), rsvd(0x20_0010));
        put(&mut r, 0x3008, 0x40_0000 | 7 | PAGE_SIZE_BIT);
        assert_eq!(read_at(&r, &m, 0x20_0010), Ok(0x40_0010));
        // PAE: a PDPTE with R/W set (bits 2:1 are reserved there).
        let pae = PagingMode {
            cr0: CR0_PG | 1,
            cr3: 0x5000,
            cr4: CR4_PAE,
            efer: 0,
            maxphyaddr: 40,
        };
        put(&mut r, 0x4000, 0x9000 | 7); // no XD: the PAE mode here has NXE = 0
        put(&mut r, 0x5000, 0x3000 | 1);
        assert_eq!(read_at(&r, &pae, 0x10), Ok(0x9010));
        put(&mut r, 0x5000, 0x3000 | 3);
        assert_eq!(read_at(&r, &pae, 0x10), rsvd(0x10));
        // 32-bit paging, a 4 MiB page: bit 21 is reserved; bits 20:13 are address bits 39:32.
        let pse = PagingMode {
            cr0: CR0_PG | 1,
            cr3: 0x6000,
            cr4: CR4_PSE,
            efer: 0,
            maxphyaddr: 36,
        };
        r.bytes()[0x6000..0x6004].copy_from_slice(&(0x0040_2083u32).to_le_bytes());
        assert_eq!(read_at(&r, &pse, 0x10), Ok(0x1_0040_0010));
        r.bytes()[0x6000..0x6004].copy_from_slice(&(0x0060_0083u32).to_le_bytes());
        assert_eq!(read_at(&r, &pse, 0x10), rsvd(0x10));
        // With MAXPHYADDR 36, bit 17 (address bit 36) is reserved too.
        r.bytes()[0x6000..0x6004].copy_from_slice(&(0x0042_0083u32).to_le_bytes());
        assert_eq!(read_at(&r, &pse, 0x10), rsvd(0x10));
    }

    #[test]
    fn page_tables_outside_ram_are_not_a_page_fault() {
        // The CPU's own walk would exit (an EPT violation on the table), which Keel does not
        // turn into a #PF.
        let mut r = ram(1 << 20);
        let mut m = four_level(&mut r, 0);
        m.cr3 = 0x20_0000;
        assert_eq!(
            read_at(&r, &m, 0x10),
            Err(Fault::TableOutsideRam(0x20_0000))
        );
        let m = four_level(&mut r, 0);
        put(&mut r, 0x3000, 0x30_0000 | 7);
        assert_eq!(
            read_at(&r, &m, 0x10),
            Err(Fault::TableOutsideRam(0x30_0000))
        );
    }

    #[test]
    fn smap_stops_supervisor_accesses_to_user_pages_unless_ac_is_set() {
        // SDM 4.6.1: CR4.SMAP = 1, CPL < 3, RFLAGS.AC = 0: a data access to a user page faults
        // (P, W/R as the access); AC = 1 allows explicit accesses; supervisor pages are not
        // affected, nor user-mode accesses.
        let mut r = ram(1 << 20);
        let m = four_level(&mut r, CR4_SMAP);
        let kind = |write, user, ac| AccessKind { write, user, ac };
        let gpa = |res: Result<Walk, Fault>| res.map(|w| w.gpa);
        assert_eq!(
            gpa(check(&r, &m, 0x10, kind(true, false, false))),
            Err(Fault::Page(PageFault {
                address: 0x10,
                error_code: 0b011
            }))
        );
        assert_eq!(
            gpa(check(&r, &m, 0x10, kind(false, false, false))),
            Err(Fault::Page(PageFault {
                address: 0x10,
                error_code: 0b001
            }))
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
            Err(Fault::Page(PageFault {
                address: 0x2000,
                error_code: 0b010
            }))
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
            maxphyaddr: 40,
        };
        assert_eq!(translate(&r, &m, 0x1234), Some(0x40_1234));
        assert_eq!(translate(&r, &m, 0x20_5abc), Some(0x7abc));
        assert_eq!(translate(&r, &m, 0x20_6000), None, "not present");
        assert_eq!(translate(&r, &m, 1 << 39), None);
    }

    #[test]
    fn five_level_paging_walks_the_pml5() {
        // CR4.LA57: PML5 0x5000 entry 1 (linear bit 48) -> PML4 0x1000 -> ... -> 0x9000.
        let mut r = ram(1 << 20);
        let mut m = four_level(&mut r, 0);
        m.cr4 |= CR4_LA57;
        m.cr3 = 0x5000;
        put(&mut r, 0x5008, 0x1000 | 7);
        assert_eq!(translate(&r, &m, 1 << 48 | 0x10), Some(0x9010));
        assert_eq!(translate(&r, &m, 0x10), None, "PML5 entry 0 not present");
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
            maxphyaddr: 40,
        };
        assert_eq!(access(&r, &wp, 0x10, false, false), Ok(0x9010));
        assert_eq!(
            access(&r, &wp, 0x10, true, false),
            Err(Fault::Page(PageFault {
                address: 0x10,
                error_code: 0b011
            }))
        );
        assert_eq!(
            access(&r, &wp, 0x10, false, true),
            Err(Fault::Page(PageFault {
                address: 0x10,
                error_code: 0b101
            }))
        );
        assert_eq!(access(&r, &wp, 0x1010, true, true), Ok(0xa010));
        assert_eq!(
            access(&r, &wp, 0x2010, true, false),
            Err(Fault::Page(PageFault {
                address: 0x2010,
                error_code: 0b010
            }))
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
            maxphyaddr: 40,
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
            maxphyaddr: 40,
        };
        assert_eq!(translate(&r, &m, 0x40_2010), Some(0x9010));
    }
}
