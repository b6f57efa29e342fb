//! Writing a disk image to a USB stick, with the checks that keep it from overwriting the wrong
//! disk: the target must be a whole block device, nothing on it may be mounted or used as swap,
//! it must say it is removable (unless forced), and the user must type `yes` (unless told not to
//! ask).

use std::io::{BufRead, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

/// A Linux device number, as in /sys/dev/block/MAJOR:MINOR.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    /// Decodes `st_rdev` the way glibc's `major()`/`minor()` do.
    pub fn from_rdev(rdev: u64) -> Self {
        Self {
            major: (((rdev >> 8) & 0xfff) | ((rdev >> 32) & !0xfff)) as u32,
            minor: ((rdev & 0xff) | ((rdev >> 12) & !0xff)) as u32,
        }
    }

    /// Parses sysfs' `dev` file, "8:16".
    pub fn parse(s: &str) -> Option<Self> {
        let (major, minor) = s.trim().split_once(':')?;
        Some(Self {
            major: major.parse().ok()?,
            minor: minor.parse().ok()?,
        })
    }
}

impl std::fmt::Display for DevNum {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.major, self.minor)
    }
}

/// Where the checks look: the live system, or a fake one in tests.
#[derive(Debug, Clone)]
pub struct SystemView {
    /// Normally /sys/dev/block: one directory per block device, named MAJOR:MINOR.
    pub sys_dev_block: PathBuf,
    /// The text of /proc/mounts.
    pub mounts: String,
    /// The text of /proc/swaps.
    pub swaps: String,
}

impl SystemView {
    pub fn live() -> Result<Self> {
        Ok(Self {
            sys_dev_block: PathBuf::from("/sys/dev/block"),
            mounts: std::fs::read_to_string("/proc/mounts").context("cannot read /proc/mounts")?,
            swaps: std::fs::read_to_string("/proc/swaps").unwrap_or_default(),
        })
    }
}

/// A device that passed the checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub path: PathBuf,
    /// The kernel's name for it, e.g. `sdb`.
    pub name: String,
    pub size_bytes: u64,
    pub model: String,
    pub removable: bool,
}

/// The kind of a non-block file, for the refusal message.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    let t = meta.file_type();
    if t.is_file() {
        "a regular file"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a device"
    }
}

/// /proc/mounts escapes spaces and other bytes as `\ooo`.
pub fn unescape_mount_field(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first mount or swap whose source is one of `devs`, as (source, where). `stat` maps a
/// source path to its device number (sources that are not block devices give `None`).
pub fn find_in_use(
    devs: &[DevNum],
    mounts: &str,
    swaps: &str,
    stat: impl Fn(&Path) -> Option<DevNum>,
) -> Option<(String, String)> {
    let mounted = mounts.lines().filter_map(|l| {
        let mut f = l.split_whitespace();
        Some((
            unescape_mount_field(f.next()?),
            unescape_mount_field(f.next()?),
        ))
    });
    // /proc/swaps: a header line, then "Filename Type Size Used Priority".
    let swapped = swaps.lines().skip(1).filter_map(|l| {
        let source = unescape_mount_field(l.split_whitespace().next()?);
        Some((source, "swap".to_string()))
    });
    mounted
        .chain(swapped)
        .filter(|(source, _)| source.starts_with('/'))
        .find(|(source, _)| stat(Path::new(source)).is_some_and(|d| devs.contains(&d)))
}

fn block_dev_of(path: &Path) -> Option<DevNum> {
    let meta = std::fs::metadata(path).ok()?;
    meta.file_type()
        .is_block_device()
        .then(|| DevNum::from_rdev(meta.rdev()))
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// Runs every check on `device`; see the module documentation.
pub fn check_device(device: &Path, view: &SystemView, force: bool) -> Result<Target> {
    let meta = std::fs::metadata(device)
        .with_context(|| format!("refusing {}: cannot stat it", device.display()))?;
    if !meta.file_type().is_block_device() {
        bail!(
            "refusing {}: it is {}, not a block device (give the whole USB disk, e.g. /dev/sdb)",
            device.display(),
            file_kind(&meta)
        );
    }
    let dev = DevNum::from_rdev(meta.rdev());
    let sys = view.sys_dev_block.join(dev.to_string());
    let name = std::fs::canonicalize(&sys)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .ok_or_else(|| {
            anyhow!(
                "refusing {}: block device {dev} has no {}",
                device.display(),
                sys.display()
            )
        })?;
    if sys.join("partition").exists() {
        let parent = std::fs::canonicalize(&sys)
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "the whole disk".into());
        bail!(
            "refusing {}: it is a partition ({name}); give the whole disk (/dev/{parent})",
            device.display()
        );
    }
    let mut devs = vec![dev];
    if let Ok(entries) = std::fs::read_dir(&sys) {
        for e in entries.flatten() {
            if e.path().join("partition").exists() {
                if let Some(d) = read_trimmed(&e.path().join("dev")).and_then(|s| DevNum::parse(&s))
                {
                    devs.push(d);
                }
            }
        }
    }
    if let Some((source, at)) = find_in_use(&devs, &view.mounts, &view.swaps, block_dev_of) {
        bail!(
            "refusing {}: {source} is in use ({at}); unmount it first",
            device.display()
        );
    }
    let removable = read_trimmed(&sys.join("removable")).as_deref() == Some("1");
    if !removable && !force {
        bail!(
            "refusing {}: /sys/block/{name}/removable is not 1, so this may be an internal disk; \
             pass --force if you are sure",
            device.display()
        );
    }
    let sectors: u64 = read_trimmed(&sys.join("size"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let vendor = read_trimmed(&sys.join("device/vendor")).unwrap_or_default();
    let model = read_trimmed(&sys.join("device/model")).unwrap_or_default();
    Ok(Target {
        path: device.to_path_buf(),
        name,
        size_bytes: sectors * 512,
        model: format!("{vendor} {model}").trim().to_string(),
        removable,
    })
}

fn writable(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: access(2) reads the NUL-terminated path and nothing else.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// What `flash` writes where.
#[derive(Debug, Clone)]
pub struct FlashOptions {
    pub image: PathBuf,
    pub device: PathBuf,
    /// Accept a device that does not say it is removable.
    pub force: bool,
    /// Do not ask for confirmation.
    pub yes: bool,
}

fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// Checks the device, asks on `ask_out`/`answers` unless `opts.yes`, then writes with
/// `dd conv=fsync`.
pub fn flash(
    opts: &FlashOptions,
    answers: &mut dyn BufRead,
    ask_out: &mut dyn Write,
) -> Result<()> {
    let image_len = std::fs::metadata(&opts.image)
        .with_context(|| format!("cannot read the image {}", opts.image.display()))?
        .len();
    let target = check_device(&opts.device, &SystemView::live()?, opts.force)?;
    if target.size_bytes != 0 && image_len > target.size_bytes {
        bail!(
            "refusing {}: the image ({image_len} bytes) is larger than the device ({} bytes)",
            target.path.display(),
            target.size_bytes
        );
    }
    if !opts.yes {
        write!(
            ask_out,
            "About to write {} ({:.1} MiB) to {} ({}, {:.1} GiB{}).\nEverything on {} will be lost. Type yes to continue: ",
            opts.image.display(),
            image_len as f64 / (1u64 << 20) as f64,
            target.path.display(),
            if target.model.is_empty() { "unknown model" } else { &target.model },
            gib(target.size_bytes),
            if target.removable { ", removable" } else { ", NOT marked removable" },
            target.path.display(),
        )?;
        ask_out.flush()?;
        let mut answer = String::new();
        answers.read_line(&mut answer)?;
        if answer.trim() != "yes" {
            bail!("not confirmed; nothing was written");
        }
    }
    if crate::tools::find_program("dd").is_none() {
        bail!("cannot flash: program `dd` is missing (Debian package: coreutils)");
    }
    // Writing to a disk usually needs root; go through sudo rather than ask for a root cargo.
    let mut cmd = if writable(&target.path) {
        Command::new("dd")
    } else if crate::tools::find_program("sudo").is_some() {
        eprintln!(
            "{} is not writable by this user: running dd through sudo",
            target.path.display()
        );
        let mut c = Command::new("sudo");
        c.arg("dd");
        c
    } else {
        bail!(
            "{} is not writable by this user and sudo is missing; run as root",
            target.path.display()
        );
    };
    let status = cmd
        .arg(format!("if={}", opts.image.display()))
        .arg(format!("of={}", target.path.display()))
        .args(["bs=4M", "conv=fsync", "status=progress"])
        .status()
        .context("cannot start dd")?;
    if !status.success() {
        bail!("dd failed ({status}); the device may hold a partial image");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live_view() -> SystemView {
        SystemView {
            sys_dev_block: "/sys/dev/block".into(),
            mounts: String::new(),
            swaps: String::new(),
        }
    }

    #[test]
    fn refuses_a_regular_file() -> Result<()> {
        let path = std::env::temp_dir().join(format!("keel-flash-file-{}", std::process::id()));
        std::fs::write(&path, b"not a disk")?;
        let e = check_device(&path, &live_view(), true).expect_err("a file is no disk");
        let msg = format!("{e:#}");
        assert!(msg.contains("a regular file, not a block device"), "{msg}");
        std::fs::remove_file(&path)?;
        Ok(())
    }

    #[test]
    fn refuses_dev_null_and_missing_paths() {
        let e = check_device(Path::new("/dev/null"), &live_view(), true).expect_err("char dev");
        assert!(format!("{e:#}").contains("a character device"), "{e:#}");
        let e = check_device(Path::new("/dev/keel-no-such-disk"), &live_view(), true)
            .expect_err("missing");
        assert!(format!("{e:#}").contains("cannot stat"), "{e:#}");
    }

    #[test]
    fn dev_numbers() {
        assert_eq!(
            DevNum::from_rdev(0x0811),
            DevNum {
                major: 8,
                minor: 17
            }
        );
        // A large minor (e.g. 259:65536) uses the high encoding.
        let rdev = (259u64 << 8) | ((65536u64 & !0xff) << 12);
        assert_eq!(
            DevNum::from_rdev(rdev),
            DevNum {
                major: 259,
                minor: 65536
            }
        );
        assert_eq!(
            DevNum::parse("8:16\n"),
            Some(DevNum {
                major: 8,
                minor: 16
            })
        );
        assert_eq!(DevNum::parse("8"), None);
    }

    const MOUNTS: &str = "\
/dev/sda2 / ext4 rw 0 0
proc /proc proc rw 0 0
/dev/sdb1 /media/me/KEEL\\040STICK vfat rw 0 0
";
    const SWAPS: &str = "\
Filename Type Size Used Priority
/dev/sdc2 partition 1024 0 -2
";

    fn fake_stat(p: &Path) -> Option<DevNum> {
        let minor = match p.to_str()? {
            "/dev/sda2" => 2,
            "/dev/sdb1" => 17,
            "/dev/sdc2" => 34,
            _ => return None,
        };
        Some(DevNum { major: 8, minor })
    }

    #[test]
    fn finds_mounted_partitions_and_swap() {
        let sdb = [
            DevNum {
                major: 8,
                minor: 16,
            },
            DevNum {
                major: 8,
                minor: 17,
            },
        ];
        assert_eq!(
            find_in_use(&sdb, MOUNTS, SWAPS, fake_stat),
            Some(("/dev/sdb1".into(), "/media/me/KEEL STICK".into()))
        );
        let sdc = [
            DevNum {
                major: 8,
                minor: 32,
            },
            DevNum {
                major: 8,
                minor: 34,
            },
        ];
        assert_eq!(
            find_in_use(&sdc, MOUNTS, SWAPS, fake_stat),
            Some(("/dev/sdc2".into(), "swap".into()))
        );
        let sdd = [DevNum {
            major: 8,
            minor: 48,
        }];
        assert_eq!(find_in_use(&sdd, MOUNTS, SWAPS, fake_stat), None);
    }

    #[test]
    fn mount_escapes() {
        assert_eq!(unescape_mount_field("a\\040b\\011c"), "a b\tc");
        assert_eq!(unescape_mount_field("trailing\\04"), "trailing\\04");
    }

    #[test]
    fn flash_refuses_before_asking() {
        let image = std::env::temp_dir().join(format!("keel-flash-img-{}", std::process::id()));
        std::fs::write(&image, b"image").expect("temp image");
        let opts = FlashOptions {
            image: image.clone(),
            device: "/dev/null".into(),
            force: false,
            yes: false,
        };
        let mut asked = Vec::new();
        let e = flash(&opts, &mut &b"yes\n"[..], &mut asked).expect_err("/dev/null");
        assert!(format!("{e:#}").contains("not a block device"));
        assert!(asked.is_empty(), "asked before refusing");
        let _ = std::fs::remove_file(&image);
    }
}
