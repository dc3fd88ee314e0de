//! Where things are, and how xtask runs commands (loudly, with context on failure).

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_path_buf()
}

pub fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("target"))
}

pub fn cargo(args: &[&str]) -> Step {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).current_dir(root());
    Step(cmd)
}

pub fn command(program: &str, args: &[&str]) -> Step {
    let mut cmd = Command::new(program);
    cmd.args(args);
    Step(cmd)
}

/// A command to run with its output on the terminal.
pub struct Step(pub Command);

impl Step {
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.0.env(key, value);
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.0.env_remove(key);
        self
    }

    pub fn run(mut self, what: &str) -> Result<()> {
        eprintln!("xtask: {what}");
        let status = self
            .0
            .status()
            .with_context(|| format!("{what}: could not start {:?}", self.0.get_program()))?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(())
    }

    /// Runs quietly and returns stdout; `None` if the program is missing or fails.
    pub fn output(mut self) -> Option<String> {
        let out = self.0.output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
