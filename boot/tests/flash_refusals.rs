//! The refusal paths of `keel-boot flash` and scripts/flash-usb.sh, end to end: neither may write
//! to something that is not a whole, unmounted, removable block device.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const KEEL_BOOT: &str = env!("CARGO_BIN_EXE_keel-boot");

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("keel-flash-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a temp dir");
    dir
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/flash-usb.sh")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn binary_refuses_dev_null() {
    let dir = scratch("null");
    let image = dir.join("keel.img");
    std::fs::write(&image, b"image bytes").expect("write image");
    let out = Command::new(KEEL_BOOT)
        .args(["flash", "/dev/null", "--yes", "--force", "--image"])
        .arg(&image)
        .output()
        .expect("run keel-boot");
    assert!(!out.status.success(), "flash to /dev/null succeeded");
    assert!(
        stderr(&out).contains("/dev/null: it is a character device, not a block device"),
        "{}",
        stderr(&out)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn binary_refuses_a_regular_file_and_leaves_it_alone() {
    let dir = scratch("file");
    let image = dir.join("keel.img");
    let victim = dir.join("not-a-disk");
    std::fs::write(&image, b"image bytes").expect("write image");
    std::fs::write(&victim, b"precious").expect("write victim");
    let out = Command::new(KEEL_BOOT)
        .args(["flash", "--yes", "--force", "--image"])
        .arg(&image)
        .arg(&victim)
        .output()
        .expect("run keel-boot");
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("a regular file, not a block device"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read(&victim).expect("read victim"), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn script_refuses_dev_null_and_a_regular_file() {
    let dir = scratch("script");
    let image = dir.join("keel.img");
    let victim = dir.join("not-a-disk");
    std::fs::write(&image, b"image bytes").expect("write image");
    std::fs::write(&victim, b"precious").expect("write victim");
    for device in [Path::new("/dev/null"), victim.as_path()] {
        let out = Command::new("bash")
            .arg(script())
            .arg(&image)
            .arg(device)
            .args(["--yes", "--force"])
            .env("KEEL_BOOT", KEEL_BOOT)
            .output()
            .expect("run flash-usb.sh");
        assert!(
            !out.status.success(),
            "flash-usb.sh wrote to {}",
            device.display()
        );
        assert!(
            stderr(&out).contains("not a block device"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(std::fs::read(&victim).expect("read victim"), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn script_usage_errors() {
    let out = Command::new("bash")
        .arg(script())
        .env("KEEL_BOOT", KEEL_BOOT)
        .output()
        .expect("run flash-usb.sh");
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("usage:"));
    let out = Command::new("bash")
        .arg(script())
        .args(["/no/such.img", "/dev/null"])
        .env("KEEL_BOOT", KEEL_BOOT)
        .output()
        .expect("run flash-usb.sh");
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("does not exist"), "{}", stderr(&out));
}
