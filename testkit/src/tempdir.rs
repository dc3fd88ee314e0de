//! A directory of its own under the temporary directory, removed on drop.

use std::{
    env, fs, io,
    path::{Path, PathBuf},
};

/// A temporary directory, `trustdrift-{tag}-{pid}-{random}`, removed with everything in it
/// when dropped.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        Self::try_new(tag).unwrap_or_else(|e| panic!("creating a temporary directory: {e}"))
    }

    pub fn try_new(tag: &str) -> io::Result<Self> {
        let dir = env::temp_dir().join(format!(
            "trustdrift-{tag}-{}-{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        ));
        fs::create_dir_all(&dir)
            .map_err(|e| io::Error::new(e.kind(), format!("creating {}: {e}", dir.display())))?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A bpffs directory of its own for a daemon's pinned probe,
/// `/sys/fs/bpf/trustdrift-e2e-{tag}-{pid}-{random}`: not created (the daemon does that),
/// removed when dropped, which detaches whatever probe is still pinned there.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/sys/fs/bpf/trustdrift-e2e-{tag}-{}-{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        )))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}
