//! The command line of `keel-boot` (also reached as `cargo keel ...`).

use std::path::PathBuf;

use crate::emulator::Emulator;

pub const USAGE: &str = "\
keel-boot: build, boot and flash Keel images

USAGE:
    cargo keel image [IMAGE OPTIONS]
    cargo keel run   [IMAGE OPTIONS] [RUN OPTIONS]
    cargo keel flash DEVICE [IMAGE OPTIONS] [--image PATH] [--bios] [--force] [--yes]
    cargo keel bench [IMAGE OPTIONS] [--timeout SECS] [--echo]

IMAGE OPTIONS:
    --manifest PATH   guest manifest (default tests/guests/manifests/demo.manifest)
    --linux KERNEL    instead of a manifest: one Linux guest booting KERNEL (a bzImage or
                      vmlinux; the manifest written for it is <out>/linux-guest/linux.manifest)
    --initrd FILE     (with --linux) the guest's initrd / initramfs
    --append TEXT     (with --linux) its command line (default: console=ttyS0)
    --linux-memory SIZE  (with --linux) its RAM, e.g. 512M (default 256M); the emulated
                      machine gets enough more for Keel and the ramdisk unless --memory says
    --files DIR       take the files the manifest names from DIR instead of building
                      the guests with tests/guests/build.sh
    --out DIR         where images go (default target/keel/<profile>)
    --release         build the kernel with the release profile
    --quiet           hide build output unless a build fails

RUN OPTIONS:
    --image PATH      boot this disk image instead of building one
    --emulator E      bochs | qemu | qemu-kvm (default: qemu-kvm if /dev/kvm exists and
                      the CPU has vmx, else bochs)
    --uefi            boot the UEFI image with OVMF (default: BIOS image)
    --timeout SECS    stop the emulator after SECS (0: never; default 300 Bochs BIOS,
                      600 Bochs UEFI, 120 QEMU, 60 KVM)
    --memory MIB      guest-physical memory of the emulated machine (default 256; Bochs:
                      at most 2048)
    --ips N           Bochs instructions per emulated second (default 10000000)
    --cpu MODEL       Bochs CPU model (default corei7_skylake_x)
    --work-dir DIR    keep the run's files (serial.log, e9.log, emulator.*, bochsrc) in DIR
    --no-echo         do not copy COM1 to stdout
    --no-input        do not forward what you type to COM1 (forwarded by default when
                      stdin is a terminal; Keel reads keys such as `s` there, then Enter)

`run` exits with QEMU's status ((code << 1) | 1 from isa-debug-exit) or, in Bochs, the status
of Keel's `keel: exit status N` line; 124 on a timeout, 130 when interrupted.

FLASH OPTIONS:
    --image PATH      write this image (default: build, then write the UEFI image)
    --bios            write the BIOS image instead of the UEFI one
    --force           accept a device that is not marked removable
    --yes             do not ask for confirmation

BENCH OPTIONS (docs/BENCHMARKS.md; always a release build, default manifest bench.manifest):
    --timeout SECS    time limit of each of the two Bochs boots (default 120)
    --echo            copy COM1 of both boots to the terminal
";

/// `--linux KERNEL [--initrd FILE] [--append TEXT] [--linux-memory SIZE]`: a one-guest manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinuxArgs {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
}

/// The guest RAM `--linux` gives when `--linux-memory` does not say.
pub const DEFAULT_LINUX_MEMORY: u64 = 256 << 20;
/// The command line `--linux` gives when `--append` does not say.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0";

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageArgs {
    pub manifest: Option<PathBuf>,
    /// `--linux`: build a one-guest manifest instead of reading one.
    pub linux: Option<LinuxArgs>,
    pub files: Option<PathBuf>,
    pub out: Option<PathBuf>,
    pub release: bool,
    pub quiet: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunArgs {
    pub build: ImageArgs,
    pub image: Option<PathBuf>,
    pub emulator: Option<Emulator>,
    pub uefi: bool,
    /// `Some(0)` means no limit.
    pub timeout_secs: Option<u64>,
    pub memory_mib: Option<u32>,
    pub ips: Option<u64>,
    pub cpu: Option<String>,
    pub work_dir: Option<PathBuf>,
    pub no_echo: bool,
    pub no_input: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FlashArgs {
    pub build: ImageArgs,
    pub device: PathBuf,
    pub image: Option<PathBuf>,
    pub bios: bool,
    pub force: bool,
    pub yes: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cmd {
    Image(ImageArgs),
    Run(RunArgs),
    Flash(FlashArgs),
    Bench(crate::bench::BenchArgs),
    Help,
}

/// Splits `--key=value` and hands out values of `--key value`.
struct Args<'a> {
    items: std::slice::Iter<'a, String>,
    inline: Option<String>,
}

impl<'a> Args<'a> {
    fn next_flag(&mut self) -> Option<String> {
        let item = self.items.next()?;
        match item.split_once('=') {
            Some((flag, value)) if item.starts_with("--") => {
                self.inline = Some(value.to_string());
                Some(flag.to_string())
            }
            _ => {
                self.inline = None;
                Some(item.clone())
            }
        }
    }

    fn value(&mut self, flag: &str) -> Result<String, String> {
        if let Some(v) = self.inline.take() {
            return Ok(v);
        }
        self.items
            .next()
            .cloned()
            .ok_or_else(|| format!("{flag} needs a value"))
    }

    fn number<T: std::str::FromStr>(&mut self, flag: &str) -> Result<T, String> {
        let v = self.value(flag)?;
        v.parse()
            .map_err(|_| format!("{flag} takes a number, not `{v}`"))
    }

    /// A flag that takes no value must not have been given one.
    fn no_value(&mut self, flag: &str) -> Result<(), String> {
        match self.inline.take() {
            Some(_) => Err(format!("{flag} takes no value")),
            None => Ok(()),
        }
    }
}

/// The `--linux` options as they are read, checked together by [`finish_image_args`].
#[derive(Default)]
struct LinuxFlags {
    kernel: Option<PathBuf>,
    initrd: Option<PathBuf>,
    append: Option<String>,
    memory: Option<u64>,
}

/// Handles the options every subcommand shares; false if `flag` is not one of them.
fn image_flag(
    flag: &str,
    args: &mut Args,
    b: &mut ImageArgs,
    lx: &mut LinuxFlags,
) -> Result<bool, String> {
    match flag {
        "--manifest" => b.manifest = Some(args.value(flag)?.into()),
        "--linux" => lx.kernel = Some(args.value(flag)?.into()),
        "--initrd" => lx.initrd = Some(args.value(flag)?.into()),
        "--append" => lx.append = Some(args.value(flag)?),
        "--linux-memory" => {
            let v = args.value(flag)?;
            let m = keel::manifest::parse_size(&v)
                .filter(|&m| {
                    m != 0
                        && m % keel::manifest::MEMORY_GRANULE == 0
                        && m <= keel::manifest::MAX_GUEST_MEMORY
                })
                .ok_or_else(|| {
                    format!("--linux-memory takes a multiple of 2M up to 3G (e.g. 512M), not `{v}`")
                })?;
            lx.memory = Some(m)
        }
        "--files" => b.files = Some(args.value(flag)?.into()),
        "--out" => b.out = Some(args.value(flag)?.into()),
        "--release" => {
            args.no_value(flag)?;
            b.release = true
        }
        "--quiet" => {
            args.no_value(flag)?;
            b.quiet = true
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Turns the `--linux` flags into `b.linux`: the others need `--linux`, which excludes a
/// manifest and a files directory (it makes both).
fn finish_image_args(b: &mut ImageArgs, lx: LinuxFlags) -> Result<(), String> {
    let Some(kernel) = lx.kernel else {
        for (given, flag) in [
            (lx.initrd.is_some(), "--initrd"),
            (lx.append.is_some(), "--append"),
            (lx.memory.is_some(), "--linux-memory"),
        ] {
            if given {
                return Err(format!("{flag} goes with --linux KERNEL"));
            }
        }
        return Ok(());
    };
    if b.manifest.is_some() || b.files.is_some() {
        return Err(
            "--linux makes its own manifest: use it without --manifest and --files (or add a \
             `kind = linux` guest to your manifest)"
                .into(),
        );
    }
    b.linux = Some(LinuxArgs {
        kernel,
        initrd: lx.initrd,
        cmdline: lx.append.unwrap_or_else(|| DEFAULT_LINUX_CMDLINE.into()),
        memory: lx.memory.unwrap_or(DEFAULT_LINUX_MEMORY),
    });
    Ok(())
}

/// The most memory Bochs emulates: its `megs` (and `memory: host=`) setting stops at 2048 MiB.
pub const BOCHS_MAX_MEMORY_MIB: u32 = 2048;

/// `--memory` must be something the chosen emulator can give (checked once the whole command
/// line is read, so the order of `--emulator` and `--memory` does not matter).
fn check_memory(r: &RunArgs) -> Result<(), String> {
    match (r.memory_mib, r.emulator) {
        (Some(0), _) => Err("--memory 0: the emulated machine needs some memory".into()),
        (Some(m), Some(Emulator::Bochs)) if m > BOCHS_MAX_MEMORY_MIB => Err(format!(
            "--memory {m}: Bochs emulates at most {BOCHS_MAX_MEMORY_MIB} MiB (its `megs` limit)"
        )),
        _ => Ok(()),
    }
}

/// Parses the arguments after the program name.
pub fn parse(argv: &[String]) -> Result<Cmd, String> {
    let Some((sub, rest)) = argv.split_first() else {
        return Ok(Cmd::Help);
    };
    let mut args = Args {
        items: rest.iter(),
        inline: None,
    };
    match sub.as_str() {
        "help" | "--help" | "-h" => Ok(Cmd::Help),
        "image" => {
            let mut b = ImageArgs::default();
            let mut lx = LinuxFlags::default();
            while let Some(flag) = args.next_flag() {
                if !image_flag(&flag, &mut args, &mut b, &mut lx)? {
                    return Err(format!("image: unknown option `{flag}`"));
                }
            }
            finish_image_args(&mut b, lx)?;
            Ok(Cmd::Image(b))
        }
        "run" => {
            let mut r = RunArgs::default();
            let mut lx = LinuxFlags::default();
            while let Some(flag) = args.next_flag() {
                if image_flag(&flag, &mut args, &mut r.build, &mut lx)? {
                    continue;
                }
                match flag.as_str() {
                    "--image" => r.image = Some(args.value(&flag)?.into()),
                    "--emulator" => {
                        let v = args.value(&flag)?;
                        r.emulator = Some(Emulator::parse(&v).ok_or_else(|| {
                            format!("--emulator takes bochs, qemu or qemu-kvm, not `{v}`")
                        })?)
                    }
                    "--uefi" => {
                        args.no_value(&flag)?;
                        r.uefi = true
                    }
                    "--timeout" => r.timeout_secs = Some(args.number(&flag)?),
                    "--memory" => r.memory_mib = Some(args.number(&flag)?),
                    "--ips" => r.ips = Some(args.number(&flag)?),
                    "--cpu" => r.cpu = Some(args.value(&flag)?),
                    "--work-dir" => r.work_dir = Some(args.value(&flag)?.into()),
                    "--no-echo" => {
                        args.no_value(&flag)?;
                        r.no_echo = true
                    }
                    "--no-input" => {
                        args.no_value(&flag)?;
                        r.no_input = true
                    }
                    _ => return Err(format!("run: unknown option `{flag}`")),
                }
            }
            finish_image_args(&mut r.build, lx)?;
            check_memory(&r)?;
            Ok(Cmd::Run(r))
        }
        "flash" => {
            let mut f = FlashArgs::default();
            let mut lx = LinuxFlags::default();
            let mut device = None;
            while let Some(flag) = args.next_flag() {
                if image_flag(&flag, &mut args, &mut f.build, &mut lx)? {
                    continue;
                }
                match flag.as_str() {
                    "--image" => f.image = Some(args.value(&flag)?.into()),
                    "--bios" => {
                        args.no_value(&flag)?;
                        f.bios = true
                    }
                    "--force" => {
                        args.no_value(&flag)?;
                        f.force = true
                    }
                    "--yes" => {
                        args.no_value(&flag)?;
                        f.yes = true
                    }
                    other if other.starts_with('-') => {
                        return Err(format!("flash: unknown option `{other}`"))
                    }
                    other if device.is_none() => device = Some(PathBuf::from(other)),
                    other => return Err(format!("flash: unexpected argument `{other}`")),
                }
            }
            finish_image_args(&mut f.build, lx)?;
            f.device = device.ok_or("flash: which device? e.g. `cargo keel flash /dev/sdb`")?;
            Ok(Cmd::Flash(f))
        }
        "bench" => {
            let mut b = crate::bench::BenchArgs::default();
            let mut lx = LinuxFlags::default();
            while let Some(flag) = args.next_flag() {
                if image_flag(&flag, &mut args, &mut b.build, &mut lx)? {
                    continue;
                }
                match flag.as_str() {
                    "--timeout" => b.timeout_secs = Some(args.number(&flag)?),
                    "--echo" => {
                        args.no_value(&flag)?;
                        b.echo = true
                    }
                    _ => return Err(format!("bench: unknown option `{flag}`")),
                }
            }
            if lx.kernel.is_some() {
                return Err("bench: --linux is for image, run and flash".into());
            }
            finish_image_args(&mut b.build, lx)?;
            b.build.release = true;
            Ok(Cmd::Bench(b))
        }
        other => Err(format!(
            "unknown command `{other}` (image, run, flash, bench or help)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Cmd, String> {
        let argv: Vec<String> = line.split_whitespace().map(String::from).collect();
        parse(&argv)
    }

    #[test]
    fn run_options() {
        let Ok(Cmd::Run(r)) = p("run --emulator=qemu --uefi --timeout 30 --manifest m --release")
        else {
            panic!("run parses");
        };
        assert_eq!(r.emulator, Some(Emulator::Qemu));
        assert!(r.uefi && r.build.release);
        assert_eq!(r.timeout_secs, Some(30));
        assert_eq!(r.build.manifest, Some(PathBuf::from("m")));
    }

    #[test]
    fn image_defaults_and_help() {
        assert_eq!(p("image"), Ok(Cmd::Image(ImageArgs::default())));
        assert_eq!(p(""), Ok(Cmd::Help));
        assert_eq!(p("--help"), Ok(Cmd::Help));
    }

    #[test]
    fn flash_takes_one_device() {
        let Ok(Cmd::Flash(f)) = p("flash /dev/sdb --yes --image x.img") else {
            panic!("flash parses");
        };
        assert_eq!(f.device, PathBuf::from("/dev/sdb"));
        assert!(f.yes && !f.force);
        assert_eq!(f.image, Some(PathBuf::from("x.img")));
        assert!(p("flash").is_err());
        assert!(p("flash /dev/sdb /dev/sdc").is_err());
    }

    /// Bochs' `megs` takes at most 2048 MiB; more must fail here, not in Bochs' log.
    #[test]
    fn bochs_memory_is_capped() {
        assert_eq!(
            p("run --emulator bochs --memory 4096"),
            Err("--memory 4096: Bochs emulates at most 2048 MiB (its `megs` limit)".into())
        );
        assert_eq!(
            p("run --memory 3000 --emulator bochs"),
            Err("--memory 3000: Bochs emulates at most 2048 MiB (its `megs` limit)".into())
        );
        let Ok(Cmd::Run(r)) = p("run --emulator bochs --memory 2048") else {
            panic!("2048 MiB is Bochs' largest");
        };
        assert_eq!(r.memory_mib, Some(2048));
        assert!(matches!(
            p("run --emulator qemu --memory 4096"),
            Ok(Cmd::Run(_))
        ));
        assert_eq!(
            p("run --memory 0"),
            Err("--memory 0: the emulated machine needs some memory".into())
        );
    }

    /// `--linux` and its companions; `--append` keeps its spaces when given as one argument.
    #[test]
    fn linux_options() {
        let argv: Vec<String> = [
            "run",
            "--linux",
            "bz",
            "--initrd=rd.cpio",
            "--append",
            "console=ttyS0 quiet",
            "--linux-memory",
            "512M",
            "--emulator",
            "bochs",
        ]
        .map(String::from)
        .to_vec();
        let Ok(Cmd::Run(r)) = parse(&argv) else {
            panic!("run --linux parses");
        };
        assert_eq!(
            r.build.linux,
            Some(LinuxArgs {
                kernel: "bz".into(),
                initrd: Some("rd.cpio".into()),
                cmdline: "console=ttyS0 quiet".into(),
                memory: 512 << 20,
            })
        );
        assert_eq!(
            r.memory_mib, None,
            "the machine's memory is left to the run"
        );
        let Ok(Cmd::Image(b)) = p("image --linux vmlinux") else {
            panic!("image --linux parses");
        };
        assert_eq!(
            b.linux,
            Some(LinuxArgs {
                kernel: "vmlinux".into(),
                initrd: None,
                cmdline: "console=ttyS0".into(),
                memory: 256 << 20,
            })
        );
        assert_eq!(
            p("run --initrd x"),
            Err("--initrd goes with --linux KERNEL".into())
        );
        assert_eq!(
            p("run --linux-memory 3M --linux bz"),
            Err("--linux-memory takes a multiple of 2M up to 3G (e.g. 512M), not `3M`".into())
        );
        assert_eq!(
            p("run --linux bz --manifest m"),
            Err(
                "--linux makes its own manifest: use it without --manifest and --files (or add \
                 a `kind = linux` guest to your manifest)"
                    .into()
            )
        );
        assert!(p("bench --linux bz").is_err());
    }

    #[test]
    fn errors_are_readable() {
        assert_eq!(
            p("run --emulator vbox"),
            Err("--emulator takes bochs, qemu or qemu-kvm, not `vbox`".into())
        );
        assert_eq!(
            p("run --timeout soon"),
            Err("--timeout takes a number, not `soon`".into())
        );
        assert_eq!(p("run --timeout"), Err("--timeout needs a value".into()));
        assert_eq!(p("run --uefi=1"), Err("--uefi takes no value".into()));
        assert!(p("image --bogus").is_err());
        assert!(p("boot").is_err());
    }
}
