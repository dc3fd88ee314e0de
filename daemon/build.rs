//! Embeds the eBPF object built by `cargo xtask build`. This script never builds eBPF
//! itself (xtask is the one place that knows how), so `cargo build` needs no nightly.
//! Without an object the binary still builds, and says at run time how to get one.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TRUSTDRIFT_EBPF_OBJECT");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../target"));
    let object = env::var_os("TRUSTDRIFT_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| target_dir.join("bpfel-unknown-none/release/trustdrift"));
    println!("cargo:rerun-if-changed={}", object.display());

    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo")).join("probe.o");
    match fs::read(&object) {
        Ok(bytes) => {
            fs::write(&out, bytes).expect("writing OUT_DIR/probe.o");
        }
        Err(_) => {
            println!(
                "cargo:warning=no eBPF object at {}: this build cannot load the probe; \
                 run `cargo xtask build`",
                object.display()
            );
            fs::write(&out, []).expect("writing OUT_DIR/probe.o");
        }
    }
}
