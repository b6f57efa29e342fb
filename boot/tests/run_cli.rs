//! `keel-boot run` on a host without the emulator: it must name what is missing and its Debian
//! package, before building or starting anything.

use std::process::Command;

const KEEL_BOOT: &str = env!("CARGO_BIN_EXE_keel-boot");

#[test]
fn missing_emulator_is_named_with_its_package() {
    let dir = std::env::temp_dir().join(format!("keel-run-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let image = dir.join("keel-bios.img");
    std::fs::write(&image, [0u8; 512]).expect("write image");
    for (emulator, program, package) in [
        ("bochs", "program `bochs`", "Debian package: bochs"),
        ("bochs", "program `xvfb-run`", "Debian package: xvfb"),
        (
            "qemu",
            "program `qemu-system-x86_64`",
            "Debian package: qemu-system-x86",
        ),
    ] {
        let out = Command::new(KEEL_BOOT)
            .args(["run", "--emulator", emulator, "--image"])
            .arg(&image)
            .env("PATH", dir.join("empty-path"))
            .output()
            .expect("run keel-boot");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains(&format!("{program} ({package})")),
            "{emulator}: {err}"
        );
        assert!(err.contains("scripts/setup.sh"), "{err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
