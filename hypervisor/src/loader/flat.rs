//! Flat binaries started in 16-bit real mode, the way a PC BIOS starts a boot sector.
//!
//! The image is copied byte for byte to `cfg.load` (default 0x7c00) and entered at `cfg.entry`
//! (default: the load address). Conventions (docs/GUESTS.md):
//! - CS:IP: CS = `(entry >> 4) & 0xf000`, IP = `entry & 0xffff`, i.e. the segment is the 64 KiB
//!   block holding the entry (0x7c00 -> 0000:7C00, 0x12345 -> 1000:2345). Most BIOSes enter boot
//!   sectors at 0000:7C00, so code linked at its load address with `.code16` just works.
//! - DS = ES = SS = FS = GS = 0. SP = min(load, 0xfff0): the stack grows down from just below the
//!   image (or from the top of the first 64 KiB when the image sits higher).
//! - EDX = 0x80, the BIOS boot drive number of the first hard disk; other registers 0.
//! - RFLAGS = 0x2 (interrupts off); CR0 = ET (PE = PG = 0); IDTR = 0:0x3ff, the IVT.
//!
//! There is no BIOS: nothing answers `int 0x10` or `int 0x13`, and the IVT is all zero until the
//! guest fills it. The image must lie in `0x500..0x100000` (above the IVT and BIOS data area,
//! inside the real-mode address space) and the entry inside the image.

use super::{
    CpuMode, GuestRam, InitialState, LoadError, LoadRequest, CR0_ET, FLAT_MIN_LOAD, REAL_MODE_LIMIT,
};

/// DL at entry, as a BIOS passes the boot drive (0x80 = first hard disk).
pub const BOOT_DRIVE: u64 = 0x80;
/// Highest initial SP: the stack starts at most at 0000:FFF0.
pub const MAX_SP: u64 = 0xfff0;

/// Splits a real-mode linear address below 1 MiB into (segment, offset) with the segment chosen
/// as the 64 KiB block that holds the address.
pub fn split_real_address(linear: u64) -> (u16, u16) {
    (((linear >> 4) & 0xf000) as u16, (linear & 0xffff) as u16)
}

/// Loads a flat real-mode guest.
pub fn load(ram: &mut [u8], req: &LoadRequest) -> Result<InitialState, LoadError> {
    if !req.modules.is_empty() {
        return Err(LoadError::ModulesNotSupported);
    }
    if req.image.is_empty() {
        return Err(LoadError::EmptyImage);
    }
    let load = req.cfg.load;
    let size = req.image.len() as u64;
    let in_range = load >= FLAT_MIN_LOAD
        && load
            .checked_add(size)
            .is_some_and(|end| end <= REAL_MODE_LIMIT);
    if !in_range {
        return Err(LoadError::FlatOutOfRange { addr: load, size });
    }
    let entry = req.cfg.entry;
    if entry < load || entry - load >= size {
        return Err(LoadError::EntryOutsideImage { entry });
    }
    let mut ram = GuestRam::new(ram);
    ram.write("flat image", load, req.image)?;
    let (cs, ip) = split_real_address(entry);
    Ok(InitialState {
        rip: u64::from(ip),
        rsp: load.min(MAX_SP),
        rdx: BOOT_DRIVE,
        cr0: CR0_ET,
        code_selector: cs,
        data_selector: 0,
        ..InitialState::new(CpuMode::Real)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::loader::test_util::config;
    use crate::manifest::GuestKind;
    use alloc::vec;

    fn load_flat(
        image: &[u8],
        load: u64,
        entry: u64,
        ram: &mut [u8],
    ) -> Result<InitialState, LoadError> {
        let mut cfg = config(GuestKind::Flat, ram.len() as u64, "");
        cfg.load = load;
        cfg.entry = entry;
        let req = LoadRequest {
            cfg: &cfg,
            image,
            modules: &[],
            guest_id: 1,
        };
        crate::loader::load(ram, &req)
    }

    #[test]
    fn boot_sector_convention() {
        let mut ram = vec![0u8; 2 << 20];
        let image = [0xfa, 0xf4, 0xeb, 0xfe];
        let s = load_flat(&image, 0x7c00, 0x7c00, &mut ram).unwrap();
        assert_eq!(&ram[0x7c00..0x7c04], &image);
        assert_eq!(ram[0x7bff], 0);
        assert_eq!(ram[0x7c04], 0);
        assert_eq!(s.mode, CpuMode::Real);
        assert_eq!((s.code_selector, s.rip), (0, 0x7c00));
        assert_eq!((s.data_selector, s.rsp), (0, 0x7c00));
        assert_eq!((s.rdx, s.rflags, s.cr0), (0x80, 2, 0x10));
        assert_eq!(
            (s.cr3, s.cr4, s.efer, s.gdtr_base, s.gdtr_limit),
            (0, 0, 0, 0, 0)
        );
    }

    #[test]
    fn high_entry_uses_a_segment() {
        let mut ram = vec![0u8; 2 << 20];
        let image = vec![0x90u8; 0x100];
        let s = load_flat(&image, 0x12300, 0x12345, &mut ram).unwrap();
        assert_eq!((s.code_selector, s.rip), (0x1000, 0x2345));
        assert_eq!(s.rsp, 0xfff0);
        assert_eq!(split_real_address(0x9_ffff), (0x9000, 0xffff));
    }

    #[test]
    fn rejects_out_of_range() {
        let mut ram = vec![0u8; 2 << 20];
        let e = load_flat(&[0x90; 16], 0x400, 0x400, &mut ram).unwrap_err();
        assert_eq!(
            e,
            LoadError::FlatOutOfRange {
                addr: 0x400,
                size: 16
            }
        );
        let e = load_flat(&[0x90; 16], 0xf_fff8, 0xf_fff8, &mut ram).unwrap_err();
        assert!(matches!(e, LoadError::FlatOutOfRange { .. }));
        let e = load_flat(&[0x90; 16], u64::MAX - 4, 0x7c00, &mut ram).unwrap_err();
        assert!(matches!(e, LoadError::FlatOutOfRange { .. }));
        let e = load_flat(&[0x90; 16], 0x7c00, 0x7c10, &mut ram).unwrap_err();
        assert_eq!(e, LoadError::EntryOutsideImage { entry: 0x7c10 });
        let e = load_flat(&[0x90; 16], 0x7c00, 0x7bff, &mut ram).unwrap_err();
        assert_eq!(e, LoadError::EntryOutsideImage { entry: 0x7bff });
        assert_eq!(
            load_flat(&[], 0x7c00, 0x7c00, &mut ram).unwrap_err(),
            LoadError::EmptyImage
        );
        // RAM smaller than the image's end.
        let mut tiny = vec![0u8; 0x8000];
        let e = load_flat(&[0x90; 0x800], 0x7c00, 0x7c00, &mut tiny).unwrap_err();
        assert!(matches!(e, LoadError::OutsideRam { .. }));
    }
}
