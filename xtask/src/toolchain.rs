//! The toolchain the eBPF build needs, made ready idempotently:
//! nightly with rust-src, and bpf-linker built against the nightly toolchain's own libLLVM
//! (its LLVM major and library name discovered, never assumed).

use std::{
    env, fs,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

use crate::workspace::{self, command};

/// What the nightly toolchain links against.
struct NightlyLlvm {
    /// e.g. 22
    major: u32,
    /// The real shared object in the toolchain's lib/, e.g. libLLVM.so.22.1-rust-1.97.0-nightly
    library: PathBuf,
}

impl NightlyLlvm {
    fn soname(&self) -> String {
        self.library
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }
}

fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
}

fn state_dir() -> PathBuf {
    cargo_home().join("trustdrift-xtask")
}

fn nightly_installed() -> bool {
    command("rustup", &["toolchain", "list"])
        .output()
        .is_some_and(|out| out.lines().any(|l| l.starts_with("nightly")))
}

fn nightly_sysroot() -> Result<PathBuf> {
    let out = command("rustup", &["run", "nightly", "rustc", "--print", "sysroot"])
        .output()
        .context("nightly rustc does not run (is the nightly toolchain installed?)")?;
    Ok(PathBuf::from(out.trim()))
}

fn has_rust_src(sysroot: &Path) -> bool {
    sysroot
        .join("lib/rustlib/src/rust/library/core/Cargo.toml")
        .exists()
}

fn nightly_llvm(sysroot: &Path) -> Result<NightlyLlvm> {
    let version = command("rustup", &["run", "nightly", "rustc", "-vV"])
        .output()
        .context("rustc +nightly -vV failed")?;
    let major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.trim().parse().ok())
        .context("rustc +nightly -vV printed no LLVM version")?;
    let lib = sysroot.join("lib");
    let mut candidates: Vec<PathBuf> = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            // The real library is libLLVM.so.<ver>...; libLLVM-<major>-*.so is a linker script.
            name.is_some_and(|n| n.starts_with(&format!("libLLVM.so.{major}")))
        })
        .collect();
    candidates.sort();
    let library = candidates.pop().with_context(|| {
        format!(
            "no libLLVM.so.{major}* in {} (nightly toolchain without its LLVM?)",
            lib.display()
        )
    })?;
    Ok(NightlyLlvm { major, library })
}

/// The stamp records which nightly LLVM the installed bpf-linker was built against.
fn stamp_path() -> PathBuf {
    state_dir().join("bpf-linker.llvm")
}

fn bpf_linker_ready(llvm: &NightlyLlvm) -> bool {
    let runs = command("bpf-linker", &["--version"]).output().is_some();
    let stamp = fs::read_to_string(stamp_path()).unwrap_or_default();
    runs && stamp.trim() == llvm.soname()
}

/// A folder whose lib/ holds libLLVM.so and the soname, both pointing at nightly's library:
/// what bpf-linker's build script needs, with no system LLVM.
fn llvm_prefix(llvm: &NightlyLlvm) -> Result<PathBuf> {
    let prefix = state_dir().join("llvm-prefix").join(llvm.soname());
    let lib = prefix.join("lib");
    fs::create_dir_all(&lib).with_context(|| format!("creating {}", lib.display()))?;
    for name in ["libLLVM.so".to_string(), llvm.soname()] {
        let link = lib.join(&name);
        let _ = fs::remove_file(&link);
        symlink(&llvm.library, &link)
            .with_context(|| format!("linking {} -> {}", link.display(), llvm.library.display()))?;
    }
    Ok(prefix)
}

fn install_bpf_linker(llvm: &NightlyLlvm) -> Result<()> {
    let prefix = llvm_prefix(llvm)?;
    let feature = format!("llvm-{}", llvm.major);
    workspace::command(
        "cargo",
        &[
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &feature,
        ],
    )
    .env("LLVM_PREFIX", &prefix)
    .run(&format!(
        "installing bpf-linker against nightly's LLVM {} ({})",
        llvm.major,
        llvm.library.display()
    ))?;
    fs::write(stamp_path(), llvm.soname()).context("writing the bpf-linker stamp")?;
    Ok(())
}

/// Everything `setup` does, skipping what is already in place.
pub fn ensure() -> Result<()> {
    if !nightly_installed() {
        command(
            "rustup",
            &[
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "-c",
                "rust-src",
            ],
        )
        .run("installing the nightly toolchain with rust-src")?;
    }
    let sysroot = nightly_sysroot()?;
    if !has_rust_src(&sysroot) {
        command(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )
        .run("adding rust-src to nightly")?;
    }
    let llvm = nightly_llvm(&sysroot)?;
    if !bpf_linker_ready(&llvm) {
        install_bpf_linker(&llvm)?;
    }
    if !bpf_linker_ready(&llvm) {
        bail!(
            "bpf-linker still does not run after installing it; check that {} exists",
            llvm.library.display()
        );
    }
    Ok(())
}

pub fn setup() -> Result<()> {
    ensure()?;
    crate::packages::ensure_for_tests()?;
    eprintln!("xtask: this machine is ready");
    Ok(())
}
