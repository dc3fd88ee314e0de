//! The ledger across restarts: saved as one versioned JSON document in the state
//! directory, written atomically (temporary file, fsync, rename), with the catalog's
//! version histories and the content they refer to, so that what a process read is still
//! known (and diffable) when the file on disk has long changed.
//!
//! A file that cannot be read back (corrupt, from an unknown format version) is set aside
//! with a warning and the daemon starts empty: never fatal. Processes are matched by pid
//! and start time, so a reused pid never inherits another process's verdict; after a
//! reboot (a new boot id) nothing is restored.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    fs,
    path::PathBuf,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use trustdrift_common::AccessKey;

use crate::{
    budget::Budget,
    events::journal::Mark,
    ledger::{
        Aggregates, Ledger, Origin, ProcKey, ProcessEntry, ProcessInfo, TrustRead,
        state_dir::{StateDir, Writer},
    },
    process::procfs,
    stores::catalog::{
        Catalog, Content, FileIdentity, FileKey, RootKey, Shape, Version, contents::weight,
    },
    stores::digest::Digest,
    stores::formats::{CertInfo, ContentKind},
};

/// Bumped whenever the document's meaning changes; newer files are set aside, older ones
/// read as far as they can be. 2: contents are keyed by `Digest::to_saved`, and only
/// certificates by their plain SHA-256 (format 1 had a plain SHA-256 for everything).
pub const FORMAT: u32 = 2;
const FILE: &str = "ledger.json";
/// A state file is the daemon's own, but not believed past this size.
const MAX_STATE_BYTES: u64 = 1 << 30;

fn ns(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn at(ns: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns)
}

#[derive(Serialize, Deserialize)]
struct Document {
    format: u32,
    saved_at_ns: u64,
    boot_id: String,
    /// `NodeKey::id` of the key keyed digests were made under.
    #[serde(default)]
    key_id: String,
    contents: BTreeMap<String, SavedContent>,
    files: Vec<SavedFile>,
    processes: Vec<SavedProcess>,
    /// How far this save covers the crash journal (absent: no journal).
    #[serde(default)]
    journal: Option<Mark>,
}

/// What a restore brought back.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Restored {
    pub processes: usize,
    /// How far the restored state covers the crash journal.
    pub journal: Option<Mark>,
}

#[derive(Serialize, Deserialize)]
struct SavedContent {
    size: u64,
    shape: SavedShape,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "shape", rename_all = "snake_case")]
enum SavedShape {
    File {
        kind: ContentKind,
        certs: Vec<CertInfo>,
        errors: Vec<String>,
    },
    Directory {
        /// name -> content sha256
        entries: BTreeMap<String, String>,
        errors: Vec<String>,
    },
    Unreadable {
        reason: String,
    },
}

#[derive(Serialize, Deserialize)]
struct SavedVersion {
    id: u64,
    seen_at_ns: u64,
    observed_at_ns: u64,
    canonical: Option<PathBuf>,
    identity: Option<FileIdentity>,
    content: Option<String>,
    #[serde(default)]
    unseen: bool,
}

#[derive(Serialize, Deserialize)]
struct SavedFile {
    root: RootKey,
    path: PathBuf,
    versions: Vec<SavedVersion>,
}

#[derive(Serialize, Deserialize)]
struct SavedAccess {
    tgid: u32,
    exec_seq: u32,
    start_ns: u64,
    path_hash: u64,
}

#[derive(Serialize, Deserialize)]
struct SavedRead {
    access: Option<SavedAccess>,
    path: PathBuf,
    file: Option<(RootKey, PathBuf)>,
    resolved: Option<PathBuf>,
    resolve_error: Option<String>,
    first_open_ns: u64,
    last_open_ns: u64,
    last_read_ns: Option<u64>,
    bytes: u64,
    opens: u64,
    reads: u64,
    version: Option<SavedVersion>,
    version_read_at_ns: u64,
    listed: bool,
    #[serde(default)]
    unverifiable: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct SavedProcess {
    key: ProcKey,
    origin: Origin,
    info: ProcessInfo,
    exec_seq: u32,
    exited_at_ns: Option<u64>,
    reads: Vec<SavedRead>,
}

/// `/proc/sys/kernel/random/boot_id`: pids and start times mean nothing across boots.
pub fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Collects content (shared by digest) while versions are saved. Every read of a storm's
/// processes names a content: its name is formatted once, not once per read.
#[derive(Default)]
struct ContentTable {
    saved: BTreeMap<String, SavedContent>,
    names: HashMap<*const Content, String>,
}

impl ContentTable {
    fn add(&mut self, content: &Content) -> String {
        if let Some(name) = self.names.get(&std::ptr::from_ref(content)) {
            return name.clone();
        }
        let sha = match content.digest {
            // Nothing tells two foreign contents apart: each is its own entry.
            Digest::Foreign => format!("foreign:{}", self.names.len()),
            d => d.to_saved(),
        };
        self.names.insert(std::ptr::from_ref(content), sha.clone());
        if !self.saved.contains_key(&sha) {
            let shape = match &content.shape {
                Shape::File {
                    kind,
                    certs,
                    errors,
                } => SavedShape::File {
                    kind: *kind,
                    certs: certs.iter().map(|c| (**c).clone()).collect(),
                    errors: errors.clone(),
                },
                Shape::Directory { entries, errors } => SavedShape::Directory {
                    entries: entries
                        .iter()
                        .map(|(name, c)| (name.clone(), self.add(c)))
                        .collect(),
                    errors: errors.clone(),
                },
                Shape::Unreadable { reason } => SavedShape::Unreadable {
                    reason: reason.clone(),
                },
            };
            self.saved.insert(
                sha.clone(),
                SavedContent {
                    size: content.size,
                    shape,
                },
            );
        }
        sha
    }

    fn version(&mut self, v: &Version) -> SavedVersion {
        SavedVersion {
            id: v.id,
            seen_at_ns: ns(v.seen_at),
            observed_at_ns: ns(v.observed_at),
            canonical: v.canonical.clone(),
            identity: v.identity,
            content: v.content.as_deref().map(|c| self.add(c)),
            unseen: v.unseen,
        }
    }
}

/// The document as a save writes it: each process is made as it is written, so a storm's
/// ledger is never copied whole (it doubled the daemon's memory for the length of a save),
/// and the contents the processes name come after them (a restore reads the fields in any
/// order).
#[derive(Serialize)]
struct DocumentOut<'a> {
    format: u32,
    saved_at_ns: u64,
    boot_id: String,
    key_id: String,
    files: Vec<SavedFile>,
    processes: ProcessesOut<'a>,
    contents: ContentsOut<'a>,
    journal: Option<Mark>,
}

struct ProcessesOut<'a> {
    ledger: &'a Ledger,
    table: &'a RefCell<ContentTable>,
}

impl Serialize for ProcessesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(None)?;
        for p in self.ledger.processes() {
            seq.serialize_element(&saved_process(p, &mut self.table.borrow_mut()))?;
        }
        seq.end()
    }
}

struct ContentsOut<'a>(&'a RefCell<ContentTable>);

impl Serialize for ContentsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.borrow().saved.serialize(s)
    }
}

fn saved_process(p: &ProcessEntry, table: &mut ContentTable) -> SavedProcess {
    SavedProcess {
        key: p.key,
        origin: p.origin,
        info: p.info.clone(),
        exec_seq: p.exec_seq,
        exited_at_ns: p.exited_at.map(ns),
        reads: p
            .reads
            .iter()
            .map(|r| SavedRead {
                access: r.access_key.map(|a| SavedAccess {
                    tgid: a.tgid,
                    exec_seq: a.exec_seq,
                    start_ns: a.start_ns,
                    path_hash: a.path_hash,
                }),
                path: r.path.clone(),
                file: r.file.as_ref().map(|f| (f.root, f.path.clone())),
                resolved: r.resolved.clone(),
                resolve_error: r.resolve_error.clone(),
                first_open_ns: ns(r.first_open),
                last_open_ns: ns(r.last_open),
                last_read_ns: r.last_read.map(ns),
                bytes: r.bytes,
                opens: r.opens,
                reads: r.reads,
                version: r.version.as_deref().map(|v| table.version(v)),
                version_read_at_ns: ns(r.version_read_at),
                listed: r.listed,
                unverifiable: r.unverifiable.clone(),
            })
            .collect(),
    }
}

/// Rebuilds content from the table, sharing it by name.
struct Contents<'a> {
    saved: &'a BTreeMap<String, SavedContent>,
    built: BTreeMap<String, Arc<Content>>,
    /// The keyed digests were made under the key in use now.
    same_key: bool,
    /// What restored contents are charged to, as parsed ones are.
    budget: Budget,
}

impl Contents<'_> {
    fn get(&mut self, sha: &str, depth: u32) -> Option<Arc<Content>> {
        if let Some(c) = self.built.get(sha) {
            return Some(Arc::clone(c));
        }
        let saved = self.saved.get(sha)?;
        let shape = match &saved.shape {
            SavedShape::File {
                kind,
                certs,
                errors,
            } => Shape::File {
                kind: *kind,
                certs: certs.iter().cloned().map(Arc::new).collect(),
                errors: errors.clone(),
            },
            SavedShape::Directory { entries, errors } if depth == 0 => Shape::Directory {
                entries: entries
                    .iter()
                    .filter_map(|(name, sha)| Some((name.clone(), self.get(sha, depth + 1)?)))
                    .collect(),
                errors: errors.clone(),
            },
            SavedShape::Directory { .. } => return None,
            SavedShape::Unreadable { reason } => Shape::Unreadable {
                reason: reason.clone(),
            },
        };
        let digest = if sha.starts_with("foreign:") {
            Digest::Foreign
        } else {
            Digest::from_saved(sha, self.same_key)?
        };
        let content = Arc::new(Content {
            digest,
            size: saved.size,
            charge: self.budget.charge(weight(&shape)),
            shape,
        });
        self.built.insert(sha.to_owned(), Arc::clone(&content));
        Some(content)
    }

    fn version(&mut self, v: &SavedVersion) -> Version {
        Version {
            id: v.id,
            seen_at: at(v.seen_at_ns),
            observed_at: at(v.observed_at_ns),
            canonical: v.canonical.clone(),
            identity: v.identity,
            content: v.content.as_deref().and_then(|s| self.get(s, 0)),
            unseen: v.unseen,
        }
    }
}

impl StateDir {
    /// Writes the whole state atomically; `journal`: how far it covers the crash journal.
    pub fn save(&self, ledger: &Ledger, catalog: &Catalog, journal: Option<Mark>) -> Result<usize> {
        let bytes = encode(ledger, catalog, journal, 0)?;
        self.write_atomically(FILE, &bytes)?;
        Ok(bytes.len())
    }
}

/// Writes what [`encode`] made as the state, atomically (on a thread of its own: the
/// sync can take seconds on a busy disk, and nothing drains the probe meanwhile).
pub fn write(writer: &Writer, bytes: &[u8]) -> Result<()> {
    writer.write_atomically(FILE, bytes)
}

/// The whole state as it is to be written; `journal`: how far it covers the crash journal;
/// `size_hint`: how long the last one was (a buffer grown by doubling would hold up to
/// twice a storm's tens of MB for the length of a save).
pub fn encode(
    ledger: &Ledger,
    catalog: &Catalog,
    journal: Option<Mark>,
    size_hint: usize,
) -> Result<Vec<u8>> {
    let mut table = ContentTable::default();
    let files = catalog
        .export()
        .map(|(key, versions)| SavedFile {
            root: key.root,
            path: key.path.clone(),
            versions: versions.iter().map(|v| table.version(v)).collect(),
        })
        .collect();
    let table = RefCell::new(table);
    let doc = DocumentOut {
        format: FORMAT,
        saved_at_ns: ns(SystemTime::now()),
        boot_id: boot_id(),
        key_id: catalog.node_key().id(),
        files,
        processes: ProcessesOut {
            ledger,
            table: &table,
        },
        contents: ContentsOut(&table),
        journal,
    };
    let mut out = Vec::with_capacity(size_hint + size_hint / 8);
    serde_json::to_writer(&mut out, &doc).context("encoding the state")?;
    Ok(out)
}

impl StateDir {
    /// Moves an unreadable state file out of the way (kept for inspection).
    fn set_aside(&self, why: &str) {
        let aside = format!(
            "{FILE}.unreadable-{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        );
        tracing::warn!(
            "state file {}/{FILE} {why}: set aside as {aside}; starting with an empty ledger",
            self.path().display(),
        );
        let _ = self.rename(FILE, &aside);
    }

    /// Restores what an earlier run saved.
    pub fn restore(&self, ledger: &mut Ledger, catalog: &mut Catalog) -> Restored {
        let bytes = match self.read(FILE, MAX_STATE_BYTES) {
            Ok(Some(b)) => b,
            Ok(None) => return Restored::default(),
            Err(e) => {
                tracing::warn!(
                    "cannot read state file {}/{FILE}: {e}",
                    self.path().display()
                );
                return Restored::default();
            }
        };
        // Check the version first, so a newer format is named as such, not as corrupt.
        #[derive(Deserialize)]
        struct Head {
            format: u32,
        }
        match serde_json::from_slice::<Head>(&bytes) {
            // Format 1's digests all come back foreign (it fingerprinted keys in the open).
            Ok(Head { format }) if format == FORMAT || format == 1 => {}
            Ok(Head { format }) => {
                self.set_aside(&format!("has format {format}, this version reads {FORMAT}"));
                return Restored::default();
            }
            Err(e) => {
                self.set_aside(&format!("is not a trustdrift state file ({e})"));
                return Restored::default();
            }
        }
        let doc: Document = match serde_json::from_slice(&bytes) {
            Ok(d) => d,
            Err(e) => {
                self.set_aside(&format!("is corrupt ({e})"));
                return Restored::default();
            }
        };
        if doc.boot_id != boot_id() {
            tracing::info!("state file is from before the last boot: nothing to restore");
            return Restored::default();
        }
        let same_key = doc.format == FORMAT && doc.key_id == catalog.node_key().id();
        let mut contents = Contents {
            saved: &doc.contents,
            built: BTreeMap::new(),
            same_key,
            budget: catalog.content_budget().clone(),
        };
        for f in &doc.files {
            let versions = f
                .versions
                .iter()
                .map(|v| Arc::new(contents.version(v)))
                .collect();
            catalog.import(
                FileKey {
                    root: f.root,
                    path: f.path.clone(),
                },
                versions,
            );
        }
        let now = SystemTime::now();
        let mut restored = 0;
        for p in doc.processes {
            // Still the same process? A reused pid has another start time.
            let alive = procfs::start_ticks(p.key.pid).ok() == Some(p.key.start_ticks);
            let exited_at = p.exited_at_ns.map(at).or((!alive).then_some(now));
            let reads = p
                .reads
                .into_iter()
                .map(|r| TrustRead {
                    access_key: r.access.map(|a| AccessKey {
                        tgid: a.tgid,
                        exec_seq: a.exec_seq,
                        start_ns: a.start_ns,
                        path_hash: a.path_hash,
                    }),
                    path: r.path,
                    file: r.file.map(|(root, path)| FileKey { root, path }),
                    resolved: r.resolved,
                    resolve_error: r.resolve_error,
                    first_open: at(r.first_open_ns),
                    last_open: at(r.last_open_ns),
                    last_read: r.last_read_ns.map(at),
                    bytes: r.bytes,
                    opens: r.opens,
                    reads: r.reads,
                    version: r.version.as_ref().map(|v| Arc::new(contents.version(v))),
                    version_read_at: at(r.version_read_at_ns),
                    listed: r.listed,
                    unverifiable: r.unverifiable,
                })
                .collect();
            ledger.restore(ProcessEntry {
                key: p.key,
                origin: p.origin,
                info: p.info,
                exec_seq: p.exec_seq,
                exited_at,
                reads,
                // Not saved: whether an earlier run took them, deleting is what is sure.
                aggregates: Aggregates::InKernel,
            });
            restored += 1;
        }
        Restored {
            processes: restored,
            journal: doc.journal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ledger::LedgerLimits, stores::catalog::Limits};

    use crate::stores::catalog::tests::{NoWatch, catalog as new_catalog, io};

    struct Tmp(PathBuf);
    impl Tmp {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir()
                .join(format!("trustdrift-state-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn fixture(name: &str) -> String {
        fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/store_format")
                .join(name),
        )
        .unwrap()
    }

    #[test]
    fn a_saved_ledger_comes_back_with_what_each_process_read() {
        let t = Tmp::new("roundtrip");
        let bundle = t.0.join("bundle.pem");
        fs::write(&bundle, fixture("ca.pem")).unwrap();
        let mut catalog = new_catalog(Limits::default());
        let file = FileKey {
            root: catalog.host_root().unwrap(),
            path: bundle.clone(),
        };
        let version = catalog.observe(&file, None, &mut NoWatch, &mut io()).ok();
        let mut ledger = Ledger::new(LedgerLimits::default());
        // Ourselves: alive, so restored as alive.
        let me = std::process::id();
        let key = ProcKey {
            pid: me,
            start_ticks: procfs::start_ticks(me).unwrap(),
        };
        ledger.upsert(key, Origin::Observed, ProcessInfo::default());
        let read_at = SystemTime::now();
        ledger.add_read(
            &key,
            TrustRead {
                access_key: Some(AccessKey {
                    tgid: me,
                    exec_seq: 0,
                    start_ns: 1,
                    path_hash: 42,
                }),
                path: bundle.clone(),
                file: Some(file.clone()),
                resolved: Some(bundle.clone()),
                resolve_error: None,
                first_open: read_at,
                last_open: read_at,
                last_read: Some(read_at),
                bytes: 10,
                opens: 1,
                reads: 2,
                version: version.clone(),
                version_read_at: read_at,
                listed: false,
                unverifiable: None,
            },
        );
        // A process that is gone: a pid with a start time that is not its own.
        let ghost = ProcKey {
            pid: me,
            start_ticks: 1,
        };
        ledger.upsert(ghost, Origin::Observed, ProcessInfo::default());

        let dir = StateDir::open(&t.0.join("state")).unwrap();
        let mark = Mark {
            epoch: 7,
            ring_through: 100,
            aggregates_through: 99,
        };
        dir.save(&ledger, &catalog, Some(mark)).unwrap();
        // The old file content goes away: the saved version still knows its CAs.
        fs::write(&bundle, fixture("v1-root.pem")).unwrap();
        drop(dir);

        let dir = StateDir::open(&t.0.join("state")).unwrap();
        let mut ledger2 = Ledger::new(LedgerLimits::default());
        let mut catalog2 = new_catalog(Limits::default());
        assert_eq!(
            dir.restore(&mut ledger2, &mut catalog2),
            Restored {
                processes: 2,
                journal: Some(mark)
            }
        );
        let p = ledger2.get(&key).unwrap();
        assert!(p.exited_at.is_none());
        let r = &p.reads[0];
        assert_eq!(r.version_read_at, at(ns(read_at)));
        assert_eq!((r.bytes, r.reads), (10, 2));
        let certs = r
            .version
            .as_ref()
            .unwrap()
            .content
            .as_ref()
            .unwrap()
            .certificates();
        assert_eq!(certs.len(), 1);
        assert!(
            ledger2.get(&ghost).unwrap().exited_at.is_some(),
            "the pid was reused"
        );
        assert_eq!(catalog2.history(&file).len(), 1);
        assert_eq!(ledger2.owner_of(&r.access_key.unwrap()), Some(key));
    }

    #[test]
    fn corrupt_and_foreign_state_is_set_aside_not_fatal() {
        let t = Tmp::new("corrupt");
        let state = t.0.join("state");
        for (content, why) in [
            ("{ not json", "not a trustdrift state file"),
            ("{\"format\": 99}", "has format 99"),
            ("{\"format\": 1, \"boot_id\": 3}", "corrupt"),
        ] {
            fs::create_dir_all(&state).unwrap();
            fs::write(state.join(FILE), content).unwrap();
            let dir = StateDir::open(&state).unwrap();
            let mut l = Ledger::new(LedgerLimits::default());
            let mut c = new_catalog(Limits::default());
            assert_eq!(dir.restore(&mut l, &mut c), Restored::default(), "{why}");
            assert!(!state.join(FILE).exists(), "{why}: moved away");
            let aside = fs::read_dir(&state)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name().to_string_lossy().contains("unreadable"))
                .count();
            assert!(aside >= 1);
            drop(dir);
            fs::remove_dir_all(&state).unwrap();
        }
    }
}
