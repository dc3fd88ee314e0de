//! Building the kernel probe: nightly, `-Z build-std=core`, target bpfel-unknown-none,
//! linked by bpf-linker with BTF.

use std::path::PathBuf;

use anyhow::Result;

use crate::workspace::{self, Step};

const TARGET: &str = "bpfel-unknown-none";

pub fn object_path() -> PathBuf {
    workspace::target_dir()
        .join(TARGET)
        .join("release/trustdrift")
}

fn nightly_cargo(subcommand: &str) -> Step {
    let mut step = workspace::command(
        "rustup",
        &[
            "run",
            "nightly",
            "cargo",
            subcommand,
            "--package",
            "trustdrift-ebpf",
            "--bins",
            "--release",
            "--target",
            TARGET,
            "-Z",
            "build-std=core",
        ],
    );
    step.0.current_dir(workspace::root());
    // aya-ebpf picks the pt_regs layout from this cfg; --btf keeps the program's BTF so
    // the kernel can check map and global types.
    let arch = std::env::consts::ARCH;
    let flags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
    ]
    .join("\x1f");
    step.env("CARGO_ENCODED_RUSTFLAGS", flags)
        // The stable toolchain's variables must not leak into the nightly build.
        .env_remove("RUSTC")
        .env_remove("RUSTDOC")
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
}

pub fn build() -> Result<PathBuf> {
    nightly_cargo("build").run("building the eBPF probe (nightly, bpfel-unknown-none)")?;
    Ok(object_path())
}

pub fn clippy() -> Result<()> {
    let mut step = nightly_cargo("clippy");
    step.0.args(["--", "-D", "warnings"]);
    step.run("clippy on the eBPF probe")
}
