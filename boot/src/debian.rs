//! A real Linux for the tests, the demo and `cargo keel bench --linux`, fetched at run time: Debian's cloud kernel and
//! busybox-static from the host's apt archive (`apt-get download`, unpacked with `dpkg-deb -x`;
//! nothing prebuilt is committed), and an initramfs built here around busybox (an uncompressed
//! newc cpio written by [`Cpio`], so no `cpio` tool is needed).
//!
//! The packages are cached under `target/keel-tests/debian/`: a rerun with the same kernel
//! package downloads nothing. A host without apt, dpkg-deb or the network fails loudly, naming
//! what is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The meta-package whose versioned dependency is the kernel (`linux-image-6.1.0-57-cloud-amd64`).
pub const KERNEL_META: &str = "linux-image-cloud-amd64";
pub const BUSYBOX: &str = "busybox-static";
/// What /init prints once /proc, /sys and /dev are mounted, before it starts the shell.
pub const INIT_MARKER: &str = "keel-initramfs: /init running";
/// The shell's prompt (PS1).
pub const PROMPT: &str = "keel-sh# ";

/// Where the tests, the demo and `bench --linux` keep the packages and the files made from them,
/// for the checkout at `root`: `target/keel-tests/debian`.
pub fn default_cache(root: &Path) -> PathBuf {
    crate::image::target_dir(root)
        .join("keel-tests")
        .join("debian")
}

/// The files a `kind = linux` guest needs, ready in one directory.
#[derive(Debug, Clone)]
pub struct LinuxFiles {
    /// Holds `vmlinuz` (the kernel) and `initrd` (the initramfs).
    pub dir: PathBuf,
    /// The kernel's release, what `uname -r` prints (`6.1.0-57-cloud-amd64`).
    pub release: String,
    /// The kernel package, e.g. `linux-image-6.1.0-57-cloud-amd64`.
    pub package: String,
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| {
        format!("{what}: cannot run {:?} ({e}); install it (apt and dpkg are needed to fetch Debian's kernel)", cmd.get_program())
    })?;
    if !out.status.success() {
        return Err(format!(
            "{what}: {:?} failed ({}): {}",
            cmd,
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The versioned kernel package `KERNEL_META` depends on, from `apt-cache depends`.
pub fn kernel_package() -> Result<String, String> {
    let text = run(
        Command::new("apt-cache").args(["depends", KERNEL_META]),
        "resolving the kernel package",
    )?;
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && *p != KERNEL_META)
        .map(str::to_string)
        .ok_or_else(|| {
            format!("`apt-cache depends {KERNEL_META}` names no linux-image package: is Debian's archive in apt's sources (apt-get update)?")
        })
}

/// `package`'s .deb in `cache`, downloaded unless a copy is there already.
fn fetch_deb(package: &str, cache: &Path) -> Result<PathBuf, String> {
    let find = || -> Option<PathBuf> {
        std::fs::read_dir(cache)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
    };
    if let Some(deb) = find() {
        return Ok(deb);
    }
    run(
        Command::new("apt-get")
            .args(["download", package])
            .current_dir(cache),
        &format!("downloading {package} (network and apt's sources needed)"),
    )?;
    find().ok_or_else(|| {
        format!(
            "apt-get download {package} left no .deb in {}",
            cache.display()
        )
    })
}

/// Unpacks `deb` into `dir` (once).
fn unpack(deb: &Path, dir: &Path) -> Result<(), String> {
    if dir.join(".unpacked").exists() {
        return Ok(());
    }
    let _ = std::fs::remove_dir_all(dir);
    run(
        Command::new("dpkg-deb").arg("-x").arg(deb).arg(dir),
        &format!("unpacking {}", deb.display()),
    )?;
    std::fs::write(dir.join(".unpacked"), b"").map_err(|e| e.to_string())
}

/// Fetches (or finds in `cache`) the kernel and busybox and writes `vmlinuz` and `initrd` into
/// `cache/files`.
pub fn linux_files(cache: &Path) -> Result<LinuxFiles, String> {
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    let package = kernel_package()?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_string();
    let kdeb = fetch_deb(&package, cache)?;
    let bdeb = fetch_deb(BUSYBOX, cache)?;
    let kdir = cache.join(&package);
    let bdir = cache.join(BUSYBOX);
    unpack(&kdeb, &kdir)?;
    unpack(&bdeb, &bdir)?;
    let files = cache.join("files");
    std::fs::create_dir_all(&files).map_err(|e| e.to_string())?;
    let read = |p: PathBuf| std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()));
    let vmlinuz = read(kdir.join("boot").join(format!("vmlinuz-{release}")))?;
    let busybox = read(bdir.join("bin/busybox"))?;
    write_if_changed(&files.join("vmlinuz"), &vmlinuz)?;
    write_if_changed(&files.join("initrd"), &initramfs(&busybox))?;
    Ok(LinuxFiles {
        dir: files,
        release,
        package,
    })
}

/// Writes `data` to `path` unless it holds that already; through a temporary file and a rename,
/// so that another process packing an image from `path` (the demo, a test) never reads half a
/// file.
fn write_if_changed(path: &Path, data: &[u8]) -> Result<(), String> {
    if std::fs::read(path).is_ok_and(|old| old == data) {
        return Ok(());
    }
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, data)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The busybox applets the initramfs links (`/bin/NAME -> busybox`).
const APPLETS: &[&str] = &[
    "sh", "mount", "uname", "cat", "dmesg", "grep", "poweroff", "setsid", "cttyhack", "echo", "ls",
    "sleep", "seq", "head", "wc", "expr", "cut",
];

/// /init: mounts /proc, /sys and /dev, says so, and runs a shell on the console (ttyS0) with
/// job control (`cttyhack` makes the console its controlling terminal). With `KEEL_SHELL=no` on
/// the kernel command line (the kernel hands unknown `NAME=value` parameters to init's
/// environment) it prints the kernel's release and powers off instead: the non-interactive demo.
const INIT: &str = "#!/bin/sh
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
echo \"keel-initramfs: /init running\"
if [ \"$KEEL_SHELL\" = no ]; then
    echo \"keel-initramfs: Linux $(uname -r) up $(cut -d' ' -f1 /proc/uptime) s, powering off\"
    poweroff -f
fi
export PS1='keel-sh# '
exec setsid cttyhack sh
";

/// The initramfs: busybox, its applet links, /init, and /dev/console (the kernel opens it for
/// /init's standard input and output before devtmpfs is mounted).
pub fn initramfs(busybox: &[u8]) -> Vec<u8> {
    let mut c = Cpio::default();
    for d in ["bin", "dev", "proc", "sys", "tmp", "root"] {
        c.dir(d);
    }
    c.file("bin/busybox", 0o755, busybox);
    for a in APPLETS {
        c.symlink(&format!("bin/{a}"), "busybox");
    }
    c.file("init", 0o755, INIT.as_bytes());
    c.char_dev("dev/console", 0o600, 5, 1);
    c.finish()
}

/// A newc ("070701") cpio archive, as the kernel's initramfs unpacker reads it
/// (Documentation/driver-api/early-userspace/buffer-format.rst): per entry a 110-byte ASCII
/// header of 13 eight-digit hex fields, the NUL-terminated name padded to 4 bytes, the data padded
/// to 4 bytes; the archive ends with an entry named `TRAILER!!!`.
#[derive(Default)]
pub struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let nlink = if mode & S_IFDIR != 0 { 2 } else { 1 };
        let fields = [
            self.ino,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) {
        self.entry(name, S_IFDIR | 0o755, (0, 0), &[]);
    }

    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, S_IFREG | perm, (0, 0), data);
    }

    pub fn symlink(&mut self, name: &str, target: &str) {
        self.entry(name, S_IFLNK | 0o777, (0, 0), target.as_bytes());
    }

    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) {
        self.entry(name, S_IFCHR | perm, (major, minor), &[]);
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newc_header_layout() {
        let mut c = Cpio::default();
        c.file("init", 0o755, b"hi");
        let a = c.finish();
        let h = std::str::from_utf8(&a[..110]).unwrap();
        assert_eq!(&h[..6], "070701");
        assert_eq!(&h[6..14], "00000001", "inode");
        assert_eq!(&h[14..22], "000081ed", "regular file 0755");
        assert_eq!(&h[54..62], "00000002", "size");
        assert_eq!(&h[94..102], "00000005", "name size with NUL");
        assert_eq!(&a[110..115], b"init\0");
        // 110 + 5 = 115, padded to 116; then the data, padded to 120.
        assert_eq!(&a[116..118], b"hi");
        assert_eq!(&a[120..126], b"070701");
        assert!(a.windows(11).any(|w| w == b"TRAILER!!!\0"));
        assert_eq!(a.len() % 4, 0);
    }

    #[test]
    fn init_prints_the_marker_and_sets_the_prompt() {
        assert!(INIT.contains(INIT_MARKER));
        assert!(INIT.contains(&format!("PS1='{PROMPT}'")));
    }
}
