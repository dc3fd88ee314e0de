//! The daemon killed at any moment: every read a process made before the kill is listed
//! after the restart, with what it read, and judged on the next change. The probe stays
//! pinned across the kill (records the dead daemon never took wait in its ring buffer);
//! what the dead daemon took and had not saved comes back from its crash journal.

use std::{
    fs,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use trustdrift_e2e::{
    Cert, Daemon, DaemonSetup, Guarded, PinDir, TempDir, Value, bundle, python_reader, random_u64,
    sha256_hex,
};

/// Kills, each at a random moment from 0 to 3 s after the round's reads.
const KILLS: usize = 20;
const LATEST_KILL_MS: u64 = 3000;

/// A small, reproducible sequence (xorshift64*): the seed is printed, and
/// `TRUSTDRIFT_CRASH_SEED` replays a failing run's moments.
struct Moments(u64);

impl Moments {
    fn next_ms(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % (LATEST_KILL_MS + 1)
    }
}

/// What a reader read, as the daemon must list it.
fn read_as_listed(p: &Value, path: &str, size: u64, sha: &str) -> bool {
    p["files"].as_array().is_some_and(|files| {
        files.iter().any(|f| {
            f["path"] == path
                && f["bytes_read"].as_u64() == Some(size)
                && f["read_version"]["sha256"] == sha
        })
    })
}

#[test]
fn a_daemon_killed_at_any_moment_after_reads_loses_none_of_them() {
    killed_at_random_moments(KILLS, false);
}

/// As the DaemonSet runs it: the journal in a directory of its own (the node's /run).
#[test]
fn a_daemon_whose_journal_lives_apart_from_its_state_loses_nothing_when_killed() {
    killed_at_random_moments(KILLS / 4, true);
}

/// `kills` rounds of reads, each followed by a SIGKILL at a random moment and a restart;
/// with `journal_apart`, the crash journal lives in a directory of its own.
fn killed_at_random_moments(kills: usize, journal_apart: bool) {
    let dir = TempDir::new("crash");
    let state = dir.join("state");
    let journal_dir = dir.join("run");
    let pins = PinDir::new("crash");
    let setup = || DaemonSetup {
        state_dir: Some(&state),
        pin_dir: Some(pins.path()),
        env: if journal_apart {
            vec![(
                "TRUSTDRIFT_STATE_JOURNAL_DIR",
                journal_dir.to_string_lossy().into_owned(),
            )]
        } else {
            Vec::new()
        },
        ..DaemonSetup::default()
    };
    let path = dir.join("bundle.pem");
    let first_ca = Cert::ca("Held Across Crashes");
    let text = bundle(&[&first_ca]);
    fs::write(&path, &text).unwrap();
    let (size, sha) = (text.len() as u64, sha256_hex(text.as_bytes()));
    let path_str = path.to_str().unwrap().to_owned();
    let seed = std::env::var("TRUSTDRIFT_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| random_u64() | 1);
    eprintln!("crash moments: TRUSTDRIFT_CRASH_SEED={seed}");
    let mut moments = Moments(seed);

    let Some(mut daemon) = Daemon::start_with(&[], setup()) else {
        return;
    };
    // Readers that stay (judged stale at the end) and readers gone before the kill (their
    // exit, and the aggregate taken from the kernel at it, must survive too).
    let mut staying: Vec<Guarded> = Vec::new();
    let mut gone: Vec<u32> = Vec::new();
    for round in 0..kills {
        staying.push(python_reader(&path));
        let mut once = Guarded::spawn(
            Command::new("/usr/bin/python3")
                .args(["-I", "-c", &format!("open({path_str:?}, 'rb').read()")])
                .stdin(Stdio::null()),
        );
        assert!(once.wait(Duration::from_secs(20)).success());
        gone.push(once.pid());
        let after = moments.next_ms();
        thread::sleep(Duration::from_millis(after));
        daemon.kill();
        daemon = Daemon::start_with(&[], setup()).expect("the daemon restarts");
        let last = staying.last().map(Guarded::pid).unwrap_or_default();
        for pid in [last, *gone.last().unwrap_or(&0)] {
            daemon.wait_for(
                &format!("listed with its read after kill {round} ({after} ms after it)"),
                pid,
                |p| read_as_listed(p, &path_str, size, &sha),
            );
        }
    }
    // Nothing of the earlier rounds went missing in the later kills.
    for pid in staying.iter().map(Guarded::pid).chain(gone.iter().copied()) {
        let p = daemon
            .process(pid)
            .unwrap_or_else(|| panic!("process {pid} is not listed any more:\n{}", daemon.log()));
        assert!(
            read_as_listed(&p, &path_str, size, &sha),
            "{p:#}\ndaemon log:\n{}",
            daemon.log()
        );
    }
    // The last exit may still wait in the pinned ring buffer when the daemon says ready:
    // records the dead daemon never took are handled after the start-up.
    for pid in &gone {
        daemon.wait_for("listed as exited", *pid, |p| !p["exited_at"].is_null());
    }

    // The store changes: every reader still running is stale, since its first read.
    fs::write(&path, bundle(&[&first_ca, &Cert::ca("After The Crashes")])).unwrap();
    for reader in &staying {
        let p = daemon.wait_for("stale", reader.pid(), |p| p["verdict"] == "stale");
        assert_eq!(
            p["files"][0]["missing_cas"][0]["subject"], "CN=After The Crashes",
            "{p:#}"
        );
    }
    let metrics = daemon.metrics();
    assert!(
        metrics.contains("trustdrift_state_journal_overflows_total 0"),
        "the journal never overflowed"
    );
    // The journal is where it was told to be, and only there.
    let (used, unused) = if journal_apart {
        (&journal_dir, &state)
    } else {
        (&state, &journal_dir)
    };
    assert!(
        used.join("journal").is_file(),
        "no journal in {}",
        used.display()
    );
    assert!(
        !unused.join("journal").exists(),
        "a journal in {} too",
        unused.display()
    );
}
