//! Where the probe lives between daemon runs. Its maps and links are pinned in bpffs, so
//! when the daemon stops (a crash, an upgrade) the programs keep recording into the same
//! maps and ring buffer, and the next daemon reads what happened meanwhile.
//!
//! Pins live under `<pin_dir>/layout-<hash>/`: the hash covers every map's key and value
//! layout and capacity, so a daemon never reuses maps laid out by another version. A
//! directory of another layout is set aside (unpinned) with a warning. On start the new
//! daemon attaches its own programs first, then unpins the previous ones: reads in
//! between may be counted twice, never lost.

use std::{
    ffi::CString,
    fs, io,
    path::{Path, PathBuf},
};

use aya::programs::links::{FdLink, PinnedLink};

/// `BPF_FS_MAGIC`
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// What became of pinning this run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PinStatus {
    /// Not asked for (trace, benchmarks, `state.pin_dir = ""`).
    Disabled,
    /// Asked for but impossible here: the probe runs unpinned.
    Unavailable(String),
    /// Maps and links are pinned under `dir`; `reused` if a previous run's maps were found.
    Active { dir: PathBuf, reused: bool },
}

/// The directories of one layout.
pub struct Plan {
    pub dir: PathBuf,
    pub maps: PathBuf,
    links: PathBuf,
    generation: String,
    pub reused: bool,
}

fn is_bpffs(path: &Path) -> bool {
    rustix::fs::statfs(path).is_ok_and(|s| s.f_type == BPF_FS_MAGIC)
}

/// Mounts bpffs at /sys/fs/bpf when `dir` lives there and nothing is mounted yet.
fn ensure_bpffs(dir: &Path) -> Result<(), String> {
    let base = Path::new("/sys/fs/bpf");
    let mut probe = dir.to_path_buf();
    while !probe.exists() {
        if !probe.pop() {
            break;
        }
    }
    if is_bpffs(&probe) {
        return Ok(());
    }
    if !dir.starts_with(base) {
        return Err(format!("{} is not on a bpffs", dir.display()));
    }
    let source = CString::new("bpf").expect("no NUL");
    let target = CString::new("/sys/fs/bpf").expect("no NUL");
    let data = CString::new("mode=0700").expect("no NUL");
    // SAFETY: valid NUL-terminated strings.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            source.as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(format!(
            "no bpffs at /sys/fs/bpf and mounting one failed: {}",
            io::Error::last_os_error()
        ));
    }
    tracing::info!("mounted bpffs at /sys/fs/bpf");
    Ok(())
}

/// Removes every pin under `dir` (which detaches links nobody else holds) and `dir`. A
/// symlink is removed as a link, never followed: one planted in the pin directory must not
/// turn the clean-up onto anything else.
fn remove_tree(dir: &Path) -> io::Result<()> {
    if fs::symlink_metadata(dir)?.file_type().is_symlink() {
        return fs::remove_file(dir);
    }
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // The entry's own type (lstat), not its target's.
        if entry.file_type()?.is_dir() {
            remove_tree(&entry.path())?;
        } else {
            fs::remove_file(entry.path())?;
        }
    }
    fs::remove_dir(dir)
}

/// Prepares `<pin_dir>/<layout>`, setting aside other layouts.
pub fn prepare(pin_dir: &Path, layout: &str) -> Result<Plan, String> {
    ensure_bpffs(pin_dir)?;
    fs::create_dir_all(pin_dir).map_err(|e| format!("creating {}: {e}", pin_dir.display()))?;
    // Only root reaches the probe's maps: the pins are the maps (the node's key among them).
    let _ = fs::set_permissions(pin_dir, std::os::unix::fs::PermissionsExt::from_mode(0o700));
    if !is_bpffs(pin_dir) {
        return Err(format!("{} is not on a bpffs", pin_dir.display()));
    }
    for entry in fs::read_dir(pin_dir)
        .map_err(|e| format!("reading {}: {e}", pin_dir.display()))?
        .flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != layout && name.starts_with("layout-") {
            tracing::warn!(
                "setting aside pinned probe state of another layout ({name}): its maps are \
                 not compatible with this version"
            );
            if let Err(e) = remove_tree(&entry.path()) {
                tracing::warn!("could not remove {}: {e}", entry.path().display());
            }
        }
    }
    let dir = pin_dir.join(layout);
    let maps = dir.join("maps");
    let links = dir.join("links");
    for d in [&maps, &links] {
        fs::create_dir_all(d).map_err(|e| format!("creating {}: {e}", d.display()))?;
    }
    let reused = fs::read_dir(&maps).is_ok_and(|mut r| r.next().is_some());
    let generation = format!(
        "{}-{}",
        std::process::id(),
        crate::process::procfs::start_ticks(std::process::id()).unwrap_or(0)
    );
    Ok(Plan {
        dir,
        maps,
        links,
        generation,
        reused,
    })
}

impl Plan {
    /// Pins a link of this run.
    pub fn pin_link(&self, name: &str, link: FdLink) -> Result<PinnedLink, String> {
        // bpffs reserves dots in names: the generation is joined with a dash.
        let path = self.links.join(format!("{name}--{}", self.generation));
        link.pin(&path)
            .map_err(|e| format!("pinning link {}: {e}", path.display()))
    }

    /// Unpins the links of earlier runs, detaching their programs (ours are attached).
    pub fn retire_previous_links(&self) -> usize {
        let mut retired = 0;
        let Ok(entries) = fs::read_dir(&self.links) else {
            return 0;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(&format!("--{}", self.generation)) {
                continue;
            }
            match PinnedLink::from_pin(entry.path()) {
                Ok(link) => {
                    // Unpinning returns the last reference, which detaches when dropped.
                    if link.unpin().is_ok() {
                        retired += 1;
                    }
                }
                Err(_) => {
                    let _ = fs::remove_file(entry.path());
                }
            }
        }
        retired
    }

    /// Removes everything this layout pinned (the daemon was asked to leave no probe
    /// behind).
    pub fn remove(&self) -> io::Result<()> {
        remove_tree(&self.dir)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    #[test]
    fn clean_up_removes_links_and_never_follows_them() {
        let scratch = tempfile::Builder::new()
            .prefix("trustdrift-pin-")
            .tempdir()
            .unwrap();
        let base = scratch.path();
        let tree = base.join("layout-old");
        let outside = base.join("outside");
        fs::create_dir_all(tree.join("maps")).unwrap();
        fs::create_dir_all(&outside).unwrap();
        fs::write(outside.join("precious"), "keep").unwrap();
        fs::write(tree.join("maps/EVENTS"), "").unwrap();
        // Links to a directory and to a file, planted in the tree.
        symlink(&outside, tree.join("maps/evil-dir")).unwrap();
        symlink(outside.join("precious"), tree.join("evil-file")).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert_eq!(
            fs::read_to_string(outside.join("precious")).unwrap(),
            "keep"
        );
        // The tree itself as a link: the link goes, the target stays.
        let linked = base.join("layout-linked");
        symlink(&outside, &linked).unwrap();
        remove_tree(&linked).unwrap();
        assert!(outside.join("precious").exists());
    }
}
