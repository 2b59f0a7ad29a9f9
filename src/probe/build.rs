//! Links the probe with its linker script (fixed load address, PVH note segment).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| ".".into());
    println!("cargo:rustc-link-arg=-T{dir}/link.ld");
    println!("cargo:rustc-link-arg=--no-relax");
    println!("cargo:rerun-if-changed=link.ld");
}
