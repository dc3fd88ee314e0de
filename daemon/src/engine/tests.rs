//! The engine's decisions, driven through a fake of the kernel tables: real processes
//! (children of the test) and real files, no probe.

use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::Result;
use tokio::sync::watch;
use trustdrift_common::{AccessKey, AccessStats, Loss};

use super::{Engine, kernel::Kernel, options::EngineOptions, publisher::Publisher, saver::Saver};
use crate::{
    config::Config,
    events::{Access, Event, Task},
    judge::verdict::Verdict,
    ledger::{ProcKey, state_dir::StateDir},
    probe::{MapFill, ProgramStats, pinning::PinStatus, trust_paths::TrustPaths},
    process::procfs,
    serve::snapshot::Snapshot,
};

/// What the fake kernel holds and what was asked of it.
#[derive(Default)]
struct Tables {
    accesses: HashMap<AccessKey, AccessStats>,
    forgotten: Vec<AccessKey>,
    taken: Vec<AccessKey>,
    /// Accesses watched for a re-read, in the order asked (unwatching removes them).
    watched: Vec<AccessKey>,
}

struct FakeKernel(Arc<Mutex<Tables>>, PinStatus);

impl Kernel for FakeKernel {
    fn access_stats(&self, key: &AccessKey) -> Option<AccessStats> {
        self.0.lock().unwrap().accesses.get(key).copied()
    }
    fn take_access_stats(&mut self, key: &AccessKey) -> Option<AccessStats> {
        let mut t = self.0.lock().unwrap();
        t.taken.push(*key);
        t.accesses.remove(key)
    }
    fn forget_access(&mut self, key: &AccessKey) {
        let mut t = self.0.lock().unwrap();
        t.forgotten.push(*key);
        t.accesses.remove(key);
    }
    fn watch_reread(&mut self, key: &AccessKey) -> Result<()> {
        self.0.lock().unwrap().watched.push(*key);
        Ok(())
    }
    fn unwatch_reread(&mut self, key: &AccessKey) {
        self.0.lock().unwrap().watched.retain(|k| k != key);
    }
    fn losses(&self) -> Vec<(Loss, u64)> {
        Vec::new()
    }
    fn map_fill(&self) -> Vec<MapFill> {
        Vec::new()
    }
    fn program_stats(&self) -> Vec<ProgramStats> {
        Vec::new()
    }
    fn set_paths(&mut self, _: &TrustPaths) -> Result<()> {
        Ok(())
    }
    fn pinning(&self) -> &PinStatus {
        &self.1
    }
    fn unpin(&mut self) {}
}

/// An engine over a fake kernel, and a temporary directory of trust files.
struct Bench {
    engine: Engine,
    tables: Arc<Mutex<Tables>>,
    dir: PathBuf,
    _rx: watch::Receiver<Arc<Snapshot>>,
    children: Vec<Child>,
}

impl Bench {
    fn new(name: &str, config: &str) -> Self {
        Self::build(name, config, false)
    }

    /// As [`Bench::new`], the daemon saving its ledger in the bench's `state`.
    fn with_state(name: &str) -> Self {
        Self::build(name, "", true)
    }

    fn build(name: &str, config: &str, saving: bool) -> Self {
        let dir =
            std::env::temp_dir().join(format!("trustdrift-engine-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let tables = Arc::new(Mutex::new(Tables::default()));
        let state = saving.then(|| dir.join("state"));
        let (engine, rx) = engine_over(&tables, config, state.as_deref());
        Self {
            engine,
            tables,
            dir,
            _rx: rx,
            children: Vec::new(),
        }
    }

    /// A daemon started again over the same kernel tables from what the bench's daemon
    /// saved last (a copy of its state: the first still holds its directory's lock, as
    /// a killed one would not), with the snapshot it publishes.
    fn restarted(&self) -> (Engine, watch::Receiver<Arc<Snapshot>>) {
        let copy = self.dir.join("state-after-kill");
        fs::create_dir_all(&copy).unwrap();
        for entry in fs::read_dir(self.dir.join("state")).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let (mut engine, rx) = engine_over(&self.tables, "", Some(&copy));
        engine.start_up((Vec::new(), 0), None);
        (engine, rx)
    }

    fn file(&self, name: &str, content: &str) -> PathBuf {
        let p = self.dir.join(name);
        fs::write(&p, content).unwrap();
        p
    }

    /// A live process to attribute accesses to (it sleeps until the bench ends).
    fn process(&mut self) -> Task {
        let child = Command::new("sleep").arg("60").spawn().unwrap();
        let pid = child.id();
        self.children.push(child);
        let ticks = procfs::start_ticks(pid).unwrap();
        Task {
            tgid: pid,
            tid: pid,
            uid: 0,
            start_ns: ticks * (1_000_000_000 / procfs::clock_ticks_per_second()),
            ts_ns: 0,
            cgroup_id: 0,
            mnt_ns: procfs::mount_namespace_of(pid).unwrap_or(0),
            exec_seq: 0,
            comm: "sleep".into(),
        }
    }

    /// `task` opened `path` (the probe announced it), with these aggregates in the kernel.
    fn open(&mut self, task: &Task, path: &Path, stats: AccessStats) -> AccessKey {
        let key = AccessKey {
            tgid: task.tgid,
            exec_seq: task.exec_seq,
            start_ns: task.start_ns,
            path_hash: path.to_string_lossy().len() as u64 ^ 0x9e37,
        };
        self.tables.lock().unwrap().accesses.insert(key, stats);
        let inode = fs::metadata(path).ok().map(|m| {
            (
                std::os::unix::fs::MetadataExt::ino(&m),
                std::os::unix::fs::MetadataExt::dev(&m),
            )
        });
        self.engine.on_event(Event::Access(Access {
            task: task.clone(),
            key,
            dir_path_hash: 0,
            open_flags: 0,
            dirfd: -100,
            fd: -1,
            inode,
            match_flags: 0,
            path: path.to_path_buf(),
            kernel_path: None,
        }));
        key
    }

    fn key_of(task: &Task) -> ProcKey {
        ProcKey {
            pid: task.tgid,
            start_ticks: procfs::start_ns_to_ticks(task.start_ns),
        }
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// An engine over the fake kernel `tables`; `state`: where it saves its ledger.
fn engine_over(
    tables: &Arc<Mutex<Tables>>,
    config: &str,
    state: Option<&Path>,
) -> (Engine, watch::Receiver<Arc<Snapshot>>) {
    let config = Config::from_toml(config, "test").unwrap();
    let mut options = EngineOptions::from_config(&config);
    options.state_dir = None;
    let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
    let publisher = Publisher::new(tx, options.metrics.clone());
    let kernel = Box::new(FakeKernel(Arc::clone(tables), PinStatus::Disabled));
    let key = crate::stores::digest::NodeKey::random().unwrap();
    let state = state.map(|s| StateDir::open(s).unwrap());
    let (engine, _inotify) =
        Engine::new(kernel, options, Saver::new(state, None), publisher, key).unwrap();
    (engine, rx)
}

fn stats(opens: u64, reads: u64, bytes: u64) -> AccessStats {
    let now = crate::events::clock::boot_ns_now();
    AccessStats {
        first_open_ns: now,
        last_open_ns: now,
        first_read_ns: if reads > 0 { now } else { 0 },
        last_read_ns: if reads > 0 { now } else { 0 },
        bytes,
        opens,
        reads,
        ..AccessStats::default()
    }
}

#[test]
fn an_access_records_the_version_the_process_read_and_who_reads_the_file() {
    let mut b = Bench::new("access", "");
    let bundle = b.file("bundle.pem", "first");
    let task = b.process();
    b.open(&task, &bundle, stats(1, 1, 5));
    let key = Bench::key_of(&task);
    let entry = b.engine.ledger.get(&key).expect("listed");
    let read = &entry.reads[0];
    assert_eq!(read.bytes, 5);
    let version = read.version.as_ref().expect("a version");
    assert_eq!(version.content.as_ref().unwrap().size, 5);
    let file = read.file.clone().unwrap();
    assert_eq!(
        b.engine.index.readers_of(&file).collect::<Vec<_>>(),
        vec![key]
    );
}

#[test]
fn a_reread_after_a_change_takes_the_new_version() {
    let mut b = Bench::new("reread", "");
    let bundle = b.file("bundle.pem", "first");
    let task = b.process();
    let access = b.open(&task, &bundle, stats(1, 1, 5));
    let key = Bench::key_of(&task);
    let first = b.engine.ledger.get(&key).unwrap().reads[0]
        .version
        .clone()
        .unwrap();
    // The file changes, then the process opens and reads it again.
    std::thread::sleep(Duration::from_millis(20));
    fs::write(&bundle, "second!").unwrap();
    let mut again = stats(2, 2, 12);
    let meta = fs::metadata(&bundle).unwrap();
    again.last_ino = std::os::unix::fs::MetadataExt::ino(&meta);
    b.tables.lock().unwrap().accesses.insert(access, again);
    b.engine.poll(false);
    let read = &b.engine.ledger.get(&key).unwrap().reads[0];
    assert_eq!((read.opens, read.reads, read.bytes), (2, 2, 12));
    let now = read.version.as_ref().unwrap();
    assert_ne!(now.id, first.id, "the re-read holds the new version");
    assert_eq!(now.content.as_ref().unwrap().size, 7);
}

#[test]
fn an_exit_takes_the_final_aggregates_out_of_the_kernel_once() {
    let mut b = Bench::new("exit", "[ledger]\nexit_grace = \"0s\"\n");
    let bundle = b.file("bundle.pem", "content");
    let task = b.process();
    let access = b.open(&task, &bundle, stats(1, 1, 7));
    b.tables
        .lock()
        .unwrap()
        .accesses
        .insert(access, stats(1, 3, 21));
    b.engine.on_event(Event::Exit(task.clone()));
    let t = b.tables.lock().unwrap();
    assert_eq!(t.taken, vec![access], "taken at the exit");
    assert!(
        !t.accesses.contains_key(&access),
        "and gone from the kernel"
    );
    drop(t);
    let entry = b.engine.ledger.get(&Bench::key_of(&task)).unwrap();
    assert!(entry.exited_at.is_some());
    assert_eq!(
        entry.reads[0].bytes, 21,
        "with its last word on what it read"
    );
    // Its grace over, it leaves, and nothing is deleted from the kernel a second time.
    b.engine.housekeeping();
    assert!(b.engine.ledger.get(&Bench::key_of(&task)).is_none(), "left");
    let forgotten = b.tables.lock().unwrap().forgotten.clone();
    assert!(forgotten.is_empty(), "a second delete: {forgotten:?}");
}

#[test]
fn an_exec_forgets_the_old_image_and_drops_its_aggregates() {
    let mut b = Bench::new("exec", "");
    let bundle = b.file("bundle.pem", "content");
    let task = b.process();
    let access = b.open(&task, &bundle, stats(1, 1, 7));
    let mut exec = task.clone();
    exec.comm = "newimage".into();
    b.engine.on_event(Event::Exec(exec));
    let entry = b.engine.ledger.get(&Bench::key_of(&task)).unwrap();
    assert!(entry.reads.is_empty());
    assert_eq!(entry.info.comm, "newimage");
    assert_eq!(b.tables.lock().unwrap().forgotten, vec![access]);
}

#[test]
fn a_repeated_announcement_of_a_known_access_changes_nothing() {
    let mut b = Bench::new("repeat", "");
    let bundle = b.file("bundle.pem", "content");
    let task = b.process();
    b.open(&task, &bundle, stats(1, 1, 7));
    b.open(&task, &bundle, stats(1, 1, 7));
    assert_eq!(
        b.engine
            .ledger
            .get(&Bench::key_of(&task))
            .unwrap()
            .reads
            .len(),
        1
    );
}

/// A certificate from the daemon's fixtures, as text.
fn fixture(name: &str) -> String {
    fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/store_format")
            .join(name),
    )
    .unwrap()
}

impl Bench {
    /// `bundle`, which `key` read, gets new content; the engine learns it and publishes.
    fn replace_under(&mut self, key: &ProcKey, bundle: &Path, content: &str) {
        std::thread::sleep(Duration::from_millis(20));
        fs::write(bundle, content).unwrap();
        let file = self.engine.ledger.get(key).unwrap().reads[0]
            .file
            .clone()
            .unwrap();
        let e = &mut self.engine;
        assert!(e.catalog.refresh(&file, &mut e.watcher, &mut e.io));
        e.publish(true);
    }
}

/// The rotation-storm story: one process read the bundle and was judged fresh; the
/// bundle is rotated, and another process's open finds the new file before the watcher
/// says anything. The first reader is judged again against it, whichever look found it.
#[test]
fn a_rotation_found_by_another_process_open_makes_earlier_readers_stale() {
    let mut b = Bench::new("rotation-found-by-open", "");
    let bundle = b.file("bundle.pem", &fixture("ca.pem"));
    let first = b.process();
    b.open(&first, &bundle, stats(1, 1, 5));
    b.engine.publish(true);
    let first = Bench::key_of(&first);
    assert_eq!(b.engine.publisher.verdict_of(&first), Some(Verdict::Fresh));

    // Rotated by rename (a new inode), and the watcher's events are never taken in here.
    std::thread::sleep(Duration::from_millis(20));
    let next = b.file(".bundle.pem.new", &fixture("v1-root.pem"));
    fs::rename(&next, &bundle).unwrap();
    let second = b.process();
    b.open(&second, &bundle, stats(1, 1, 5));
    b.engine.publish(false);
    assert_eq!(
        b.engine.publisher.verdict_of(&Bench::key_of(&second)),
        Some(Verdict::Fresh)
    );
    assert_eq!(b.engine.publisher.verdict_of(&first), Some(Verdict::Stale));
}

#[test]
fn a_stale_process_is_watched_and_its_reread_notice_makes_it_fresh_without_a_poll() {
    let mut b = Bench::new("reread-notice", "");
    let bundle = b.file("bundle.pem", &fixture("ca.pem"));
    let task = b.process();
    let key = Bench::key_of(&task);
    let access = b.open(&task, &bundle, stats(1, 1, 5));
    b.engine.publish(true);
    assert!(
        b.tables.lock().unwrap().watched.is_empty(),
        "fresh: not watched"
    );

    // The bundle changes under the process: it is stale, and its access is watched.
    b.replace_under(&key, &bundle, &fixture("v1-root.pem"));
    assert_eq!(b.engine.publisher.verdict_of(&key), Some(Verdict::Stale));
    assert_eq!(b.tables.lock().unwrap().watched, vec![access]);

    // It opens the bundle again: the probe's notice alone brings the new version in.
    let mut again = stats(2, 2, 12);
    again.last_ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&bundle).unwrap());
    b.tables.lock().unwrap().accesses.insert(access, again);
    b.engine.on_event(Event::Reread(crate::events::Reread {
        task: task.clone(),
        key: access,
        cause: trustdrift_common::RereadCause::Open,
    }));
    assert_eq!(b.engine.counters.events.get("reread"), Some(&1));
    b.engine.publish(true);
    assert_eq!(b.engine.publisher.verdict_of(&key), Some(Verdict::Fresh));
    assert!(
        b.tables.lock().unwrap().watched.is_empty(),
        "fresh again: the watch is withdrawn"
    );
}

#[test]
fn an_exiting_stale_process_leaves_no_watch_behind() {
    let mut b = Bench::new("reread-exit", "");
    let bundle = b.file("bundle.pem", &fixture("ca.pem"));
    let task = b.process();
    let key = Bench::key_of(&task);
    b.open(&task, &bundle, stats(1, 1, 5));
    b.replace_under(&key, &bundle, &fixture("v1-root.pem"));
    assert_eq!(b.tables.lock().unwrap().watched.len(), 1);
    b.engine.on_event(Event::Exit(task.clone()));
    assert!(b.tables.lock().unwrap().watched.is_empty());
}

#[test]
fn a_restarted_daemon_lists_reads_made_after_its_last_save_before_it_is_ready() {
    let mut b = Bench::with_state("restart-reads");
    let bundle = b.file("bundle.pem", "content");
    let task = b.process();
    // The open is handled before the process reads (the probe's record is that quick),
    // and saved so: no read yet.
    let access = b.open(&task, &bundle, stats(1, 0, 0));
    b.engine.save(true);
    // The read lands in the kernel's aggregate; the daemon is killed before its next
    // poll and save.
    b.tables
        .lock()
        .unwrap()
        .accesses
        .insert(access, stats(1, 1, 7));
    let (engine, rx) = b.restarted();
    let key = Bench::key_of(&task);
    let read = &engine.ledger.get(&key).expect("restored").reads[0];
    assert_eq!((read.opens, read.reads, read.bytes), (1, 1, 7));
    let snapshot = rx.borrow();
    let listed = snapshot.processes.get(&key).expect("in the first snapshot");
    assert_eq!(
        listed.files[0].bytes_read, 7,
        "the snapshot that says ready lists the read"
    );
}
