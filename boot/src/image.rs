//! Building what boots: the kernel ELF, the guest files, the ramdisk archive (manifest + files)
//! and the BIOS (MBR) and UEFI (GPT) disk images made by `bootloader::DiskImageBuilder`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{anyhow, bail, Context, Result};
use bootloader::{BootConfig, DiskImageBuilder};
use keel::manifest::{self, Manifest};

/// The target the kernel is built for.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";
/// The manifest `image` and `run` use when none is given (relative to the workspace root).
pub const DEFAULT_MANIFEST: &str = "tests/guests/manifests/demo.toml";
/// The script that builds the guest kernels into the directory it is given (owned by tests/guests).
pub const GUEST_BUILD_SCRIPT: &str = "tests/guests/build.sh";

/// What `build_images` builds and where it puts it.
#[derive(Debug, Clone)]
pub struct ImageOptions {
    /// The workspace root (the directory holding the top Cargo.toml).
    pub root: PathBuf,
    pub manifest: PathBuf,
    /// A directory holding the files the manifest names; `None` builds the guests with
    /// `tests/guests/build.sh` when the manifest names any file.
    pub files: Option<PathBuf>,
    pub out: PathBuf,
    pub release: bool,
    /// Capture the output of cargo and the guest build and show it only when they fail.
    pub quiet: bool,
}

impl ImageOptions {
    /// The defaults of `keel-boot image`: the demo manifest, a debug kernel, images under
    /// `target/keel/debug`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
            manifest: root.join(DEFAULT_MANIFEST),
            files: None,
            out: default_out_dir(root, false),
            release: false,
            quiet: false,
        }
    }
}

/// The results of `build_images`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Images {
    pub kernel: PathBuf,
    pub ramdisk: PathBuf,
    pub bios: PathBuf,
    pub uefi: PathBuf,
    /// The guests the manifest declares, in order.
    pub guests: Vec<String>,
}

/// The environment variable that names the Keel checkout to work in, like `--workspace DIR`.
pub const WORKSPACE_ENV: &str = "KEEL_WORKSPACE";

/// Whether `toml` (a Cargo.toml) declares Keel's workspace: a `[workspace]` table whose
/// `members` include `"hypervisor"`. Read as text: a table header starts a line, and the members
/// array runs from `members =` to its `]`, over several lines if need be.
pub fn declares_keel_workspace(toml: &str) -> bool {
    let mut in_workspace = false;
    let mut members: Option<String> = None;
    for line in toml.lines() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if let Some(m) = members.as_mut() {
            m.push_str(line);
        } else if line.starts_with('[') && !line.starts_with("[[") && line.ends_with(']') {
            in_workspace = line == "[workspace]";
            continue;
        } else if in_workspace {
            if let Some(rest) = line.strip_prefix("members") {
                if let Some(array) = rest.trim_start().strip_prefix('=') {
                    members = Some(array.to_string());
                }
            }
        }
        if let Some(m) = &members {
            if let Some(end) = m.find(']') {
                let items = m[..end].trim_start().strip_prefix('[').unwrap_or_default();
                return items.split(',').any(|s| s.trim() == "\"hypervisor\"");
            }
        }
    }
    false
}

/// Whether `dir` is the root of a Keel checkout (see [`declares_keel_workspace`]).
pub fn is_keel_workspace(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join("Cargo.toml")).is_ok_and(|t| declares_keel_workspace(&t))
}

/// The Keel checkout to work in: `explicit` (`--workspace DIR`), else `env` (`$KEEL_WORKSPACE`),
/// else the nearest directory from `cwd` upwards that is one. Relative paths are taken from `cwd`.
pub fn resolve_workspace(
    explicit: Option<&Path>,
    env: Option<&Path>,
    cwd: &Path,
) -> Result<PathBuf> {
    let named = explicit
        .map(|d| (d, "--workspace"))
        .or(env.map(|d| (d, WORKSPACE_ENV)));
    if let Some((dir, how)) = named {
        let dir = cwd.join(dir);
        if !is_keel_workspace(&dir) {
            bail!(
                "{how} {}: not a Keel checkout (no Cargo.toml there whose [workspace] members \
                 include \"hypervisor\")",
                dir.display()
            );
        }
        return Ok(dir);
    }
    cwd.ancestors()
        .find(|d| is_keel_workspace(d))
        .map(Path::to_path_buf)
        .ok_or_else(|| {
            anyhow!(
                "{} is not inside a Keel checkout (no Cargo.toml whose [workspace] members include \
                 \"hypervisor\" there or above): run this in your checkout, or name it with \
                 --workspace DIR or {WORKSPACE_ENV}=DIR",
                cwd.display()
            )
        })
}

/// [`resolve_workspace`] for this process: its `--workspace`, `$KEEL_WORKSPACE` and current
/// directory. The checkout is the one the tool is run in, not the one it was built from.
pub fn locate_workspace(explicit: Option<&Path>) -> Result<PathBuf> {
    let env = std::env::var_os(WORKSPACE_ENV).map(PathBuf::from);
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    resolve_workspace(explicit, env.as_deref(), &cwd)
}

/// The checkout holding the current directory, for the integration tests (which run in it):
/// [`locate_workspace`] without `--workspace`.
///
/// # Panics
/// Outside a Keel checkout, with the message of [`resolve_workspace`].
pub fn workspace_root() -> PathBuf {
    match locate_workspace(None) {
        Ok(root) => root,
        Err(e) => panic!("{e:#}"),
    }
}

/// Cargo's target directory: `CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir(root: &Path) -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

pub fn default_out_dir(root: &Path, release: bool) -> PathBuf {
    target_dir(root).join("keel").join(profile(release))
}

fn profile(release: bool) -> &'static str {
    if release {
        "release"
    } else {
        "debug"
    }
}

/// The archive entries a manifest needs (each guest's `image` and `modules`), first use first,
/// each once.
pub fn needed_files(manifest: &Manifest) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for guest in &manifest.guests {
        let modules = guest.modules.iter().map(|m| manifest::module_file(m));
        for name in std::iter::once(guest.image.as_str()).chain(modules) {
            if !names.iter().any(|n| n == name) {
                names.push(name.to_string());
            }
        }
    }
    names
}

/// Parses `text` (so a bad manifest fails here, with its line number, rather than in Keel) and
/// packs it with the files it names from `files_dir` into a ramdisk archive. A linux guest's
/// kernel is packed as the kernel image Keel loads (`prepare_linux_kernels`); unless `quiet`,
/// what was made of it is printed.
pub fn pack_ramdisk(
    manifest_path: &Path,
    text: &str,
    files_dir: Option<&Path>,
    quiet: bool,
) -> Result<Vec<u8>> {
    let (parsed, translated) = crate::manifest_file::parse(text)
        .map_err(|e| anyhow!("{}: {e}", manifest_path.display()))?;
    let names = needed_files(&parsed);
    let mut contents: Vec<(String, Vec<u8>)> = Vec::new();
    if !names.is_empty() {
        let dir = files_dir.ok_or_else(|| {
            anyhow!(
                "{} names files ({}) but no directory to take them from: pass it with --files DIR",
                manifest_path.display(),
                names.join(", ")
            )
        })?;
        for name in names {
            let path = dir.join(&name);
            let data = std::fs::read(&path).with_context(|| {
                format!(
                    "{} names `{name}`, but {} cannot be read (your own guests: pass the \
                     directory that holds them with --files DIR, docs/GUESTS.md)",
                    manifest_path.display(),
                    path.display()
                )
            })?;
            contents.push((name, data));
        }
    }
    prepare_linux_kernels(manifest_path, &parsed, &mut contents, quiet)?;
    check_guests_load(manifest_path, &parsed, &contents)?;
    // Keel reads the manifest in its own line format (`keel::manifest`), translated from the TOML.
    let mut entries: Vec<(&str, &[u8])> =
        vec![(keel::archive::MANIFEST_NAME, translated.text.as_bytes())];
    entries.extend(contents.iter().map(|(n, d)| (n.as_str(), d.as_slice())));
    keel::archive::build(&entries).map_err(|e| anyhow!("cannot pack the ramdisk: {e}"))
}

/// Replaces each linux guest's kernel file (a bzImage or a vmlinux ELF) with the kernel image
/// Keel's Linux loader reads (`crate::linux::prepare`: the payload decompressed here, not in the
/// emulator). A file that already is such an image is kept. A kernel file that another guest also
/// uses as something else (an ELF guest's image, an initrd) is refused: it can be only one entry.
fn prepare_linux_kernels(
    manifest_path: &Path,
    parsed: &Manifest,
    files: &mut [(String, Vec<u8>)],
    quiet: bool,
) -> Result<()> {
    let linux = |g: &manifest::GuestConfig| g.kind == manifest::GuestKind::Linux;
    for (name, data) in files.iter_mut() {
        if !parsed.guests.iter().any(|g| linux(g) && g.image == *name) {
            continue;
        }
        if let Some(other) = parsed
            .guests
            .iter()
            .find(|g| (!linux(g) && g.image == *name) || g.modules.contains(name))
        {
            bail!(
                "{}: `{name}` is a linux guest's kernel and also used by guest {} (kind = {}); \
                 one file cannot be both: copy it under another name",
                manifest_path.display(),
                other.name,
                kind_name(other.kind)
            );
        }
        if keel::loader::linux::KernelImage::is_kernel_image(data) {
            continue;
        }
        let prepared = crate::linux::prepare(data)
            .with_context(|| format!("{}: the Linux kernel `{name}`", manifest_path.display()))?;
        if !quiet {
            eprintln!(
                "keel-boot: {}",
                crate::linux::describe(name, data.len(), &prepared)
            );
        }
        *data = prepared.image;
    }
    Ok(())
}

/// Runs Keel's own loaders against every guest as Keel will start it: its image and modules,
/// its memory and its longest command line (the one with the ` restart=<k>` of its last
/// restart), so that an image Keel would refuse at boot or at a restart fails here, naming the
/// guest. Guest RAM is a zeroed allocation of the guest's size; the loaders touch only the pages
/// they write, so even a 3 GiB guest costs little.
fn check_guests_load(
    manifest_path: &Path,
    parsed: &Manifest,
    files: &[(String, Vec<u8>)],
) -> Result<()> {
    let file = |name: &str| {
        files
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, d)| d.as_slice())
            .ok_or_else(|| anyhow!("{}: `{name}` was not read", manifest_path.display()))
    };
    for guest in &parsed.guests {
        if guest.kind == manifest::GuestKind::Snapshot {
            check_snapshot(manifest_path, guest, file(&guest.image)?)?;
            continue;
        }
        let mut cfg = guest.clone();
        if cfg.restart > 0 {
            cfg.cmdline = manifest::restart_cmdline(&cfg.cmdline, cfg.restart);
        }
        let modules = guest
            .modules
            .iter()
            .map(|m| Ok((m.as_str(), file(manifest::module_file(m))?)))
            .collect::<Result<Vec<_>>>()?;
        let request = keel::loader::LoadRequest {
            cfg: &cfg,
            image: file(&guest.image)?,
            modules: &modules,
            guest_id: 0,
        };
        let memory = usize::try_from(guest.memory)
            .map_err(|_| anyhow!("guest {}: memory does not fit this host", guest.name))?;
        let mut ram = vec![0u8; memory];
        keel::loader::load(&mut ram, &request).map_err(|e| {
            anyhow!(
                "{}: guest {}: `{}` (kind = {}, memory = {}M) cannot be loaded: {e}",
                manifest_path.display(),
                guest.name,
                guest.image,
                kind_name(guest.kind),
                guest.memory >> 20
            )
        })?;
    }
    Ok(())
}

/// A `kind = "snapshot"` guest: its image must be a snapshot Keel reads (magic, format, checksum)
/// of a guest with the memory and vCPUs the manifest gives it. Whether the CPU fits is Keel's to
/// check when it boots.
fn check_snapshot(manifest_path: &Path, guest: &manifest::GuestConfig, data: &[u8]) -> Result<()> {
    let here = |e: String| {
        anyhow!(
            "{}: guest {}: `{}` (kind = snapshot): {e}",
            manifest_path.display(),
            guest.name,
            guest.image
        )
    };
    let (_, info) = keel::snapshot::describe(data).map_err(|e| here(e.to_string()))?;
    if info.memory != guest.memory {
        return Err(here(
            keel::snapshot::SnapshotError::MemoryMismatch {
                snapshot: info.memory,
                guest: guest.memory,
            }
            .to_string()
                + " (give it the snapshot's memory)",
        ));
    }
    if info.vcpus != u32::from(guest.vcpus) {
        return Err(here(
            keel::snapshot::SnapshotError::VcpusMismatch {
                snapshot: info.vcpus,
                guest: u32::from(guest.vcpus),
            }
            .to_string(),
        ));
    }
    Ok(())
}

/// The manifest's word for `kind`.
fn kind_name(kind: manifest::GuestKind) -> &'static str {
    match kind {
        manifest::GuestKind::Flat => "flat",
        manifest::GuestKind::Elf => "elf",
        manifest::GuestKind::Multiboot => "multiboot",
        manifest::GuestKind::Linux => "linux",
        manifest::GuestKind::Snapshot => "snapshot",
    }
}

/// The directory under the output directory where `--linux` writes its manifest and links to
/// the kernel and initrd (kept after the run, so the manifest can be copied and extended).
pub const LINUX_GUEST_DIR: &str = "linux-guest";

/// The one-guest manifest of `--linux`: a guest `linux` with the archive entries `kernel` and
/// (with an initrd) `initrd`, and `--vcpus` vCPUs.
pub fn linux_manifest_text(linux: &crate::cli::LinuxArgs) -> String {
    let mut text = String::from(
        "# Written by `cargo keel ... --linux`: one Linux guest (docs/GUESTS.md, kind = linux).\n\
         # The files are links in this directory; copy the manifest to add guests.\n\
         [[guest]]\nname = \"linux\"\nkind = \"linux\"\nimage = \"kernel\"\n",
    );
    if linux.initrd.is_some() {
        text.push_str("initrd = \"initrd\"\n");
    }
    text.push_str(&format!("memory = \"{}M\"\n", linux.memory >> 20));
    text.push_str(&format!("vcpus = {}\n", linux.vcpus));
    text.push_str(&format!("cmdline = {}\n", toml_string(&linux.cmdline)));
    text
}

/// `s` as a TOML basic string (quoted, with `"`, `\\` and control characters escaped).
pub fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// Writes the `--linux` manifest and links named `kernel` and `initrd` to the user's files into
/// `out/linux-guest`; returns (the manifest, the files directory).
pub fn write_linux_guest(out: &Path, linux: &crate::cli::LinuxArgs) -> Result<(PathBuf, PathBuf)> {
    if linux.cmdline.contains(['\n', '\r']) {
        bail!("--append: the command line must be one line");
    }
    let dir = out.join(LINUX_GUEST_DIR);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = std::iter::once(("kernel", &linux.kernel))
        .chain(linux.initrd.iter().map(|i| ("initrd", i)));
    for (name, path) in files {
        let target = std::fs::canonicalize(path)
            .with_context(|| format!("--linux: cannot read {}", path.display()))?;
        std::os::unix::fs::symlink(&target, dir.join(name))
            .with_context(|| format!("cannot link {} in {}", target.display(), dir.display()))?;
    }
    let manifest = dir.join("linux.toml");
    std::fs::write(&manifest, linux_manifest_text(linux))
        .with_context(|| format!("cannot write {}", manifest.display()))?;
    Ok((manifest, dir))
}

/// MiB of emulated machine for a `--linux` guest of `guest_memory` bytes booted from a ramdisk
/// of `ramdisk_len` bytes: both, plus 64 MiB for Keel and the firmware, in steps of 64 MiB, at
/// least the usual 256.
pub fn linux_machine_mib(guest_memory: u64, ramdisk_len: u64) -> u32 {
    let mib = (guest_memory >> 20) + ramdisk_len.div_ceil(1 << 20) + 64;
    u32::try_from(mib.div_ceil(64) * 64)
        .unwrap_or(u32::MAX)
        .max(256)
}

/// Runs a build command; with `quiet`, its output is kept and shown only if it fails.
fn run_build(mut cmd: Command, what: &str, quiet: bool) -> Result<()> {
    cmd.stdin(Stdio::null());
    let shown = format!("{cmd:?}");
    if quiet {
        let out = cmd
            .output()
            .with_context(|| format!("cannot start {what}: {shown}"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {shown}\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                crate::console::tail_lines(&String::from_utf8_lossy(&out.stderr), 60)
            );
        }
    } else {
        let status = cmd
            .status()
            .with_context(|| format!("cannot start {what}: {shown}"))?;
        if !status.success() {
            bail!("{what} failed ({status}): {shown}");
        }
    }
    Ok(())
}

/// `cargo build -p keel --target x86_64-unknown-none`; returns the kernel ELF.
pub fn build_kernel(root: &Path, release: bool, quiet: bool) -> Result<PathBuf> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root).args([
        "build",
        "-p",
        "keel",
        "--bin",
        "keel",
        "--target",
        KERNEL_TARGET,
    ]);
    if release {
        cmd.arg("--release");
    }
    run_build(cmd, "the kernel build", quiet)?;
    let elf = target_dir(root)
        .join(KERNEL_TARGET)
        .join(profile(release))
        .join("keel");
    if !elf.is_file() {
        bail!(
            "the kernel build succeeded but {} is missing",
            elf.display()
        );
    }
    Ok(elf)
}

/// `llvm-objcopy` from the toolchain's llvm-tools component (the bootloader build needs that
/// component anyway), or binutils' `objcopy`.
fn find_objcopy() -> Option<PathBuf> {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let in_sysroot = sysroot.and_then(|root| {
        let bins = std::fs::read_dir(root.join("lib/rustlib")).ok()?;
        bins.flatten()
            .map(|e| e.path().join("bin/llvm-objcopy"))
            .find(|p| p.is_file())
    });
    in_sysroot.or_else(|| crate::tools::find_program("objcopy"))
}

/// A copy of the kernel without debug information in `out/keel.elf`. The debug kernel is mostly
/// DWARF (7 MB against 0.35 MB), and every byte of it would be read through the firmware's disk
/// calls at each boot, which is slow in an emulator. The unstripped ELF stays where cargo put it,
/// for gdb and addr2line. Without an objcopy the full ELF is used.
pub fn strip_kernel(elf: &Path, out: &Path) -> Result<PathBuf> {
    let Some(objcopy) = find_objcopy() else {
        eprintln!(
            "keel-boot: no llvm-objcopy or objcopy found: packing the kernel with its debug info"
        );
        return Ok(elf.to_path_buf());
    };
    let stripped = out.join("keel.elf");
    write_atomically(&stripped, |tmp| {
        let mut cmd = Command::new(&objcopy);
        cmd.arg("--strip-debug").arg(elf).arg(tmp);
        run_build(cmd, "stripping the kernel", true)
    })?;
    Ok(stripped)
}

/// Builds the guest kernels into `out` with tests/guests/build.sh.
pub fn build_guests(root: &Path, out: &Path, quiet: bool) -> Result<()> {
    let script = root.join(GUEST_BUILD_SCRIPT);
    if !script.is_file() {
        bail!(
            "{} does not exist, so the guest kernels cannot be built here; build the files the \
             manifest names and pass their directory with --files DIR",
            script.display()
        );
    }
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cmd = Command::new("bash");
    cmd.current_dir(root).arg(&script).arg(out);
    run_build(cmd, "the guest build", quiet)
}

/// Writes `data` to `path` through a temporary file and a rename, so a reader (another run in the
/// same checkout) never sees half a file.
fn write_atomically(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp-{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = write(&tmp).and_then(|()| {
        std::fs::rename(&tmp, path)
            .with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
    });
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The bootloader's own settings: it logs to COM1 (the first lines of every run, useful when a
/// boot stalls before Keel) but not to the framebuffer, which costs seconds per screen in Bochs.
fn boot_config() -> BootConfig {
    let mut config = BootConfig::default();
    config.frame_buffer_logging = false;
    config.serial_logging = true;
    config
}

/// Packs `kernel` and `ramdisk` into `out/keel-bios.img` and `out/keel-uefi.img`.
pub fn write_disk_images(kernel: &Path, ramdisk: &Path, out: &Path) -> Result<(PathBuf, PathBuf)> {
    let mut builder = DiskImageBuilder::new(kernel.to_path_buf());
    builder.set_ramdisk(ramdisk.to_path_buf());
    builder.set_boot_config(&boot_config());
    let bios = out.join("keel-bios.img");
    let uefi = out.join("keel-uefi.img");
    write_atomically(&bios, |tmp| {
        builder
            .create_bios_image(tmp)
            .map_err(|e| anyhow!("cannot write the BIOS image {}: {e:#}", bios.display()))
    })?;
    write_atomically(&uefi, |tmp| {
        builder
            .create_uefi_image(tmp)
            .map_err(|e| anyhow!("cannot write the UEFI image {}: {e:#}", uefi.display()))
    })?;
    Ok((bios, uefi))
}

/// The whole `image` step: validate the manifest, build the kernel and (if needed) the guests,
/// pack the ramdisk, write both disk images.
pub fn build_images(opts: &ImageOptions) -> Result<Images> {
    let text = std::fs::read_to_string(&opts.manifest).with_context(|| {
        format!(
            "cannot read the manifest {} (Keel's own are in {}; docs/GUESTS.md says how to \
                 write one)",
            opts.manifest.display(),
            opts.root.join("tests/guests/manifests").display()
        )
    })?;
    let (parsed, _) = crate::manifest_file::parse(&text)
        .map_err(|e| anyhow!("{}: {e}", opts.manifest.display()))?;
    std::fs::create_dir_all(&opts.out)
        .with_context(|| format!("cannot create {}", opts.out.display()))?;
    let say = |what: String| {
        if !opts.quiet {
            eprintln!("keel-boot: {what}");
        }
    };
    say(format!(
        "building the kernel ({}) in {}...",
        profile(opts.release),
        opts.root.display()
    ));
    let kernel = build_kernel(&opts.root, opts.release, opts.quiet)?;

    // Guests go to a directory of this process's own, so two runs in one checkout do not read
    // each other's half-written files.
    let built_guests = opts.out.join(format!("guests.{}", std::process::id()));
    let files_dir = match (&opts.files, needed_files(&parsed).is_empty()) {
        (Some(dir), _) => Some(dir.clone()),
        (None, true) => None,
        (None, false) => {
            say(format!("building the guests ({GUEST_BUILD_SCRIPT})..."));
            build_guests(&opts.root, &built_guests, opts.quiet)?;
            Some(built_guests.clone())
        }
    };
    say(format!(
        "packing {} guest(s) from {}{}...",
        parsed.guests.len(),
        opts.manifest.display(),
        match (&opts.files, &files_dir) {
            (Some(dir), _) => format!(" with the files in {}", dir.display()),
            _ => String::new(),
        }
    ));
    let packed = pack_ramdisk(&opts.manifest, &text, files_dir.as_deref(), opts.quiet);
    let _ = std::fs::remove_dir_all(&built_guests);
    let archive = packed?;

    let ramdisk = opts.out.join("ramdisk.keelarc");
    write_atomically(&ramdisk, |tmp| {
        std::fs::write(tmp, &archive).with_context(|| format!("cannot write {}", tmp.display()))
    })?;
    let packed_kernel = if std::env::var_os("KEEL_NO_STRIP").is_some() {
        kernel.clone()
    } else {
        strip_kernel(&kernel, &opts.out)?
    };
    say("writing the BIOS and UEFI disk images...".into());
    let (bios, uefi) = write_disk_images(&packed_kernel, &ramdisk, &opts.out)?;
    Ok(Images {
        kernel,
        ramdisk,
        bios,
        uefi,
        guests: parsed.guests.into_iter().map(|g| g.name).collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::archive::Archive;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("keel-boot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    /// The checkout's own Cargo.toml is Keel's; the test guests' workspace is not.
    #[test]
    fn keel_workspace_is_recognised() {
        assert!(declares_keel_workspace(include_str!("../../Cargo.toml")));
        assert!(!declares_keel_workspace(include_str!(
            "../../tests/guests/Cargo.toml"
        )));
        let multi = "[package]\nname = \"x\"\n[workspace]\nmembers = [\n  \"boot\", # host\n  \"hypervisor\",\n]\n";
        assert!(declares_keel_workspace(multi));
        for not in [
            "[workspace]\nmembers = [\"hypervisor-x\"]\n",
            "[workspace.package]\nmembers = [\"hypervisor\"]\n",
            "[workspace]\nexclude = [\"hypervisor\"]\nmembers = [\"boot\"]\n",
            "members = [\"hypervisor\"]\n",
            "",
        ] {
            assert!(!declares_keel_workspace(not), "{not}");
        }
    }

    /// The checkout is found from the current directory upwards, past the test guests' own
    /// workspace; `--workspace` and KEEL_WORKSPACE name it outright, and must name a checkout.
    #[test]
    fn workspace_is_found_from_the_current_directory() -> Result<()> {
        let root = scratch("workspace");
        std::fs::write(
            root.join("Cargo.toml"),
            "[workspace]\nmembers = [\"hypervisor\", \"boot\", \"tests\"]\n",
        )?;
        let guests = root.join("tests/guests");
        std::fs::create_dir_all(guests.join("long64/src"))?;
        std::fs::write(
            guests.join("Cargo.toml"),
            "[workspace]\nmembers = [\"common\", \"long64\"]\n",
        )?;
        assert_eq!(
            resolve_workspace(None, None, &guests.join("long64/src"))?,
            root
        );
        assert_eq!(resolve_workspace(None, None, &root)?, root);

        let outside = scratch("no-workspace");
        assert_eq!(
            format!(
                "{:#}",
                resolve_workspace(None, None, &outside).expect_err("outside")
            ),
            format!(
                "{} is not inside a Keel checkout (no Cargo.toml whose [workspace] members \
                 include \"hypervisor\" there or above): run this in your checkout, or name it \
                 with --workspace DIR or KEEL_WORKSPACE=DIR",
                outside.display()
            )
        );
        assert_eq!(resolve_workspace(Some(&root), None, &outside)?, root);
        assert_eq!(resolve_workspace(None, Some(&root), &outside)?, root);
        assert_eq!(
            resolve_workspace(Some(Path::new("../..")), None, &guests)?,
            guests.join("../..")
        );
        assert_eq!(
            format!(
                "{:#}",
                resolve_workspace(Some(&guests), Some(&root), &root).expect_err("not Keel's")
            ),
            format!(
                "--workspace {}: not a Keel checkout (no Cargo.toml there whose [workspace] \
                 members include \"hypervisor\")",
                guests.display()
            )
        );
        assert!(format!(
            "{:#}",
            resolve_workspace(None, Some(&outside), &root).expect_err("env wins")
        )
        .starts_with("KEEL_WORKSPACE "));
        std::fs::remove_dir_all(&root)?;
        std::fs::remove_dir_all(&outside)?;
        Ok(())
    }

    const TWO_GUESTS: &str = "\
[[guest]]
name = \"a\"
kind = \"multiboot\"
image = \"a.elf\"
memory = \"2M\"
modules = [\"initrd\", \"a.elf\"]
[[guest]]
name = \"b\"
kind = \"flat\"
image = \"b.bin\"
memory = \"2M\"
";

    /// A multiboot kernel the loader accepts: the header with the a.out kludge (flag 16) at
    /// offset 0, loaded at 1 MiB, entered at its code (HLT) after the 32-byte header.
    fn multiboot_image() -> Vec<u8> {
        let magic: u32 = 0x1bad_b002;
        let flags: u32 = 1 << 16;
        let load: u32 = 0x10_0000;
        let mut img = Vec::new();
        for v in [
            magic,
            flags,
            0u32.wrapping_sub(magic).wrapping_sub(flags),
            load,
            load,
            0,
            0,
            load + 32,
        ] {
            img.extend_from_slice(&v.to_le_bytes());
        }
        img.extend_from_slice(&[0xf4; 16]);
        img
    }

    /// `files` written to a fresh directory.
    fn files_dir(name: &str, files: &[(&str, &[u8])]) -> PathBuf {
        let dir = scratch(name);
        for (file, data) in files {
            std::fs::write(dir.join(file), data).expect("write a test file");
        }
        dir
    }

    fn pack_error(manifest: &str, dir: &Path) -> String {
        let e = pack_ramdisk(Path::new("t.toml"), manifest, Some(dir), true)
            .expect_err("the manifest is refused");
        format!("{e:#}")
    }

    /// An image named `manifest` would be a second archive entry of that name, and Keel booted
    /// the manifest text as the guest.
    #[test]
    fn an_image_named_manifest_is_refused_with_the_guests_name() {
        let dir = files_dir("named-manifest", &[("manifest", b"\xeb\xfe")]);
        let text = r#"[[guest]]
name = "g1"
kind = "flat"
image = "manifest"
memory = "2M"
"#;
        assert_eq!(
            pack_error(text, &dir),
            "t.toml: line 4: guest g1: image `manifest` has the name of the \
             ramdisk's manifest entry; rename the file"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A vCPU count Keel cannot give is refused when the image is packed, naming the guest.
    #[test]
    fn a_bad_vcpu_count_is_refused_at_pack_time_with_the_guests_name() {
        let dir = files_dir("vcpus", &[("a.bin", b"\xeb\xfe")]);
        for (bad, shown) in [("0", "0"), ("17", "17"), ("\"many\"", "many")] {
            let text = format!(
                "[[guest]]\nname = \"web\"\nkind = \"flat\"\nimage = \"a.bin\"\n\
                 memory = \"2M\"\nvcpus = {bad}\n"
            );
            assert_eq!(
                pack_error(&text, &dir),
                format!(
                    "t.toml: line 6: guest web: vcpus must be a number from 1 to 16, not `{shown}`"
                )
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Host CPUs a board cannot have are refused in `cpus` when the image is packed, naming the
    /// guest.
    #[test]
    fn a_bad_cpu_list_is_refused_at_pack_time_with_the_guests_name() {
        let dir = files_dir("cpus", &[("a.bin", b"\xeb\xfe")]);
        for (bad, shown) in [("64", "64"), ("\"0-64\"", "0-64"), ("\"1-0\"", "1-0")] {
            let text = format!(
                "[[guest]]\nname = \"web\"\nkind = \"flat\"\nimage = \"a.bin\"\n\
                 memory = \"2M\"\ncpus = {bad}\n"
            );
            assert_eq!(
                pack_error(&text, &dir),
                format!(
                    "t.toml: line 6: guest web: cpus must list host CPUs from 0 to 63 (such as 0-1,3), not `{shown}`"
                )
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The loaders run at pack time against each guest's image, memory and longest command
    /// line: what Keel would refuse at boot (or at a restart) fails here, naming the guest.
    #[test]
    fn images_the_loaders_refuse_fail_at_pack_time() {
        let mb = multiboot_image();
        let dir = files_dir(
            "loaders",
            &[
                ("mb.elf", &mb),
                ("junk.elf", b"not an ELF"),
                ("b.bin", b"\xeb\xfe"),
            ],
        );
        let guest = |kind: &str, image: &str, memory: &str, rest: &str| {
            format!("[[guest]]\nname = \"g1\"\nkind = \"{kind}\"\nimage = \"{image}\"\nmemory = \"{memory}\"\n{rest}")
        };
        assert!(pack_ramdisk(
            Path::new("t"),
            &guest("multiboot", "mb.elf", "2M", ""),
            Some(&dir),
            true
        )
        .is_ok());
        assert_eq!(
            pack_error(&guest("elf", "junk.elf", "2M", ""), &dir),
            "t.toml: guest g1: `junk.elf` (kind = elf, memory = 2M) cannot be loaded: \
             the image is not an ELF file"
        );
        assert_eq!(
            pack_error(&guest("flat", "b.bin", "2M", "load = 0x100\n"), &dir),
            "t.toml: guest g1: `b.bin` (kind = flat, memory = 2M) cannot be loaded: \
             flat image at 0x100 (+0x2) must lie within 0x500..0x100000"
        );
        assert_eq!(
            pack_error(
                &guest("flat", "b.bin", "2M", "modules = [\"mb.elf\"]\n"),
                &dir
            ),
            "t.toml: guest g1: `b.bin` (kind = flat, memory = 2M) cannot be loaded: \
             only multiboot guests take modules"
        );
        // Too many modules for the RAM: each takes a page after the kernel (QEMU's layout).
        let many = vec!["\"b.bin\""; 600].join(", ");
        assert_eq!(
            pack_error(&guest("multiboot", "mb.elf", "2M", &format!("modules = [{many}]\n")), &dir),
            "t.toml: guest g1: `mb.elf` (kind = multiboot, memory = 2M) cannot be loaded: modules and boot information at 0x100030 (+0x25cfd0) lies outside guest RAM"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Entries are named by the manifest's path, not the file's base name: two files of one
    /// base name from different directories are two entries, each guest gets its own.
    #[test]
    fn same_base_name_in_two_directories_are_two_entries() -> Result<()> {
        let dir = scratch("basename");
        for (sub, code) in [("a", b"\xeb\xfe"), ("b", b"\xf4\xf4")] {
            std::fs::create_dir_all(dir.join(sub))?;
            std::fs::write(dir.join(sub).join("x.bin"), code)?;
        }
        let text = "[[guest]]\nname = \"a\"\nkind = \"flat\"\nimage = \"a/x.bin\"\nmemory = \"2M\"\n\
                    [[guest]]\nname = \"b\"\nkind = \"flat\"\nimage = \"b/x.bin\"\nmemory = \"2M\"\n";
        let bytes = pack_ramdisk(Path::new("t"), text, Some(&dir), true)?;
        let archive = Archive::parse(&bytes).map_err(|e| anyhow!("{e}"))?;
        assert_eq!(archive.get("a/x.bin"), Some(&b"\xeb\xfe"[..]));
        assert_eq!(archive.get("b/x.bin"), Some(&b"\xf4\xf4"[..]));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    /// A 4,095-byte command line fits the loaders once, but not with ` restart=1` after it.
    #[test]
    fn a_command_line_too_long_for_a_restart_fails_at_pack_time() {
        let dir = files_dir("cmdline", &[("mb.elf", &multiboot_image())]);
        let text = format!(
            "[[guest]]\nname = \"g1\"\nkind = \"multiboot\"\nimage = \"mb.elf\"\nmemory = \"2M\"\nrestart = 1\ncmdline = \"{}\"\n",
            "c".repeat(4095)
        );
        assert_eq!(
            pack_error(&text, &dir),
            "t.toml: line 7: guest g1: command line of 4095 bytes is too long: Keel \
             appends ` restart=1` (10 bytes) when it restarts the guest, and command lines are at \
             most 4095 bytes with it, so at most 4085 without it"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A linux guest's bzImage is packed as Keel's kernel image (decompressed), its initrd as
    /// its one module, and the Linux loader runs against them at pack time.
    #[test]
    fn linux_kernels_are_prepared_and_checked_at_pack_time() -> Result<()> {
        use crate::linux::tests::{bzimage, text, vmlinux};
        use keel::loader::linux::KernelImage;
        let elf = vmlinux(&text());
        let bz = bzimage(&elf);
        let dir = files_dir(
            "linux",
            &[
                ("bzImage", &bz),
                ("rootfs", b"070701"),
                ("b.bin", b"\xeb\xfe"),
            ],
        );
        let text = "[[guest]]\nname = \"lx\"\nkind = \"linux\"\nimage = \"bzImage\"\n\
                    memory = \"32M\"\ninitrd = \"rootfs\"\ncmdline = \"console=ttyS0\"\n";
        let bytes = pack_ramdisk(Path::new("t"), text, Some(&dir), true)?;
        let archive = Archive::parse(&bytes).map_err(|e| anyhow!("{e}"))?;
        let packed = archive.get("bzImage").expect("the kernel entry");
        assert_eq!(packed, &crate::linux::prepare(&bz)?.image[..]);
        let k = KernelImage::parse(packed).map_err(|e| anyhow!("{e}"))?;
        assert_eq!((k.entry, k.segments[0].paddr), (0x100_0000, 0x100_0000));
        assert_eq!(archive.get("rootfs"), Some(&b"070701"[..]));
        // The loader at pack time: the kernel at 16 MiB needs more than 16 MiB of RAM, and
        // the initrd must fit above it.
        assert_eq!(
            pack_error(&text.replace("32M", "16M"), &dir),
            "t.toml: guest lx: `bzImage` (kind = linux, memory = 16M) cannot be loaded: \
             guest RAM of 0x1000000 bytes is too small, need 0x104a3e0"
        );
        assert_eq!(
            pack_error(
                &text.replace("32M", "18M").replace("rootfs", "bzImage"),
                &dir
            ),
            "t.toml: `bzImage` is a linux guest's kernel and also used by guest lx \
             (kind = linux); one file cannot be both: copy it under another name"
        );
        assert_eq!(
            pack_error(
                &format!(
                    "{text}[[guest]]\nname = \"b\"\nkind = \"flat\"\nimage = \"b.bin\"\nmemory = \"2M\"\nmodules = [\"bzImage\"]\n"
                ),
                &dir
            ),
            "t.toml: `bzImage` is a linux guest's kernel and also used by guest b \
             (kind = flat); one file cannot be both: copy it under another name"
        );
        let cut = files_dir(
            "linux-cut",
            &[("bzImage", &bz[..bz.len() - 9]), ("rootfs", b"")],
        );
        let e = pack_error(text, &cut);
        assert!(e.starts_with("t.toml: the Linux kernel `bzImage`: "), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&cut);
        Ok(())
    }

    /// `--linux`: the manifest names `kernel` and `initrd`, which link to the user's files.
    #[test]
    fn linux_guest_manifest_and_links() -> Result<()> {
        let dir = files_dir("linux-guest", &[("bz", b"BZ"), ("rd", b"RD")]);
        let mut linux = crate::cli::LinuxArgs {
            kernel: dir.join("bz"),
            initrd: Some(dir.join("rd")),
            cmdline: "console=ttyS0 quiet # kept".into(),
            memory: 512 << 20,
            vcpus: 3,
        };
        let out = dir.join("out");
        let (manifest, files) = write_linux_guest(&out, &linux)?;
        assert_eq!(files, out.join("linux-guest"));
        let text = std::fs::read_to_string(&manifest)?;
        let (parsed, _) = crate::manifest_file::parse(&text).map_err(|e| anyhow!("{e}"))?;
        let g = &parsed.guests[0];
        assert_eq!(
            (g.name.as_str(), g.kind, g.image.as_str(), g.memory),
            ("linux", manifest::GuestKind::Linux, "kernel", 512 << 20)
        );
        assert_eq!(g.modules, ["initrd"]);
        assert_eq!(g.vcpus, 3, "--vcpus reaches the manifest");
        assert_eq!(g.cmdline, "console=ttyS0 quiet # kept");
        assert_eq!(std::fs::read(files.join("kernel"))?, b"BZ");
        assert_eq!(std::fs::read(files.join("initrd"))?, b"RD");
        // Again without an initrd: the old link goes.
        linux.initrd = None;
        let (manifest, files) = write_linux_guest(&out, &linux)?;
        let parsed = crate::manifest_file::parse(&std::fs::read_to_string(&manifest)?)
            .map_err(|e| anyhow!("{e}"))?
            .0;
        assert!(parsed.guests[0].modules.is_empty());
        assert!(!files.join("initrd").exists());
        linux.kernel = dir.join("missing");
        let e = write_linux_guest(&out, &linux).expect_err("no such kernel");
        assert!(
            format!("{e:#}").starts_with("--linux: cannot read "),
            "{e:#}"
        );
        linux.cmdline = "a\nb".into();
        assert_eq!(
            format!(
                "{:#}",
                write_linux_guest(&out, &linux).expect_err("two lines")
            ),
            "--append: the command line must be one line"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn linux_machine_memory() {
        // 256 MiB guest, Debian's 35 MB kernel image: 256 + 34 + 64 -> 384.
        assert_eq!(linux_machine_mib(256 << 20, 35_000_000), 384);
        assert_eq!(linux_machine_mib(32 << 20, 1 << 20), 256);
        assert_eq!(linux_machine_mib(2 << 30, 100 << 20), 2240);
    }

    #[test]
    fn needed_files_in_first_use_order_once() {
        let (m, _) = crate::manifest_file::parse(TWO_GUESTS).expect("sample parses");
        assert_eq!(needed_files(&m), ["a.elf", "initrd", "b.bin"]);
    }

    #[test]
    fn packs_manifest_and_named_files() -> Result<()> {
        let dir = scratch("pack");
        let a = multiboot_image();
        std::fs::write(dir.join("a.elf"), &a)?;
        std::fs::write(dir.join("initrd"), b"INITRD")?;
        std::fs::write(dir.join("b.bin"), b"\xeb\xfe")?;
        std::fs::write(dir.join("unused"), b"not packed")?;
        let bytes = pack_ramdisk(Path::new("two.toml"), TWO_GUESTS, Some(&dir), true)?;
        let archive = Archive::parse(&bytes).map_err(|e| anyhow!("{e}"))?;
        let names: Vec<&str> = archive.entries().map(|(n, _)| n).collect();
        assert_eq!(names, ["manifest", "a.elf", "initrd", "b.bin"]);
        let kernel_text = crate::manifest_file::translate(TWO_GUESTS)
            .expect("translates")
            .text;
        assert_eq!(archive.get("manifest"), Some(kernel_text.as_bytes()));
        assert_eq!(archive.get("a.elf"), Some(&a[..]));
        assert_eq!(archive.get("b.bin"), Some(&b"\xeb\xfe"[..]));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }

    #[test]
    fn bad_manifest_fails_with_path_and_line() {
        let text = "[[guest]]\nname = \"a\"\nkind = \"flat\"\nimage = \"x\"\nmemory = \"3M\"\n";
        let e = pack_ramdisk(Path::new("demo.toml"), text, None, true).expect_err("3M is rejected");
        let msg = format!("{e:#}");
        assert!(msg.contains("demo.toml: line 5:"), "{msg}");
    }

    #[test]
    fn missing_file_is_named() {
        let dir = scratch("missing");
        let e = pack_ramdisk(Path::new("two.toml"), TWO_GUESTS, Some(&dir), true)
            .expect_err("files are missing");
        let msg = format!("{e:#}");
        assert!(msg.contains("names `a.elf`"), "{msg}");
        assert!(
            msg.ends_with(
                "cannot be read (your own guests: pass the directory that holds them with \
                 --files DIR, docs/GUESTS.md): No such file or directory (os error 2)"
            ),
            "{msg}"
        );
        let e = pack_ramdisk(Path::new("two.toml"), TWO_GUESTS, None, true)
            .expect_err("no files directory");
        assert!(format!("{e:#}").ends_with(
            "names files (a.elf, initrd, b.bin) but no directory to take them from: pass it with \
             --files DIR"
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn manifest_without_guests_needs_no_files() -> Result<()> {
        let bytes = pack_ramdisk(Path::new("empty"), "[keel]\nquantum_ms = 5\n", None, true)?;
        let archive = Archive::parse(&bytes).map_err(|e| anyhow!("{e}"))?;
        assert_eq!(archive.len(), 1);
        Ok(())
    }

    #[test]
    fn missing_guest_script_gives_a_clear_error() {
        let dir = scratch("noscript");
        let e = build_guests(&dir, &dir.join("out"), true).expect_err("no build.sh");
        let msg = format!("{e:#}");
        assert!(
            msg.contains("tests/guests/build.sh does not exist"),
            "{msg}"
        );
        assert!(msg.contains("--files DIR"), "{msg}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
