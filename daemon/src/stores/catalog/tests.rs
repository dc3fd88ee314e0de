//! The catalog against real files in the host's root.

use std::{fs, os::unix::fs::symlink, path::Path, sync::Arc, time::Duration};

use super::*;
use crate::process::deadline::Limits as DeadlineLimits;

pub(crate) struct NoWatch;
impl DirWatcher for NoWatch {
    fn watch(&mut self, _: &mut Deadline, _: &Arc<Root>, _: RootKey, _: &Path) -> bool {
        true
    }
}

pub(crate) fn catalog(limits: Limits) -> Catalog {
    Catalog::new(limits, NodeKey::random().unwrap())
}

pub(crate) fn io() -> Deadline {
    Deadline::new(DeadlineLimits::default())
}

struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Self {
        let d =
            std::env::temp_dir().join(format!("trustdrift-catalog-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Self(d)
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn host_file(c: &mut Catalog, path: &Path) -> FileKey {
    FileKey {
        root: c.host_root().unwrap(),
        path: path.to_path_buf(),
    }
}

#[test]
fn a_new_version_only_when_the_content_changes() {
    let d = Dir::new("versions");
    let f = d.0.join("bundle.pem");
    fs::write(&f, "one").unwrap();
    let mut c = catalog(Limits::default());
    let key = host_file(&mut c, &f);
    let v1 = c.observe(&key, None, &mut NoWatch, &mut io()).unwrap();
    // Identical rewrite and touch: same content, same version.
    fs::write(&f, "one").unwrap();
    assert!(!c.refresh(&key, &mut NoWatch, &mut io()));
    let v1b = c.latest(&key).unwrap();
    assert_eq!(v1b.id, v1.id);
    // New content: a new version, seen after the first.
    std::thread::sleep(Duration::from_millis(5));
    fs::write(&f, "two").unwrap();
    assert!(c.refresh(&key, &mut NoWatch, &mut io()));
    let v2 = c.latest(&key).unwrap();
    assert!(v2.id > v1.id && v2.seen_at >= v1.seen_at);
    assert_ne!(
        v2.content.as_ref().unwrap().digest,
        v1.content.as_ref().unwrap().digest
    );
    // Back to the old content: still a new version (the history is a timeline).
    fs::write(&f, "one").unwrap();
    assert!(c.refresh(&key, &mut NoWatch, &mut io()));
    assert_eq!(c.history(&key).len(), 3);
    // Removal is a version too.
    fs::remove_file(&f).unwrap();
    assert!(c.refresh(&key, &mut NoWatch, &mut io()));
    assert!(c.latest(&key).unwrap().content.is_none());
    assert_eq!(
        c.last_error(&key).as_deref().map(|e| &e[..9]),
        Some("not_found")
    );
}

#[test]
fn version_at_answers_what_was_current_then() {
    let d = Dir::new("timeline");
    let f = d.0.join("ca.pem");
    fs::write(&f, "a").unwrap();
    let mut c = catalog(Limits::default());
    let key = host_file(&mut c, &f);
    let v1 = c.observe(&key, None, &mut NoWatch, &mut io()).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let between = SystemTime::now();
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&f, "b").unwrap();
    c.refresh(&key, &mut NoWatch, &mut io());
    let v2 = c.latest(&key).unwrap();
    assert_eq!(c.version_at(&key, between).unwrap().id, v1.id);
    assert_eq!(c.version_at(&key, SystemTime::now()).unwrap().id, v2.id);
}

#[test]
fn the_same_file_is_hashed_once_whatever_path_leads_to_it() {
    let d = Dir::new("dedup");
    let f = d.0.join("real.crt");
    fs::write(&f, "shared").unwrap();
    symlink(&f, d.0.join("alias.pem")).unwrap();
    let mut c = catalog(Limits::default());
    let a = host_file(&mut c, &f);
    let b = host_file(&mut c, &d.0.join("alias.pem"));
    let _ = c.observe(&a, None, &mut NoWatch, &mut io());
    let _ = c.observe(&b, None, &mut NoWatch, &mut io());
    assert_eq!(c.counters.contents_hashed, 1);
    assert_eq!(c.counters.content_cache_hits, 1);
    let vb = c.latest(&b).unwrap();
    assert_eq!(vb.canonical.as_deref(), Some(f.as_path()));
}

#[test]
fn fifos_and_oversized_files_are_reported_not_read() {
    let d = Dir::new("hostile");
    let fifo = d.0.join("pipe.pem");
    let cpath = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(cpath.as_ptr(), 0o600) }, 0);
    let big = d.0.join("big.pem");
    fs::write(&big, vec![b'A'; 4096]).unwrap();
    let mut c = catalog(Limits {
        max_file_bytes: 1024,
        ..Limits::default()
    });
    let k = host_file(&mut c, &fifo);
    let v = c.observe(&k, None, &mut NoWatch, &mut io()).unwrap();
    assert!(matches!(
        v.content.as_deref().unwrap().shape,
        Shape::Unreadable { .. }
    ));
    let k = host_file(&mut c, &big);
    let v = c.observe(&k, None, &mut NoWatch, &mut io()).unwrap();
    let content = v.content.as_deref().unwrap();
    assert_eq!(content.size, 1024);
    assert!(content.errors()[0].contains("cap"));
    assert_eq!(c.counters.read_errors.get("too_large"), Some(&1));
    assert_eq!(c.counters.read_errors.get("not_regular"), Some(&1));
}

#[test]
fn a_directory_store_is_versioned_by_its_entries() {
    let d = Dir::new("dirstore");
    let store = d.0.join("certs");
    fs::create_dir_all(&store).unwrap();
    fs::write(store.join("a.pem"), "a").unwrap();
    let mut c = catalog(Limits::default());
    let key = host_file(&mut c, &store);
    let v1 = c.observe(&key, None, &mut NoWatch, &mut io()).unwrap();
    let Shape::Directory { entries, .. } = &v1.content.as_ref().unwrap().shape else {
        panic!("not a directory");
    };
    assert_eq!(entries.len(), 1);
    fs::write(store.join("b.pem"), "b").unwrap();
    assert!(c.refresh(&key, &mut NoWatch, &mut io()));
    fs::remove_file(store.join("a.pem")).unwrap();
    assert!(c.refresh(&key, &mut NoWatch, &mut io()));
    let v3 = c.latest(&key).unwrap();
    let Shape::Directory { entries, .. } = &v3.content.as_ref().unwrap().shape else {
        panic!("not a directory");
    };
    assert_eq!(entries.keys().collect::<Vec<_>>(), vec!["b.pem"]);
}

fn fixture(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/store_format")
            .join(name),
    )
    .unwrap()
}

fn inode(p: &Path) -> (u64, u64) {
    let m = fs::metadata(p).unwrap();
    (
        std::os::unix::fs::MetadataExt::dev(&m),
        std::os::unix::fs::MetadataExt::ino(&m),
    )
}

/// The rotation-storm race: a reader opened v2 before the daemon looked, v3 was renamed
/// over it, and only then does the daemon read v2 through the reader's fd. Unlinking v2
/// moved its ctime past v3's; the history must still end with v3, or v2's readers would
/// be judged against v2 and look fresh.
#[test]
fn a_version_adopted_through_a_readers_fd_never_becomes_the_latest() {
    use std::os::{fd::AsRawFd, unix::fs::PermissionsExt};
    let d = Dir::new("adopt");
    let f = d.0.join("bundle.pem");
    let replace = |content: &str| {
        let tmp = d.0.join(".tmp");
        fs::write(&tmp, content).unwrap();
        fs::rename(&tmp, &f).unwrap();
    };
    replace("v1");
    let mut c = catalog(Limits::default());
    let key = host_file(&mut c, &f);
    let v1 = c.observe(&key, None, &mut NoWatch, &mut io()).unwrap();
    replace("v2");
    let held = fs::File::open(&f).unwrap();
    let opened = SystemTime::now();
    let v2_inode = inode(&f);
    std::thread::sleep(Duration::from_millis(20));
    replace("v3");
    assert!(c.refresh(&key, &mut NoWatch, &mut io()));
    let v3 = c.latest(&key).unwrap();
    // Anything that moves the replaced inode's ctime later (its unlink, a chmod).
    std::thread::sleep(Duration::from_millis(20));
    held.set_permissions(fs::Permissions::from_mode(0o640))
        .unwrap();

    let adopted = c
        .adopt_open_file(
            &key,
            std::process::id(),
            held.as_raw_fd(),
            v2_inode,
            opened,
            &mut io(),
        )
        .expect("read through the held fd");
    assert_eq!(
        c.latest(&key).unwrap().id,
        v3.id,
        "v3 is still what is on disk"
    );
    let ids: Vec<u64> = c.history(&key).iter().map(|v| v.id).collect();
    assert_eq!(ids, vec![v1.id, adopted.id, v3.id]);
    assert!(adopted.seen_at <= opened && adopted.seen_at >= v1.seen_at);
    assert_eq!(
        c.version_of_inode(&key, v2_inode.0, v2_inode.1, opened)
            .map(|v| v.id),
        Some(adopted.id)
    );
}

#[test]
fn a_path_that_leads_elsewhere_than_the_open_is_never_read_nor_tracked() {
    let d = Dir::new("elsewhere");
    let opened = d.0.join("opened.pem");
    let named = d.0.join("named.pem");
    fs::write(&opened, fixture("ca.pem")).unwrap();
    fs::write(&named, "a secret the process could not open").unwrap();
    let mut c = catalog(Limits::default());
    let (dev, ino) = inode(&opened);
    let key = host_file(&mut c, &named);
    let expect = Expect {
        dev,
        ino,
        kernel_path: Some(opened.clone()),
    };
    let got = c.observe(&key, Some(&expect), &mut NoWatch, &mut io());
    assert!(matches!(got, Err(Unobserved::Elsewhere { .. })), "{got:?}");
    assert_eq!(c.counters.contents_hashed, 0, "nothing was read");
    assert!(c.latest(&key).is_none(), "nor tracked");
    // The file the open got is read, by the path that leads to it.
    let key = host_file(&mut c, &opened);
    assert!(
        c.observe(&key, Some(&expect), &mut NoWatch, &mut io())
            .is_ok()
    );
    assert_eq!(c.counters.contents_hashed, 1);
}

#[test]
fn a_file_replaced_where_the_open_found_it_is_still_read() {
    // The legitimate race: the open got an inode that was replaced at the same path
    // before the daemon looked. The kernel's path of the opened file is where the path
    // leads now, so the process could open what is there: it is read (and the process is
    // then judged to hold a version nobody saw).
    let d = Dir::new("replaced");
    let bundle = d.0.join("bundle.pem");
    fs::write(&bundle, "old").unwrap();
    let (dev, ino) = inode(&bundle);
    let tmp = d.0.join("bundle.pem.new");
    fs::write(&tmp, fixture("ca.pem")).unwrap();
    fs::rename(&tmp, &bundle).unwrap();
    let mut c = catalog(Limits::default());
    let key = host_file(&mut c, &bundle);
    let expect = Expect {
        dev,
        ino,
        kernel_path: Some(bundle.clone()),
    };
    let v = c
        .observe(&key, Some(&expect), &mut NoWatch, &mut io())
        .unwrap();
    assert_ne!(v.identity.unwrap().ino, ino);
    // Without the kernel's word it is not.
    let mut c = catalog(Limits::default());
    let key = host_file(&mut c, &bundle);
    let blind = Expect {
        kernel_path: None,
        ..expect
    };
    assert!(
        c.observe(&key, Some(&blind), &mut NoWatch, &mut io())
            .is_err()
    );
}

#[test]
fn only_certificates_are_fingerprinted_in_the_open() {
    let d = Dir::new("digests");
    let ca = d.0.join("ca.pem");
    let key_file = d.0.join("tls.key");
    let password = d.0.join("db_password");
    let pair = d.0.join("pair.pem");
    fs::write(&ca, fixture("ca.pem")).unwrap();
    fs::write(&key_file, fixture("test-only-throwaway.key")).unwrap();
    fs::write(&password, "hunter2\n").unwrap();
    fs::write(
        &pair,
        format!(
            "{}{}",
            fixture("leaf.pem"),
            fixture("test-only-throwaway.key")
        ),
    )
    .unwrap();
    let store = d.0.join("store");
    fs::create_dir(&store).unwrap();
    fs::write(store.join("ca.pem"), fixture("ca.pem")).unwrap();
    let mixed = d.0.join("mixed");
    fs::create_dir(&mixed).unwrap();
    fs::write(mixed.join("ca.pem"), fixture("ca.pem")).unwrap();
    fs::write(mixed.join("tls.key"), fixture("test-only-throwaway.key")).unwrap();
    let mut c = catalog(Limits::default());
    let mut sha = |p: &Path| {
        let k = host_file(&mut c, p);
        let v = c.observe(&k, None, &mut NoWatch, &mut io()).unwrap();
        v.content.as_ref().unwrap().sha256_hex()
    };
    assert!(sha(&ca).is_some(), "a CA bundle is public");
    assert!(
        sha(&store).is_some(),
        "a directory of certificates is public"
    );
    for secret in [&key_file, &password, &pair, &mixed] {
        assert_eq!(sha(secret), None, "{}", secret.display());
    }
    // Two reads of the same secret still compare equal (a keyed digest), so an identical
    // rewrite is no change.
    let k = host_file(&mut c, &password);
    fs::write(&password, "hunter2\n").unwrap();
    assert!(!c.refresh(&k, &mut NoWatch, &mut io()));
    fs::write(&password, "hunter3\n").unwrap();
    assert!(c.refresh(&k, &mut NoWatch, &mut io()));
}
