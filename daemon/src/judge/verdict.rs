//! Verdicts: does what a process read still match what is on disk now, in its root?
//!
//! Per (process, file): fresh, stale (the content changed after the process last read
//! it; a touch or an identical rewrite is not a change), or expired in memory (a
//! certificate it read has passed notAfter while its renewal sits on disk: see
//! [`super::renewal`]; an expired certificate merely removed is stale at most). Rolled up
//! per process, worst first. Processes that were running before the daemon started and
//! use TLS, with no record of what they read, are `unverified`: listed apart, never
//! counted as stale.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::Arc,
    time::SystemTime,
};

use serde::Serialize;

use crate::{
    judge::renewal::{self, Match},
    ledger::{Origin, ProcessEntry, TrustRead},
    stores::catalog::{Catalog, Content, Shape, Version},
    stores::formats::{CertInfo, ContentKind},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Fresh,
    Unverified,
    Stale,
    ExpiredInMemory,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Fresh => "fresh",
            Verdict::Unverified => "unverified",
            Verdict::Stale => "stale",
            Verdict::ExpiredInMemory => "expired_in_memory",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Verdict::Fresh,
            Verdict::Unverified,
            Verdict::Stale,
            Verdict::ExpiredInMemory,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }
}

/// Whether a file is trust anchors (CAs: whom the process trusts) or identity (the
/// certificate and key it presents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TrustKind {
    Ca,
    Identity,
}

#[derive(Clone, Debug)]
pub struct FileVerdict {
    pub verdict: Verdict,
    pub kind: TrustKind,
    /// When the first version differing from what the process read appeared.
    pub stale_since: Option<SystemTime>,
    pub current: Option<Arc<Version>>,
    /// CAs on disk now that the process lacks.
    pub missing_cas: Vec<Arc<CertInfo>>,
    /// CAs the process still trusts that were removed from disk: a security risk.
    pub removed_cas_trusted: Vec<Arc<CertInfo>>,
    /// CAs removed from disk that it still holds but that have expired (a distribution
    /// dropping roots past their end): no exposure, since nothing verifies against them.
    pub removed_cas_expired: Vec<Arc<CertInfo>>,
    /// Certificates the process holds that are gone from disk while their renewal is
    /// there, expired or not (earliest expiry first): what a reload fixes before (or
    /// after) it is an outage.
    pub expiring: Vec<Expiring>,
    /// Those of `expiring` already past their notAfter.
    pub expired_in_memory: Vec<Arc<CertInfo>>,
    /// Why no better answer was possible, when that is the case.
    pub note: Option<String>,
}

/// A certificate the process holds in memory, no longer on disk, whose renewal is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiring {
    pub held: Arc<CertInfo>,
    pub renewal: Arc<CertInfo>,
    pub matched: Match,
    /// When a renewal of it first appeared on disk after the process read it.
    pub renewed_at: SystemTime,
}

#[derive(Clone, Debug)]
pub struct ProcessVerdict {
    pub verdict: Verdict,
    pub stale_since: Option<SystemTime>,
    /// Per read, in the ledger's order.
    pub files: Vec<FileVerdict>,
}

/// A file whose first certificate is a leaf is an identity (a server's certificate and
/// its chain); keys are identities; bundles, keystores and directories of CAs are trust
/// anchors.
fn kind_of(content: Option<&Content>, path: &Path) -> TrustKind {
    match content.map(|c| &c.shape) {
        Some(Shape::File {
            kind: ContentKind::PrivateKey,
            ..
        }) => TrustKind::Identity,
        Some(Shape::File { certs, .. }) if !certs.is_empty() => {
            if certs[0].is_ca {
                TrustKind::Ca
            } else {
                TrustKind::Identity
            }
        }
        Some(Shape::Directory { .. }) => TrustKind::Ca,
        _ if path.extension().is_some_and(|e| e == "key") => TrustKind::Identity,
        _ => TrustKind::Ca,
    }
}

fn cas(certs: &BTreeMap<String, Arc<CertInfo>>) -> BTreeMap<&String, &Arc<CertInfo>> {
    certs.iter().filter(|(_, c)| c.is_ca).collect()
}

/// When the first version after the one read (with different content) appeared. The
/// history is in time order; a read version no longer in it is placed by its time.
fn first_change_after(history: &[Arc<Version>], read: &Version) -> Option<SystemTime> {
    after(history, read)
        .iter()
        .find(|v| !v.same_content(read))
        .map(|v| v.seen_at)
}

fn unix_secs(t: SystemTime) -> i64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn fresh(kind: TrustKind, current: Option<Arc<Version>>, note: Option<String>) -> FileVerdict {
    FileVerdict {
        verdict: Verdict::Fresh,
        kind,
        stale_since: None,
        current,
        missing_cas: vec![],
        removed_cas_trusted: vec![],
        removed_cas_expired: vec![],
        expiring: vec![],
        expired_in_memory: vec![],
        note,
    }
}

/// The versions after `read` in `history` (time order); a read version no longer in it is
/// placed by its time.
fn after<'h>(history: &'h [Arc<Version>], read: &Version) -> &'h [Arc<Version>] {
    let start = history
        .iter()
        .position(|v| v.id == read.id)
        .map(|i| i + 1)
        .unwrap_or_else(|| history.partition_point(|v| v.seen_at <= read.seen_at));
    &history[start..]
}

/// The held certificates renewed on disk, each with when a renewal of it first appeared
/// after the read (the current version's time if the history kept none older).
fn expiring(
    read_certs: &BTreeMap<String, Arc<CertInfo>>,
    current_certs: &BTreeMap<String, Arc<CertInfo>>,
    later: &[Arc<Version>],
    current: Option<&Arc<Version>>,
) -> Vec<Expiring> {
    let found = renewal::renewed(read_certs, current_certs);
    if found.is_empty() {
        return vec![];
    }
    let mut first_seen: Vec<Option<SystemTime>> = vec![None; found.len()];
    for version in later {
        let Some(content) = version.content.as_deref() else {
            continue;
        };
        let certs = content.certificates();
        for (r, seen) in found.iter().zip(first_seen.iter_mut()) {
            if seen.is_none()
                && certs.iter().any(|(fp, c)| {
                    !read_certs.contains_key(fp) && renewal::renews(c, &r.held).is_some()
                })
            {
                *seen = Some(version.seen_at);
            }
        }
        if first_seen.iter().all(Option::is_some) {
            break;
        }
    }
    let fallback = current.map_or(SystemTime::UNIX_EPOCH, |v| v.seen_at);
    let mut out: Vec<Expiring> = found
        .into_iter()
        .zip(first_seen)
        .map(|(r, seen)| Expiring {
            held: r.held,
            renewal: r.renewal,
            matched: r.matched,
            renewed_at: seen.unwrap_or(fallback),
        })
        .collect();
    out.sort_by(|a, b| (a.held.not_after, &a.held.sha256).cmp(&(b.held.not_after, &b.held.sha256)));
    out
}

/// The verdict on one read.
pub fn judge_read(
    read: &TrustRead,
    others: &[TrustRead],
    catalog: &Catalog,
    now: SystemTime,
) -> FileVerdict {
    if let Some(why) = &read.unverifiable {
        // What it read is unknown; what the path names now is not it.
        return FileVerdict {
            verdict: Verdict::Unverified,
            ..fresh(TrustKind::Ca, None, Some(why.clone()))
        };
    }
    let Some(file) = &read.file else {
        return fresh(
            TrustKind::Ca,
            None,
            Some(format!(
                "not judged: the path could not be resolved in the process's root ({})",
                read.resolve_error.as_deref().unwrap_or("unknown reason")
            )),
        );
    };
    let current = catalog.latest(file);
    let Some(read_version) = &read.version else {
        let kind = kind_of(
            current.as_ref().and_then(|v| v.content.as_deref()),
            &read.path,
        );
        return fresh(
            kind,
            current,
            Some("not judged: the file could not be read when the process read it".into()),
        );
    };
    if read_version.unseen {
        // It holds a version that was replaced before the daemon could read it: stale
        // for sure (the inode is not what the path names now), but no diff to give.
        let kind = kind_of(
            current.as_ref().and_then(|v| v.content.as_deref()),
            &read.path,
        );
        let history = catalog.history(file);
        return FileVerdict {
            verdict: Verdict::Stale,
            kind,
            stale_since: first_change_after(&history, read_version)
                .or_else(|| current.as_ref().map(|v| v.seen_at)),
            current,
            missing_cas: vec![],
            removed_cas_trusted: vec![],
            removed_cas_expired: vec![],
            expiring: vec![],
            expired_in_memory: vec![],
            note: Some(
                "read a version that was replaced before trustdrift could read it: what it \
                 trusts is unknown, only that it is not what is on disk"
                    .into(),
            ),
        };
    }
    let read_content = read_version.content.as_deref();
    let kind = kind_of(read_content, &read.path);
    let current_content = current.as_ref().and_then(|v| v.content.as_deref());
    let material = |c: Option<&Content>| c.is_some_and(Content::is_trust_material);
    if !material(read_content) && !material(current_content) {
        // A `.pem` of DH parameters, a README in a certs folder: whatever becomes of it,
        // no trust changes.
        return fresh(
            kind,
            current,
            Some("holds no certificate or key: not trust material".into()),
        );
    }
    let gone = current_content.is_none().then(|| {
        format!(
            "no longer on disk ({})",
            catalog
                .last_error(file)
                .unwrap_or_else(|| "unknown reason".into())
        )
    });
    let unchanged = current
        .as_ref()
        .is_some_and(|c| c.id == read_version.id || c.same_content(read_version));
    if unchanged {
        return fresh(kind, current, None);
    }
    let history = catalog.history(file);
    let stale_since = first_change_after(&history, read_version).or_else(|| {
        // Older than the history kept: the change is at least as old as the oldest kept.
        history.first().map(|v| v.seen_at)
    });

    let (read_certs, current_certs) = if read.listed {
        directory_sets(read, others, read_content, current_content)
    } else {
        (
            read_content.map(Content::certificates).unwrap_or_default(),
            current_content
                .map(Content::certificates)
                .unwrap_or_default(),
        )
    };
    let (read_cas, current_cas) = (cas(&read_certs), cas(&current_certs));
    let missing_cas: Vec<Arc<CertInfo>> = current_cas
        .iter()
        .filter(|(fp, _)| !read_cas.contains_key(*fp))
        .map(|(_, c)| Arc::clone(c))
        .collect();
    let now_secs = unix_secs(now);
    let (removed_cas_expired, removed_cas_trusted): (Vec<Arc<CertInfo>>, Vec<Arc<CertInfo>>) =
        read_cas
            .iter()
            .filter(|(fp, _)| !current_cas.contains_key(*fp))
            .map(|(_, c)| Arc::clone(c))
            .partition(|c| c.not_after < now_secs);
    let expiring = expiring(
        &read_certs,
        &current_certs,
        after(&history, read_version),
        current.as_ref(),
    );
    let expired_in_memory: Vec<Arc<CertInfo>> = expiring
        .iter()
        .filter(|e| e.held.not_after < now_secs)
        .map(|e| Arc::clone(&e.held))
        .collect();

    if read.listed
        && missing_cas.is_empty()
        && removed_cas_trusted.is_empty()
        && removed_cas_expired.is_empty()
    {
        // Entries came or went that hold no CA (a README, a CRL): no change in trust.
        return fresh(kind, current, None);
    }
    let verdict = if expired_in_memory.is_empty() {
        Verdict::Stale
    } else {
        Verdict::ExpiredInMemory
    };
    FileVerdict {
        verdict,
        kind,
        stale_since,
        current,
        missing_cas,
        removed_cas_trusted,
        removed_cas_expired,
        expiring,
        expired_in_memory,
        note: gone,
    }
}

/// A listed directory store: the process trusts the certificates of the files it read
/// in it (all of the listing if the reads were not seen); disk has the current listing.
fn directory_sets(
    read: &TrustRead,
    others: &[TrustRead],
    read_content: Option<&Content>,
    current_content: Option<&Content>,
) -> (
    BTreeMap<String, Arc<CertInfo>>,
    BTreeMap<String, Arc<CertInfo>>,
) {
    let listing = read_content.map(Content::certificates).unwrap_or_default();
    let dir = read.file.as_ref().map(|f| f.path.as_path());
    let mut read_in_dir = BTreeMap::new();
    for other in others {
        let (Some(f), Some(v)) = (&other.file, &other.version) else {
            continue;
        };
        if f.path.parent() == dir {
            if let Some(content) = v.content.as_deref() {
                read_in_dir.extend(content.certificates());
            }
        }
    }
    let trusted = if read_in_dir.is_empty() {
        listing
    } else {
        read_in_dir
    };
    (
        trusted,
        current_content
            .map(Content::certificates)
            .unwrap_or_default(),
    )
}

/// The verdict on a process; `None` when there is nothing to say (a TLS-capable process
/// that started after the last change of its root's stores).
pub fn judge(
    process: &ProcessEntry,
    catalog: &Catalog,
    stores_changed_at: Option<SystemTime>,
    now: SystemTime,
) -> Option<ProcessVerdict> {
    if process.origin == Origin::TlsCapable && process.reads.is_empty() {
        let started = process.info.start_time?;
        let changed = stores_changed_at?;
        if started >= changed {
            return None;
        }
        return Some(ProcessVerdict {
            verdict: Verdict::Unverified,
            stale_since: None,
            files: vec![],
        });
    }
    if process.reads.is_empty() {
        return None;
    }
    // Directory listings are judged as a set; the files read inside a listed directory
    // are then covered by it.
    let listed_dirs: BTreeSet<&Path> = process
        .reads
        .iter()
        .filter(|r| r.listed)
        .filter_map(|r| r.file.as_ref().map(|f| f.path.as_path()))
        .collect();
    let files: Vec<FileVerdict> = process
        .reads
        .iter()
        .map(|r| {
            let inside_listed = r
                .file
                .as_ref()
                .and_then(|f| f.path.parent())
                .is_some_and(|p| listed_dirs.contains(p));
            if inside_listed && !r.listed {
                let mut v = judge_read(r, &process.reads, catalog, now);
                if v.verdict == Verdict::Stale && v.expired_in_memory.is_empty() {
                    // A file changed inside a listed directory: the directory's verdict says
                    // which CAs differ; counting the file again would double it.
                    v.verdict = Verdict::Fresh;
                    v.expiring.clear();
                    v.note = Some("covered by the listed directory's verdict".into());
                }
                v
            } else {
                judge_read(r, &process.reads, catalog, now)
            }
        })
        .collect();
    let verdict = files
        .iter()
        .map(|f| f.verdict)
        .max()
        .unwrap_or(Verdict::Fresh);
    let stale_since = files.iter().filter_map(|f| f.stale_since).min();
    Some(ProcessVerdict {
        verdict,
        stale_since: if verdict >= Verdict::Stale {
            stale_since
        } else {
            None
        },
        files,
    })
}

#[cfg(test)]
mod tests {
    use std::{
        fs,
        path::{Path, PathBuf},
        time::Duration,
    };

    use super::*;
    use crate::{
        ledger::{LedgerLimits, ProcKey, ProcessInfo},
        stores::catalog::{FileKey, Limits},
    };

    use crate::stores::catalog::tests::{NoWatch, catalog as new_catalog, io};

    fn fixture(name: &str) -> String {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/store_format");
        fs::read_to_string(dir.join(name)).unwrap()
    }

    struct Setup {
        dir: PathBuf,
        catalog: Catalog,
    }

    impl Setup {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("trustdrift-verdict-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).unwrap();
            Self {
                dir,
                catalog: new_catalog(Limits::default()),
            }
        }

        fn key(&mut self, name: &str) -> FileKey {
            FileKey {
                root: self.catalog.host_root().unwrap(),
                path: self.dir.join(name),
            }
        }

        /// A process that reads `name` now.
        fn read(&mut self, name: &str) -> TrustRead {
            let file = self.key(name);
            let version = self
                .catalog
                .observe(&file, None, &mut NoWatch, &mut io())
                .ok();
            let now = SystemTime::now();
            TrustRead {
                access_key: None,
                path: file.path.clone(),
                file: Some(file),
                resolved: None,
                resolve_error: None,
                first_open: now,
                last_open: now,
                last_read: Some(now),
                bytes: 1,
                opens: 1,
                reads: 1,
                version,
                version_read_at: now,
                listed: false,
                unverifiable: None,
            }
        }

        fn change(&mut self, name: &str, content: &str) {
            std::thread::sleep(Duration::from_millis(5));
            fs::write(self.dir.join(name), content).unwrap();
            let key = self.key(name);
            self.catalog.refresh(&key, &mut NoWatch, &mut io());
        }
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }

    fn subjects(list: &[Arc<CertInfo>]) -> Vec<&str> {
        list.iter().map(|c| c.subject.as_str()).collect()
    }

    #[test]
    fn an_added_ca_is_missing_from_what_the_process_read() {
        let mut s = Setup::new("added");
        fs::write(s.dir.join("bundle.pem"), fixture("ca.pem")).unwrap();
        let read = s.read("bundle.pem");
        assert_eq!(
            judge_read(&read, &[], &s.catalog, SystemTime::now()).verdict,
            Verdict::Fresh
        );
        let both = fixture("ca.pem") + &fixture("v1-root.pem");
        s.change("bundle.pem", &both);
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Stale);
        assert_eq!(v.kind, TrustKind::Ca);
        assert!(v.stale_since.is_some());
        assert_eq!(
            subjects(&v.missing_cas),
            vec!["O=trustdrift, CN=trustdrift test v1 root"]
        );
        assert!(v.removed_cas_trusted.is_empty());
    }

    #[test]
    fn a_removed_ca_is_still_trusted_by_the_process() {
        let mut s = Setup::new("removed");
        fs::write(
            s.dir.join("bundle.pem"),
            fixture("ca.pem") + &fixture("v1-root.pem"),
        )
        .unwrap();
        let read = s.read("bundle.pem");
        s.change("bundle.pem", &fixture("ca.pem"));
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Stale);
        assert_eq!(
            subjects(&v.removed_cas_trusted),
            vec!["O=trustdrift, CN=trustdrift test v1 root"]
        );
    }

    #[test]
    fn going_back_to_what_was_read_is_fresh_and_stale_since_is_the_first_change() {
        let mut s = Setup::new("revert");
        fs::write(s.dir.join("b.pem"), fixture("ca.pem")).unwrap();
        let read = s.read("b.pem");
        s.change("b.pem", &fixture("v1-root.pem"));
        let key = s.key("b.pem");
        let first_change = s.catalog.latest(&key).unwrap().seen_at;
        s.change("b.pem", &(fixture("v1-root.pem") + &fixture("leaf.pem")));
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.stale_since, Some(first_change));
        s.change("b.pem", &fixture("ca.pem"));
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Fresh);
    }

    /// Certificates made by the real openssl in `dir`: a CA, and leaves it signs with
    /// a given key and lifetime.
    struct Pki {
        dir: PathBuf,
    }

    impl Pki {
        fn new(dir: &Path) -> Self {
            let pki = Self {
                dir: dir.join("pki"),
            };
            fs::create_dir_all(&pki.dir).unwrap();
            pki.openssl(&[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                "ca.key",
                "-subj",
                "/CN=Verdict Test CA",
                "-days",
                "30",
                "-out",
                "ca.pem",
            ]);
            pki
        }

        fn openssl(&self, args: &[&str]) {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(&self.dir)
                .output()
                .expect("openssl is needed by these tests (cargo xtask setup installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        }

        /// A leaf for `cn` with key `key` (made if new), valid `days`, as PEM.
        fn leaf(&self, cn: &str, key: &str, days: u32) -> String {
            let key_file = format!("{key}.key");
            if !self.dir.join(&key_file).exists() {
                self.openssl(&[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    &key_file,
                ]);
            }
            let out = format!("{cn}-{key}-{days}.pem");
            self.openssl(&[
                "req",
                "-x509",
                "-new",
                "-key",
                &key_file,
                "-subj",
                &format!("/CN={cn}"),
                "-days",
                &days.to_string(),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-addext",
                "basicConstraints=critical,CA:FALSE",
                "-out",
                &out,
            ]);
            fs::read_to_string(self.dir.join(out)).unwrap()
        }
    }

    fn certs_of(read: &TrustRead) -> Vec<Arc<CertInfo>> {
        read.version
            .as_ref()
            .unwrap()
            .content
            .as_ref()
            .unwrap()
            .certificates()
            .into_values()
            .collect()
    }

    fn at(secs: i64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
    }

    #[test]
    fn a_leaf_renewed_with_the_same_key_is_expiring_then_expired_in_memory() {
        let mut s = Setup::new("renewed-same-key");
        let pki = Pki::new(&s.dir);
        fs::write(s.dir.join("tls.crt"), pki.leaf("proxy.internal", "k1", 2)).unwrap();
        let read = s.read("tls.crt");
        let old = certs_of(&read).remove(0);
        // Nothing renewed yet: fresh, nothing expiring, whatever the time.
        let v = judge_read(&read, &[], &s.catalog, at(old.not_after + 10));
        assert_eq!((v.verdict, v.expiring.len()), (Verdict::Fresh, 0));

        s.change("tls.crt", &pki.leaf("proxy.internal", "k1", 90));
        let key = s.key("tls.crt");
        let renewed_at = s.catalog.latest(&key).unwrap().seen_at;
        let v = judge_read(&read, &[], &s.catalog, at(old.not_after - 10));
        assert_eq!((v.verdict, v.kind), (Verdict::Stale, TrustKind::Identity));
        assert_eq!(v.expiring.len(), 1, "{v:?}");
        let e = &v.expiring[0];
        assert_eq!(e.held, old);
        assert_eq!(e.matched, Match::SameKey);
        assert!(e.renewal.not_after > old.not_after + 80 * 86400);
        assert_eq!(e.renewed_at, renewed_at);
        assert!(v.expired_in_memory.is_empty());

        let v = judge_read(&read, &[], &s.catalog, at(old.not_after + 10));
        assert_eq!(v.verdict, Verdict::ExpiredInMemory);
        assert_eq!(subjects(&v.expired_in_memory), vec!["CN=proxy.internal"]);
        assert_eq!(v.expiring.len(), 1);
    }

    #[test]
    fn a_leaf_renewed_with_a_new_key_by_its_issuer_is_expired_in_memory_once_past_not_after() {
        let mut s = Setup::new("renewed-new-key");
        let pki = Pki::new(&s.dir);
        fs::write(s.dir.join("tls.crt"), pki.leaf("proxy.internal", "k1", 2)).unwrap();
        let read = s.read("tls.crt");
        let old = certs_of(&read).remove(0);
        // A first rotation, then another: the renewal named is the one on disk now, and
        // the time is when the first renewal landed.
        s.change("tls.crt", &pki.leaf("proxy.internal", "k2", 30));
        let key = s.key("tls.crt");
        let first = s.catalog.latest(&key).unwrap().seen_at;
        s.change("tls.crt", &pki.leaf("proxy.internal", "k3", 90));
        let v = judge_read(&read, &[], &s.catalog, at(old.not_after + 1));
        assert_eq!(v.verdict, Verdict::ExpiredInMemory);
        let e = &v.expiring[0];
        assert_eq!(e.matched, Match::SameIssuer);
        assert_eq!(e.renewed_at, first);
        assert_eq!(
            s.catalog
                .latest(&key)
                .unwrap()
                .content
                .as_ref()
                .unwrap()
                .certificates()
                .get(&e.renewal.sha256),
            Some(&e.renewal)
        );
    }

    #[test]
    fn an_expired_certificate_without_a_renewal_is_stale_at_most() {
        let mut s = Setup::new("expired-alone");
        let pki = Pki::new(&s.dir);
        fs::write(s.dir.join("tls.crt"), pki.leaf("proxy.internal", "k1", 2)).unwrap();
        let read = s.read("tls.crt");
        let old = certs_of(&read).remove(0);
        let after = at(old.not_after + 10);
        // Expired, nothing newer on disk: the certificate's problem, not drift.
        assert_eq!(
            judge_read(&read, &[], &s.catalog, after).verdict,
            Verdict::Fresh
        );
        // Replaced by someone else's certificate: stale, but nothing of its was renewed.
        s.change("tls.crt", &pki.leaf("other.internal", "k1", 90));
        let v = judge_read(&read, &[], &s.catalog, after);
        assert_eq!(v.verdict, Verdict::Stale);
        assert!(
            v.expiring.is_empty() && v.expired_in_memory.is_empty(),
            "{v:?}"
        );
    }

    #[test]
    fn an_expired_root_removed_by_an_upgrade_is_stale_never_expired_in_memory() {
        let mut s = Setup::new("root-removed");
        // The v1 root expires in 2126: judged as if it were later than that.
        let bundle = fixture("ca.pem") + &fixture("v1-root.pem");
        fs::write(s.dir.join("ca-certificates.crt"), &bundle).unwrap();
        let read = s.read("ca-certificates.crt");
        let far = certs_of(&read).iter().map(|c| c.not_after).max().unwrap() + 86400;
        s.change("ca-certificates.crt", &fixture("ca.pem"));
        let v = judge_read(&read, &[], &s.catalog, at(far));
        assert_eq!(v.verdict, Verdict::Stale);
        assert!(
            v.expiring.is_empty() && v.expired_in_memory.is_empty(),
            "{v:?}"
        );
        // Listed, as every removed CA is, but apart from the ones still trusted: an
        // expired root is no exposure, and the security alert must not fire on upgrades.
        assert_eq!(
            subjects(&v.removed_cas_expired),
            vec!["O=trustdrift, CN=trustdrift test v1 root"]
        );
        assert!(v.removed_cas_trusted.is_empty(), "{v:?}");
    }

    #[test]
    fn a_version_replaced_before_the_daemon_read_it_is_stale_without_a_diff() {
        let mut s = Setup::new("unseen");
        fs::write(s.dir.join("ca.pem"), fixture("ca.pem")).unwrap();
        let mut read = s.read("ca.pem");
        let seen = read.version.clone().unwrap();
        // The process opened an inode between the one seen and the one there now.
        s.change("ca.pem", &fixture("v1-root.pem"));
        let at = read.version_read_at;
        read.version = Some(s.catalog.unseen_version(1, 2, at));
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Stale);
        assert!(v.missing_cas.is_empty() && v.removed_cas_trusted.is_empty());
        assert!(
            v.note
                .unwrap()
                .contains("replaced before trustdrift could read it")
        );
        assert!(v.stale_since.unwrap() > seen.seen_at);
        assert_eq!(
            s.catalog.counters.read_errors.get("replaced_before_read"),
            Some(&1)
        );
    }

    #[test]
    fn a_changing_file_without_certificates_or_keys_is_not_drift() {
        let mut s = Setup::new("noise");
        fs::write(
            s.dir.join("dhparam.pem"),
            "-----BEGIN DH PARAMETERS-----\nMAA=\n-----END DH PARAMETERS-----\n",
        )
        .unwrap();
        let read = s.read("dhparam.pem");
        s.change(
            "dhparam.pem",
            "-----BEGIN DH PARAMETERS-----\nMAE=\n-----END DH PARAMETERS-----\n",
        );
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Fresh);
        assert!(v.note.unwrap().contains("not trust material"));
        // But a file that becomes a certificate is.
        s.change("dhparam.pem", &fixture("ca.pem"));
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Stale);
    }

    #[test]
    fn a_private_key_change_is_identity_drift() {
        let mut s = Setup::new("key");
        fs::write(s.dir.join("tls.key"), fixture("test-only-throwaway.key")).unwrap();
        let read = s.read("tls.key");
        s.change(
            "tls.key",
            &fixture("test-only-throwaway.key").replace('A', "B"),
        );
        let v = judge_read(&read, &[], &s.catalog, SystemTime::now());
        assert_eq!((v.verdict, v.kind), (Verdict::Stale, TrustKind::Identity));
    }

    #[test]
    fn a_listed_directory_drifts_when_a_ca_file_comes_or_goes() {
        let mut s = Setup::new("dir");
        fs::create_dir_all(s.dir.join("certs")).unwrap();
        fs::write(s.dir.join("certs/a.pem"), fixture("ca.pem")).unwrap();
        fs::write(s.dir.join("certs/README"), "not a certificate").unwrap();
        let mut dir_read = s.read("certs");
        dir_read.listed = true;
        let file_read = s.read("certs/a.pem");
        let reads = vec![dir_read.clone(), file_read];
        // A file without a CA coming and going is no drift.
        fs::write(s.dir.join("certs/NOTES"), "still not a certificate").unwrap();
        let key = s.key("certs");
        s.catalog.refresh(&key, &mut NoWatch, &mut io());
        assert_eq!(
            judge_read(&dir_read, &reads, &s.catalog, SystemTime::now()).verdict,
            Verdict::Fresh
        );
        // A CA file added: missing for the process, although no file it read changed.
        fs::write(s.dir.join("certs/b.pem"), fixture("v1-root.pem")).unwrap();
        s.catalog.refresh(&key, &mut NoWatch, &mut io());
        let v = judge_read(&dir_read, &reads, &s.catalog, SystemTime::now());
        assert_eq!(v.verdict, Verdict::Stale);
        assert_eq!(
            subjects(&v.missing_cas),
            vec!["O=trustdrift, CN=trustdrift test v1 root"]
        );
        // The CA file it read removed: still trusted in memory.
        fs::remove_file(s.dir.join("certs/a.pem")).unwrap();
        s.catalog.refresh(&key, &mut NoWatch, &mut io());
        let v = judge_read(&dir_read, &reads, &s.catalog, SystemTime::now());
        assert_eq!(
            subjects(&v.removed_cas_trusted),
            vec!["O=trustdrift, CN=trustdrift test CA"]
        );
    }

    #[test]
    fn processes_roll_up_to_their_worst_file_and_unverified_ones_stand_apart() {
        let mut s = Setup::new("rollup");
        fs::write(s.dir.join("a.pem"), fixture("ca.pem")).unwrap();
        fs::write(s.dir.join("b.pem"), fixture("ca.pem")).unwrap();
        let reads = vec![s.read("a.pem"), s.read("b.pem")];
        s.change("b.pem", &fixture("v1-root.pem"));
        let mut ledger = crate::ledger::Ledger::new(LedgerLimits::default());
        let key = ProcKey {
            pid: 1,
            start_ticks: 1,
        };
        let now = SystemTime::now();
        ledger.upsert(key, Origin::Observed, ProcessInfo::default());
        for r in reads {
            ledger.add_read(&key, r);
        }
        let p = judge(ledger.get(&key).unwrap(), &s.catalog, None, now).unwrap();
        assert_eq!(p.verdict, Verdict::Stale);
        assert_eq!(p.files[0].verdict, Verdict::Fresh);
        assert!(p.stale_since.is_some());

        let capable = ProcKey {
            pid: 2,
            start_ticks: 1,
        };
        let info = ProcessInfo {
            start_time: Some(now - Duration::from_secs(60)),
            ..ProcessInfo::default()
        };
        ledger.upsert(capable, Origin::TlsCapable, info);
        let entry = ledger.get(&capable).unwrap();
        // Stores last changed before it started: nothing to say.
        assert!(judge(entry, &s.catalog, Some(now - Duration::from_secs(120)), now).is_none());
        // Changed after it started: unverified, never stale.
        let v = judge(entry, &s.catalog, Some(now), now).unwrap();
        assert_eq!(v.verdict, Verdict::Unverified);
    }
}
