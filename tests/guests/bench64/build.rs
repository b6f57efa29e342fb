//! Links bench64 with common/guest.ld at 2 MiB (like long64) and bench64-boot at 0x7c00 with
//! boot.ld. (common/link.rs picks one address per package, and this package has two binaries.)

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rustc-link-arg-bin=bench64=-T{dir}/../common/guest.ld");
    println!("cargo:rustc-link-arg-bin=bench64=--defsym=GUEST_BASE=0x200000");
    println!("cargo:rustc-link-arg-bin=bench64-boot=-T{dir}/boot.ld");
    println!("cargo:rerun-if-changed=../common/guest.ld");
    println!("cargo:rerun-if-changed=boot.ld");
    println!("cargo:rerun-if-changed=src/boot.s");
}
