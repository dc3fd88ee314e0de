//! What the start-up scan finds in processes that were running before the daemon: the
//! same through the probe's task iterators as through /proc.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, Value, bundle};

/// A process in a private mount namespace where `certs` is bind-mounted on
/// /etc/ssl/certs, holding /etc/ssl/certs/ca-certificates.crt open; returns once it has it.
fn holder_in_its_own_mount_namespace(certs: &Path) -> Guarded {
    let script = "import sys\n\
                  f = open('/etc/ssl/certs/ca-certificates.crt', 'rb')\n\
                  print('loaded', flush=True)\n\
                  sys.stdin.read()";
    let setup = format!(
        "mount --bind {} /etc/ssl/certs && exec /usr/bin/python3 -I -c \"$0\"",
        certs.display()
    );
    let mut holder = Guarded::spawn(
        Command::new("unshare")
            .args([
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &setup,
                script,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped()),
    );
    let mut line = String::new();
    BufReader::new(holder.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "loaded", "the holder did not open its bundle");
    holder
}

fn holds(p: &Value, path: &str) -> bool {
    p["files"]
        .as_array()
        .is_some_and(|files| files.iter().any(|f| f["path"] == path))
}

#[test]
fn a_bundle_held_open_in_another_mount_namespace_before_the_daemon_started_is_seeded_either_way() {
    for seed in ["probe.seed=auto", "probe.seed=procfs"] {
        let dir = TempDir::new("seed-mntns");
        let certs = dir.join("certs");
        fs::create_dir_all(&certs).unwrap();
        let ca = Cert::ca("Held Before Start");
        fs::write(certs.join("ca-certificates.crt"), bundle(&[&ca])).unwrap();
        let holder = holder_in_its_own_mount_namespace(&certs);
        let Some(daemon) = Daemon::start(&["--set", seed]) else {
            return;
        };
        let p = daemon.wait_for("seeded and fresh", holder.pid(), |p| {
            p["verdict"] == "fresh" && holds(p, "/etc/ssl/certs/ca-certificates.crt")
        });
        assert_eq!(p["origin"], "seeded", "{seed}: {p}");
        // Rewritten in place: the inode it holds now has other content.
        fs::write(
            certs.join("ca-certificates.crt"),
            bundle(&[&ca, &Cert::ca("Added After Start")]),
        )
        .unwrap();
        daemon.wait_for("stale", holder.pid(), |p| p["verdict"] == "stale");
        let scanned = daemon
            .log()
            .lines()
            .find(|l| l.contains("start-up scan of the processes already running"))
            .map(str::to_owned)
            .unwrap_or_default();
        if seed == "probe.seed=procfs" {
            assert!(scanned.contains("procfs"), "{scanned}");
        }
    }
}
