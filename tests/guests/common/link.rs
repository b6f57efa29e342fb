//! Build script shared by the Rust guests (`build = "../common/link.rs"`): links each one with
//! common/guest.ld at its own base address.

fn main() {
    let name = std::env::var("CARGO_PKG_NAME").unwrap_or_default();
    let base: u32 = match name.as_str() {
        // Where a multiboot kernel conventionally lives, and QEMU's -kernel accepts it.
        "mb32" | "qk32" | "platform32" => 0x10_0000,
        // 2 MiB: above the loader's boot area and the 1 MiB PC hole.
        "pm32" | "long64" | "smp32" => 0x20_0000,
        other => panic!("guest {other:?} has no base address in common/link.rs"),
    };
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-T{dir}/../common/guest.ld");
    println!("cargo:rustc-link-arg-bins=--defsym=GUEST_BASE={base:#x}");
    println!("cargo:rerun-if-changed=../common/guest.ld");
    println!("cargo:rerun-if-changed=../common/link.rs");
}
