//! Links real16 at 0x7c00 with real16.ld; build.sh turns the ELF into a flat binary.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    println!("cargo:rustc-link-arg-bins=-T{dir}/real16.ld");
    println!("cargo:rerun-if-changed=real16.ld");
    println!("cargo:rerun-if-changed=src/real16.s");
}
