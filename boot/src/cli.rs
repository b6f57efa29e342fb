//! The command line of `keel-boot` (also reached as `cargo keel ...`), declared with clap.
//!
//! [`parse`] reads it and hands back the plain option structs the library takes ([`Cmd`]) after
//! the checks that involve more than one option; `--help`, `--version` and clap's own errors come
//! back as a `clap::Error` that knows how to print itself and with which exit status.
//!
//! Adding a subcommand: a variant of `Sub` (its help line is the doc comment), an arm in
//! `Cli::into_invocation`, a variant of [`Cmd`] and an arm in main.rs.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::builder::PossibleValue;
use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::emulator::Emulator;

/// `--linux KERNEL [--initrd FILE] [--append TEXT] [--linux-memory SIZE] [--vcpus N]`: a
/// one-guest manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinuxArgs {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    /// Guest RAM in bytes.
    pub memory: u64,
    /// The guest's vCPUs (the manifest's `vcpus`), 1 to `keel::manifest::MAX_VCPUS`.
    pub vcpus: u8,
}

/// The guest RAM `--linux` gives when `--linux-memory` does not say.
pub const DEFAULT_LINUX_MEMORY: u64 = 256 << 20;
/// The command line `--linux` gives when `--append` does not say.
pub const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0";
/// The vCPUs `--linux` gives when `--vcpus` does not say.
pub const DEFAULT_LINUX_VCPUS: u8 = 1;

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
    /// Processors of the emulated machine (Bochs `cpu: count=N`, QEMU `-smp N`).
    pub cpus: Option<u32>,
    pub work_dir: Option<PathBuf>,
    pub no_echo: bool,
    pub no_input: bool,
    /// `--control PATH`: the control channel's socket [default: `control::default_socket`].
    pub control: Option<PathBuf>,
    /// `--bulk FILE`: Keel's bulk disk (docs/SNAPSHOTS.md, "The bulk disk").
    pub bulk: Option<PathBuf>,
}

/// `cargo keel ctl COMMAND...`: one command to a running Keel over its control channel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CtlArgs {
    /// The command line, words joined by spaces (`list`, `pause NAME`, ...).
    pub command: String,
    /// The socket [default: `control::default_socket` of the checkout].
    pub control: Option<PathBuf>,
    /// Print the raw JSON reply.
    pub json: bool,
    pub timeout_secs: u64,
    /// `--out FILE`: where `snapshot NAME` writes the snapshot.
    pub out: Option<PathBuf>,
    /// `--bulk FILE`: the run's bulk disk, through which `snapshot` and `restore` move the stream.
    pub bulk: Option<PathBuf>,
}

/// `cargo keel migrate NAME --from SOCKET_A --to SOCKET_B`: live migration between two runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrateArgs {
    pub name: String,
    pub from: PathBuf,
    pub to: PathBuf,
    pub timeout_secs: u64,
    /// `--from-bulk FILE --to-bulk FILE`: both runs' bulk disks, through which the stream goes.
    pub bulk: Option<(PathBuf, PathBuf)>,
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
    Ctl(CtlArgs),
    Migrate(MigrateArgs),
}

/// What the command line asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// `--workspace DIR`: the Keel checkout to build from (see `image::locate_workspace`).
    pub workspace: Option<PathBuf>,
    pub cmd: Cmd,
}

/// The most memory Bochs emulates: its `megs` (and `memory: host=`) setting stops at 2048 MiB.
pub const BOCHS_MAX_MEMORY_MIB: u32 = 2048;

const ABOUT: &str = "Build, boot and flash Keel images (docs/BOOTING.md)";

const RUN_AFTER_HELP: &str = "\
Exit status: QEMU's ((code << 1) | 1 from isa-debug-exit) or, in Bochs, the N of Keel's
`keel: exit status N` line; 1 when Keel printed no status line, 124 on a timeout, 130 after Ctrl-C.
While it runs, what you type goes to COM1 (the keys Keel reads there: docs/BOOTING.md, \"Keel's console keys\").";

#[derive(Parser, Debug)]
#[command(
    name = "keel-boot",
    bin_name = "cargo keel",
    version,
    about = ABOUT,
    arg_required_else_help = true,
    after_help = "Run `cargo keel help COMMAND` or `cargo keel COMMAND --help` for its options."
)]
struct Cli {
    /// The Keel checkout to build in [default: the one holding the current directory, or
    /// $KEEL_WORKSPACE]
    #[arg(long, global = true, value_name = "DIR")]
    workspace: Option<PathBuf>,
    #[command(subcommand)]
    sub: Sub,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// Build the kernel and the guests, pack the ramdisk, write the BIOS and UEFI disk images
    Image {
        #[command(flatten)]
        build: BuildOpts,
        #[command(flatten)]
        linux: LinuxOpts,
    },
    /// Build the images (or take --image) and boot one in an emulator, showing COM1
    #[command(after_help = RUN_AFTER_HELP)]
    Run(Box<RunOpts>),
    /// Write an image to a USB stick, after checking that DEVICE is one
    Flash(FlashOpts),
    /// The exit-path benchmark: Keel and a bare run in Bochs, one table (docs/BENCHMARKS.md)
    Bench(BenchOpts),
    /// Send one command to a running `cargo keel run` over Keel's control channel (COM2)
    #[command(after_help = CTL_AFTER_HELP)]
    Ctl(CtlOpts),
    /// Move a running guest from one `cargo keel run` to another while it runs (docs/SNAPSHOTS.md)
    Migrate(MigrateOpts),
}

#[derive(Args, Debug)]
struct MigrateOpts {
    /// The guest (its name in both manifests; stopped on the target, e.g. `autostart = false`)
    name: String,
    /// The control socket of the Keel the guest runs on now (`cargo keel run --control PATH`)
    #[arg(long, value_name = "SOCKET")]
    from: PathBuf,
    /// The control socket of the Keel it moves to
    #[arg(long, value_name = "SOCKET")]
    to: PathBuf,
    /// How long to wait for each reply, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// The bulk disk of the Keel the guest runs on now (`cargo keel run --bulk FILE`): with
    /// `--to-bulk`, the stream goes through the disks instead of the serial lines
    #[arg(long, value_name = "FILE", requires = "to_bulk")]
    from_bulk: Option<PathBuf>,
    /// The bulk disk of the Keel it moves to
    #[arg(long, value_name = "FILE", requires = "from_bulk")]
    to_bulk: Option<PathBuf>,
}

const CTL_AFTER_HELP: &str = "\
Commands: help, list, stats NAME, regs NAME, pause NAME, resume NAME, kill NAME, restart NAME,
start NAME, balloon NAME SIZE, console NAME, quit, snapshot NAME [paused] --out FILE, restore NAME
FILE [paused] (NAME: a guest's name or id). Examples: `cargo keel ctl list`, `cargo keel ctl pause
linux`, `cargo keel ctl balloon big 8M`, `cargo keel ctl --json stats 0`, `cargo keel ctl snapshot
linux --out linux.snap`, `cargo keel ctl restore linux linux.snap` (docs/SNAPSHOTS.md); with `--bulk FILE` (the run's
`--bulk` disk) both go through the disk, without the serial line's 2 MiB limit. Exit status
0 when Keel answered ok, 1 when it answered with an error or did not answer (docs/BOOTING.md, \"The
monitor and the
control channel\").";

#[derive(Args, Debug)]
struct CtlOpts {
    /// The command and its argument, e.g. `list` or `pause NAME`
    #[arg(value_name = "COMMAND", required = true, num_args = 1..)]
    command: Vec<String>,
    /// The control socket of the run [default: target/keel/control.sock in the checkout]
    #[arg(long, value_name = "PATH")]
    control: Option<PathBuf>,
    /// Print Keel's reply as it came: one JSON object
    #[arg(long)]
    json: bool,
    /// How long to wait for the reply, in seconds
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    timeout: u64,
    /// `snapshot NAME`: write the snapshot to this file
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// `snapshot` and `restore`: move the stream through the run's bulk disk (`cargo keel run
    /// --bulk FILE`) instead of the serial line; no 2 MiB limit
    #[arg(long, value_name = "FILE")]
    bulk: Option<PathBuf>,
}

/// The options of every command that builds an image.
#[derive(Args, Debug)]
#[command(next_help_heading = "Image options")]
struct BuildOpts {
    /// Guest manifest [default: tests/guests/manifests/demo.toml in the workspace]
    #[arg(long, value_name = "PATH")]
    manifest: Option<PathBuf>,
    /// Take the files the manifest names from DIR instead of building the test guests with
    /// tests/guests/build.sh
    #[arg(long, value_name = "DIR")]
    files: Option<PathBuf>,
    /// Where the images go [default: target/keel/<debug|release>]
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Build the kernel with the release profile
    #[arg(long)]
    release: bool,
    /// No progress lines; build output only when a build fails
    #[arg(long, short)]
    quiet: bool,
}

/// `--linux` and its companions.
#[derive(Args, Debug)]
#[command(next_help_heading = "A Linux guest instead of a manifest")]
struct LinuxOpts {
    /// Boot one Linux guest from KERNEL (a bzImage or vmlinux); the manifest written for it is
    /// <out>/linux-guest/linux.toml
    #[arg(long, value_name = "KERNEL")]
    linux: Option<PathBuf>,
    /// (with --linux) the guest's initrd / initramfs
    #[arg(long, value_name = "FILE")]
    initrd: Option<PathBuf>,
    /// (with --linux) its command line [default: console=ttyS0]
    #[arg(long, value_name = "TEXT", allow_hyphen_values = true)]
    append: Option<String>,
    /// (with --linux) its RAM, a multiple of 2M up to 3G, e.g. 512M [default: 256M]; the
    /// emulated machine gets enough more for Keel and the ramdisk unless --memory says
    #[arg(long, value_name = "SIZE", value_parser = linux_memory)]
    linux_memory: Option<u64>,
    /// (with --linux) its virtual CPUs, 1 to 16 [default: 1]; the emulated machine's
    /// processors are --cpus
    #[arg(long, value_name = "N", value_parser = linux_vcpus)]
    vcpus: Option<u8>,
}

#[derive(Args, Debug)]
struct RunOpts {
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    linux: LinuxOpts,
    /// Boot this disk image instead of building one
    #[arg(long, value_name = "PATH", help_heading = "Run options")]
    image: Option<PathBuf>,
    /// The emulator [default: qemu-kvm if /dev/kvm exists and the CPU has VT-x (vmx), else bochs]
    #[arg(long, value_name = "E", help_heading = "Run options")]
    emulator: Option<Emulator>,
    /// Boot the UEFI image with OVMF [default: the BIOS image]
    #[arg(long, help_heading = "Run options")]
    uefi: bool,
    /// Stop the emulator after SECS, 0 for never [default: Bochs 300 (BIOS) / 600 (UEFI), QEMU
    /// 120, KVM 60]
    #[arg(long, value_name = "SECS", help_heading = "Run options")]
    timeout: Option<u64>,
    /// Memory of the emulated machine [default: 256; Bochs: at most 2048]
    #[arg(long, value_name = "MIB", help_heading = "Run options")]
    memory: Option<u32>,
    /// Bochs instructions per emulated second [default: 10000000]
    #[arg(long, value_name = "N", help_heading = "Run options")]
    ips: Option<u64>,
    /// Bochs CPU model [default: corei7_skylake_x]
    #[arg(long, value_name = "MODEL", help_heading = "Run options")]
    cpu: Option<String>,
    /// Processors of the emulated machine [default: 1; Bochs: at most 254]
    #[arg(long, value_name = "N", help_heading = "Run options",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::bochs::MAX_CPUS)))]
    cpus: Option<u32>,
    /// Keep the run's files (serial.log, e9.log, emulator.*, bochsrc) in DIR
    #[arg(long, value_name = "DIR", help_heading = "Run options")]
    work_dir: Option<PathBuf>,
    /// Do not copy COM1 to the terminal
    #[arg(long, help_heading = "Run options")]
    no_echo: bool,
    /// Do not forward what you type to COM1 (forwarded when stdin is a terminal)
    #[arg(long, help_heading = "Run options")]
    no_input: bool,
    /// The control channel's socket, for `cargo keel ctl` [default: target/keel/control.sock in
    /// the checkout]
    #[arg(long, value_name = "PATH", help_heading = "Run options")]
    control: Option<PathBuf>,
    /// A raw file attached as Keel's bulk disk (the second ATA disk), made 4 MiB if it does not
    /// exist: the fast path of snapshots and live migration (docs/SNAPSHOTS.md)
    #[arg(long, value_name = "FILE", help_heading = "Run options")]
    bulk: Option<PathBuf>,
}

#[derive(Args, Debug)]
#[command(after_help = "Example: cargo keel flash /dev/sdb (find the stick with lsblk)")]
struct FlashOpts {
    /// The whole USB disk to write, e.g. /dev/sdb (checked before anything is built)
    #[arg(value_name = "DEVICE")]
    device: PathBuf,
    #[command(flatten)]
    build: BuildOpts,
    #[command(flatten)]
    linux: LinuxOpts,
    /// Write this image [default: build, then write the UEFI image]
    #[arg(long, value_name = "PATH", help_heading = "Flash options")]
    image: Option<PathBuf>,
    /// Write the BIOS image instead of the UEFI one
    #[arg(long, help_heading = "Flash options")]
    bios: bool,
    /// Accept a device that is not marked removable
    #[arg(long, help_heading = "Flash options")]
    force: bool,
    /// Do not ask for confirmation
    #[arg(long, help_heading = "Flash options")]
    yes: bool,
}

/// Always a release build; the default manifest is bench.toml.
#[derive(Args, Debug)]
struct BenchOpts {
    #[command(flatten)]
    build: BuildOpts,
    /// Time limit of each Bochs boot [default: 120; with --linux 900]
    #[arg(long, value_name = "SECS", help_heading = "Bench options")]
    timeout: Option<u64>,
    /// Copy COM1 of the boots to the terminal
    #[arg(long, help_heading = "Bench options")]
    echo: bool,
    /// Instead: boot Debian's kernel (fetched as the Linux test does) to its shell, with and
    /// without APIC virtualization, and print its exits by kind with Keel's instructions per exit
    #[arg(long, help_heading = "Bench options")]
    linux: bool,
}

/// `--emulator`'s values; an unknown one is answered with this list.
impl ValueEnum for Emulator {
    fn value_variants<'a>() -> &'a [Self] {
        &[Emulator::Bochs, Emulator::Qemu, Emulator::QemuKvm]
    }

    fn to_possible_value(&self) -> Option<PossibleValue> {
        Some(match self {
            Emulator::Bochs => PossibleValue::new("bochs").help("Bochs and its VT-x emulation"),
            Emulator::Qemu => PossibleValue::new("qemu")
                .alias("qemu-tcg")
                .help("QEMU TCG: no VT-x, Keel stops with \"no VMX\" (tests the boot path)"),
            Emulator::QemuKvm => PossibleValue::new("qemu-kvm")
                .alias("kvm")
                .help("QEMU with KVM: a host with VT-x and nested virtualization"),
        })
    }
}

/// `--linux-memory`: what a manifest's `memory` accepts.
fn linux_memory(v: &str) -> Result<u64, String> {
    keel::manifest::parse_size(v)
        .filter(|&m| {
            m != 0
                && m % keel::manifest::MEMORY_GRANULE == 0
                && m <= keel::manifest::MAX_GUEST_MEMORY
        })
        .ok_or_else(|| "takes a multiple of 2M up to 3G (e.g. 512M)".into())
}

/// `--vcpus`: what a manifest's `vcpus` accepts.
fn linux_vcpus(v: &str) -> Result<u8, String> {
    v.parse::<u8>()
        .ok()
        .filter(|n| (1..=keel::manifest::MAX_VCPUS).contains(n))
        .ok_or_else(|| format!("takes a number from 1 to {}", keel::manifest::MAX_VCPUS))
}

impl BuildOpts {
    /// Turns the `--linux` flags into `linux`: the others need `--linux`, which excludes a
    /// manifest and a files directory (it makes both).
    fn into_image_args(self, lx: Option<LinuxOpts>) -> Result<ImageArgs, String> {
        let mut b = ImageArgs {
            manifest: self.manifest,
            linux: None,
            files: self.files,
            out: self.out,
            release: self.release,
            quiet: self.quiet,
        };
        let Some(lx) = lx else {
            return Ok(b);
        };
        let Some(kernel) = lx.linux else {
            for (given, flag) in [
                (lx.initrd.is_some(), "--initrd"),
                (lx.append.is_some(), "--append"),
                (lx.linux_memory.is_some(), "--linux-memory"),
                (lx.vcpus.is_some(), "--vcpus"),
            ] {
                if given {
                    return Err(format!("{flag} goes with --linux KERNEL"));
                }
            }
            return Ok(b);
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
            memory: lx.linux_memory.unwrap_or(DEFAULT_LINUX_MEMORY),
            vcpus: lx.vcpus.unwrap_or(DEFAULT_LINUX_VCPUS),
        });
        Ok(b)
    }
}

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

impl Cli {
    /// The option structs, or (subcommand name, message) for a combination that does not go.
    fn into_invocation(self) -> Result<Invocation, (&'static str, String)> {
        let cmd = match self.sub {
            Sub::Image { build, linux } => Cmd::Image(
                build
                    .into_image_args(Some(linux))
                    .map_err(|e| ("image", e))?,
            ),
            Sub::Run(r) => {
                let r = *r;
                let run = RunArgs {
                    build: r
                        .build
                        .into_image_args(Some(r.linux))
                        .map_err(|e| ("run", e))?,
                    image: r.image,
                    emulator: r.emulator,
                    uefi: r.uefi,
                    timeout_secs: r.timeout,
                    memory_mib: r.memory,
                    ips: r.ips,
                    cpu: r.cpu,
                    cpus: r.cpus,
                    work_dir: r.work_dir,
                    no_echo: r.no_echo,
                    no_input: r.no_input,
                    control: r.control,
                    bulk: r.bulk,
                };
                check_memory(&run).map_err(|e| ("run", e))?;
                Cmd::Run(run)
            }
            Sub::Flash(f) => Cmd::Flash(FlashArgs {
                build: f
                    .build
                    .into_image_args(Some(f.linux))
                    .map_err(|e| ("flash", e))?,
                device: f.device,
                image: f.image,
                bios: f.bios,
                force: f.force,
                yes: f.yes,
            }),
            Sub::Bench(b) => {
                let mut build = b.build.into_image_args(None).map_err(|e| ("bench", e))?;
                build.release = true;
                if b.linux && (build.manifest.is_some() || build.files.is_some()) {
                    return Err((
                        "bench",
                        "bench --linux writes its own manifest: use it without --manifest and --files"
                            .into(),
                    ));
                }
                Cmd::Bench(crate::bench::BenchArgs {
                    build,
                    timeout_secs: b.timeout,
                    echo: b.echo,
                    linux: b.linux,
                })
            }
            Sub::Migrate(m) => Cmd::Migrate(MigrateArgs {
                name: m.name,
                from: m.from,
                to: m.to,
                timeout_secs: m.timeout,
                bulk: m.from_bulk.zip(m.to_bulk),
            }),
            Sub::Ctl(c) => Cmd::Ctl(CtlArgs {
                command: c.command.join(" "),
                control: c.control,
                json: c.json,
                timeout_secs: c.timeout,
                out: c.out,
                bulk: c.bulk,
            }),
        };
        Ok(Invocation {
            workspace: self.workspace,
            cmd,
        })
    }
}

/// Parses a command line, program name first (as `std::env::args_os()` gives it).
pub fn parse<I, T>(argv: I) -> Result<Invocation, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = Cli::try_parse_from(argv)?;
    cli.into_invocation().map_err(|(sub, msg)| {
        let mut cmd = Cli::command();
        cmd.build();
        match cmd.find_subcommand_mut(sub) {
            Some(sub) => sub.error(ErrorKind::ArgumentConflict, msg),
            None => cmd.error(ErrorKind::ArgumentConflict, msg),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(line: &str) -> Result<Cmd, clap::Error> {
        let argv = std::iter::once("keel-boot").chain(line.split_whitespace());
        parse(argv).map(|i| i.cmd)
    }

    /// The message of a refusal, without clap's usage lines.
    fn err(line: &str) -> String {
        match p(line) {
            Ok(cmd) => panic!("`{line}` was accepted: {cmd:?}"),
            Err(e) => e.to_string().lines().next().unwrap_or_default().to_string(),
        }
    }

    /// clap's own checks of the declarations (conflicting names, bad defaults).
    #[test]
    fn declarations_are_consistent() {
        Cli::command().debug_assert();
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
        let Ok(Cmd::Run(r)) = p("run --emulator kvm --memory 512 --ips 5 --cpu x --no-echo -q")
        else {
            panic!("run parses");
        };
        assert_eq!(
            (r.emulator, r.memory_mib, r.ips, r.cpu.as_deref()),
            (Some(Emulator::QemuKvm), Some(512), Some(5), Some("x"))
        );
        assert!(r.no_echo && !r.no_input && r.build.quiet);
    }

    #[test]
    fn ctl_sends_the_words_as_one_line() {
        assert_eq!(
            p("ctl pause linux").ok(),
            Some(Cmd::Ctl(CtlArgs {
                command: "pause linux".into(),
                control: None,
                json: false,
                timeout_secs: 30,
                out: None,
                bulk: None,
            }))
        );
        assert_eq!(
            p("migrate counter --from /tmp/a.sock --to /tmp/b.sock").ok(),
            Some(Cmd::Migrate(MigrateArgs {
                name: "counter".into(),
                from: "/tmp/a.sock".into(),
                to: "/tmp/b.sock".into(),
                timeout_secs: 30,
                bulk: None,
            }))
        );
        assert!(
            p("migrate counter --from /tmp/a.sock").is_err(),
            "--to is needed"
        );
        let Ok(Cmd::Migrate(m)) =
            p("migrate c --from a --to b --from-bulk /tmp/a.img --to-bulk /tmp/b.img")
        else {
            panic!("migrate with both bulk disks parses");
        };
        assert_eq!(m.bulk, Some(("/tmp/a.img".into(), "/tmp/b.img".into())));
        assert!(
            p("migrate c --from a --to b --from-bulk /tmp/a.img").is_err(),
            "--from-bulk needs --to-bulk"
        );
        let Ok(Cmd::Ctl(c)) = p("ctl snapshot linux --out /tmp/l.snap") else {
            panic!("ctl snapshot parses");
        };
        assert_eq!(
            (c.command.as_str(), c.out),
            ("snapshot linux", Some(PathBuf::from("/tmp/l.snap")))
        );
        let Ok(Cmd::Ctl(c)) = p("ctl --json --control /tmp/k.sock --timeout 5 list") else {
            panic!("ctl parses");
        };
        assert_eq!(
            (c.command.as_str(), c.control, c.json, c.timeout_secs),
            ("list", Some(PathBuf::from("/tmp/k.sock")), true, 5)
        );
        assert!(err("ctl").contains("required"), "{}", err("ctl"));
        let Ok(Cmd::Run(r)) = p("run --control /tmp/k.sock") else {
            panic!("run --control parses");
        };
        assert_eq!(r.control, Some(PathBuf::from("/tmp/k.sock")));
    }

    #[test]
    fn cpus() {
        let Ok(Cmd::Run(r)) = p("run --cpus 4") else {
            panic!("--cpus parses");
        };
        assert_eq!(r.cpus, Some(4));
        assert_eq!(
            err("run --cpus 0"),
            "error: invalid value '0' for '--cpus <N>': 0 is not in 1..=254"
        );
    }

    #[test]
    fn image_defaults() {
        assert_eq!(p("image").ok(), Some(Cmd::Image(ImageArgs::default())));
        let Ok(Cmd::Image(b)) = p("image --files g --out o") else {
            panic!("image parses");
        };
        assert_eq!(
            (b.files, b.out),
            (Some(PathBuf::from("g")), Some(PathBuf::from("o")))
        );
    }

    /// `--workspace` goes before or after the subcommand.
    #[test]
    fn workspace_anywhere() {
        for line in [
            "keel-boot --workspace /k image",
            "keel-boot image --workspace /k",
        ] {
            let inv = parse(line.split_whitespace()).expect("parses");
            assert_eq!(inv.workspace, Some(PathBuf::from("/k")), "{line}");
        }
        let inv = parse(["keel-boot", "image"]).expect("parses");
        assert_eq!(inv.workspace, None);
    }

    /// `--help` on every subcommand and `--version` answer on stdout (exit status 0).
    #[test]
    fn help_and_version() {
        for line in [
            "--help",
            "help",
            "image --help",
            "run --help",
            "flash --help",
            "bench --help",
            "help run",
        ] {
            let e = p(line).expect_err("help is an early exit");
            assert_eq!(e.kind(), ErrorKind::DisplayHelp, "{line}");
            assert!(!e.use_stderr(), "{line}");
        }
        let help = p("run --help").expect_err("help").to_string();
        assert!(help.contains("Usage: cargo keel run [OPTIONS]"), "{help}");
        for flag in [
            "--emulator <E>",
            "--files <DIR>",
            "--linux <KERNEL>",
            "--workspace <DIR>",
        ] {
            assert!(help.contains(flag), "{flag} in\n{help}");
        }
        let e = p("--version").expect_err("version is an early exit");
        assert_eq!(e.kind(), ErrorKind::DisplayVersion);
        assert_eq!(
            e.to_string(),
            format!("keel-boot {}\n", env!("CARGO_PKG_VERSION"))
        );
        // No arguments: the help, as an error (status 2).
        let e = p("").expect_err("nothing to do");
        assert_eq!(
            e.kind(),
            ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
        );
    }

    #[test]
    fn flash_takes_one_device() {
        let Ok(Cmd::Flash(f)) = p("flash /dev/sdb --yes --image x.img") else {
            panic!("flash parses");
        };
        assert_eq!(f.device, PathBuf::from("/dev/sdb"));
        assert!(f.yes && !f.force);
        assert_eq!(f.image, Some(PathBuf::from("x.img")));
        assert_eq!(
            err("flash"),
            "error: the following required arguments were not provided:"
        );
        assert_eq!(
            err("flash /dev/sdb /dev/sdc"),
            "error: unexpected argument '/dev/sdc' found"
        );
    }

    /// Bochs' `megs` takes at most 2048 MiB; more must fail here, not in Bochs' log.
    #[test]
    fn bochs_memory_is_capped() {
        assert_eq!(
            err("run --emulator bochs --memory 4096"),
            "error: --memory 4096: Bochs emulates at most 2048 MiB (its `megs` limit)"
        );
        assert_eq!(
            err("run --memory 3000 --emulator bochs"),
            "error: --memory 3000: Bochs emulates at most 2048 MiB (its `megs` limit)"
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
            err("run --memory 0"),
            "error: --memory 0: the emulated machine needs some memory"
        );
    }

    /// `--linux` and its companions; `--append` keeps its spaces when given as one argument.
    #[test]
    fn linux_options() {
        let argv = [
            "keel-boot",
            "run",
            "--linux",
            "bz",
            "--initrd=rd.cpio",
            "--append",
            "console=ttyS0 quiet",
            "--linux-memory",
            "512M",
            "--vcpus",
            "2",
            "--emulator",
            "bochs",
        ];
        let Ok(Invocation {
            cmd: Cmd::Run(r), ..
        }) = parse(argv)
        else {
            panic!("run --linux parses");
        };
        assert_eq!(
            r.build.linux,
            Some(LinuxArgs {
                kernel: "bz".into(),
                initrd: Some("rd.cpio".into()),
                cmdline: "console=ttyS0 quiet".into(),
                memory: 512 << 20,
                vcpus: 2,
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
                vcpus: 1,
            })
        );
        assert_eq!(
            err("run --initrd x"),
            "error: --initrd goes with --linux KERNEL"
        );
        assert_eq!(
            err("run --linux-memory 3M --linux bz"),
            "error: invalid value '3M' for '--linux-memory <SIZE>': takes a multiple of 2M up to \
             3G (e.g. 512M)"
        );
        assert_eq!(
            err("run --vcpus 2"),
            "error: --vcpus goes with --linux KERNEL"
        );
        assert_eq!(
            err("run --linux bz --vcpus 17"),
            "error: invalid value '17' for '--vcpus <N>': takes a number from 1 to 16"
        );
        assert_eq!(
            err("run --linux bz --vcpus 0"),
            "error: invalid value '0' for '--vcpus <N>': takes a number from 1 to 16"
        );
        assert_eq!(
            err("run --linux bz --manifest m"),
            "error: --linux makes its own manifest: use it without --manifest and --files (or \
             add a `kind = linux` guest to your manifest)"
        );
        assert_eq!(
            err("bench --linux bz"),
            "error: unexpected argument 'bz' found"
        );
    }

    /// Errors name the option and, where there is a choice, list it.
    #[test]
    fn errors_suggest_the_fix() {
        let e = p("run --emulator vbox").expect_err("no such emulator");
        assert_eq!(e.kind(), ErrorKind::InvalidValue);
        let msg = e.to_string();
        assert!(
            msg.starts_with(
                "error: invalid value 'vbox' for '--emulator <E>'\n  \
                 [possible values: bochs, qemu, qemu-kvm]"
            ),
            "{msg}"
        );
        assert_eq!(
            err("run --timeout soon"),
            "error: invalid value 'soon' for '--timeout <SECS>': invalid digit found in string"
        );
        assert_eq!(
            err("run --timeout"),
            "error: a value is required for '--timeout <SECS>' but none was supplied"
        );
        assert_eq!(
            err("run --uefi=1"),
            "error: unexpected value '1' for '--uefi' found; no more were expected"
        );
        // A misspelt option or command gets the near one suggested.
        let e = p("run --emulater bochs").expect_err("misspelt");
        assert!(
            e.to_string()
                .contains("tip: a similar argument exists: '--emulator'"),
            "{e}"
        );
        // (clap finds `migrate` near too, and then lists both.)
        let e = p("imgae").expect_err("misspelt");
        let tip = e.to_string();
        assert!(
            tip.contains("tip: some similar subcommands exist:") && tip.contains("'image'"),
            "{e}"
        );
        assert_eq!(
            err("image --bogus"),
            "error: unexpected argument '--bogus' found"
        );
    }

    #[test]
    fn bench_is_always_release() {
        let Ok(Cmd::Bench(b)) = p("bench --timeout 5 --echo --files g") else {
            panic!("bench parses");
        };
        assert!(b.build.release && b.echo);
        assert_eq!(b.timeout_secs, Some(5));
        assert_eq!(b.build.files, Some(PathBuf::from("g")));
    }
}
