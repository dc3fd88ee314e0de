//! Looking at a path in a root: where it leads, what file is there, and what it holds.
//! This is the catalog's I/O, and it runs on a `process::deadline` worker, never on the
//! engine's thread: everything here may block on a hostile filesystem.
//!
//! A file is read only when an `O_PATH` handle and `fstat` say it is a regular file; when
//! a look is made for a process's open, only when it is the inode that open got (see
//! [`Expect`]): a process must not be able to make the daemon read a file it did not.

use std::{
    collections::BTreeMap,
    io,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use crate::{
    budget::{Budget, Charge},
    process::rootfs::{self, Resolved, Root},
    stores::{
        catalog::contents::{Content, ContentCache, Shape, weight},
        digest::NodeKey,
        formats,
        identity::FileIdentity,
    },
};

/// What jobs share with the catalog: the content cache, the node's key, and the bounds
/// on memory every job draws from.
pub struct Shared {
    pub cache: Mutex<ContentCache>,
    pub key: NodeKey,
    /// Bytes of parsed content alive.
    pub budget: Budget,
    /// Bytes of files being read, across jobs (a job left behind on a file that trickles
    /// its bytes holds its buffer until it ends).
    pub reading: Budget,
}

/// Bounds of one look.
#[derive(Clone, Copy, Debug)]
pub struct LookLimits {
    pub max_file_bytes: u64,
    pub max_dir_entries: usize,
    pub max_certs: usize,
}

/// What a look counted, for the catalog's counters.
#[derive(Debug, Default)]
pub struct Tally {
    pub hashed: u64,
    pub parse_errors: u64,
    /// Reasons of files that could not be read.
    pub errors: Vec<&'static str>,
    /// Certificates past the per-file cap, not read.
    pub certs_dropped: u64,
    /// Contents not parsed: the budget for parsed content was spent.
    pub unparsed: u64,
}

/// The file a process's open got, which a look made for that open must find.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expect {
    pub dev: u64,
    pub ino: u64,
    /// The path of the opened file in the process's root, as the kernel knew it at the
    /// open: when the path looked at leads there now, the open was of that location (the
    /// file was replaced since), not of somewhere the process named but did not open.
    pub kernel_path: Option<PathBuf>,
}

/// What a look found.
#[derive(Debug)]
pub enum Looked {
    Seen(Seen),
    /// The path leads to another file than the one expected, somewhere the open did not
    /// go: nothing was read.
    Elsewhere {
        canonical: PathBuf,
    },
}

/// A file (or directory) as it is now.
#[derive(Debug)]
pub struct Seen {
    pub canonical: PathBuf,
    pub identity: FileIdentity,
    pub content: Arc<Content>,
    /// When its content (or a link on the way) last changed, ns since the epoch.
    pub changed_ns: i128,
}

fn is_dir(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::Directory
}

fn is_regular(st: &rustix::fs::Stat) -> bool {
    rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile
}

/// A short reason for an I/O error, as a metric label.
pub fn error_reason(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "not_found",
        Some(libc::EACCES) | Some(libc::EPERM) => "permission_denied",
        Some(libc::ELOOP) => "symlink_loop",
        Some(libc::EXDEV) => "escapes_root",
        Some(libc::EAGAIN) => "would_block",
        // The bytes being read across jobs are at their bound (see `rootfs::read_budgeted`).
        Some(libc::ENOBUFS) => "io_saturated",
        _ => "io_error",
    }
}

/// Resolves `path` in `root` and looks at what it leads to.
pub fn look(
    shared: &Shared,
    root: &Root,
    path: &Path,
    limits: LookLimits,
    expect: Option<&Expect>,
    tally: &mut Tally,
) -> io::Result<Looked> {
    let Resolved {
        path: canonical,
        newest_link_ctime_ns,
    } = root.resolve(path)?;
    let handle = root.open_path(&canonical, true)?;
    let st = rustix::fs::fstat(&handle)?;
    let identity = FileIdentity::of(&st);
    if let Some(expect) = expect {
        let there = identity.is(expect.dev, expect.ino);
        let same_place = expect.kernel_path.as_deref() == Some(canonical.as_path());
        if !there && !same_place {
            return Ok(Looked::Elsewhere { canonical });
        }
    }
    let mut changed_ns = identity.ctime_ns.max(newest_link_ctime_ns.unwrap_or(0));
    let content = if is_dir(&st) {
        let fd = root.open_verified(&canonical, &identity, true)?;
        let (content, newest_entry_ns) = directory(shared, root, &canonical, fd, limits, tally)?;
        changed_ns = changed_ns.max(newest_entry_ns);
        content
    } else {
        file_content(shared, root, &canonical, &identity, &st, limits, tally)?
    };
    Ok(Looked::Seen(Seen {
        canonical,
        identity,
        content,
        changed_ns,
    }))
}

/// What fd `fd` of process `pid` holds, if it is still the file (`dev`, `ino`) it opened.
pub fn adopt(
    shared: &Shared,
    pid: u32,
    fd: i32,
    dev: u64,
    ino: u64,
    limits: LookLimits,
    tally: &mut Tally,
) -> io::Result<(FileIdentity, Arc<Content>)> {
    let handle = rootfs::open_process_fd(pid, fd)?;
    let st = rustix::fs::fstat(&handle)?;
    let identity = FileIdentity::of(&st);
    // The fd may have been closed and reused for another file since the open.
    if !identity.is(dev, ino) {
        return Err(io::Error::other("the fd is open on another file now"));
    }
    if let Some(hit) = lock(&shared.cache).get(&identity) {
        return Ok((identity, hit));
    }
    let fd = rootfs::reopen_verified(&handle, &identity)?;
    let content = read_content(shared, fd, &identity, limits, tally)?;
    Ok((identity, content))
}

fn lock(cache: &Mutex<ContentCache>) -> std::sync::MutexGuard<'_, ContentCache> {
    // A job that panicked while holding the lock left the cache as it was between two
    // whole operations: still usable.
    cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Content of something that is not read (FIFO, device, socket): all such are alike.
fn not_regular(shared: &Shared, tally: &mut Tally) -> Arc<Content> {
    tally.errors.push("not_regular");
    Arc::new(Content {
        digest: shared.key.digest(b"\0not a regular file\0", false),
        size: 0,
        shape: Shape::Unreadable {
            reason: "not a regular file (FIFO, device or socket): not read".into(),
        },
        charge: Charge::none(),
    })
}

/// The content of the regular file at `canonical` (cached by identity), or why it cannot
/// be read.
fn file_content(
    shared: &Shared,
    root: &Root,
    canonical: &Path,
    identity: &FileIdentity,
    st: &rustix::fs::Stat,
    limits: LookLimits,
    tally: &mut Tally,
) -> io::Result<Arc<Content>> {
    if !is_regular(st) {
        return Ok(not_regular(shared, tally));
    }
    if let Some(hit) = lock(&shared.cache).get(identity) {
        return Ok(hit);
    }
    let fd = root.open_verified(canonical, identity, false)?;
    read_content(shared, fd, identity, limits, tally)
}

/// Reads, digests and parses an opened regular file, and caches what it holds.
fn read_content(
    shared: &Shared,
    fd: OwnedFd,
    identity: &FileIdentity,
    limits: LookLimits,
    tally: &mut Tally,
) -> io::Result<Arc<Content>> {
    let (bytes, over) = rootfs::read_budgeted(fd, limits.max_file_bytes, &shared.reading)?;
    tally.hashed += 1;
    let mut spent = false;
    let (shape, public) = if over {
        tally.errors.push("too_large");
        (
            Shape::Unreadable {
                reason: format!(
                    "larger than the {} byte cap: not parsed",
                    limits.max_file_bytes
                ),
            },
            false,
        )
    } else {
        let parsed = formats::parse_capped(&bytes, limits.max_certs);
        tally.parse_errors += parsed.errors.len() as u64;
        tally.certs_dropped += parsed.certs_dropped as u64;
        // Only certificates are fingerprinted in the open: a key, a password or anything
        // else that is not public trust material gets a keyed digest.
        let public = !parsed.secret && !parsed.certs.is_empty();
        let shape = Shape::File {
            kind: parsed.kind,
            certs: parsed.certs.into_iter().map(Arc::new).collect(),
            errors: parsed.errors,
        };
        if make_room(shared, &shape) {
            (shape, public)
        } else {
            // Known by its digest, not parsed; not cached, so a later look parses it
            // once the budget has room again.
            tally.unparsed += 1;
            spent = true;
            (
                Shape::Unreadable {
                    reason: "not parsed: the daemon's budget for parsed certificates is \
                             spent (catalog.max_content_bytes)"
                        .into(),
                },
                false,
            )
        }
    };
    let digest = shared.key.digest(&bytes, public);
    let mut cache = lock(&shared.cache);
    if let Some(same) = cache.with_digest(&digest) {
        cache.insert(identity, Arc::clone(&same));
        return Ok(same);
    }
    let charge = shared.budget.charge(weight(&shape));
    let content = Arc::new(Content {
        digest,
        size: bytes.len() as u64,
        shape,
        charge,
    });
    if !spent {
        cache.insert(identity, Arc::clone(&content));
    }
    Ok(content)
}

/// Whether what `shape` weighs fits the budget for parsed content, after dropping cached
/// contents nothing else holds if it must.
fn make_room(shared: &Shared, shape: &Shape) -> bool {
    let weight = weight(shape);
    if shared.budget.fits(weight) {
        return true;
    }
    lock(&shared.cache).shed(|| shared.budget.fits(weight));
    shared.budget.fits(weight)
}

/// A directory store: every entry resolved inside the root and read. Returns the content
/// and the newest ctime among the entries. Its digest is public only when every entry's
/// is.
fn directory(
    shared: &Shared,
    root: &Root,
    dir: &Path,
    fd: OwnedFd,
    limits: LookLimits,
    tally: &mut Tally,
) -> io::Result<(Arc<Content>, i128)> {
    let mut names = Vec::new();
    let mut errors = Vec::new();
    let mut listing = rustix::fs::Dir::read_from(&fd)?;
    while let Some(entry) = listing.read() {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == "." || name == ".." {
            continue;
        }
        if names.len() >= limits.max_dir_entries {
            errors.push(format!(
                "more than {} entries: the rest not read",
                limits.max_dir_entries
            ));
            tally.errors.push("dir_too_large");
            break;
        }
        names.push(name);
    }
    names.sort();
    let mut entries = BTreeMap::new();
    let mut newest = 0i128;
    let mut summary = Vec::new();
    let mut public = true;
    for name in names {
        let path = dir.join(&name);
        let found = root.resolve(&path).and_then(|r| {
            let handle = root.open_path(&r.path, true)?;
            let st = rustix::fs::fstat(&handle)?;
            Ok((r, st))
        });
        let (resolved, st) = match found {
            Ok(x) => x,
            Err(e) => {
                errors.push(format!("{name}: {}", error_reason(&e)));
                continue;
            }
        };
        if is_dir(&st) {
            continue;
        }
        let identity = FileIdentity::of(&st);
        newest = newest
            .max(identity.ctime_ns)
            .max(resolved.newest_link_ctime_ns.unwrap_or(0));
        let content =
            match file_content(shared, root, &resolved.path, &identity, &st, limits, tally) {
                Ok(c) => c,
                Err(e) => {
                    errors.push(format!("{name}: {}", error_reason(&e)));
                    continue;
                }
            };
        public &= content.digest.is_public();
        summary.extend_from_slice(name.as_bytes());
        summary.push(0);
        match content.digest.index() {
            Some((keyed, d)) => {
                summary.push(u8::from(keyed));
                summary.extend_from_slice(&d);
            }
            None => summary.extend_from_slice(&[2; 33]),
        }
        entries.insert(name, content);
    }
    let size = entries.len() as u64;
    let shape = Shape::Directory { entries, errors };
    let content = Content {
        digest: shared.key.digest(&summary, public),
        size,
        charge: shared.budget.charge(weight(&shape)),
        shape,
    };
    Ok((Arc::new(content), newest))
}
