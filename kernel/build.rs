//! Links the kernel with its own script (load at 2 MiB, run at -2 GiB) and
//! defmt's, which places the log-string table outside every loaded segment.

fn main() {
    let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    println!("cargo:rustc-link-arg-bins=-T{dir}/linker.ld");
    println!("cargo:rustc-link-arg-bins=-Tdefmt.x");
    println!("cargo:rerun-if-changed=linker.ld");
}
