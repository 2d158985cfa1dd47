//! Links the guest with the runtime's linker script (multiboot v1 image at
//! physical 1 MiB, one loadable segment).

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let script = std::path::Path::new(&dir).join("../runtime/guest.ld");
    let script = script.canonicalize().unwrap_or(script);
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
    println!("cargo:rerun-if-changed={}", script.display());
}
