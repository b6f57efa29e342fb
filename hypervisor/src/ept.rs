//! Extended page tables (SDM 29.3 "The Extended Page Table Mechanism"): each guest's map from
//! guest-physical to host-physical addresses.
//!
//! [`Ept`] builds a 4-level structure (PML4, PDPT, PD, PT) through a [`TableAlloc`], using the
//! largest leaf that fits: 1 GiB (when enabled), 2 MiB, else 4 KiB. It refuses overlapping or
//! misaligned maps rather than silently replacing entries. An unmapped subtree's tables stay
//! owned; the only tables freed while the `Ept` lives are page tables [`Ept::merge_to_2m`] made
//! redundant, and only once the caller has invalidated the EPT ([`Ept::free_retired`]). Dropping
//! the `Ept` gives every table it allocated back to its [`TableAlloc`], so a guest that is refused
//! or destroyed keeps none.
//!
//! After removing entries from a live EPT the caller must INVEPT the context before the guest runs
//! again: [`Ept::unmap`] returns a [`StaleTranslations`] that says so and may not be ignored.
//! [`Ept::map`] needs none: it only fills entries that were not present, and the processor caches
//! no translation through a not-present entry (an EPT violation invalidates what it used,
//! SDM 29.4.3.1).

use alloc::vec::Vec;
use bitflags::bitflags;
use core::fmt;

bitflags! {
    /// Access rights of an EPT entry, bits 2:0 (SDM 29.3.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct EptPerms: u8 {
        const READ = 1 << 0;
        const WRITE = 1 << 1;
        const EXECUTE = 1 << 2;
        const RW = Self::READ.bits() | Self::WRITE.bits();
        const RX = Self::READ.bits() | Self::EXECUTE.bits();
        const RWX = Self::READ.bits() | Self::WRITE.bits() | Self::EXECUTE.bits();
    }
}

/// EPT memory type of a leaf, bits 5:3 (SDM 29.3.7; values from SDM 12.3, Table 12-2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum MemType {
    Uncacheable = 0,
    WriteCombining = 1,
    WriteThrough = 4,
    WriteProtected = 5,
    WriteBack = 6,
}

impl MemType {
    /// `None` for the reserved values 2, 3 and 7 (an EPT misconfiguration, SDM 29.3.3.1).
    pub const fn from_bits(bits: u8) -> Option<Self> {
        match bits {
            0 => Some(Self::Uncacheable),
            1 => Some(Self::WriteCombining),
            4 => Some(Self::WriteThrough),
            5 => Some(Self::WriteProtected),
            6 => Some(Self::WriteBack),
            _ => None,
        }
    }
}

/// Where EPT tables come from: Keel's frame allocator in the kernel, a heap in tests.
pub trait TableAlloc {
    /// A zeroed 4 KiB table; returns its host-physical address.
    fn alloc_table(&mut self) -> Option<u64>;
    /// The table at `hpa`, which this allocator handed out.
    fn table(&mut self, hpa: u64) -> &mut [u64; 512];
    /// Takes back a table this allocator handed out; it is not used again.
    fn free_table(&mut self, hpa: u64);
}

/// Tables from an allocator the caller keeps (tests look at it after the `Ept` is gone).
impl<A: TableAlloc> TableAlloc for &mut A {
    fn alloc_table(&mut self) -> Option<u64> {
        (**self).alloc_table()
    }
    fn table(&mut self, hpa: u64) -> &mut [u64; 512] {
        (**self).table(hpa)
    }
    fn free_table(&mut self, hpa: u64) {
        (**self).free_table(hpa)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EptError {
    /// Addresses and length must be multiples of 4 KiB.
    Misaligned {
        gpa: u64,
        hpa: u64,
        len: u64,
    },
    EmptyRange,
    /// The range runs past the 48-bit guest-physical space of a 4-level EPT or the 52-bit
    /// host-physical space.
    OutOfRange {
        gpa: u64,
        len: u64,
    },
    /// Part of the range is already mapped, starting at `gpa`.
    Overlap {
        gpa: u64,
    },
    /// Leaves must be readable: write-only and execute-only entries are misconfigurations on
    /// processors without those features (SDM 29.3.3.1), and none-at-all is "not present".
    BadPermissions(EptPerms),
    OutOfMemory,
}

impl fmt::Display for EptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::Misaligned { gpa, hpa, len } => write!(
                f,
                "EPT map not 4 KiB aligned: gpa {gpa:#x}, hpa {hpa:#x}, length {len:#x}"
            ),
            Self::EmptyRange => f.write_str("EPT map of zero length"),
            Self::OutOfRange { gpa, len } => write!(
                f,
                "EPT range {gpa:#x}+{len:#x} exceeds the 48-bit guest-physical or 52-bit host-physical space"
            ),
            Self::Overlap { gpa } => write!(f, "EPT map overlaps an existing mapping at {gpa:#x}"),
            Self::BadPermissions(p) => write!(f, "EPT permissions {p:?} lack READ"),
            Self::OutOfMemory => f.write_str("out of memory for EPT tables"),
        }
    }
}

/// Guest-physical addresses a 4-level EPT translates (SDM 29.3.2: bits 47:0).
pub const GPA_LIMIT: u64 = 1 << 48;
/// Host-physical addresses an entry can hold (bits 51:12).
const HPA_LIMIT: u64 = 1 << 52;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const LARGE: u64 = 1 << 7;
/// Set by the processor in a leaf it wrote through, when the EPTP enables accessed and dirty
/// flags (SDM Vol. 3C 29.3.5 "Accessed and Dirty Flags for EPT"; bit 8 is the accessed flag).
const DIRTY: u64 = 1 << 9;
const ACCESSED: u64 = 1 << 8;
/// EPTP bit 6: accessed and dirty flags on (SDM 25.6.11).
const EPTP_ACCESSED_DIRTY: u64 = 1 << 6;
const PAGE: u64 = 4096;
/// Bits of a leaf below the address: permissions, memory type, ignore-PAT, large.
const LEAF_ATTRS: u64 = 0xff;

/// Bytes one entry of a table at `level` covers (1 = PT: 4 KiB ... 4 = PML4: 512 GiB).
const fn entry_size(level: u8) -> u64 {
    1 << (12 + 9 * (level as u32 - 1))
}

const fn entry_index(gpa: u64, level: u8) -> usize {
    ((gpa >> (12 + 9 * (level as u32 - 1))) & 511) as usize
}

const fn present(entry: u64) -> bool {
    entry & 7 != 0
}

const fn is_leaf(entry: u64, level: u8) -> bool {
    level == 1 || entry & LARGE != 0
}

/// Translations cached under `eptp` may be out of date: the caller must run the INVEPT that
/// `vmx::FlushPolicy::for_ept(eptp)` picks before a guest runs on this EPT again.
#[must_use = "run FlushPolicy::for_ept(eptp) before the guest runs again (SDM 29.4.3.1)"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleTranslations {
    pub eptp: u64,
}

/// A present entry an [`Ept::walk`] reached: where it is, its level (1 = PT), whether it is a
/// leaf, the guest-physical address it starts at, and the part `[from, to)` of the walked range
/// it covers.
#[derive(Debug, Clone, Copy)]
struct Slot {
    /// The table the entry is in, and its index there.
    table: u64,
    index: usize,
    level: u8,
    leaf: bool,
    start: u64,
    from: u64,
    to: u64,
}

impl Slot {
    /// The range covers the whole entry.
    fn whole(&self) -> bool {
        self.from == self.start && self.to == self.start + entry_size(self.level)
    }
}

/// What [`Ept::merge_to_2m`] did: the 2 MiB leaves it made, and the EPTP to invalidate before
/// the guest runs again and before [`Ept::free_retired`].
#[must_use = "invalidate the EPT, then free_retired (SDM 29.4.3.1)"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Merged {
    pub pages: u64,
    pub stale: StaleTranslations,
}

/// Where an [`Ept::walk`] goes after visiting an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// To the next entry at the same level.
    Next,
    /// Into the table below the entry first; a large leaf is split into one.
    Descend,
    /// Nowhere: the walk ends.
    Stop,
}

/// The leaf work of a walk: sees an entry (and may change it) and says where to go next.
type Visitor<'a> = dyn FnMut(Slot, &mut u64) -> Step + 'a;

/// One EPT hierarchy.
pub struct Ept<A: TableAlloc> {
    alloc: A,
    /// Every table, the PML4 first.
    tables: Vec<u64>,
    /// Page tables a merge took out of the hierarchy, which the processor may still reach
    /// through cached entries until the EPT is invalidated ([`Ept::free_retired`]).
    retired: Vec<u64>,
    pages_1g: bool,
    pages_2m: bool,
    accessed_dirty: bool,
}

impl<A: TableAlloc> Ept<A> {
    /// An empty EPT (one zeroed PML4). `pages_1g` allows 1 GiB leaves; pass
    /// `VmxCaps::ept_1g_pages()`. 2 MiB leaves are used unless [`set_2m_pages`](Self::set_2m_pages)
    /// turns them off.
    pub fn new(mut alloc: A, pages_1g: bool) -> Result<Self, EptError> {
        let root = alloc.alloc_table().ok_or(EptError::OutOfMemory)?;
        Ok(Self {
            alloc,
            tables: alloc::vec![root],
            retired: Vec::new(),
            pages_1g,
            pages_2m: true,
            accessed_dirty: false,
        })
    }

    /// Allow or forbid 2 MiB leaves for later maps (`VmxCaps::ept_2m_pages()`).
    pub fn set_2m_pages(&mut self, enabled: bool) {
        self.pages_2m = enabled;
    }

    /// Turns the accessed and dirty flags on or off in [`eptp`](Self::eptp) (pass
    /// `VmxCaps::ept_accessed_dirty()`): with them on the processor marks every leaf it writes
    /// through (bit 9), which [`take_dirty`](Self::take_dirty) collects. Set before the EPTP is
    /// first written to a VMCS. (With them on, the processor's accesses to the guest's own page
    /// tables count as writes, SDM 29.3.5: those pages show as dirty too.)
    pub fn set_accessed_dirty(&mut self, enabled: bool) {
        self.accessed_dirty = enabled;
    }

    /// Whether the EPTP enables the accessed and dirty flags.
    pub fn accessed_dirty(&self) -> bool {
        self.accessed_dirty
    }

    /// The EPT pointer for the VMCS (SDM 25.6.11): PML4 address, write-back paging-structure
    /// memory type (6) in bits 2:0, page-walk length minus one (3) in bits 5:3, accessed/dirty
    /// flags in bit 6 when [`set_accessed_dirty`](Self::set_accessed_dirty) turned them on.
    pub fn eptp(&self) -> u64 {
        let ad = if self.accessed_dirty {
            EPTP_ACCESSED_DIRTY
        } else {
            0
        };
        self.tables[0] | ad | (3 << 3) | MemType::WriteBack as u64
    }

    /// Splits every 2 MiB and 1 GiB leaf that covers part of `[gpa, gpa + len)` down to 4 KiB
    /// leaves with the same translation and attributes, so that dirty tracking sees single
    /// pages. A large leaf that sticks out of the range is split whole. The processor may hold
    /// the large translations: the result says which EPTP to invalidate. Tables already split
    /// stay until [`merge_to_2m`](Self::merge_to_2m). On `OutOfMemory` part may be split; the
    /// translation is the same either way.
    pub fn split_to_4k(&mut self, gpa: u64, len: u64) -> Result<StaleTranslations, EptError> {
        let end = self.range_end(gpa, len)?;
        // Down every present entry above the PTs: a large leaf is split to go down.
        self.walk(gpa, end, &mut |slot, _| {
            if slot.level > 1 {
                Step::Descend
            } else {
                Step::Next
            }
        })?;
        Ok(StaleTranslations { eptp: self.eptp() })
    }

    /// Undoes [`split_to_4k`](Self::split_to_4k) where it can: every page table under a 2 MiB
    /// entry wholly inside `[gpa, gpa + len)` whose 512 entries still map one 2 MiB-aligned,
    /// contiguous host block with the same rights, memory type and ignore-PAT bit becomes one
    /// 2 MiB leaf again (with the accessed and dirty flags of any of its pages). A table with a
    /// hole (a page ballooned out), a page on another frame or other rights stays. A 1 GiB leaf
    /// split before comes back as 2 MiB leaves. Returns how many 2 MiB leaves it made; nothing
    /// when 2 MiB leaves are off.
    ///
    /// The processor may hold the 4 KiB translations and the entries that lead to the old page
    /// tables (SDM 29.4.3.1): the caller runs the INVEPT the result names, and only then gives
    /// the old tables back with [`free_retired`](Self::free_retired), so that no cached entry
    /// leads into a frame that serves something else.
    pub fn merge_to_2m(&mut self, gpa: u64, len: u64) -> Result<Merged, EptError> {
        let end = self.range_end(gpa, len)?;
        let mut pts = Vec::new();
        if self.leaf_allowed(2) {
            self.walk(gpa, end, &mut |slot, entry| match slot.level {
                2 if !slot.leaf && slot.whole() => {
                    pts.push((slot.table, slot.index, *entry & ADDR_MASK));
                    Step::Next
                }
                3 | 4 if !slot.leaf => Step::Descend,
                _ => Step::Next,
            })?;
        }
        let mut pages = 0;
        for (pd, index, pt) in pts {
            if let Some(leaf) = self.merged_leaf(pt) {
                self.alloc.table(pd)[index] = leaf;
                self.tables.retain(|&t| t != pt);
                self.retired.push(pt);
                pages += 1;
            }
        }
        Ok(Merged {
            pages,
            stale: StaleTranslations { eptp: self.eptp() },
        })
    }

    /// The 2 MiB leaf that translates as the page table `pt` does, if one can.
    fn merged_leaf(&mut self, pt: u64) -> Option<u64> {
        let entries = self.alloc.table(pt);
        let base = entries[0] & ADDR_MASK;
        // Rights, memory type, ignore-PAT and the bits above the address must agree.
        let kind = |e: u64| e & !(ADDR_MASK | ACCESSED | DIRTY);
        let same = kind(entries[0]);
        if !base.is_multiple_of(entry_size(2)) {
            return None;
        }
        let mut flags = 0;
        for (i, &e) in entries.iter().enumerate() {
            if !present(e) || e & ADDR_MASK != base + i as u64 * PAGE || kind(e) != same {
                return None;
            }
            flags |= e & (ACCESSED | DIRTY);
        }
        Some(base | same | flags | LARGE)
    }

    /// Gives back the page tables [`merge_to_2m`](Self::merge_to_2m) took out; call it after the
    /// INVEPT that merge asked for.
    pub fn free_retired(&mut self) {
        for t in self.retired.drain(..) {
            self.alloc.free_table(t);
        }
    }

    /// Collects and clears the dirty flags of the leaves in `[gpa, gpa + len)`: `dirty(page)`
    /// for every 4 KiB page written since its flag was last cleared (every page of a large leaf
    /// that is dirty; split first with [`split_to_4k`](Self::split_to_4k) for single pages).
    /// The processor sets a dirty flag only when it walks the tables, and it may keep the
    /// translation it used with the flag set (SDM 29.3.5, 29.4.3.1): the caller must run the
    /// INVEPT the result names before the guest runs again, or later writes go unseen.
    pub fn take_dirty(
        &mut self,
        gpa: u64,
        len: u64,
        dirty: &mut dyn FnMut(u64),
    ) -> Result<StaleTranslations, EptError> {
        let end = self.range_end(gpa, len)?;
        // Only tables are gone down, so nothing is split (and nothing can fail).
        self.walk(gpa, end, &mut |slot, entry| {
            if !slot.leaf {
                return Step::Descend;
            }
            if *entry & DIRTY != 0 {
                *entry &= !DIRTY;
                let mut page = slot.start;
                while page < slot.start + entry_size(slot.level) {
                    dirty(page);
                    page += PAGE;
                }
            }
            Step::Next
        })?;
        Ok(StaleTranslations { eptp: self.eptp() })
    }

    /// The end of `[gpa, gpa + len)`, a 4 KiB-aligned range within the guest-physical space.
    fn range_end(&self, gpa: u64, len: u64) -> Result<u64, EptError> {
        if !(gpa | len).is_multiple_of(PAGE) {
            return Err(EptError::Misaligned { gpa, hpa: 0, len });
        }
        gpa.checked_add(len)
            .filter(|&e| e <= GPA_LIMIT)
            .ok_or(EptError::OutOfRange { gpa, len })
    }

    /// Number of 4 KiB tables in use (the memory overhead of this EPT).
    pub fn tables_used(&self) -> usize {
        self.tables.len()
    }

    /// Host-physical addresses of every table, the PML4 first.
    pub fn tables(&self) -> &[u64] {
        &self.tables
    }

    /// Maps `len` bytes of guest-physical memory at `gpa` to host-physical `hpa`. All three must
    /// be 4 KiB multiples and the range must be unmapped. On error nothing is mapped.
    pub fn map(
        &mut self,
        gpa: u64,
        hpa: u64,
        len: u64,
        perms: EptPerms,
        mem_type: MemType,
    ) -> Result<(), EptError> {
        if !(gpa | hpa | len).is_multiple_of(PAGE) {
            return Err(EptError::Misaligned { gpa, hpa, len });
        }
        if len == 0 {
            return Err(EptError::EmptyRange);
        }
        let end = gpa
            .checked_add(len)
            .filter(|&e| e <= GPA_LIMIT)
            .ok_or(EptError::OutOfRange { gpa, len })?;
        if hpa.checked_add(len).is_none_or(|e| e > HPA_LIMIT) {
            return Err(EptError::OutOfRange { gpa, len });
        }
        if !perms.contains(EptPerms::READ) {
            return Err(EptError::BadPermissions(perms));
        }
        if let Some(at) = self.first_mapped(gpa, end) {
            return Err(EptError::Overlap { gpa: at });
        }
        let attrs = u64::from(perms.bits()) | ((mem_type as u64) << 3);
        let delta = hpa.wrapping_sub(gpa);
        let root = self.tables[0];
        let result = self.map_range(root, 4, gpa, end, delta, attrs);
        if result.is_err() {
            // Undo the part that was mapped; it lies wholly inside the range, so no split (and no
            // allocation) is needed.
            let _ = self.unmap_range(gpa, end);
        }
        result
    }

    /// Removes every mapping in `[gpa, gpa + len)`; holes are fine. A large page that straddles
    /// an end is split (which may need tables, hence `OutOfMemory`). The processor may still hold
    /// the removed translations: the result says which EPTP to invalidate (SDM 29.4.3.1); on
    /// error part of the range may be unmapped, so the caller invalidates then too.
    pub fn unmap(&mut self, gpa: u64, len: u64) -> Result<StaleTranslations, EptError> {
        if !(gpa | len).is_multiple_of(PAGE) {
            return Err(EptError::Misaligned { gpa, hpa: 0, len });
        }
        let end = gpa
            .checked_add(len)
            .filter(|&e| e <= GPA_LIMIT)
            .ok_or(EptError::OutOfRange { gpa, len })?;
        self.unmap_range(gpa, end)?;
        Ok(StaleTranslations { eptp: self.eptp() })
    }

    /// Walks the tables for `gpa`: the host-physical address, permissions and memory type, or
    /// `None` where nothing is mapped. Takes `&mut self` because [`TableAlloc`] hands tables out
    /// mutably; nothing is changed.
    pub fn translate(&mut self, gpa: u64) -> Option<(u64, EptPerms, MemType)> {
        if gpa >= GPA_LIMIT {
            return None;
        }
        let mut table = self.tables[0];
        for level in (1..=4u8).rev() {
            let entry = self.alloc.table(table)[entry_index(gpa, level)];
            if !present(entry) {
                return None;
            }
            if is_leaf(entry, level) {
                let offset = gpa & (entry_size(level) - 1);
                let perms = EptPerms::from_bits_truncate(entry as u8);
                let mem_type = MemType::from_bits(((entry >> 3) & 7) as u8)?;
                return Some(((entry & ADDR_MASK) + offset, perms, mem_type));
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    /// Whether every byte of `[gpa, gpa + len)` is mapped with at least `need` (for checking
    /// guest pointers, e.g. hypercall buffers).
    pub fn is_mapped(&mut self, gpa: u64, len: u64, need: EptPerms) -> bool {
        let Some(end) = gpa.checked_add(len) else {
            return false;
        };
        let mut page = gpa & !(PAGE - 1);
        while page < end {
            match self.translate(page) {
                Some((_, perms, _)) if perms.contains(need) => {}
                _ => return false,
            }
            page += PAGE;
        }
        true
    }

    /// The first address in `[gpa, end)` covered by a leaf.
    fn first_mapped(&mut self, gpa: u64, end: u64) -> Option<u64> {
        let mut hit = None;
        // Only tables are gone down: nothing is split, and the walk cannot fail.
        let _ = self.walk(gpa, end, &mut |slot, _| {
            if slot.leaf {
                hit = Some(slot.from);
                Step::Stop
            } else {
                Step::Descend
            }
        });
        hit
    }

    /// Calls `visit` for every present entry that covers part of `[gpa, end)`, top down from the
    /// PML4, with the entry to change in place, and goes on as it says: to the entry's next
    /// sibling, one level down under it ([`Step::Descend`], splitting a large leaf to do so;
    /// at a PT the same as [`Step::Next`]), or nowhere ([`Step::Stop`]). The range and leaf work
    /// of `split_to_4k`, `take_dirty`, `unmap`, `map`'s overlap check and `merge_to_2m`'s search
    /// for page tables are all walks.
    fn walk(&mut self, gpa: u64, end: u64, visit: &mut Visitor<'_>) -> Result<(), EptError> {
        let root = self.tables[0];
        self.walk_table(root, 4, gpa, end, visit).map(|_| ())
    }

    /// [`walk`](Self::walk) of the part `[gpa, end)` under `table` at `level`; true when a visit
    /// said [`Step::Stop`].
    fn walk_table(
        &mut self,
        table: u64,
        level: u8,
        gpa: u64,
        end: u64,
        visit: &mut Visitor<'_>,
    ) -> Result<bool, EptError> {
        let size = entry_size(level);
        let mut a = gpa;
        while a < end {
            let start = a & !(size - 1);
            let next = (start + size).min(end);
            let index = entry_index(a, level);
            let before = self.alloc.table(table)[index];
            if present(before) {
                let slot = Slot {
                    table,
                    index,
                    level,
                    leaf: is_leaf(before, level),
                    start,
                    from: a,
                    to: next,
                };
                let mut entry = before;
                let step = visit(slot, &mut entry);
                if entry != before {
                    self.alloc.table(table)[index] = entry;
                }
                match step {
                    Step::Stop => return Ok(true),
                    Step::Descend if level > 1 && present(entry) => {
                        let child = self.below(table, index, level, entry)?;
                        if self.walk_table(child, level - 1, a, next, visit)? {
                            return Ok(true);
                        }
                    }
                    Step::Descend | Step::Next => {}
                }
            }
            a = next;
        }
        Ok(false)
    }

    /// The table an entry points to, allocating it when the entry is empty.
    fn child(&mut self, table: u64, index: usize) -> Result<u64, EptError> {
        let entry = self.alloc.table(table)[index];
        if present(entry) {
            return Ok(entry & ADDR_MASK);
        }
        let new = self.alloc.alloc_table().ok_or(EptError::OutOfMemory)?;
        self.tables.push(new);
        // Non-leaf entries grant everything; the leaf decides (SDM 29.3.2: access is the AND of
        // the rights along the walk).
        self.alloc.table(table)[index] = new | EptPerms::RWX.bits() as u64;
        Ok(new)
    }

    fn leaf_allowed(&self, level: u8) -> bool {
        match level {
            1 => true,
            2 => self.pages_2m,
            3 => self.pages_1g,
            _ => false,
        }
    }

    fn map_range(
        &mut self,
        table: u64,
        level: u8,
        gpa: u64,
        end: u64,
        delta: u64,
        attrs: u64,
    ) -> Result<(), EptError> {
        let size = entry_size(level);
        let mut a = gpa;
        while a < end {
            let start = a & !(size - 1);
            let next = (start + size).min(end);
            let hpa = a.wrapping_add(delta);
            let index = entry_index(a, level);
            let whole = a == start && next == start + size && hpa.is_multiple_of(size);
            if whole && self.leaf_allowed(level) {
                let large = if level > 1 { LARGE } else { 0 };
                self.alloc.table(table)[index] = hpa | attrs | large;
            } else {
                let child = self.child(table, index)?;
                self.map_range(child, level - 1, a, next, delta, attrs)?;
            }
            a = next;
        }
        Ok(())
    }

    /// Clears every entry wholly inside `[gpa, end)`, leaf or subtree (a subtree's tables stay
    /// owned), and goes down (splitting a large leaf) where the range covers part of one.
    fn unmap_range(&mut self, gpa: u64, end: u64) -> Result<(), EptError> {
        self.walk(gpa, end, &mut |slot, entry| {
            if slot.whole() {
                *entry = 0;
                Step::Next
            } else {
                Step::Descend
            }
        })
    }

    /// The table under the present `entry` (at `level` > 1), a large leaf split for it.
    fn below(&mut self, table: u64, index: usize, level: u8, entry: u64) -> Result<u64, EptError> {
        if is_leaf(entry, level) {
            self.split(table, index, level, entry)
        } else {
            Ok(entry & ADDR_MASK)
        }
    }

    /// Replaces the large leaf `entry` (at `level` > 1) by a table of 512 leaves one level down
    /// with the same attributes, covering the same memory.
    fn split(&mut self, table: u64, index: usize, level: u8, entry: u64) -> Result<u64, EptError> {
        let new = self.alloc.alloc_table().ok_or(EptError::OutOfMemory)?;
        self.tables.push(new);
        let base = entry & ADDR_MASK;
        // The dirty flag goes to every child: a page written before the split stays dirty.
        let mut attrs = entry & (LEAF_ATTRS | DIRTY) & !LARGE;
        if level - 1 > 1 {
            attrs |= LARGE;
        }
        let step = entry_size(level - 1);
        let children = self.alloc.table(new);
        for (i, slot) in children.iter_mut().enumerate() {
            *slot = (base + i as u64 * step) | attrs;
        }
        self.alloc.table(table)[index] = new | EptPerms::RWX.bits() as u64;
        Ok(new)
    }
}

/// Every table goes back to the allocator: a guest refused at boot or destroyed keeps no EPT
/// memory (issue 8 item 9). The caller must have stopped using the EPTP (no VMCS that refers to it
/// is entered again) and invalidates it before the frames can serve as another guest's EPT
/// (`vmx::FlushPolicy::at_guest_boot`).
impl<A: TableAlloc> Drop for Ept<A> {
    fn drop(&mut self) {
        for &t in &self.tables {
            self.alloc.free_table(t);
        }
        self.tables.clear();
        self.free_retired();
    }
}

/// EPT tables on the heap with made-up host-physical addresses, for tests of EPT users. Addresses
/// start at `base`; `limit` caps the number of tables to test running out of memory; `freed`
/// lists the tables given back, in order.
pub struct FakeTables {
    pub base: u64,
    pub tables: Vec<alloc::boxed::Box<[u64; 512]>>,
    pub limit: usize,
    pub freed: Vec<u64>,
}

impl FakeTables {
    pub fn new() -> Self {
        Self {
            base: 0x7000_0000_0000,
            tables: Vec::new(),
            limit: usize::MAX,
            freed: Vec::new(),
        }
    }
}

impl Default for FakeTables {
    fn default() -> Self {
        Self::new()
    }
}

impl TableAlloc for FakeTables {
    fn alloc_table(&mut self) -> Option<u64> {
        if self.tables.len() >= self.limit {
            return None;
        }
        self.tables.push(alloc::boxed::Box::new([0; 512]));
        Some(self.base + (self.tables.len() as u64 - 1) * PAGE)
    }

    fn table(&mut self, hpa: u64) -> &mut [u64; 512] {
        let i = hpa
            .checked_sub(self.base)
            .filter(|off| off.is_multiple_of(PAGE))
            .map(|off| (off / PAGE) as usize)
            .filter(|&i| i < self.tables.len());
        match i {
            Some(i) => &mut self.tables[i],
            None => panic!("{hpa:#x} is not a table of this allocator"),
        }
    }

    fn free_table(&mut self, hpa: u64) {
        assert!(!self.freed.contains(&hpa), "table {hpa:#x} freed twice");
        // Panics on an address this allocator never handed out.
        self.table(hpa);
        self.freed.push(hpa);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;

    const MB: u64 = 1 << 20;
    const GB: u64 = 1 << 30;
    const RAM: u64 = 0x4000_0000;
    const IGNORE_PAT: u64 = 1 << 6;

    fn ept() -> Ept<FakeTables> {
        Ept::new(FakeTables::new(), false).unwrap()
    }

    /// The raw leaf entry for `gpa` and the level it sits at.
    fn leaf<A: TableAlloc>(e: &mut Ept<A>, gpa: u64) -> Option<(u64, u8)> {
        let mut table = e.tables[0];
        for level in (1..=4u8).rev() {
            let entry = e.alloc.table(table)[entry_index(gpa, level)];
            if !present(entry) {
                return None;
            }
            if is_leaf(entry, level) {
                return Some((entry, level));
            }
            table = entry & ADDR_MASK;
        }
        None
    }

    #[test]
    fn eptp_format() {
        let e = ept();
        let eptp = e.eptp();
        assert_eq!(eptp & 7, 6, "write-back paging structures");
        assert_eq!((eptp >> 3) & 7, 3, "4-level walk");
        assert_eq!(eptp & (1 << 6), 0, "A/D off");
        assert_eq!(eptp & ADDR_MASK, e.tables()[0]);
    }

    #[test]
    fn eptp_enables_accessed_dirty_flags_when_asked() {
        let mut e = ept();
        assert!(!e.accessed_dirty());
        e.set_accessed_dirty(true);
        assert_eq!(e.eptp() & (1 << 6), 1 << 6, "bit 6: A/D flags on");
        assert_eq!(e.eptp() & !(1 << 6), e.tables()[0] | (3 << 3) | 6);
    }

    /// Marks the leaf for `gpa` written, as the processor does (SDM 29.3.5).
    fn write_through(e: &mut Ept<FakeTables>, gpa: u64) {
        let mut table = e.tables[0];
        for level in (1..=4u8).rev() {
            let index = entry_index(gpa, level);
            let entry = e.alloc.table(table)[index];
            assert!(present(entry), "{gpa:#x} is not mapped");
            if is_leaf(entry, level) {
                e.alloc.table(table)[index] = entry | DIRTY | (1 << 8);
                return;
            }
            table = entry & ADDR_MASK;
        }
    }

    fn dirty_pages(e: &mut Ept<FakeTables>, gpa: u64, len: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        let stale = e.take_dirty(gpa, len, &mut |p| seen.push(p)).unwrap();
        assert_eq!(stale.eptp, e.eptp(), "the caller must invalidate this EPT");
        seen
    }

    /// RAM at `[0, len)` in 2 MiB pages, and 8-10 MiB read-execute and uncached.
    fn ram_and_uncached<A: TableAlloc>(e: &mut Ept<A>, len: u64) {
        e.map(0, RAM, len, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let uc = MemType::Uncacheable;
        e.map(8 * MB, RAM + 8 * MB, 2 * MB, EptPerms::RX, uc)
            .unwrap();
    }

    #[test]
    fn split_to_4k_keeps_every_translation() {
        let mut e = ept();
        ram_and_uncached(&mut e, 4 * MB);
        let before: Vec<_> = (0..10 * MB / PAGE).map(|p| e.translate(p * PAGE)).collect();
        let stale = e.split_to_4k(0, 16 * MB).unwrap();
        assert_eq!(stale.eptp, e.eptp());
        let after: Vec<_> = (0..10 * MB / PAGE).map(|p| e.translate(p * PAGE)).collect();
        assert_eq!(before, after);
        for gpa in [0, 2 * MB + 0x5000, 8 * MB, 10 * MB - PAGE] {
            assert_eq!(leaf(&mut e, gpa).unwrap().1, 1, "{gpa:#x} in a 4 KiB leaf");
        }
        assert_eq!(e.tables_used(), 3 + 3, "a page table for each 2 MiB page");
        // Splitting again changes nothing.
        let _ = e.split_to_4k(0, 16 * MB).unwrap();
        assert_eq!(e.tables_used(), 6);
    }

    /// Every translation of `[0, len)`, page by page.
    fn translations<A: TableAlloc>(
        e: &mut Ept<A>,
        len: u64,
    ) -> Vec<Option<(u64, EptPerms, MemType)>> {
        (0..len / PAGE).map(|p| e.translate(p * PAGE)).collect()
    }

    #[test]
    fn a_split_then_a_merge_gives_back_the_2m_pages_and_the_same_translations() {
        let mut tables = FakeTables::new();
        let mut e = Ept::new(&mut tables, false).unwrap();
        ram_and_uncached(&mut e, 8 * MB);
        let before = translations(&mut e, 12 * MB);
        let _ = e.split_to_4k(0, 10 * MB).unwrap();
        assert_eq!(e.tables_used(), 3 + 5);
        let merged = e.merge_to_2m(0, 10 * MB).unwrap();
        assert_eq!(merged.pages, 5, "every 2 MiB page the split made 4 KiB");
        assert_eq!(merged.stale.eptp, e.eptp(), "the EPTP to invalidate");
        assert_eq!(translations(&mut e, 12 * MB), before);
        for gpa in [0, 3 * MB, 8 * MB, 10 * MB - PAGE] {
            assert_eq!(leaf(&mut e, gpa).unwrap().1, 2, "{gpa:#x} in a 2 MiB leaf");
        }
        assert_eq!(e.tables_used(), 3, "PML4, PDPT, PD");
        // The page tables go back only once the caller has invalidated the EPT.
        let merged_again = e.merge_to_2m(0, 10 * MB).unwrap();
        assert_eq!(merged_again.pages, 0, "nothing left to merge");
        e.free_retired();
        drop(e);
        assert_eq!(tables.freed.len(), 8, "each table freed once");
    }

    #[test]
    fn retired_tables_wait_for_free_retired() {
        let mut tables = FakeTables::new();
        {
            let mut e = Ept::new(&mut tables, false).unwrap();
            e.map(0, RAM, 2 * MB, EptPerms::RWX, MemType::WriteBack)
                .unwrap();
            let _ = e.split_to_4k(0, 2 * MB).unwrap();
            let _ = e.merge_to_2m(0, 2 * MB).unwrap();
            assert!(e.alloc.freed.is_empty(), "not before the INVEPT");
            e.free_retired();
            assert_eq!(e.alloc.freed.len(), 1, "the page table");
            // Retired and not yet freed: dropping the EPT frees it.
            let _ = e.split_to_4k(0, 2 * MB).unwrap();
            let _ = e.merge_to_2m(0, 2 * MB).unwrap();
        }
        assert_eq!(tables.freed.len(), 5, "PML4, PDPT, PD, two page tables");
    }

    #[test]
    fn a_hole_a_moved_page_or_other_rights_keep_the_split() {
        let mut e = ept();
        e.map(0, RAM, 10 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let _ = e.split_to_4k(0, 10 * MB).unwrap();
        // 0-2M: a page given back (a balloon hole). 2M-4M: a page on another frame.
        // 4M-6M: a page read-only. 6M-8M: a page uncached. 8M-10M: untouched.
        let _ = e.unmap(MB, PAGE).unwrap();
        let _ = e.unmap(3 * MB, PAGE).unwrap();
        e.map(3 * MB, 3 * GB, PAGE, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let _ = e.unmap(5 * MB, PAGE).unwrap();
        e.map(5 * MB, RAM + 5 * MB, PAGE, EptPerms::RX, MemType::WriteBack)
            .unwrap();
        let _ = e.unmap(7 * MB, PAGE).unwrap();
        e.map(
            7 * MB,
            RAM + 7 * MB,
            PAGE,
            EptPerms::RWX,
            MemType::Uncacheable,
        )
        .unwrap();
        let before = translations(&mut e, 10 * MB);
        let merged = e.merge_to_2m(0, 10 * MB).unwrap();
        assert_eq!(merged.pages, 1, "only the untouched 2 MiB");
        assert_eq!(translations(&mut e, 10 * MB), before);
        for gpa in [0, 2 * MB, 4 * MB, 6 * MB] {
            assert_eq!(leaf(&mut e, gpa).unwrap().1, 1, "{gpa:#x} stays split");
        }
        assert_eq!(leaf(&mut e, 8 * MB).unwrap().1, 2);
        assert_eq!(e.translate(MB), None, "the hole stays a hole");
        // The page taken back onto its own frame: its 2 MiB merges.
        e.map(MB, RAM + MB, PAGE, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(e.merge_to_2m(0, 10 * MB).unwrap().pages, 1);
        assert_eq!(leaf(&mut e, MB).unwrap().1, 2);
        assert_eq!(e.translate(MB + 5).unwrap().0, RAM + MB + 5);
    }

    #[test]
    fn a_merge_keeps_dirty_flags_and_respects_its_range_and_the_2m_switch() {
        let mut e = tracked(4 * MB);
        write_through(&mut e, 2 * MB + 0x5000);
        // A range that covers only part of a 2 MiB entry does not merge it.
        assert_eq!(e.merge_to_2m(0, 4 * MB - PAGE).unwrap().pages, 1);
        assert_eq!(leaf(&mut e, 2 * MB).unwrap().1, 1);
        e.set_2m_pages(false);
        assert_eq!(e.merge_to_2m(0, 4 * MB).unwrap().pages, 0);
        e.set_2m_pages(true);
        assert_eq!(e.merge_to_2m(0, 4 * MB).unwrap().pages, 1);
        let (entry, level) = leaf(&mut e, 2 * MB).unwrap();
        assert_eq!(level, 2);
        assert_ne!(
            entry & DIRTY,
            0,
            "a page written before the merge stays dirty"
        );
        assert_eq!(dirty_pages(&mut e, 0, 4 * MB).len(), 512);
        assert!(matches!(
            e.merge_to_2m(0x10, PAGE),
            Err(EptError::Misaligned { .. })
        ));
    }

    #[test]
    fn a_split_1g_page_merges_back_to_2m_pages() {
        let mut e = Ept::new(FakeTables::new(), true).unwrap();
        e.map(0, GB, GB, EptPerms::RWX, MemType::WriteBack).unwrap();
        let before: Vec<_> = (0..GB).step_by(0x3_3000).map(|g| e.translate(g)).collect();
        let _ = e.split_to_4k(0, GB).unwrap();
        assert_eq!(e.tables_used(), 2 + 1 + 512);
        assert_eq!(e.merge_to_2m(0, GB).unwrap().pages, 512);
        assert_eq!(e.tables_used(), 3);
        let after: Vec<_> = (0..GB).step_by(0x3_3000).map(|g| e.translate(g)).collect();
        assert_eq!(before, after);
        assert_eq!(leaf(&mut e, GB - 1).unwrap().1, 2);
    }

    /// RAM at `[0, len)` with dirty flags on, split to 4 KiB pages as a migration does.
    fn tracked(len: u64) -> Ept<FakeTables> {
        let mut e = ept();
        e.set_accessed_dirty(true);
        e.map(0, RAM, len, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let _ = e.split_to_4k(0, len).unwrap();
        e
    }

    #[test]
    fn dirty_pages_are_reported_once_and_cleared() {
        let mut e = tracked(4 * MB);
        assert!(
            dirty_pages(&mut e, 0, 4 * MB).is_empty(),
            "nothing written yet"
        );
        for gpa in [0x3000, 0x3000, 2 * MB + 0x1000, 4 * MB - PAGE] {
            write_through(&mut e, gpa);
        }
        assert_eq!(
            dirty_pages(&mut e, 0, 4 * MB),
            [0x3000, 2 * MB + 0x1000, 4 * MB - PAGE]
        );
        assert!(dirty_pages(&mut e, 0, 4 * MB).is_empty(), "flags cleared");
        write_through(&mut e, 0x7000);
        assert_eq!(dirty_pages(&mut e, 0, 4 * MB), [0x7000]);
        // The translations are untouched by the clearing.
        assert_eq!(
            e.translate(0x7000),
            Some((RAM + 0x7000, EptPerms::RWX, MemType::WriteBack))
        );
    }

    #[test]
    fn a_dirty_large_page_counts_whole_and_its_split_keeps_the_flag() {
        let mut e = ept();
        e.map(0, RAM, 4 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        write_through(&mut e, 2 * MB + 0x42000);
        let mut copy = ept();
        copy.map(0, RAM, 4 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        write_through(&mut copy, 2 * MB + 0x42000);
        let whole = dirty_pages(&mut copy, 0, 4 * MB);
        assert_eq!(whole.len(), 512, "every page of the dirty 2 MiB leaf");
        assert_eq!((whole[0], whole[511]), (2 * MB, 4 * MB - PAGE));
        let _ = e.split_to_4k(0, 4 * MB).unwrap();
        assert_eq!(dirty_pages(&mut e, 0, 4 * MB), whole, "split, still dirty");
    }

    #[test]
    fn dirty_tracking_refuses_bad_ranges() {
        let mut e = ept();
        assert!(matches!(
            e.take_dirty(0x10, PAGE, &mut |_| {}),
            Err(EptError::Misaligned { .. })
        ));
        assert!(matches!(
            e.split_to_4k(GPA_LIMIT - PAGE, 2 * PAGE),
            Err(EptError::OutOfRange { .. })
        ));
    }

    #[test]
    fn guest_ram_in_2m_pages() {
        let mut e = ept();
        e.map(0, RAM, 16 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(e.tables_used(), 3, "PML4, PDPT, PD");
        for gpa in [0, 0x1234, 2 * MB - 1, 2 * MB, 7 * MB + 0x42, 16 * MB - 1] {
            assert_eq!(
                e.translate(gpa),
                Some((RAM + gpa, EptPerms::RWX, MemType::WriteBack)),
                "gpa {gpa:#x}"
            );
        }
        assert_eq!(e.translate(16 * MB), None);
        let (entry, level) = leaf(&mut e, 3 * MB).unwrap();
        assert_eq!(level, 2);
        assert_eq!(entry, (RAM + 2 * MB) | LARGE | (6 << 3) | 7);
    }

    #[test]
    fn unaligned_ends_use_4k_pages() {
        let mut e = ept();
        let (gpa, len) = (0x1000, 4 * MB);
        e.map(gpa, RAM + gpa, len, EptPerms::RW, MemType::WriteBack)
            .unwrap();
        // 0x1000..2M in 4K pages, 2M..4M one 2M page, 4M..4M+4K in 4K pages.
        assert_eq!(leaf(&mut e, 0x1000).unwrap().1, 1);
        assert_eq!(leaf(&mut e, 2 * MB - PAGE).unwrap().1, 1);
        assert_eq!(leaf(&mut e, 2 * MB).unwrap().1, 2);
        assert_eq!(leaf(&mut e, 4 * MB).unwrap().1, 1);
        assert_eq!(e.tables_used(), 5, "PML4, PDPT, PD and two PTs");
        for g in (gpa..gpa + len).step_by(0x3_f000) {
            assert_eq!(e.translate(g).map(|t| t.0), Some(RAM + g));
        }
        assert_eq!(e.translate(0), None);
        assert_eq!(e.translate(0xfff), None);
        assert_eq!(e.translate(gpa + len), None);
        assert_eq!(
            e.translate(gpa + len - 1),
            Some((RAM + gpa + len - 1, EptPerms::RW, MemType::WriteBack))
        );
    }

    #[test]
    fn host_alignment_decides_the_page_size() {
        let mut e = ept();
        // Guest 2M-aligned, host only 4K-aligned: 4K pages throughout.
        e.map(
            2 * MB,
            RAM + PAGE,
            2 * MB,
            EptPerms::RWX,
            MemType::WriteBack,
        )
        .unwrap();
        assert_eq!(leaf(&mut e, 2 * MB).unwrap().1, 1);
        assert_eq!(e.translate(3 * MB).unwrap().0, RAM + PAGE + MB);
    }

    #[test]
    fn one_gig_pages_only_when_enabled() {
        let mut e = Ept::new(FakeTables::new(), true).unwrap();
        e.map(0, 2 * GB, 2 * GB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(e.tables_used(), 2);
        assert_eq!(leaf(&mut e, GB + 5).unwrap().1, 3);
        assert_eq!(e.translate(GB + 5).unwrap().0, 3 * GB + 5);

        let mut e = ept();
        e.map(0, 2 * GB, 2 * GB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(e.tables_used(), 4, "PML4, PDPT, two PDs");
        assert_eq!(leaf(&mut e, GB + 5).unwrap().1, 2);

        let mut e = ept();
        e.set_2m_pages(false);
        e.map(0, RAM, 2 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(leaf(&mut e, 0).unwrap().1, 1);
    }

    #[test]
    fn overlap_is_refused_and_changes_nothing() {
        let mut e = ept();
        e.map(4 * MB, RAM, 4 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let used = e.tables_used();
        assert_eq!(
            e.map(0, RAM, 4 * MB + PAGE, EptPerms::RWX, MemType::WriteBack),
            Err(EptError::Overlap { gpa: 4 * MB })
        );
        assert_eq!(
            e.map(
                8 * MB - PAGE,
                RAM,
                2 * PAGE,
                EptPerms::RWX,
                MemType::WriteBack
            ),
            Err(EptError::Overlap { gpa: 8 * MB - PAGE })
        );
        assert_eq!(e.tables_used(), used);
        assert_eq!(e.translate(0), None);
        assert_eq!(e.translate(8 * MB), None);
        // Right next to it is fine.
        e.map(
            8 * MB,
            RAM + 8 * MB,
            PAGE,
            EptPerms::READ,
            MemType::Uncacheable,
        )
        .unwrap();
        assert_eq!(
            EptError::Overlap { gpa: 0x400000 }.to_string(),
            "EPT map overlaps an existing mapping at 0x400000"
        );
    }

    #[test]
    fn argument_errors() {
        let mut e = ept();
        let wb = MemType::WriteBack;
        assert_eq!(
            e.map(0x800, RAM, PAGE, EptPerms::RWX, wb),
            Err(EptError::Misaligned {
                gpa: 0x800,
                hpa: RAM,
                len: PAGE
            })
        );
        assert!(matches!(
            e.map(0, RAM + 1, PAGE, EptPerms::RWX, wb),
            Err(EptError::Misaligned { .. })
        ));
        assert_eq!(
            e.map(0, RAM, 0, EptPerms::RWX, wb),
            Err(EptError::EmptyRange)
        );
        assert_eq!(
            e.map(GPA_LIMIT - PAGE, RAM, 2 * PAGE, EptPerms::RWX, wb),
            Err(EptError::OutOfRange {
                gpa: GPA_LIMIT - PAGE,
                len: 2 * PAGE
            })
        );
        assert!(matches!(
            e.map(0, HPA_LIMIT - PAGE, 2 * PAGE, EptPerms::RWX, wb),
            Err(EptError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.map(!0xfff, RAM, PAGE, EptPerms::RWX, wb),
            Err(EptError::OutOfRange { .. })
        ));
        assert_eq!(
            e.map(0, RAM, PAGE, EptPerms::WRITE, wb),
            Err(EptError::BadPermissions(EptPerms::WRITE))
        );
        assert_eq!(
            e.map(0, RAM, PAGE, EptPerms::empty(), wb),
            Err(EptError::BadPermissions(EptPerms::empty()))
        );
        assert_eq!(e.tables_used(), 1);
        // The last page below the 48-bit limit works.
        e.map(GPA_LIMIT - PAGE, RAM, PAGE, EptPerms::RWX, wb)
            .unwrap();
        assert_eq!(e.translate(GPA_LIMIT - 1).unwrap().0, RAM + PAGE - 1);
        assert_eq!(e.translate(GPA_LIMIT), None);
    }

    #[test]
    fn memory_type_bits() {
        let mut e = ept();
        let cases = [
            (MemType::Uncacheable, 0),
            (MemType::WriteCombining, 1),
            (MemType::WriteThrough, 4),
            (MemType::WriteProtected, 5),
            (MemType::WriteBack, 6),
        ];
        for (i, (mt, bits)) in cases.into_iter().enumerate() {
            let gpa = i as u64 * PAGE;
            e.map(gpa, RAM + gpa, PAGE, EptPerms::RX, mt).unwrap();
            let (entry, _) = leaf(&mut e, gpa).unwrap();
            assert_eq!((entry >> 3) & 7, bits);
            assert_eq!(entry & IGNORE_PAT, 0);
            assert_eq!(entry & 7, 5);
            assert_eq!(e.translate(gpa), Some((RAM + gpa, EptPerms::RX, mt)));
        }
        assert_eq!(MemType::from_bits(2), None);
        assert_eq!(MemType::from_bits(7), None);
    }

    #[test]
    fn unmap_splits_large_pages() {
        let mut e = ept();
        e.map(0, RAM, 4 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        let hole = 2 * MB + 5 * PAGE;
        let stale = e.unmap(hole, PAGE).unwrap();
        assert_eq!(stale.eptp, e.eptp(), "the EPTP to invalidate");
        assert_eq!(e.translate(hole), None);
        assert_eq!(e.translate(hole - 1).unwrap().0, RAM + hole - 1);
        assert_eq!(e.translate(hole + PAGE).unwrap().0, RAM + hole + PAGE);
        assert_eq!(e.translate(2 * MB).unwrap().0, RAM + 2 * MB);
        assert_eq!(
            leaf(&mut e, 0).unwrap().1,
            2,
            "the other 2M page stays large"
        );
        assert_eq!(leaf(&mut e, 2 * MB).unwrap().1, 1);
        // The hole can be mapped again, e.g. as an uncached device page.
        e.map(hole, 0xfee0_0000, PAGE, EptPerms::RW, MemType::Uncacheable)
            .unwrap();
        assert_eq!(
            e.translate(hole + 0x20),
            Some((0xfee0_0020, EptPerms::RW, MemType::Uncacheable))
        );
        // Unmapping everything, holes included, leaves nothing.
        let _ = e.unmap(0, 8 * MB).unwrap();
        for g in (0..8 * MB).step_by(0x1_1000) {
            assert_eq!(e.translate(g), None);
        }
    }

    #[test]
    fn unmap_splits_1g_pages_down_to_4k() {
        let mut e = Ept::new(FakeTables::new(), true).unwrap();
        e.map(0, GB, GB, EptPerms::RWX, MemType::WriteBack).unwrap();
        let _ = e.unmap(3 * MB, PAGE).unwrap();
        assert_eq!(e.translate(3 * MB), None);
        assert_eq!(leaf(&mut e, 0).unwrap().1, 2);
        assert_eq!(leaf(&mut e, 3 * MB + PAGE).unwrap().1, 1);
        assert_eq!(e.translate(GB - 1).unwrap().0, 2 * GB - 1);
        assert_eq!(e.translate(3 * MB + PAGE).unwrap().0, GB + 3 * MB + PAGE);
    }

    #[test]
    fn out_of_memory_maps_nothing() {
        let mut tables = FakeTables::new();
        tables.limit = 4;
        let mut e = Ept::new(tables, false).unwrap();
        // Needs PML4, PDPT, PD and two PTs: the second PT is one too many.
        assert_eq!(
            e.map(PAGE, RAM + PAGE, 4 * MB, EptPerms::RWX, MemType::WriteBack),
            Err(EptError::OutOfMemory)
        );
        for g in (0..5 * MB).step_by(0x1_0000) {
            assert_eq!(e.translate(g), None, "{g:#x}");
        }
        // What fits still maps.
        e.map(0, RAM, 2 * MB, EptPerms::RWX, MemType::WriteBack)
            .unwrap();
        assert_eq!(e.translate(MB).unwrap().0, RAM + MB);
    }

    #[test]
    fn nothing_outside_the_maps_translates() {
        let mut e = ept();
        let maps = [
            (0, RAM, 6 * MB + 3 * PAGE),
            (0xfec0_0000, 0xfec0_0000, PAGE),
            (GB + 2 * MB, 2 * GB, 10 * MB),
            (0x80_0000_0000, 3 * GB, 2 * MB),
        ];
        for (g, h, l) in maps {
            e.map(g, h, l, EptPerms::RWX, MemType::WriteBack).unwrap();
        }
        let expect = |gpa: u64| {
            maps.iter()
                .find(|(g, _, l)| gpa >= *g && gpa < g + l)
                .map(|(g, h, _)| h + (gpa - g))
        };
        // A simple LCG spread over the 48-bit space, plus the edges of every map.
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut points: Vec<u64> = (0..4000)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (x >> 16) & (GPA_LIMIT - 1) & !0x7
            })
            .collect();
        for (g, _, l) in maps {
            points.extend([g.wrapping_sub(1), g, g + l - 1, g + l, g + l / 2]);
            points.extend((0..64).map(|i| g + i * 0x1_8000));
        }
        for p in points {
            assert_eq!(e.translate(p).map(|t| t.0), expect(p), "gpa {p:#x}");
        }
        assert!(e.is_mapped(0xfec0_0000, PAGE, EptPerms::RW));
        assert!(!e.is_mapped(0xfec0_0000, PAGE + 1, EptPerms::READ));
        assert!(e.is_mapped(PAGE - 2, 4, EptPerms::RWX));
        assert!(!e.is_mapped(u64::MAX, 2, EptPerms::READ));
    }

    /// Issue 8 item 9: every table an EPT allocated (PML4, the tables maps created, the ones
    /// splitting a large page made, and those left under an unmapped subtree) goes back to the
    /// allocator exactly once when the EPT is dropped, also after a map that ran out of memory.
    #[test]
    fn dropping_the_ept_frees_every_table() {
        let mut tables = FakeTables::new();
        {
            let mut e = Ept::new(&mut tables, false).unwrap();
            e.map(PAGE, RAM, PAGE, EptPerms::RWX, MemType::WriteBack)
                .unwrap();
            e.map(
                4 * MB,
                RAM + 4 * MB,
                4 * MB,
                EptPerms::RWX,
                MemType::WriteBack,
            )
            .unwrap();
            let _ = e.unmap(4 * MB + PAGE, PAGE).unwrap(); // splits a 2M page: one more table
            let _ = e.unmap(0, 2 * MB).unwrap(); // the PT under it stays owned
            assert_eq!(e.tables_used(), 5);
        }
        assert_eq!(tables.tables.len(), 5);
        let mut freed = tables.freed.clone();
        freed.sort_unstable();
        let all: Vec<u64> = (0..5).map(|i| tables.base + i * PAGE).collect();
        assert_eq!(freed, all, "each table freed once");

        let mut tables = FakeTables::new();
        tables.limit = 4;
        {
            let mut e = Ept::new(&mut tables, false).unwrap();
            assert_eq!(
                e.map(PAGE, RAM + PAGE, 4 * MB, EptPerms::RWX, MemType::WriteBack),
                Err(EptError::OutOfMemory)
            );
        }
        assert_eq!(tables.freed.len(), 4, "the tables of a failed map too");
    }
}
