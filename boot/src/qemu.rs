//! Running an image in QEMU: with KVM on an Intel host that exposes VMX (nested VT-x), or with
//! TCG, which has no VMX at all and so exercises Keel's "no VMX" path.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::console::Com1;

/// Where a QEMU run sends things, and how it boots.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub kvm: bool,
    pub memory_mib: u32,
    /// Processors (`-smp N`).
    pub cpus: u32,
    pub disk: PathBuf,
    /// OVMF code (read-only) and this run's own copy of the variable store, for UEFI.
    pub ovmf: Option<(PathBuf, PathBuf)>,
    pub com1: Com1,
    /// COM2, Keel's control channel: the terminal it is connected to (`control::Bridge`).
    pub com2: Option<PathBuf>,
    /// Keel's bulk disk: a raw file on the first IDE channel's slave (index 1), written through.
    pub bulk: Option<PathBuf>,
    pub e9_out: PathBuf,
}

fn joined(prefix: &str, path: &Path) -> OsString {
    let mut s = OsString::from(prefix);
    s.push(path.as_os_str());
    s
}

/// QEMU's arguments for `cfg`.
pub fn args(cfg: &QemuConfig) -> Vec<OsString> {
    let mut a: Vec<OsString> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(OsString::from));
    if cfg.kvm {
        // `-cpu host` passes the host's VMX capability through (nested=1 in kvm_intel).
        push(&["-accel", "kvm", "-cpu", "host"]);
    } else {
        push(&["-accel", "tcg"]);
    }
    push(&["-m", &cfg.memory_mib.to_string()]);
    push(&["-smp", &cfg.cpus.to_string()]);
    push(&["-no-reboot", "-display", "none", "-monitor", "none"]);
    // Keel writes its exit code to port 0xf4; QEMU then exits with (code << 1) | 1.
    push(&["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]);
    if let Some((code, vars)) = &cfg.ovmf {
        a.push("-drive".into());
        a.push(joined("if=pflash,format=raw,readonly=on,file=", code));
        a.push("-drive".into());
        a.push(joined("if=pflash,format=raw,file=", vars));
    }
    // snapshot=on: writes go to a temporary overlay, so parallel runs can share one image.
    a.push("-drive".into());
    a.push(joined("format=raw,snapshot=on,file=", &cfg.disk));
    if let Some(bulk) = &cfg.bulk {
        a.push("-drive".into());
        a.push(joined(
            "if=ide,index=1,format=raw,cache=writethrough,file=",
            bulk,
        ));
    }
    a.push("-serial".into());
    a.push(match &cfg.com1 {
        Com1::File(path) => joined("file:", path),
        // A host terminal device: QEMU reads and writes it.
        Com1::Terminal(path) => path.as_os_str().to_owned(),
    });
    // The second -serial is COM2.
    if let Some(tty) = &cfg.com2 {
        a.push("-serial".into());
        a.push(tty.as_os_str().to_owned());
    }
    a.push("-debugcon".into());
    a.push(joined("file:", &cfg.e9_out));
    a
}

/// QEMU cannot parse a comma inside a `-drive file=` value without doubling it; the run directory
/// and image paths are checked with this first.
pub fn path_ok(p: &Path) -> bool {
    !p.to_string_lossy().contains(',')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(cfg: &QemuConfig) -> Vec<String> {
        args(cfg)
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    fn config() -> QemuConfig {
        QemuConfig {
            kvm: false,
            memory_mib: 256,
            cpus: 1,
            disk: "/o/keel-bios.img".into(),
            ovmf: None,
            com1: Com1::File("/r/serial.log".into()),
            com2: None,
            bulk: None,
            e9_out: "/r/e9.log".into(),
        }
    }

    fn has_pair(a: &[String], flag: &str, value: &str) -> bool {
        a.windows(2).any(|w| w[0] == flag && w[1] == value)
    }

    #[test]
    fn tcg_bios_run() {
        let a = strings(&config());
        assert!(has_pair(&a, "-accel", "tcg"));
        assert!(has_pair(
            &a,
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04"
        ));
        assert!(has_pair(
            &a,
            "-drive",
            "format=raw,snapshot=on,file=/o/keel-bios.img"
        ));
        assert!(has_pair(&a, "-serial", "file:/r/serial.log"));
        assert!(has_pair(&a, "-debugcon", "file:/r/e9.log"));
        assert!(has_pair(&a, "-m", "256"));
        assert!(has_pair(&a, "-smp", "1"));
        assert!(a.contains(&"-no-reboot".to_string()));
        assert!(!a.iter().any(|s| s.contains("pflash")));
    }

    #[test]
    fn kvm_uefi_run() {
        let mut cfg = config();
        cfg.kvm = true;
        cfg.ovmf = Some(("/fw/OVMF_CODE.fd".into(), "/r/vars.fd".into()));
        let a = strings(&cfg);
        assert!(has_pair(&a, "-accel", "kvm"));
        assert!(has_pair(&a, "-cpu", "host"));
        assert!(has_pair(
            &a,
            "-drive",
            "if=pflash,format=raw,readonly=on,file=/fw/OVMF_CODE.fd"
        ));
        assert!(has_pair(
            &a,
            "-drive",
            "if=pflash,format=raw,file=/r/vars.fd"
        ));
    }

    #[test]
    fn the_bulk_disk_is_the_second_ide_disk() {
        let mut cfg = config();
        assert!(!strings(&cfg).iter().any(|s| s.contains("index=1")));
        cfg.bulk = Some("/r/bulk.img".into());
        let a = strings(&cfg);
        assert!(a.contains(
            &"if=ide,index=1,format=raw,cache=writethrough,file=/r/bulk.img".to_string()
        ));
    }

    #[test]
    fn com2_is_the_second_serial_port() {
        let mut cfg = config();
        cfg.com2 = Some("/dev/pts/9".into());
        let a = strings(&cfg);
        let serials: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(k, _)| *k == "-serial")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(serials, ["file:/r/serial.log", "/dev/pts/9"]);
    }

    #[test]
    fn com1_on_a_terminal() {
        let mut cfg = config();
        cfg.com1 = Com1::Terminal("/dev/pts/7".into());
        assert!(has_pair(&strings(&cfg), "-serial", "/dev/pts/7"));
    }

    #[test]
    fn commas_are_refused() {
        assert!(path_ok(Path::new("/tmp/a b")));
        assert!(!path_ok(Path::new("/tmp/a,b")));
    }
}
