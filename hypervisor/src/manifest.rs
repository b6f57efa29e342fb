//! The ramdisk manifest: which guests Keel runs and how each one starts.
//!
//! Users write manifests in TOML (docs/GUESTS.md); `cargo keel image` translates the TOML into
//! this small line format, which the kernel parses without a general-purpose parser, and keeps a
//! map from these lines back to the TOML file's for its error messages. The same parser checks
//! the manifest on the host when the image is packed and in Keel when it boots:
//!
//! ```text
//! # comments start with '#'
//! [keel]
//! quantum_ms = 10          # scheduler time slice (default 10)
//! fail_vmx_on_cpu = 2      # test switch: host CPU 2's VT-x set-up fails on purpose
//! apicv = off              # no APIC virtualization for any guest (default on, where the CPU has it)
//! policy.start_below = 50% # the load policy (`policy`): start on-demand guests under 50% load,
//! policy.stop_above = 90%  # pause (or stop) them over 90%, the load measured over
//! policy.window = 2s       # windows of 2 s; action = pause | stop (defaults as shown, pause)
//!
//! [guest hello64]          # one section per guest; the name is used as the console prefix
//! kind = elf               # flat | elf | multiboot | linux
//! image = hello64.elf      # archive entry holding the image
//! memory = 16M             # guest RAM, a multiple of 2M (K, M and G suffixes)
//! cmdline = quiet debug    # free text to the end of the line
//! load = 0x7c00            # flat: load address (default 0x7c00)
//! entry = 0x7c00           # flat: entry point (default: load)
//! modules = initrd.img     # multiboot: archive entries passed as modules
//! module = data.bin a b    # multiboot: one module whose string is "data.bin a b" (QEMU's
//!                          # `-initrd "data.bin a b"`): the archive entry, then its arguments
//! initrd = rootfs.cpio     # linux: the initrd (carried as the guest's one module)
//! restart = 100            # restart the guest up to 100 times when it dies (default 0)
//! apicv = off              # this guest without APIC virtualization (default: [keel]'s apicv)
//! weight = 2               # CPU weight, 1 to 64 (default 1): slices of `weight` quanta
//! cap = 25%                # at most 25% of the machine's CPU time, even when it would idle (default: none)
//! policy = on-demand       # started and paused by the load policy (default none)
//! vcpus = 4                # virtual CPUs, 1 to 16 (default 1): APIC IDs 0-3, the others
//!                          # started by the guest's INIT/SIPI
//! cpus = 0-1,3             # host CPUs its vCPUs may run on (default: all); a CPU that is
//!                          # not up at boot is a warning, and the guest may run on all
//! autostart = off          # loaded but not started (nor given RAM) until `start NAME`
//!                          # (default on)
//! ```
//!
//! A guest "dies" when Keel stops it for any reason other than its own debug-exit or SHUTDOWN
//! hypercall (a triple fault, a bad memory access, ...). A restarted guest is reloaded from its
//! image with ` restart=<k>` appended to its command line ([`restart_cmdline`]); the parser
//! refuses a command line that would be too long for the loaders at the last restart.
//!
//! `image` and `modules` name archive entries: 1-47 bytes, and never `manifest` (the entry of
//! this text).
//!
//! docs/GUESTS.md documents the TOML form users write.

use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestKind {
    /// A flat binary started in 16-bit real mode at `entry` (needs unrestricted guest).
    Flat,
    /// An ELF32 or ELF64 kernel entered in protected or long mode.
    Elf,
    /// A multiboot 1 kernel, entered as a multiboot loader such as QEMU's `-kernel` would.
    Multiboot,
    /// A Linux kernel (keel-boot packs a bzImage or vmlinux into `loader::linux::KernelImage`),
    /// entered by the x86 64-bit boot protocol; its `initrd` is carried as its one module.
    Linux,
    /// A guest restored from a snapshot file (`crate::snapshot`) rather than booted: it goes on
    /// where it was when the snapshot was taken. Its memory and vCPUs must be the snapshot's.
    Snapshot,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestConfig {
    pub name: String,
    pub kind: GuestKind,
    pub image: String,
    pub memory: u64,
    pub cmdline: String,
    pub load: u64,
    pub entry: u64,
    pub modules: Vec<String>,
    /// How many times to restart the guest after it dies.
    pub restart: u32,
    /// How many vCPUs it has (`vcpus`, 1 to [`MAX_VCPUS`]; APIC IDs 0..vcpus-1).
    pub vcpus: u8,
    /// `cpus`: the host CPUs its vCPUs may run on, a bit each (CPU n is bit n), if pinned.
    pub cpus: Option<u64>,
    /// `weight`: its CPU time relative to the others' (1 to [`crate::sched::WEIGHT_MAX`]).
    pub weight: u32,
    /// `cap`: the most CPU time it may use, in percent of the machine's (every host CPU's; 1 to
    /// 100), if capped.
    pub cap: Option<u32>,
    /// `selftest = refuse`: Keel refuses the guest at boot after it has allocated everything the
    /// guest needs (RAM, EPT, VMCS, ...), so a test can check that a refused guest gives it all
    /// back. Its image must still be one the loaders accept (they also run at pack time).
    pub refuse: bool,
    /// `apicv = on | off`: APIC virtualization (`vmx::apicv`) where the CPU offers it, or every
    /// APIC access emulated. After [`parse`] always `Some` (the guest's own key, else `[keel]`'s).
    pub apicv: Option<bool>,
    /// `policy = on-demand`: the load policy starts and pauses (or stops) it (`crate::policy`).
    pub on_demand: bool,
    /// `autostart = on | off` (default on): off loads the guest into the run loop's table without
    /// RAM or a boot; the monitor's `start` boots it.
    pub autostart: bool,
}

/// The archive entry of a `modules` entry: its first word (the rest are the arguments a
/// multiboot kernel sees in the module's string).
pub fn module_file(module: &str) -> &str {
    module.split_whitespace().next().unwrap_or("")
}

/// Keel checking its own failure paths on request (`[keel] selftest = panic | fault`): after VMXON
/// it panics, or executes UD2, so that the tests can see what a Keel bug looks like on COM1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SelfTest {
    Panic,
    Fault,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub quantum_ms: u32,
    pub selftest: Option<SelfTest>,
    /// Test switch (`[keel] fail_vmx_on_cpu = N`): host CPU N (an application processor, N >= 1)
    /// reports its VT-x set-up as failed, so the tests can watch Keel leave it out.
    pub fail_vmx_on_cpu: Option<u32>,
    /// `[keel] apicv = on | off` (default on): the default of every guest's `apicv`.
    pub apicv: bool,
    /// `[keel] policy.*`: the load policy's settings (used when a guest is on demand).
    pub policy: crate::policy::PolicyConfig,
    pub guests: Vec<GuestConfig>,
}

pub const DEFAULT_QUANTUM_MS: u32 = 10;
pub const DEFAULT_FLAT_LOAD: u64 = 0x7c00;
/// Guest RAM is built from 2 MiB EPT pages, so sizes are whole multiples of this.
pub const MEMORY_GRANULE: u64 = 2 << 20;
pub const MAX_GUEST_MEMORY: u64 = 3 << 30;
/// The most vCPUs a guest may have: one bit each in the platform's IPI bookkeeping, APIC IDs
/// below the xAPIC broadcast 0xFF, and few enough that every vCPU's VMCS and save area (8 KiB)
/// stay small next to the guest's RAM.
pub const MAX_VCPUS: u8 = 16;

/// The command line a guest gets at its `restart`-th restart: Keel appends ` restart=<k>`.
pub fn restart_cmdline(cmdline: &str, restart: u32) -> String {
    let mut line = String::from(cmdline);
    if !line.is_empty() {
        line.push(' ');
    }
    line.push_str("restart=");
    line.push_str(&restart.to_string());
    line
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "manifest line {}: {}", self.line, self.message)
    }
}

fn err(line: usize, message: impl ToString) -> ManifestError {
    ManifestError {
        line,
        message: message.to_string(),
    }
}

pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let (num, mul) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1u64 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    parse_u64(num)?.checked_mul(mul)
}

/// A list of host CPUs, `0-1,3` (numbers and ranges, each below [`crate::smp::MAX_CPUS`]), as a
/// mask with bit n for CPU n; `None` if it is not one (or lists none).
pub fn parse_cpu_list(s: &str) -> Option<u64> {
    let mut mask = 0u64;
    for part in s.split(',') {
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (parse_u64(lo)?, parse_u64(hi)?),
            None => (parse_u64(part)?, parse_u64(part)?),
        };
        if lo > hi || hi >= crate::smp::MAX_CPUS as u64 {
            return None;
        }
        for n in lo..=hi {
            mask |= 1 << n;
        }
    }
    (mask != 0).then_some(mask)
}

pub fn parse_u64(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(&hex.replace('_', ""), 16).ok()
    } else {
        s.replace('_', "").parse().ok()
    }
}

struct Partial {
    line: usize,
    name: String,
    kind: Option<GuestKind>,
    image: Option<String>,
    memory: Option<u64>,
    cmdline: String,
    /// The line of the `cmdline` key (0 when there is none).
    cmdline_line: usize,
    load: Option<u64>,
    entry: Option<u64>,
    modules: Vec<String>,
    /// The line of the `modules` key (0 when there is none).
    modules_line: usize,
    /// `initrd` and its line (linux guests).
    initrd: Option<(String, usize)>,
    restart: u32,
    vcpus: u8,
    cpus: Option<u64>,
    weight: u32,
    cap: Option<u32>,
    refuse: bool,
    apicv: Option<bool>,
    on_demand: bool,
    autostart: bool,
}

/// Checks that `file` (an `image` or `module` of guest `guest`) can be an archive entry of its
/// own: not the manifest's entry (two entries of one name: Keel would read the manifest text as
/// the guest) and short enough for an entry name.
fn check_file_name(guest: &str, what: &str, file: &str, line: usize) -> Result<(), ManifestError> {
    if file.is_empty() {
        return Err(err(
            line,
            format_args!("guest {guest}: {what} names no file"),
        ));
    }
    if file == crate::archive::MANIFEST_NAME {
        return Err(err(
            line,
            format_args!(
                "guest {guest}: {what} `{file}` has the name of the ramdisk's manifest entry; rename the file"
            ),
        ));
    }
    if file.len() >= crate::archive::NAME_LEN {
        return Err(err(
            line,
            format_args!(
                "guest {guest}: {what} `{file}` is {} bytes; ramdisk entry names are at most {}",
                file.len(),
                crate::archive::NAME_LEN - 1
            ),
        ));
    }
    Ok(())
}

impl Partial {
    /// The longest command line the guest will get: with the ` restart=<k>` of its last restart.
    /// Refused here, at pack time and when Keel reads the manifest, rather than by the loader at
    /// a restart.
    fn check_cmdline(&self) -> Result<(), ManifestError> {
        let max = crate::loader::CMDLINE_MAX;
        let len = self.cmdline.len();
        let fail = |message: core::fmt::Arguments| Err(err(self.cmdline_line, message));
        if self.cmdline.contains('\0') {
            return fail(format_args!(
                "guest {}: command line contains a NUL byte",
                self.name
            ));
        }
        if self.restart == 0 {
            if len > max {
                return fail(format_args!(
                    "guest {}: command line of {len} bytes is longer than {max}",
                    self.name
                ));
            }
            return Ok(());
        }
        let longest = restart_cmdline(&self.cmdline, self.restart).len();
        if longest > max {
            let suffix = longest - len;
            return fail(format_args!(
                "guest {}: command line of {len} bytes is too long: Keel appends ` restart={}` \
                 ({suffix} bytes) when it restarts the guest, and command lines are at most {max} \
                 bytes with it, so at most {} without it",
                self.name,
                self.restart,
                max - suffix
            ));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<GuestConfig, ManifestError> {
        self.check_cmdline()?;
        let kind = self
            .kind
            .ok_or_else(|| err(self.line, format_args!("guest {} has no kind", self.name)))?;
        // A Linux guest's initrd travels as its one module; other kinds have no initrd.
        match (kind, self.initrd.take()) {
            (GuestKind::Linux, initrd) => {
                if self.modules_line != 0 {
                    return Err(err(
                        self.modules_line,
                        format_args!(
                            "guest {}: a linux guest takes `initrd = FILE`, not modules",
                            self.name
                        ),
                    ));
                }
                self.modules = initrd.map(|(file, _)| file).into_iter().collect();
            }
            (_, Some((_, line))) => {
                return Err(err(
                    line,
                    format_args!(
                        "guest {}: initrd is for kind = linux (multiboot guests take modules)",
                        self.name
                    ),
                ))
            }
            (_, None) => {}
        }
        let image = self
            .image
            .ok_or_else(|| err(self.line, format_args!("guest {} has no image", self.name)))?;
        let memory = self.memory.ok_or_else(|| {
            err(
                self.line,
                format_args!("guest {} has no memory size", self.name),
            )
        })?;
        let load = self.load.unwrap_or(DEFAULT_FLAT_LOAD);
        Ok(GuestConfig {
            name: self.name,
            kind,
            image,
            memory,
            cmdline: self.cmdline,
            load,
            entry: self.entry.unwrap_or(load),
            modules: self.modules,
            restart: self.restart,
            vcpus: self.vcpus,
            cpus: self.cpus,
            weight: self.weight,
            cap: self.cap,
            refuse: self.refuse,
            apicv: self.apicv,
            on_demand: self.on_demand,
            autostart: self.autostart,
        })
    }
}

/// `on` or `off`.
fn parse_switch(value: &str, line: usize, key: &str) -> Result<bool, ManifestError> {
    match value {
        "on" | "true" => Ok(true),
        "off" | "false" => Ok(false),
        _ => Err(err(line, format_args!("{key} must be on or off"))),
    }
}

pub fn parse(text: &str) -> Result<Manifest, ManifestError> {
    let mut manifest = Manifest {
        quantum_ms: DEFAULT_QUANTUM_MS,
        selftest: None,
        fail_vmx_on_cpu: None,
        apicv: true,
        policy: Default::default(),
        guests: Vec::new(),
    };
    // The line of the last `[keel] policy.*` key (0: none).
    let mut policy_line = 0;
    let mut current: Option<Partial> = None;
    let mut in_keel = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(section) = line.strip_prefix('[') {
            let section = section
                .strip_suffix(']')
                .ok_or_else(|| err(line_no, "section header lacks ']'"))?
                .trim();
            if let Some(done) = current.take() {
                manifest.guests.push(done.finish()?);
            }
            in_keel = false;
            if section == "keel" {
                in_keel = true;
            } else if let Some(name) = section.strip_prefix("guest ") {
                let name = name.trim();
                if name.is_empty()
                    || name.len() > 16
                    || !name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                {
                    return Err(err(
                        line_no,
                        "guest names are 1-16 characters of [A-Za-z0-9_-]",
                    ));
                }
                if manifest.guests.iter().any(|g| g.name == name) {
                    return Err(err(line_no, format_args!("guest {name} is defined twice")));
                }
                current = Some(Partial {
                    line: line_no,
                    name: name.to_string(),
                    kind: None,
                    image: None,
                    memory: None,
                    cmdline: String::new(),
                    cmdline_line: 0,
                    load: None,
                    entry: None,
                    modules: Vec::new(),
                    modules_line: 0,
                    initrd: None,
                    restart: 0,
                    vcpus: 1,
                    cpus: None,
                    weight: 1,
                    cap: None,
                    refuse: false,
                    apicv: None,
                    on_demand: false,
                    autostart: true,
                });
            } else {
                return Err(err(line_no, format_args!("unknown section [{section}]")));
            }
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| err(line_no, "expected key = value"))?;
        let key = key.trim();
        // cmdline keeps '#' characters; everything else may carry a trailing comment.
        let value = if key == "cmdline" {
            value.trim()
        } else {
            value.split('#').next().unwrap_or("").trim()
        };
        if in_keel {
            match key {
                "quantum_ms" => {
                    manifest.quantum_ms = parse_u64(value)
                        .filter(|&q| (1..=1000).contains(&q))
                        .ok_or_else(|| err(line_no, "quantum_ms must be 1..1000"))?
                        as u32
                }
                "selftest" => {
                    manifest.selftest = Some(match value {
                        "panic" => SelfTest::Panic,
                        "fault" => SelfTest::Fault,
                        _ => return Err(err(line_no, "selftest must be panic or fault")),
                    })
                }
                "fail_vmx_on_cpu" => {
                    manifest.fail_vmx_on_cpu = Some(
                        parse_u64(value)
                            .and_then(|n| u32::try_from(n).ok())
                            .filter(|&n| n >= 1)
                            .ok_or_else(|| {
                                err(line_no, "fail_vmx_on_cpu must name an AP: 1 or more")
                            })?,
                    )
                }
                "apicv" => manifest.apicv = parse_switch(value, line_no, "apicv")?,
                _ if key.starts_with("policy.") => {
                    manifest
                        .policy
                        .set(&key["policy.".len()..], value)
                        .map_err(|m| err(line_no, m))?;
                    policy_line = line_no;
                }
                _ => return Err(err(line_no, format_args!("unknown key {key} in [keel]"))),
            }
            continue;
        }
        let g = current
            .as_mut()
            .ok_or_else(|| err(line_no, "key outside a section"))?;
        match key {
            "kind" => {
                g.kind = Some(match value {
                    "flat" => GuestKind::Flat,
                    "elf" => GuestKind::Elf,
                    "multiboot" => GuestKind::Multiboot,
                    "linux" => GuestKind::Linux,
                    "snapshot" => GuestKind::Snapshot,
                    _ => {
                        return Err(err(
                            line_no,
                            "kind must be flat, elf, multiboot, linux or snapshot",
                        ))
                    }
                })
            }
            "image" => {
                check_file_name(&g.name, "image", value, line_no)?;
                g.image = Some(value.to_string())
            }
            "memory" => {
                let m = parse_size(value)
                    .ok_or_else(|| err(line_no, "memory must be a size like 16M"))?;
                if m == 0 || m % MEMORY_GRANULE != 0 || m > MAX_GUEST_MEMORY {
                    return Err(err(
                        line_no,
                        "memory must be a non-zero multiple of 2M, at most 3G",
                    ));
                }
                g.memory = Some(m)
            }
            "cmdline" => {
                g.cmdline = value.to_string();
                g.cmdline_line = line_no;
            }
            "load" => {
                g.load =
                    Some(parse_u64(value).ok_or_else(|| err(line_no, "load must be a number"))?)
            }
            "entry" => {
                g.entry =
                    Some(parse_u64(value).ok_or_else(|| err(line_no, "entry must be a number"))?)
            }
            "modules" => {
                for m in value.split_whitespace() {
                    check_file_name(&g.name, "module", m, line_no)?;
                    g.modules.push(m.to_string());
                }
                g.modules_line = line_no;
            }
            "initrd" => {
                check_file_name(&g.name, "initrd", value, line_no)?;
                g.initrd = Some((value.to_string(), line_no));
            }
            "module" => {
                check_file_name(&g.name, "module", module_file(value), line_no)?;
                g.modules
                    .push(value.split_whitespace().collect::<Vec<_>>().join(" "));
            }
            "restart" => {
                g.restart = parse_u64(value)
                    .filter(|&r| r <= 1_000_000)
                    .ok_or_else(|| err(line_no, "restart must be a number up to 1000000"))?
                    as u32
            }
            "weight" => {
                let max = crate::sched::WEIGHT_MAX;
                g.weight = parse_u64(value)
                    .filter(|n| (1..=u64::from(max)).contains(n))
                    .ok_or_else(|| {
                        err(
                            line_no,
                            format_args!(
                                "guest {}: weight must be a number from 1 to {max}, not `{value}`",
                                g.name
                            ),
                        )
                    })? as u32
            }
            "cap" => {
                g.cap = Some(
                    parse_u64(value.strip_suffix('%').unwrap_or(value))
                        .filter(|n| (1..=100).contains(n))
                        .ok_or_else(|| {
                            err(
                                line_no,
                                format_args!(
                                "guest {}: cap must be a percentage from 1% to 100%, not `{value}`",
                                g.name
                            ),
                            )
                        })? as u32,
                )
            }
            "vcpus" => {
                g.vcpus = parse_u64(value)
                    .filter(|n| (1..=u64::from(MAX_VCPUS)).contains(n))
                    .ok_or_else(|| {
                        err(
                            line_no,
                            format_args!(
                            "guest {}: vcpus must be a number from 1 to {MAX_VCPUS}, not `{value}`",
                            g.name
                        ),
                        )
                    })? as u8
            }
            "cpus" => {
                g.cpus = Some(parse_cpu_list(value).ok_or_else(|| {
                    err(
                        line_no,
                        format_args!(
                            "guest {}: cpus must list host CPUs from 0 to {} (such as 0-1,3), not `{value}`",
                            g.name,
                            crate::smp::MAX_CPUS - 1
                        ),
                    )
                })?)
            }
            "selftest" => {
                g.refuse = match value {
                    "refuse" => true,
                    _ => return Err(err(line_no, "a guest's selftest must be refuse")),
                }
            }
            "apicv" => g.apicv = Some(parse_switch(value, line_no, "apicv")?),
            "policy" => {
                g.on_demand = crate::policy::parse_guest_key(value)
                    .map_err(|m| err(line_no, format_args!("guest {}: {m}", g.name)))?;
            }
            "autostart" => {
                g.autostart = match value {
                    "on" | "true" => true,
                    "off" | "false" => false,
                    _ => {
                        return Err(err(
                            line_no,
                            format_args!(
                            "guest {}: autostart must be on or off (true or false), not `{value}`",
                            g.name
                        ),
                        ))
                    }
                }
            }
            _ => return Err(err(line_no, format_args!("unknown key {key}"))),
        }
    }
    if let Some(done) = current.take() {
        manifest.guests.push(done.finish()?);
    }
    for g in &mut manifest.guests {
        g.apicv.get_or_insert(manifest.apicv);
    }
    if policy_line != 0 {
        manifest.policy.check().map_err(|m| err(policy_line, m))?;
    }
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
# demo
[keel]
quantum_ms = 5

[guest real16]
kind = flat
image = real16.bin
memory = 2M
load = 0x1000

[guest mb]
kind = multiboot   # trailing comment
image = mb.elf
memory = 0x400000
cmdline = console=ttyS0 # kept
modules = a b
restart = 7
";

    /// `apicv`: on by default, off for every guest from `[keel]` (wherever that section is),
    /// and a guest's own key wins.
    #[test]
    fn apicv_switch() {
        let m = parse(SAMPLE).unwrap();
        assert!(m.apicv && m.guests.iter().all(|g| g.apicv == Some(true)));
        let m = parse(&alloc::format!("{SAMPLE}[keel]\napicv = off\n")).unwrap();
        assert!(m.guests.iter().all(|g| g.apicv == Some(false)));
        let text = SAMPLE.replace("restart = 7", "restart = 7\napicv = off");
        let m = parse(&text).unwrap();
        assert_eq!(m.guests[0].apicv, Some(true));
        assert_eq!(m.guests[1].apicv, Some(false));
        let text = alloc::format!("[keel]\napicv = off\n{}", one_guest("apicv = on\n"));
        assert_eq!(parse(&text).unwrap().guests[0].apicv, Some(true));
        let e = parse(&one_guest("apicv = yes\n")).unwrap_err();
        assert!(
            alloc::format!("{e}").contains("apicv must be on or off"),
            "{e}"
        );
    }

    #[test]
    fn parses_sample() {
        let m = parse(SAMPLE).unwrap();
        assert_eq!(m.quantum_ms, 5);
        assert_eq!(m.guests.len(), 2);
        let g = &m.guests[0];
        assert_eq!(
            (g.kind, g.memory, g.load, g.entry),
            (GuestKind::Flat, 2 << 20, 0x1000, 0x1000)
        );
        let g = &m.guests[1];
        assert_eq!(g.kind, GuestKind::Multiboot);
        assert_eq!(g.memory, 4 << 20);
        assert_eq!(g.cmdline, "console=ttyS0 # kept");
        assert_eq!(g.modules, ["a", "b"]);
        let m = parse(&one_guest(
            "modules = a\nmodule = b.bin  x  y # comment\nmodules = c\n",
        ))
        .unwrap();
        assert_eq!(m.guests[0].modules, ["a", "b.bin x y", "c"]);
        assert_eq!(module_file(&m.guests[0].modules[1]), "b.bin");
        let e = parse(&one_guest("module = manifest x\n")).unwrap_err();
        assert!(alloc::format!("{e}").contains("module `manifest`"), "{e}");
        assert_eq!((g.restart, m.guests[0].restart), (7, 0));
        let refused =
            parse("[guest r]\nkind = elf\nimage = x\nmemory = 4M\nselftest = refuse\n").unwrap();
        assert!(refused.guests[0].refuse && !m.guests[0].refuse);
        let e =
            parse("[guest r]\nkind = elf\nimage = x\nmemory = 4M\nselftest = panic\n").unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (5, "a guest's selftest must be refuse")
        );
    }

    #[test]
    fn reports_line_numbers() {
        let e = parse("[guest a]\nkind = flat\nimage = x\nmemory = 3M\n").unwrap_err();
        assert_eq!(e.line, 4);
        let e = parse("[guest a]\nkind = weird\n").unwrap_err();
        assert_eq!(e.line, 2);
        let e = parse("[guest a]\nimage = x\nmemory = 2M\n").unwrap_err();
        assert!(e.message.contains("no kind"), "{e}");
        let e = parse("[guest a]\nkind=flat\nimage=x\nmemory=2M\n[guest a]\n").unwrap_err();
        assert!(e.message.contains("twice"));
        let e = parse("[bogus]\n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (1, "unknown section [bogus]"));
        assert_eq!(
            parse("[keel]\nselftest = fault\n").unwrap().selftest,
            Some(SelfTest::Fault)
        );
        let e = parse("[keel]\nselftest = maybe\n").unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "selftest must be panic or fault")
        );
        assert_eq!(
            parse("[keel]\nfail_vmx_on_cpu = 2\n")
                .unwrap()
                .fail_vmx_on_cpu,
            Some(2)
        );
        assert_eq!(parse(SAMPLE).unwrap().fail_vmx_on_cpu, None);
        let e = parse("[keel]\nfail_vmx_on_cpu = 0\n").unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (2, "fail_vmx_on_cpu must name an AP: 1 or more")
        );
        let e = parse("x = 1\n").unwrap_err();
        assert_eq!((e.line, e.message.as_str()), (1, "key outside a section"));
    }

    fn one_guest(keys: &str) -> String {
        format!("[guest g1]\nkind = multiboot\nimage = g1.elf\nmemory = 2M\n{keys}")
    }

    /// A guest image or module named `manifest` would be a second archive entry of that name
    /// (Keel booted the manifest text as the guest); names must also fit an archive entry.
    #[test]
    fn refuses_file_names_the_archive_cannot_hold() {
        let e = parse("[guest g1]\nkind = elf\nimage = manifest\nmemory = 2M\n").unwrap_err();
        assert_eq!(e.line, 3);
        assert_eq!(
            e.message,
            "guest g1: image `manifest` has the name of the ramdisk's manifest entry; rename the file"
        );
        let e = parse(&one_guest("modules = a manifest\n")).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (
                5,
                "guest g1: module `manifest` has the name of the ramdisk's manifest entry; rename the file"
            )
        );
        let long = "n".repeat(48);
        let e = parse(&one_guest(&format!("modules = {long}\n"))).unwrap_err();
        assert_eq!(
            e.message,
            format!("guest g1: module `{long}` is 48 bytes; ramdisk entry names are at most 47")
        );
        assert!(parse(&one_guest(&format!("modules = {}\n", &long[1..]))).is_ok());
    }

    /// Keel appends ` restart=<k>` at each restart; the longest command line it will pass
    /// (at the last restart) must fit the loaders' 4095 bytes, or the guest fails at a restart.
    #[test]
    fn command_line_limit_counts_the_restart_suffix() {
        let max = crate::loader::CMDLINE_MAX;
        // restart = 7: " restart=7" is 10 bytes.
        let fits = one_guest(&format!(
            "cmdline = {}\nrestart = 7\n",
            "c".repeat(max - 10)
        ));
        assert_eq!(parse(&fits).unwrap().guests[0].cmdline.len(), max - 10);
        let e = parse(&one_guest(&format!(
            "cmdline = {}\nrestart = 7\n",
            "c".repeat(max - 9)
        )))
        .unwrap_err();
        assert_eq!(e.line, 5);
        assert_eq!(
            e.message,
            "guest g1: command line of 4086 bytes is too long: Keel appends ` restart=7` (10 bytes) \
             when it restarts the guest, and command lines are at most 4095 bytes with it, so at \
             most 4085 without it"
        );
        // No restarts: the whole 4095 bytes.
        assert!(parse(&one_guest(&format!("cmdline = {}\n", "c".repeat(max)))).is_ok());
        let e = parse(&one_guest(&format!("cmdline = {}\n", "c".repeat(max + 1)))).unwrap_err();
        assert_eq!(
            e.message,
            "guest g1: command line of 4096 bytes is longer than 4095"
        );
        // restart = 1000000: " restart=1000000" is 16 bytes, whatever order the keys come in.
        let e = parse(&one_guest(&format!(
            "restart = 1000000\ncmdline = {}\n",
            "c".repeat(max - 15)
        )))
        .unwrap_err();
        assert_eq!(e.line, 6);
        assert!(e.message.contains("at most 4079 without it"), "{e}");
        let e = parse(&one_guest("cmdline = a\0b\n")).unwrap_err();
        assert_eq!(e.message, "guest g1: command line contains a NUL byte");
    }

    /// `kind = linux` takes its initrd with `initrd =` and carries it as its one module; other
    /// kinds refuse `initrd`, and a linux guest refuses `modules`.
    #[test]
    fn linux_guests_take_an_initrd() {
        let linux = "[guest lx]\nkind = linux\nimage = bzImage\nmemory = 256M\n";
        let m = parse(&format!(
            "{linux}initrd = rootfs.cpio\ncmdline = console=ttyS0\n"
        ))
        .unwrap();
        let g = &m.guests[0];
        assert_eq!(g.kind, GuestKind::Linux);
        assert_eq!((g.image.as_str(), g.memory), ("bzImage", 256 << 20));
        assert_eq!(g.modules, ["rootfs.cpio"]);
        assert_eq!(g.cmdline, "console=ttyS0");
        assert!(parse(linux).unwrap().guests[0].modules.is_empty());
        let e = parse(&format!("{linux}modules = a\n")).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (
                5,
                "guest lx: a linux guest takes `initrd = FILE`, not modules"
            )
        );
        let e = parse(&one_guest("initrd = rootfs.cpio\n")).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (
                5,
                "guest g1: initrd is for kind = linux (multiboot guests take modules)"
            )
        );
        let e = parse(&format!("{linux}initrd = manifest\n")).unwrap_err();
        assert_eq!(e.line, 5);
        let e = parse("[guest a]\nkind = vms\n").unwrap_err();
        assert_eq!(
            e.message,
            "kind must be flat, elf, multiboot, linux or snapshot"
        );
    }

    #[test]
    fn weights_and_caps() {
        let m =
            parse("[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\nweight = 3\ncap = 25%\n")
                .unwrap();
        assert_eq!((m.guests[0].weight, m.guests[0].cap), (3, Some(25)));
        let m = parse("[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\ncap = 40\n").unwrap();
        assert_eq!((m.guests[0].weight, m.guests[0].cap), (1, Some(40)));
        for (bad, says) in [
            (
                "weight = 0",
                "weight must be a number from 1 to 64, not `0`",
            ),
            (
                "weight = 65",
                "weight must be a number from 1 to 64, not `65`",
            ),
            (
                "cap = 0%",
                "cap must be a percentage from 1% to 100%, not `0%`",
            ),
            (
                "cap = 101%",
                "cap must be a percentage from 1% to 100%, not `101%`",
            ),
        ] {
            let e = parse(&alloc::format!(
                "[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\n{bad}\n"
            ))
            .unwrap_err();
            assert_eq!(e.line, 5);
            assert_eq!(e.message, alloc::format!("guest a: {says}"));
        }
    }

    /// `[keel] policy.*` and a guest's `policy`: read, and bad values refused at their line with
    /// the guest's name.
    #[test]
    fn load_policy_keys() {
        let text =
            "[keel]\npolicy.start_below = 30%\npolicy.stop_above = 80%\npolicy.window = 1s\n\
                    [guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\npolicy = on-demand\n\
                    [guest b]\nkind = flat\nimage = b.bin\nmemory = 2M\n";
        let m = parse(text).unwrap();
        assert_eq!(
            m.policy,
            crate::policy::PolicyConfig {
                start_below: 30,
                stop_above: 80,
                window_ms: 1000,
                action: crate::policy::Action::Pause
            }
        );
        assert!(m.guests[0].on_demand && !m.guests[1].on_demand);
        let e = parse(&text.replace("policy = on-demand", "policy = eager")).unwrap_err();
        assert_eq!(
            (e.line, e.message.as_str()),
            (9, "guest a: policy must be on-demand or none, not `eager`")
        );
        let e = parse(&text.replace("= 30%", "= 90%")).unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.contains("must be under policy.stop_above"), "{e}");
        let e = parse(&text.replace("window = 1s", "window = 5ms")).unwrap_err();
        assert_eq!(e.line, 4);
        assert!(e.message.starts_with("policy.window must be"), "{e}");
        let e = parse("[keel]\npolicy.when = 5%\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.message.contains("unknown key policy.when"), "{e}");
    }

    #[test]
    fn cpus_lists_the_host_cpus_a_guest_may_run_on() {
        let all = parse("[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\n").unwrap();
        assert_eq!(all.guests[0].cpus, None, "every CPU by default");
        for (list, mask) in [
            ("1", 0b10),
            ("0-1", 0b11),
            ("0-1,3", 0b1011),
            ("63", 1 << 63),
        ] {
            let m = parse(&alloc::format!(
                "[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\ncpus = {list}\n"
            ))
            .unwrap();
            assert_eq!(m.guests[0].cpus, Some(mask), "{list}");
        }
        for bad in ["64", "1-0", "0-64", "", "a", "0,,1", "-1"] {
            let e = parse(&alloc::format!(
                "[guest web]\nkind = flat\nimage = a.bin\nmemory = 2M\ncpus = {bad}\n"
            ))
            .unwrap_err();
            assert_eq!(
                alloc::format!("{e}"),
                alloc::format!(
                    "manifest line 5: guest web: cpus must list host CPUs from 0 to 63 (such as 0-1,3), not `{bad}`"
                )
            );
        }
    }

    #[test]
    fn vcpus_from_one_to_the_maximum() {
        let one = parse("[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\n").unwrap();
        assert_eq!(one.guests[0].vcpus, 1, "one vCPU by default");
        let four =
            parse("[guest a]\nkind = flat\nimage = a.bin\nmemory = 2M\nvcpus = 4\n").unwrap();
        assert_eq!(four.guests[0].vcpus, 4);
        for bad in ["0", "17", "-1", "two", "256"] {
            let text = alloc::format!(
                "[guest web]\nkind = flat\nimage = a.bin\nmemory = 2M\nvcpus = {bad}\n"
            );
            let e = parse(&text).unwrap_err();
            assert_eq!(e.line, 5, "{bad}");
            assert_eq!(
                e.message,
                alloc::format!("guest web: vcpus must be a number from 1 to 16, not `{bad}`")
            );
        }
    }

    #[test]
    fn restart_suffix() {
        assert_eq!(restart_cmdline("quiet", 3), "quiet restart=3");
        assert_eq!(restart_cmdline("", 12), "restart=12");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("16M"), Some(16 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("0x1000"), Some(0x1000));
        assert_eq!(parse_size("zz"), None);
    }

    #[test]
    fn autostart_off_and_its_errors_name_the_guest() {
        let base = "[guest web]\nkind = flat\nimage = a.bin\nmemory = 2M\n";
        assert!(parse(base).unwrap().guests[0].autostart, "on by default");
        for off in ["off", "false"] {
            let m = parse(&format!("{base}autostart = {off}\n")).unwrap();
            assert!(!m.guests[0].autostart);
        }
        assert!(parse(&format!("{base}autostart = true\n")).unwrap().guests[0].autostart);
        let e = parse(&format!("{base}autostart = later\n")).unwrap_err();
        assert_eq!(e.line, 5);
        assert_eq!(
            e.message,
            "guest web: autostart must be on or off (true or false), not `later`"
        );
    }
}
