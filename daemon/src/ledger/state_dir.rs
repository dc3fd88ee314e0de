//! The state directory: private to the daemon (0700, every file 0600), and every file in
//! it opened through the directory's own descriptor with `O_NOFOLLOW`: a symlink planted
//! there is removed or refused, never followed. It holds command lines and the trust
//! reads of every process on the node.

use std::{
    fs::File,
    io::{self, Read, Write},
    os::fd::{AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};
use rustix::fs::{AtFlags, Mode, OFlags};

/// Permissions of the directory and of its files.
const DIR_MODE: u32 = 0o700;
const FILE_MODE: u32 = 0o600;

/// The state directory, locked against a second daemon for as long as this lives.
pub struct StateDir {
    path: PathBuf,
    dir: OwnedFd,
    _lock: OwnedFd,
}

impl StateDir {
    /// Opens (creating it private if missing) the state directory at `path`. The last
    /// component must not be a symlink; an existing directory is made private.
    pub fn open(path: &Path) -> Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        match rustix::fs::mkdir(path, Mode::from_raw_mode(DIR_MODE)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => bail!("creating state dir {}: {e}", path.display()),
        }
        let dir = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| {
            format!(
                "opening state dir {} (it must be a directory, not a symlink)",
                path.display()
            )
        })?;
        let st = rustix::fs::fstat(&dir).context("state dir")?;
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if st.st_uid != me {
            bail!(
                "state dir {} belongs to uid {}, not to this daemon (uid {me}): refusing it",
                path.display(),
                st.st_uid
            );
        }
        if st.st_mode & 0o7777 != DIR_MODE {
            rustix::fs::fchmod(&dir, Mode::from_raw_mode(DIR_MODE))
                .with_context(|| format!("making {} private", path.display()))?;
        }
        let lock = open_at(&dir, "lock", OFlags::RDWR | OFlags::CREATE)
            .with_context(|| format!("creating {}/lock", path.display()))?;
        // SAFETY: flock on a valid fd.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            bail!(
                "another trustdrift is running with state dir {} (its lock is held)",
                path.display()
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            dir,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` names this very directory (its lock cannot be taken twice).
    pub fn is(&self, path: &Path) -> bool {
        match (rustix::fs::fstat(&self.dir), rustix::fs::stat(path)) {
            (Ok(this), Ok(that)) => (this.st_dev, this.st_ino) == (that.st_dev, that.st_ino),
            _ => false,
        }
    }

    /// The content of `name`, at most `cap` bytes; `None` when it does not exist.
    pub fn read(&self, name: &str, cap: u64) -> io::Result<Option<Vec<u8>>> {
        let fd = match open_at(&self.dir, name, OFlags::RDONLY) {
            Ok(fd) => fd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut bytes = Vec::new();
        File::from(fd).take(cap).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Replaces `name` with `bytes` atomically: a new private file written and synced,
    /// renamed over the old one, the directory synced.
    pub fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomically(&self.dir, &self.path, name, bytes)
    }

    /// A handle on the directory a thread of its own can write through (the lock stays
    /// here).
    pub fn writer(&self) -> io::Result<Writer> {
        Ok(Writer {
            path: self.path.clone(),
            dir: self.dir.try_clone()?,
        })
    }

    /// Renames `from` to `to`, both in the directory.
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(&self.dir, from, &self.dir, to)?)
    }

    /// Opens `name` for reading and writing, creating it private if missing.
    pub fn open_file(&self, name: &str) -> io::Result<File> {
        open_at(&self.dir, name, OFlags::RDWR | OFlags::CREATE).map(File::from)
    }
}

/// The state directory, for a writer thread.
pub struct Writer {
    path: PathBuf,
    dir: OwnedFd,
}

impl Writer {
    /// See [`StateDir::write_atomically`].
    pub fn write_atomically(&self, name: &str, bytes: &[u8]) -> Result<()> {
        write_atomically(&self.dir, &self.path, name, bytes)
    }
}

fn write_atomically(dir: &OwnedFd, path: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let tmp = format!("{name}.tmp");
    // Whatever sits at the temporary name (a crashed save, a planted symlink) goes:
    // unlinking a symlink removes the link, never its target.
    match rustix::fs::unlinkat(dir, tmp.as_str(), AtFlags::empty()) {
        Ok(()) | Err(rustix::io::Errno::NOENT) => {}
        Err(e) => bail!("removing {}/{tmp}: {e}", path.display()),
    }
    let fd = open_at(dir, &tmp, OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL)
        .with_context(|| format!("creating {}/{tmp}", path.display()))?;
    let mut f = File::from(fd);
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}/{tmp}", path.display()))?;
    rustix::fs::renameat(dir, tmp.as_str(), dir, name)
        .with_context(|| format!("renaming {}/{tmp}", path.display()))?;
    let _ = rustix::fs::fsync(dir);
    Ok(())
}

/// Opens `name` in `dir`: never through a symlink, private when created, and made private
/// if it was not (a file left by an older version).
fn open_at(dir: &OwnedFd, name: &str, flags: OFlags) -> io::Result<OwnedFd> {
    let fd = rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(FILE_MODE),
    )?;
    let st = rustix::fs::fstat(&fd)?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(io::Error::other(format!("{name} is not a regular file")));
    }
    if st.st_mode & 0o777 != FILE_MODE {
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(FILE_MODE))?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("trustdrift-statedir-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn the_directory_and_its_files_are_private_even_if_they_were_not() {
        let t = Tmp::new("private");
        let state = t.0.join("state");
        std::fs::create_dir(&state).unwrap();
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(state.join("ledger.json"), "{}").unwrap();
        std::fs::set_permissions(
            state.join("ledger.json"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let dir = StateDir::open(&state).unwrap();
        assert_eq!(mode(&state), 0o700);
        assert_eq!(mode(&state.join("lock")), 0o600);
        assert_eq!(dir.read("ledger.json", 1 << 20).unwrap().unwrap(), b"{}");
        assert_eq!(mode(&state.join("ledger.json")), 0o600);
        dir.write_atomically("ledger.json", b"{\"a\":1}").unwrap();
        assert_eq!(mode(&state.join("ledger.json")), 0o600);
    }

    #[test]
    fn planted_symlinks_are_never_followed() {
        let t = Tmp::new("symlinks");
        let state = t.0.join("state");
        let victim = t.0.join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let dir = StateDir::open(&state).unwrap();
        // A link at the temporary name: removed, the save goes to a new file.
        symlink(&victim, state.join("ledger.json.tmp")).unwrap();
        dir.write_atomically("ledger.json", b"saved").unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        assert!(
            !std::fs::symlink_metadata(state.join("ledger.json"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        // A link at the file's own name is not read through.
        std::fs::remove_file(state.join("ledger.json")).unwrap();
        symlink(&victim, state.join("ledger.json")).unwrap();
        assert!(dir.read("ledger.json", 1 << 20).is_err());
        drop(dir);
        // The directory itself as a link is refused.
        let elsewhere = t.0.join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        let linked = t.0.join("linked");
        symlink(&elsewhere, &linked).unwrap();
        assert!(StateDir::open(&linked).is_err());
    }

    #[test]
    fn a_second_daemon_on_the_same_state_dir_is_refused() {
        let t = Tmp::new("lock");
        let _first = StateDir::open(&t.0.join("s")).unwrap();
        let err = StateDir::open(&t.0.join("s")).err().unwrap().to_string();
        assert!(err.contains("another trustdrift"), "{err}");
    }

    /// A journal directory configured as the state directory under another spelling
    /// shares its lock rather than being refused as another daemon's.
    #[test]
    fn the_state_dir_recognises_itself_under_another_name() {
        let t = Tmp::new("itself");
        let state = t.0.join("s");
        let dir = StateDir::open(&state).unwrap();
        assert!(dir.is(&state));
        assert!(dir.is(&state.join(".")));
        let alias = t.0.join("alias");
        symlink(&state, &alias).unwrap();
        assert!(dir.is(&alias));
        std::fs::create_dir(t.0.join("other")).unwrap();
        assert!(!dir.is(&t.0.join("other")));
        assert!(!dir.is(&t.0.join("missing")));
    }
}
