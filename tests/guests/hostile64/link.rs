//! Build script of the hostile and fuzz guests (`build = "../hostile64/link.rs"` in fuzz): links
//! every binary with common/guest.ld at 2 MiB, like long64. (common/link.rs picks the address by
//! package name and knows only the original guests.)

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-T{dir}/../common/guest.ld");
    println!("cargo:rustc-link-arg-bins=--defsym=GUEST_BASE=0x200000");
    println!("cargo:rerun-if-changed=../common/guest.ld");
    println!("cargo:rerun-if-changed=../hostile64/link.rs");
}
