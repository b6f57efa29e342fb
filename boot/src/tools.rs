//! The host programs and firmware files each way of running Keel needs, where Debian puts them,
//! and which package provides each, so a missing one is reported by name before anything starts.

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

use crate::emulator::{Emulator, Firmware};

/// Bochs' own BIOS (package `bochsbios`).
pub const BOCHS_BIOS: &str = "/usr/share/bochs/BIOS-bochs-latest";
/// The LGPL VGA BIOS Bochs loads as its video ROM (package `vgabios`).
pub const VGA_BIOS: &str = "/usr/share/vgabios/vgabios.bin";
/// OVMF as one image (code and variables), which Bochs takes as its `romimage`.
pub const OVMF_COMBINED: &str = "/usr/share/ovmf/OVMF.fd";
/// OVMF split into code and a variable store template for QEMU's two pflash drives, in order of
/// preference. The 2 MiB build is the one measured in docs/BOOTING.md; newer Debian ships only 4M.
pub const OVMF_SPLIT: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
];
/// Where Debian-like systems keep Bochs' plugins; the X display plugin comes from `bochs-x`.
const BOCHS_PLUGIN_DIRS: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/bochs/plugins",
    "/usr/lib/bochs/plugins",
    "/usr/lib64/bochs/plugins",
];

/// Everything a run needs from the host, resolved to paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostTools {
    Bochs {
        bochs: PathBuf,
        xvfb_run: PathBuf,
        /// BIOS-bochs-latest, or OVMF.fd for a UEFI run.
        rom: PathBuf,
        vga_rom: PathBuf,
    },
    Qemu {
        qemu: PathBuf,
        /// OVMF code and variable template for a UEFI run.
        ovmf: Option<(PathBuf, PathBuf)>,
    },
}

/// One thing that was looked for and not found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Missing {
    pub what: String,
    pub package: &'static str,
}

/// Finds `name` in `PATH` like a shell would.
pub fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

fn program(name: &str, package: &'static str, missing: &mut Vec<Missing>) -> PathBuf {
    find_program(name).unwrap_or_else(|| {
        missing.push(Missing {
            what: format!("program `{name}`"),
            package,
        });
        PathBuf::from(name)
    })
}

fn file(path: &str, package: &'static str, missing: &mut Vec<Missing>) -> PathBuf {
    let p = PathBuf::from(path);
    if !p.is_file() {
        missing.push(Missing {
            what: format!("file {path}"),
            package,
        });
    }
    p
}

/// Bochs loads its display library as a plugin; a Bochs without `bochs-x` starts and then fails
/// on `display_library: x`. Only checked where a plugin directory exists (a static Bochs has none).
fn bochs_x_plugin(missing: &mut Vec<Missing>) {
    let dirs: Vec<&Path> = BOCHS_PLUGIN_DIRS
        .iter()
        .map(Path::new)
        .filter(|d| d.is_dir())
        .collect();
    if dirs.is_empty() {
        return;
    }
    let found = dirs.iter().any(|d| {
        std::fs::read_dir(d)
            .map(|entries| {
                entries
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with("libbx_x"))
            })
            .unwrap_or(false)
    });
    if !found {
        missing.push(Missing {
            what: "Bochs X display plugin (libbx_x_gui)".into(),
            package: "bochs-x",
        });
    }
}

/// Looks everything up and returns either the paths or the list of what is missing.
pub fn probe(emulator: Emulator, firmware: Firmware) -> Result<HostTools, Vec<Missing>> {
    let mut missing = Vec::new();
    let tools = match emulator {
        Emulator::Bochs => {
            let bochs = program("bochs", "bochs", &mut missing);
            bochs_x_plugin(&mut missing);
            let xvfb_run = program("xvfb-run", "xvfb", &mut missing);
            // xvfb-run needs xauth, which Debian's xvfb only recommends.
            program("xauth", "xauth", &mut missing);
            let rom = match firmware {
                Firmware::Bios => file(BOCHS_BIOS, "bochsbios", &mut missing),
                Firmware::Uefi => file(OVMF_COMBINED, "ovmf", &mut missing),
            };
            let vga_rom = file(VGA_BIOS, "vgabios", &mut missing);
            HostTools::Bochs {
                bochs,
                xvfb_run,
                rom,
                vga_rom,
            }
        }
        Emulator::Qemu | Emulator::QemuKvm => {
            let qemu = program("qemu-system-x86_64", "qemu-system-x86", &mut missing);
            let ovmf = match firmware {
                Firmware::Bios => None,
                Firmware::Uefi => {
                    let pair = OVMF_SPLIT.iter().find(|(code, vars)| {
                        Path::new(code).is_file() && Path::new(vars).is_file()
                    });
                    match pair {
                        Some((code, vars)) => Some((PathBuf::from(code), PathBuf::from(vars))),
                        None => {
                            missing.push(Missing {
                                what: format!("OVMF firmware ({})", OVMF_SPLIT[0].0),
                                package: "ovmf",
                            });
                            None
                        }
                    }
                }
            };
            HostTools::Qemu { qemu, ovmf }
        }
    };
    if missing.is_empty() {
        Ok(tools)
    } else {
        Err(missing)
    }
}

/// A readable error for what `probe` did not find.
pub fn missing_message(missing: &[Missing]) -> String {
    let mut msg = String::from("cannot run: missing on this host:\n");
    for m in missing {
        msg.push_str(&format!("  - {} (Debian package: {})\n", m.what, m.package));
    }
    let mut packages: Vec<&str> = Vec::new();
    for m in missing {
        // "the kernel's kvm_intel module" is not something apt installs.
        if !m.package.contains(' ') && !packages.contains(&m.package) {
            packages.push(m.package);
        }
    }
    if !packages.is_empty() {
        msg.push_str(&format!(
            "install with scripts/setup.sh or `sudo apt-get install {}`",
            packages.join(" ")
        ));
    }
    msg
}

/// Whether `cpuinfo` (the text of /proc/cpuinfo) shows VT-x: the `vmx` flag.
pub fn cpu_has_vmx(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx"))
}

/// Why QEMU with KVM cannot give Keel VT-x on this host, if it cannot: `kvm_device` is whether
/// /dev/kvm exists, `cpuinfo` the text of /proc/cpuinfo. Without the check QEMU starts and then
/// fails in its own way (on a software KVM such as kvm_pvm it aborts setting an MSR or hangs).
pub fn kvm_problem(kvm_device: bool, cpuinfo: &str) -> Option<String> {
    if !cpu_has_vmx(cpuinfo) {
        let why = if cpuinfo.contains("AuthenticAMD") {
            "this is an AMD CPU (AMD-V, not VT-x)"
        } else {
            "VT-x is off in the firmware setup, or this is a virtual machine whose hypervisor \
             does not pass VT-x on"
        };
        let kvm = if kvm_device {
            " /dev/kvm exists, but KVM cannot give a guest what the CPU does not have."
        } else {
            ""
        };
        return Some(format!(
            "--emulator qemu-kvm: no VT-x here: /proc/cpuinfo shows no `vmx` flag ({why}).{kvm} \
             Keel needs VT-x: use --emulator bochs, which emulates it (the default on this host)"
        ));
    }
    if !kvm_device {
        return Some(
            "--emulator qemu-kvm: the CPU has VT-x but there is no /dev/kvm: load kvm_intel \
             with nested=1 (docs/BOOTING.md, \"QEMU with KVM\"), or use --emulator bochs"
                .into(),
        );
    }
    None
}

/// `probe` as an `anyhow` result; for QEMU with KVM, first [`kvm_problem`].
pub fn require(emulator: Emulator, firmware: Firmware) -> Result<HostTools> {
    if emulator == Emulator::QemuKvm {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        if let Some(problem) = kvm_problem(Path::new("/dev/kvm").exists(), &cpuinfo) {
            bail!("{problem}");
        }
    }
    match probe(emulator, firmware) {
        Ok(t) => Ok(t),
        Err(missing) => bail!("{}", missing_message(&missing)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_program_every_host_has() {
        assert!(find_program("sh").is_some());
        assert!(find_program("no-such-program-keel").is_none());
    }

    const AMD_PVM: &str = "processor\t: 0\nvendor_id\t: AuthenticAMD\n\
                           flags\t\t: fpu vme de pse tsc msr hypervisor\n";
    const INTEL: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vmx ept tsc\n";

    /// This machine's case: an AMD host whose /dev/kvm is kvm_pvm.
    #[test]
    fn kvm_without_vt_x_says_so() {
        assert_eq!(
            kvm_problem(true, AMD_PVM).as_deref(),
            Some(
                "--emulator qemu-kvm: no VT-x here: /proc/cpuinfo shows no `vmx` flag (this is an \
                 AMD CPU (AMD-V, not VT-x)). /dev/kvm exists, but KVM cannot give a guest what the \
                 CPU does not have. Keel needs VT-x: use --emulator bochs, which emulates it (the \
                 default on this host)"
            )
        );
        let intel_off = INTEL.replace(" vmx", "");
        let msg = kvm_problem(false, &intel_off).unwrap_or_default();
        assert!(
            msg.contains("(VT-x is off in the firmware setup, or this is a virtual machine"),
            "{msg}"
        );
        assert!(!msg.contains("/dev/kvm exists"), "{msg}");
        assert_eq!(
            kvm_problem(false, INTEL).as_deref(),
            Some(
                "--emulator qemu-kvm: the CPU has VT-x but there is no /dev/kvm: load kvm_intel \
                 with nested=1 (docs/BOOTING.md, \"QEMU with KVM\"), or use --emulator bochs"
            )
        );
        assert_eq!(kvm_problem(true, INTEL), None);
        // `vmx` must be a whole flag.
        assert!(!cpu_has_vmx("flags\t: vmxfake\n"));
        assert!(!cpu_has_vmx("model name\t: vmx\n"));
    }

    #[test]
    fn message_names_tool_and_package() {
        let msg = missing_message(&[
            Missing {
                what: "program `bochs`".into(),
                package: "bochs",
            },
            Missing {
                what: "file /usr/share/vgabios/vgabios.bin".into(),
                package: "vgabios",
            },
        ]);
        assert!(
            msg.contains("program `bochs` (Debian package: bochs)"),
            "{msg}"
        );
        assert!(msg.contains("apt-get install bochs vgabios"), "{msg}");
    }
}
