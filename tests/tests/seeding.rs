//! What the start-up scan finds in processes that were running before the daemon: the
//! same through the probe's task iterators as through /proc.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, Value, bundle, spawn_after_read};

/// A process in a private mount namespace where `certs` is bind-mounted on
/// /etc/ssl/certs, holding /etc/ssl/certs/ca-certificates.crt open; returns once it has it.
fn holder_in_its_own_mount_namespace(certs: &Path) -> Guarded {
    in_its_own_mount_namespace(
        certs,
        "import sys\n\
         f = open('/etc/ssl/certs/ca-certificates.crt', 'rb')\n\
         print('read', flush=True)\n\
         sys.stdin.read()",
    )
}

/// As [`holder_in_its_own_mount_namespace`], with the bundle mapped and its fd closed.
fn mapper_in_its_own_mount_namespace(certs: &Path) -> Guarded {
    in_its_own_mount_namespace(certs, &mapping_script("/etc/ssl/certs/ca-certificates.crt"))
}

/// python3 running `script` in a private mount namespace where `certs` is bind-mounted on
/// /etc/ssl/certs.
fn in_its_own_mount_namespace(certs: &Path, script: &str) -> Guarded {
    let setup = format!(
        "mount --bind {} /etc/ssl/certs && exec /usr/bin/python3 -I -c \"$0\"",
        certs.display()
    );
    spawn_after_read(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &setup,
        script,
    ]))
}

fn holds(p: &Value, path: &str) -> bool {
    p["files"]
        .as_array()
        .is_some_and(|files| files.iter().any(|f| f["path"] == path))
}

#[test]
fn a_bundle_held_open_in_another_mount_namespace_before_the_daemon_started_is_seeded_either_way() {
    seeded_either_way("seed-mntns", |dir| {
        bundle_in_a_mount_namespace(dir, holder_in_its_own_mount_namespace)
    });
}

/// The mapping's file lives on a bind mount the daemon's root cannot reach: its path is
/// the one the process names, from the top of its own mount tree.
#[test]
fn a_bundle_mapped_in_another_mount_namespace_before_the_daemon_started_is_seeded_either_way() {
    seeded_either_way("seed-mntns-mapped", |dir| {
        bundle_in_a_mount_namespace(dir, mapper_in_its_own_mount_namespace)
    });
}

/// /etc/ssl/certs/ca-certificates.crt in a private mount namespace, from `dir`/certs,
/// held by what `start` starts there.
fn bundle_in_a_mount_namespace(dir: &Path, start: fn(&Path) -> Guarded) -> Holder {
    let certs = dir.join("certs");
    fs::create_dir_all(&certs).unwrap();
    Holder {
        bundle: certs.join("ca-certificates.crt"),
        named: "/etc/ssl/certs/ca-certificates.crt".into(),
        start: Box::new(move || start(&certs)),
    }
}

/// Trust material by its suffix alone (no default prefix covers it), mapped, its fd closed.
#[test]
fn a_bundle_mapped_and_closed_before_the_daemon_started_is_seeded_either_way() {
    seeded_either_way("seed-mapped", |dir| {
        let pem = dir.join("service-ca.pem");
        Holder {
            named: pem.to_str().unwrap().to_owned(),
            bundle: pem.clone(),
            start: Box::new(move || mapper_of(&pem)),
        }
    });
}

/// A process that came before the daemon and holds a bundle.
struct Holder {
    /// The bundle, as this test reaches it.
    bundle: PathBuf,
    /// The bundle as the process names it in its root.
    named: String,
    /// Starts the process once the bundle is written; returns once it holds it.
    start: Box<dyn Fn() -> Guarded>,
}

/// With each start-up scan, a process that took hold of a bundle before the daemon
/// started is listed as seeded and fresh, and stale once the bundle is rewritten in place
/// (the inode it holds has other content); the scan is the one asked for, and named every
/// file itself rather than leaving a process to /proc.
fn seeded_either_way(name: &str, holder: impl Fn(&Path) -> Holder) {
    for (seed, logged) in [
        ("probe.seed=auto", "bpf task iterators"),
        ("probe.seed=procfs", "procfs"),
    ] {
        let dir = TempDir::new(name);
        let holder = holder(dir.path());
        let ca = Cert::ca("Held Before Start");
        fs::write(&holder.bundle, bundle(&[&ca])).unwrap();
        let process = (holder.start)();
        let Some(daemon) = Daemon::start(&["--set", seed]) else {
            return;
        };
        let p = daemon.wait_for("seeded and fresh", process.pid(), |p| {
            p["verdict"] == "fresh" && holds(p, &holder.named)
        });
        assert_eq!(p["origin"], "seeded", "{seed}: {p}");
        fs::write(
            &holder.bundle,
            bundle(&[&ca, &Cert::ca("Added After Start")]),
        )
        .unwrap();
        daemon.wait_for("stale", process.pid(), |p| p["verdict"] == "stale");
        let scanned = start_up_scan_line(&daemon);
        assert!(
            scanned.contains(logged),
            "{seed}: {scanned}\n{}",
            daemon.log_warnings().join("\n")
        );
        assert!(scanned.contains("from_proc=0"), "{seed}: {scanned}");
    }
}

/// The daemon's log line that says how the start-up scan found the running processes.
fn start_up_scan_line(daemon: &Daemon) -> String {
    daemon
        .log()
        .lines()
        .find(|l| l.contains("start-up scan of the processes already running"))
        .map(str::to_owned)
        .unwrap_or_default()
}

/// A process that mapped `bundle` and closed its fd: only the mapping holds it.
fn mapper_of(bundle: &Path) -> Guarded {
    let script = mapping_script(bundle.to_str().unwrap());
    spawn_after_read(Command::new("/usr/bin/python3").args(["-I", "-c", &script]))
}

/// python3 that maps `path`, closes its fd and says "read".
fn mapping_script(path: &str) -> String {
    format!(
        "import mmap, sys\n\
         f = open({path:?}, 'rb')\n\
         m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)\n\
         f.close()\n\
         print('read', flush=True)\n\
         sys.stdin.read()"
    )
}
