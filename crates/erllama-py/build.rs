//! Records the CPU features this module is compiled for (`-C target-cpu`,
//! `.cargo/config.toml` or `RUSTFLAGS`) so that `erllama._cpu` can read them
//! from the file before loading it: code built for a feature the CPU lacks
//! dies of SIGILL, which no Python error can report.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    // Cargo sets these for the target being built (not the host), and runs
    // this script again whenever they change.
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let features = std::env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    println!("cargo:rustc-env=ERLLAMA_TARGET_FEATURES={arch}:{features}");
}
