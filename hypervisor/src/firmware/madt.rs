//! The host's processors, from the firmware's ACPI tables: RSDP -> XSDT (or RSDT) -> MADT.
//!
//! References are to the ACPI 6.5 specification: 5.2.5.3 (RSDP), 5.2.6 (table header), 5.2.7
//! (RSDT), 5.2.8 (XSDT), 5.2.12 (MADT) with its Processor Local APIC (5.2.12.2), Local APIC
//! Address Override (5.2.12.8) and Processor Local x2APIC (5.2.12.12) entries.
//!
//! Everything read here comes from the firmware and is treated as untrusted: each table's
//! signature, checksum and length are checked before its contents are used, lengths are bounded
//! before anything is allocated, and every entry must lie inside its table. Physical memory is
//! read through [`PhysMemory`], so the tests run on table bytes they build themselves.

use alloc::vec;
use alloc::vec::Vec;
use core::fmt;

/// Reads physical memory on behalf of the parser.
pub trait PhysMemory {
    /// Fills `buf` from physical address `pa`; false if any of it cannot be read (unmapped,
    /// beyond the end of memory).
    fn read(&self, pa: u64, buf: &mut [u8]) -> bool;
}

/// Bytes of the ACPI 1.0 RSDP (covered by its first checksum).
const RSDP_V1_LEN: usize = 20;
/// Bytes of the ACPI 2.0+ RSDP (covered by its extended checksum).
const RSDP_V2_LEN: usize = 36;
/// Bytes of the common header of every system description table (5.2.6).
const HEADER_LEN: usize = 36;
/// The MADT's fixed part: the header, the local interrupt controller address and the flags.
const MADT_FIXED_LEN: usize = HEADER_LEN + 8;
/// The largest table Keel reads. A MADT for 1000 x2APIC processors is 16 KiB; a length above
/// this is a corrupt table, not a big machine.
pub const MAX_TABLE_LEN: u32 = 256 * 1024;

/// MADT flags bit 0 (5.2.12, Table 5.43): the machine also has dual 8259 PICs.
const MADT_PCAT_COMPAT: u32 = 1 << 0;
/// Local APIC flags (5.2.12.2, Table 5.47): bit 0 Enabled, bit 1 Online Capable.
const LAPIC_ENABLED: u32 = 1 << 0;
const LAPIC_ONLINE_CAPABLE: u32 = 1 << 1;

const ENTRY_LOCAL_APIC: u8 = 0;
const ENTRY_LOCAL_APIC_ADDRESS_OVERRIDE: u8 = 5;
const ENTRY_LOCAL_X2APIC: u8 = 9;

/// Which firmware table a problem was found in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Rsdp,
    Rsdt,
    Xsdt,
    Madt,
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Rsdp => "RSDP",
            Self::Rsdt => "RSDT",
            Self::Xsdt => "XSDT",
            Self::Madt => "MADT",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AcpiError {
    /// The bootloader handed over no RSDP address.
    NoRsdp,
    /// The table's bytes at `pa` could not be read.
    Unreadable {
        table: Table,
        pa: u64,
    },
    BadSignature {
        table: Table,
        pa: u64,
    },
    BadChecksum {
        table: Table,
        pa: u64,
    },
    /// The table's length field is below its fixed part, above [`MAX_TABLE_LEN`], or leaves a
    /// partial entry.
    BadLength {
        table: Table,
        pa: u64,
        len: u32,
    },
    /// A MADT entry at `offset` has a length that is too short for its type or runs past the
    /// table's end.
    BadEntry {
        offset: usize,
        kind: u8,
        len: u8,
    },
    /// No table the root table lists is a MADT.
    NoMadt,
}

impl fmt::Display for AcpiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoRsdp => write!(f, "the bootloader found no ACPI RSDP"),
            Self::Unreadable { table, pa } => write!(f, "{table} at {pa:#x} cannot be read"),
            Self::BadSignature { table, pa } => write!(f, "{table} at {pa:#x}: bad signature"),
            Self::BadChecksum { table, pa } => write!(f, "{table} at {pa:#x}: bad checksum"),
            Self::BadLength { table, pa, len } => {
                write!(f, "{table} at {pa:#x}: bad length {len}")
            }
            Self::BadEntry { offset, kind, len } => write!(
                f,
                "MADT entry of type {kind} at offset {offset} has a bad length {len}"
            ),
            Self::NoMadt => write!(f, "the firmware's ACPI tables have no MADT"),
        }
    }
}

/// One processor the MADT lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MadtCpu {
    /// Its local APIC ID (8 bits from a Processor Local APIC entry, 32 from an x2APIC entry).
    pub apic_id: u32,
    /// The ACPI processor UID (type 0: the 8-bit ACPI Processor ID).
    pub uid: u32,
    /// Ready for use.
    pub enabled: bool,
    /// Not enabled, but the hardware can bring it online at run time.
    pub online_capable: bool,
    /// Listed by a Processor Local x2APIC entry.
    pub x2apic: bool,
}

impl MadtCpu {
    /// Whether the OS may start it (5.2.12.2: Enabled, or Online Capable).
    pub fn usable(&self) -> bool {
        self.enabled || self.online_capable
    }
}

/// What Keel takes from the MADT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Madt {
    /// Physical address of the local APICs (32-bit field, or the 64-bit override entry).
    pub local_apic_address: u64,
    /// Dual 8259 PICs are present as well.
    pub pcat_compat: bool,
    /// In the order the table lists them (the boot processor should be first, 5.2.12.14).
    pub cpus: Vec<MadtCpu>,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

/// ACPI checksums make all bytes of the structure sum to 0 modulo 256.
fn sums_to_zero(bytes: &[u8]) -> bool {
    bytes.iter().fold(0u8, |s, &b| s.wrapping_add(b)) == 0
}

/// Where the RSDP points to: the XSDT (64-bit entries) when it has one, else the RSDT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootTable {
    Xsdt(u64),
    Rsdt(u64),
}

/// Checks and decodes an RSDP (5.2.5.3). `bytes` holds at least the 20 bytes of an ACPI 1.0
/// RSDP, and the 36 of a 2.0+ one when its revision says so.
pub fn parse_rsdp(bytes: &[u8], pa: u64) -> Result<RootTable, AcpiError> {
    let table = Table::Rsdp;
    if bytes.len() < RSDP_V1_LEN {
        return Err(AcpiError::Unreadable { table, pa });
    }
    if &bytes[..8] != b"RSD PTR " {
        return Err(AcpiError::BadSignature { table, pa });
    }
    if !sums_to_zero(&bytes[..RSDP_V1_LEN]) {
        return Err(AcpiError::BadChecksum { table, pa });
    }
    let revision = bytes[15];
    let rsdt = u64::from(u32_at(bytes, 16));
    if revision >= 2 {
        if bytes.len() < RSDP_V2_LEN {
            return Err(AcpiError::Unreadable { table, pa });
        }
        let len = u32_at(bytes, 20);
        if (len as usize) < RSDP_V2_LEN || len as usize > bytes.len() {
            return Err(AcpiError::BadLength { table, pa, len });
        }
        // The extended checksum covers the whole structure, the first checksum included.
        if !sums_to_zero(&bytes[..len as usize]) {
            return Err(AcpiError::BadChecksum { table, pa });
        }
        let xsdt = u64_at(bytes, 24);
        if xsdt != 0 {
            return Ok(RootTable::Xsdt(xsdt));
        }
    }
    Ok(RootTable::Rsdt(rsdt))
}

/// Reads the table at `pa` whole, after checking its header: signature `sig`, a length between
/// `min_len` and [`MAX_TABLE_LEN`], and the checksum over that length.
fn read_table(
    mem: &impl PhysMemory,
    pa: u64,
    sig: &[u8; 4],
    table: Table,
    min_len: usize,
) -> Result<Vec<u8>, AcpiError> {
    let mut header = [0u8; HEADER_LEN];
    if !mem.read(pa, &mut header) {
        return Err(AcpiError::Unreadable { table, pa });
    }
    if &header[..4] != sig {
        return Err(AcpiError::BadSignature { table, pa });
    }
    let len = u32_at(&header, 4);
    if (len as usize) < min_len || len > MAX_TABLE_LEN {
        return Err(AcpiError::BadLength { table, pa, len });
    }
    let mut bytes = vec![0u8; len as usize];
    if !mem.read(pa, &mut bytes) {
        return Err(AcpiError::Unreadable { table, pa });
    }
    if !sums_to_zero(&bytes) {
        return Err(AcpiError::BadChecksum { table, pa });
    }
    Ok(bytes)
}

/// The table addresses an RSDT (4-byte entries) or XSDT (8-byte entries) lists.
fn root_entries(mem: &impl PhysMemory, root: RootTable) -> Result<Vec<u64>, AcpiError> {
    let (pa, sig, table, size) = match root {
        RootTable::Xsdt(pa) => (pa, b"XSDT", Table::Xsdt, 8),
        RootTable::Rsdt(pa) => (pa, b"RSDT", Table::Rsdt, 4),
    };
    let bytes = read_table(mem, pa, sig, table, HEADER_LEN)?;
    let body = &bytes[HEADER_LEN..];
    if body.len() % size != 0 {
        let len = bytes.len() as u32;
        return Err(AcpiError::BadLength { table, pa, len });
    }
    Ok(body
        .chunks_exact(size)
        .map(|e| match size {
            8 => u64_at(e, 0),
            _ => u64::from(u32_at(e, 0)),
        })
        .collect())
}

/// Decodes a whole, checked MADT (5.2.12).
pub fn parse_madt(bytes: &[u8]) -> Result<Madt, AcpiError> {
    if bytes.len() < MADT_FIXED_LEN {
        let len = bytes.len() as u32;
        return Err(AcpiError::BadLength {
            table: Table::Madt,
            pa: 0,
            len,
        });
    }
    let mut madt = Madt {
        local_apic_address: u64::from(u32_at(bytes, HEADER_LEN)),
        pcat_compat: u32_at(bytes, HEADER_LEN + 4) & MADT_PCAT_COMPAT != 0,
        cpus: Vec::new(),
    };
    let mut at = MADT_FIXED_LEN;
    while at < bytes.len() {
        let kind = bytes[at];
        let len = bytes.get(at + 1).copied().unwrap_or(0);
        let needed = match kind {
            ENTRY_LOCAL_APIC => 8,
            ENTRY_LOCAL_APIC_ADDRESS_OVERRIDE => 12,
            ENTRY_LOCAL_X2APIC => 16,
            _ => 2,
        };
        if (len as usize) < needed || at + len as usize > bytes.len() {
            return Err(AcpiError::BadEntry {
                offset: at,
                kind,
                len,
            });
        }
        let e = &bytes[at..at + len as usize];
        match kind {
            ENTRY_LOCAL_APIC => {
                let flags = u32_at(e, 4);
                madt.cpus.push(MadtCpu {
                    apic_id: u32::from(e[3]),
                    uid: u32::from(e[2]),
                    enabled: flags & LAPIC_ENABLED != 0,
                    online_capable: flags & LAPIC_ONLINE_CAPABLE != 0,
                    x2apic: false,
                });
            }
            ENTRY_LOCAL_APIC_ADDRESS_OVERRIDE => madt.local_apic_address = u64_at(e, 4),
            ENTRY_LOCAL_X2APIC => {
                // Bytes 2-3 are reserved; the flags mean what they mean for type 0.
                let flags = u32_at(e, 8);
                madt.cpus.push(MadtCpu {
                    apic_id: u32_at(e, 4),
                    uid: u32_at(e, 12),
                    enabled: flags & LAPIC_ENABLED != 0,
                    online_capable: flags & LAPIC_ONLINE_CAPABLE != 0,
                    x2apic: true,
                });
            }
            _ => {}
        }
        at += len as usize;
    }
    Ok(madt)
}

/// Follows the RSDP at `rsdp_pa` to the MADT and decodes it.
pub fn find_madt(mem: &impl PhysMemory, rsdp_pa: Option<u64>) -> Result<Madt, AcpiError> {
    let pa = rsdp_pa.ok_or(AcpiError::NoRsdp)?;
    let mut rsdp = [0u8; RSDP_V2_LEN];
    // A 1.0 RSDP may sit in the last 20 bytes before the end of readable memory: read 36 bytes,
    // and fall back to 20.
    let root = if mem.read(pa, &mut rsdp) {
        parse_rsdp(&rsdp, pa)?
    } else if mem.read(pa, &mut rsdp[..RSDP_V1_LEN]) {
        parse_rsdp(&rsdp[..RSDP_V1_LEN], pa)?
    } else {
        return Err(AcpiError::Unreadable {
            table: Table::Rsdp,
            pa,
        });
    };
    for entry in root_entries(mem, root)? {
        let mut sig = [0u8; 4];
        // An entry Keel cannot read is not the MADT; a MADT that is there must be sound.
        if !mem.read(entry, &mut sig) || &sig != b"APIC" {
            continue;
        }
        let bytes = read_table(mem, entry, b"APIC", Table::Madt, MADT_FIXED_LEN)?;
        return parse_madt(&bytes);
    }
    Err(AcpiError::NoMadt)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Physical memory made of separate byte blocks, each at its address.
    #[derive(Default)]
    struct Mem(Vec<(u64, Vec<u8>)>);

    impl Mem {
        fn put(&mut self, pa: u64, bytes: Vec<u8>) {
            self.0.push((pa, bytes));
        }
    }

    impl PhysMemory for Mem {
        fn read(&self, pa: u64, buf: &mut [u8]) -> bool {
            for (base, bytes) in &self.0 {
                if pa >= *base && pa - base + buf.len() as u64 <= bytes.len() as u64 {
                    let from = (pa - base) as usize;
                    buf.copy_from_slice(&bytes[from..from + buf.len()]);
                    return true;
                }
            }
            false
        }
    }

    fn fix_checksum(bytes: &mut [u8], at: usize, over: usize) {
        bytes[at] = 0;
        let sum = bytes[..over].iter().fold(0u8, |s, &b| s.wrapping_add(b));
        bytes[at] = 0u8.wrapping_sub(sum);
    }

    fn rsdp(revision: u8, rsdt: u32, xsdt: u64) -> Vec<u8> {
        let mut b = vec![0u8; RSDP_V2_LEN];
        b[..8].copy_from_slice(b"RSD PTR ");
        b[9..15].copy_from_slice(b"KEELTS");
        b[15] = revision;
        b[16..20].copy_from_slice(&rsdt.to_le_bytes());
        b[20..24].copy_from_slice(&(RSDP_V2_LEN as u32).to_le_bytes());
        b[24..32].copy_from_slice(&xsdt.to_le_bytes());
        fix_checksum(&mut b, 8, RSDP_V1_LEN);
        fix_checksum(&mut b, 32, RSDP_V2_LEN);
        if revision < 2 {
            b.truncate(RSDP_V1_LEN);
        }
        b
    }

    /// A table with a valid header (signature, length, checksum) around `body`.
    fn table(sig: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[..4].copy_from_slice(sig);
        b[8] = 1;
        b[10..16].copy_from_slice(b"KEELTS");
        b.extend_from_slice(body);
        let len = b.len() as u32;
        b[4..8].copy_from_slice(&len.to_le_bytes());
        let n = b.len();
        fix_checksum(&mut b, 9, n);
        b
    }

    fn lapic(uid: u8, id: u8, flags: u32) -> Vec<u8> {
        let mut e = vec![ENTRY_LOCAL_APIC, 8, uid, id];
        e.extend_from_slice(&flags.to_le_bytes());
        e
    }

    fn x2apic(id: u32, flags: u32, uid: u32) -> Vec<u8> {
        let mut e = vec![ENTRY_LOCAL_X2APIC, 16, 0, 0];
        e.extend_from_slice(&id.to_le_bytes());
        e.extend_from_slice(&flags.to_le_bytes());
        e.extend_from_slice(&uid.to_le_bytes());
        e
    }

    fn madt(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut body = 0xfee0_0000u32.to_le_bytes().to_vec();
        body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
        for e in entries {
            body.extend_from_slice(e);
        }
        table(b"APIC", &body)
    }

    fn cpu(apic_id: u32, uid: u32, enabled: bool, online_capable: bool, x2: bool) -> MadtCpu {
        MadtCpu {
            apic_id,
            uid,
            enabled,
            online_capable,
            x2apic: x2,
        }
    }

    /// A machine as Bochs' BIOS describes one: RSDP 2.0 -> XSDT -> [FACP, APIC].
    fn machine(madt_bytes: Vec<u8>) -> Mem {
        let mut m = Mem::default();
        m.put(0xf_0000, rsdp(2, 0x10_0000, 0x20_0000));
        let mut xsdt_body = 0x30_0000u64.to_le_bytes().to_vec();
        xsdt_body.extend_from_slice(&0x40_0000u64.to_le_bytes());
        m.put(0x20_0000, table(b"XSDT", &xsdt_body));
        m.put(0x30_0000, table(b"FACP", &[0; 8]));
        m.put(0x40_0000, madt_bytes);
        m
    }

    #[test]
    fn four_cpus_through_the_xsdt() {
        let m = machine(madt(&[
            lapic(0, 0, 1),
            lapic(1, 1, 1),
            lapic(2, 2, 1),
            lapic(3, 3, 1),
            // An I/O APIC entry (type 1, 12 bytes) is skipped.
            vec![1, 12, 4, 0, 0, 0, 0xc0, 0xfe, 0, 0, 0, 0],
        ]));
        let got = find_madt(&m, Some(0xf_0000)).expect("a sound MADT");
        assert_eq!(got.local_apic_address, 0xfee0_0000);
        assert!(got.pcat_compat);
        assert_eq!(
            got.cpus,
            [
                cpu(0, 0, true, false, false),
                cpu(1, 1, true, false, false),
                cpu(2, 2, true, false, false),
                cpu(3, 3, true, false, false),
            ]
        );
    }

    #[test]
    fn acpi_1_rsdp_uses_the_rsdt() {
        let mut m = Mem::default();
        m.put(0xe_0000, rsdp(0, 0x10_0000, 0));
        m.put(0x10_0000, table(b"RSDT", &0x40_0000u32.to_le_bytes()));
        m.put(0x40_0000, madt(&[lapic(0, 0, 1), lapic(1, 7, 1)]));
        let got = find_madt(&m, Some(0xe_0000)).expect("RSDT path");
        assert_eq!(
            got.cpus.iter().map(|c| c.apic_id).collect::<Vec<_>>(),
            [0, 7]
        );
    }

    #[test]
    fn flags_x2apic_entries_and_the_address_override() {
        let mut override_entry = vec![ENTRY_LOCAL_APIC_ADDRESS_OVERRIDE, 12, 0, 0];
        override_entry.extend_from_slice(&0x1_fee0_0000u64.to_le_bytes());
        let m = madt(&[
            lapic(0, 0, LAPIC_ENABLED),
            lapic(1, 1, 0),
            lapic(2, 2, LAPIC_ONLINE_CAPABLE),
            x2apic(300, LAPIC_ENABLED, 9),
            override_entry,
        ]);
        let got = parse_madt(&m).expect("sound");
        assert_eq!(got.local_apic_address, 0x1_fee0_0000);
        assert_eq!(
            got.cpus,
            [
                cpu(0, 0, true, false, false),
                cpu(1, 1, false, false, false),
                cpu(2, 2, false, true, false),
                cpu(300, 9, true, false, true),
            ]
        );
        assert_eq!(
            got.cpus.iter().map(MadtCpu::usable).collect::<Vec<_>>(),
            [true, false, true, true]
        );
    }

    #[test]
    fn bad_rsdps_are_refused() {
        let good = rsdp(2, 0x10_0000, 0x20_0000);
        let mut sig = good.clone();
        sig[0] = b'X';
        assert_eq!(
            parse_rsdp(&sig, 5),
            Err(AcpiError::BadSignature {
                table: Table::Rsdp,
                pa: 5
            })
        );
        // The first checksum covers bytes 0-19 only.
        let mut v1 = good.clone();
        v1[9] ^= 1;
        assert_eq!(
            parse_rsdp(&v1, 5),
            Err(AcpiError::BadChecksum {
                table: Table::Rsdp,
                pa: 5
            })
        );
        // The extended checksum covers the XSDT address.
        let mut v2 = good.clone();
        v2[24] ^= 1;
        assert_eq!(
            parse_rsdp(&v2, 5),
            Err(AcpiError::BadChecksum {
                table: Table::Rsdp,
                pa: 5
            })
        );
        let mut short = good.clone();
        short[20..24].copy_from_slice(&20u32.to_le_bytes());
        fix_checksum(&mut short, 32, RSDP_V2_LEN);
        assert_eq!(
            parse_rsdp(&short, 5),
            Err(AcpiError::BadLength {
                table: Table::Rsdp,
                pa: 5,
                len: 20
            })
        );
        assert_eq!(
            parse_rsdp(&good[..19], 5),
            Err(AcpiError::Unreadable {
                table: Table::Rsdp,
                pa: 5
            })
        );
        assert_eq!(parse_rsdp(&good, 5), Ok(RootTable::Xsdt(0x20_0000)));
        // Revision 2 with a zero XSDT address falls back to the RSDT.
        assert_eq!(
            parse_rsdp(&rsdp(2, 0x10_0000, 0), 5),
            Ok(RootTable::Rsdt(0x10_0000))
        );
        assert_eq!(find_madt(&Mem::default(), None), Err(AcpiError::NoRsdp));
    }

    #[test]
    fn bad_madts_are_refused() {
        let good = madt(&[lapic(0, 0, 1), lapic(1, 1, 1)]);
        let mut sum = good.clone();
        sum[HEADER_LEN + 8 + 3] = 5;
        assert_eq!(
            find_madt(&machine(sum), Some(0xf_0000)),
            Err(AcpiError::BadChecksum {
                table: Table::Madt,
                pa: 0x40_0000
            })
        );
        // A length past the end of readable memory, and one that is absurd.
        for (len, err) in [
            (
                good.len() as u32 + 4,
                AcpiError::Unreadable {
                    table: Table::Madt,
                    pa: 0x40_0000,
                },
            ),
            (
                0xffff_ff00,
                AcpiError::BadLength {
                    table: Table::Madt,
                    pa: 0x40_0000,
                    len: 0xffff_ff00,
                },
            ),
            (
                40,
                AcpiError::BadLength {
                    table: Table::Madt,
                    pa: 0x40_0000,
                    len: 40,
                },
            ),
        ] {
            let mut t = good.clone();
            t[4..8].copy_from_slice(&len.to_le_bytes());
            assert_eq!(find_madt(&machine(t), Some(0xf_0000)), Err(err), "{len}");
        }
    }

    #[test]
    fn bad_entries_are_refused() {
        // A zero-length entry would loop forever; a short Local APIC entry; an entry past the
        // end of the table.
        for (entries, offset, kind, len) in [
            (vec![lapic(0, 0, 1), vec![7, 0]], 52, 7, 0),
            (vec![vec![ENTRY_LOCAL_APIC, 6, 0, 0, 1, 0]], 44, 0, 6),
            (
                vec![vec![ENTRY_LOCAL_X2APIC, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]],
                44,
                9,
                12,
            ),
            (vec![lapic(0, 0, 1), vec![1, 12, 0, 0]], 52, 1, 12),
            (vec![vec![ENTRY_LOCAL_APIC]], 44, 0, 0),
        ] {
            let t = madt(&entries);
            assert_eq!(
                parse_madt(&t),
                Err(AcpiError::BadEntry { offset, kind, len }),
                "{entries:?}"
            );
            assert_eq!(
                find_madt(&machine(t), Some(0xf_0000)),
                Err(AcpiError::BadEntry { offset, kind, len })
            );
        }
    }

    #[test]
    fn bad_root_tables_are_refused() {
        // An XSDT whose body is not a whole number of 8-byte entries.
        let mut m = machine(madt(&[lapic(0, 0, 1)]));
        m.0.retain(|(pa, _)| *pa != 0x20_0000);
        m.put(0x20_0000, table(b"XSDT", &[0; 12]));
        assert_eq!(
            find_madt(&m, Some(0xf_0000)),
            Err(AcpiError::BadLength {
                table: Table::Xsdt,
                pa: 0x20_0000,
                len: 48
            })
        );
        // An XSDT that lists no MADT; entries that cannot be read are passed over.
        let mut m = machine(madt(&[lapic(0, 0, 1)]));
        m.0.retain(|(pa, _)| *pa != 0x20_0000);
        let mut body = 0x30_0000u64.to_le_bytes().to_vec();
        body.extend_from_slice(&0xdead_0000u64.to_le_bytes());
        m.put(0x20_0000, table(b"XSDT", &body));
        assert_eq!(find_madt(&m, Some(0xf_0000)), Err(AcpiError::NoMadt));
        // The RSDP points at nothing readable.
        assert_eq!(
            find_madt(&Mem::default(), Some(0x1000)),
            Err(AcpiError::Unreadable {
                table: Table::Rsdp,
                pa: 0x1000
            })
        );
        // An RSDP 1.0 in the last 20 readable bytes.
        let mut m = Mem::default();
        m.put(0xe_0000, rsdp(0, 0x10_0000, 0));
        m.put(0x10_0000, table(b"RSDT", &0x40_0000u32.to_le_bytes()));
        m.put(0x40_0000, madt(&[lapic(0, 0, 1)]));
        assert_eq!(find_madt(&m, Some(0xe_0000)).map(|t| t.cpus.len()), Ok(1));
        // An RSDT whose signature is wrong.
        let mut m = Mem::default();
        m.put(0xe_0000, rsdp(0, 0x10_0000, 0));
        m.put(0x10_0000, table(b"XSDT", &0x40_0000u32.to_le_bytes()));
        assert_eq!(
            find_madt(&m, Some(0xe_0000)),
            Err(AcpiError::BadSignature {
                table: Table::Rsdt,
                pa: 0x10_0000
            })
        );
    }
}
