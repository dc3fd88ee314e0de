//! Scenario 6 — a rotation storm: 200 processes read the store while it changes three
//! times within a second. Every process must get the right verdict, and a diff against
//! the version it actually read (each reader reports the SHA-256 of the bytes it got).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use trustdrift_e2e::{Cert, Daemon, Guarded, TempDir, Value, replace_atomically, sha256_hex};

use crate::support::{alone, record, shas};

const READERS: usize = 200;

#[test]
fn two_hundred_readers_during_three_rotations_each_get_a_diff_against_what_they_read() {
    let _alone = alone();
    let dir = TempDir::new("storm");
    let path = dir.join("ca-bundle.pem");
    let cas: Vec<Cert> = (0..5).map(|i| Cert::ca(&format!("Storm CA {i}"))).collect();
    // v2 drops CA 0: readers of v0 and v1 still trust a removed CA afterwards.
    let versions: Vec<Vec<usize>> =
        vec![vec![0, 1], vec![0, 1, 2], vec![1, 2, 3], vec![1, 2, 3, 4]];
    let text = |v: &[usize]| -> String { v.iter().map(|i| cas[*i].pem.as_str()).collect() };
    let by_sha: BTreeMap<String, usize> = versions
        .iter()
        .enumerate()
        .map(|(i, v)| (sha256_hex(text(v).as_bytes()), i))
        .collect();
    fs::write(&path, text(&versions[0])).unwrap();
    let Some(daemon) = Daemon::start(&[]) else {
        return;
    };

    let script = format!(
        "import hashlib, sys\nd = open({:?}, 'rb').read()\n\
         print(hashlib.sha256(d).hexdigest(), flush=True)\nsys.stdin.read()",
        path.to_str().unwrap()
    );
    let spawn = || {
        Guarded::spawn(
            Command::new("/usr/bin/python3")
                .args(["-I", "-S", "-c", &script])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped()),
        )
    };
    // The store is in use before the storm (as a production bundle is): the daemon knows
    // it and watches it, so each rotation is a version it saw.
    let mut readers: Vec<Guarded> = Vec::with_capacity(READERS);
    readers.push(spawn());
    daemon.wait_for("the first reader", readers[0].pid(), |p| {
        p["verdict"] == "fresh"
    });
    // Then readers start while the store rotates three times within a second.
    let started = Instant::now();
    let mut next_version = 1;
    let mut last_change = started;
    while readers.len() < READERS {
        readers.push(spawn());
        let due = readers.len() >= READERS / 4 && next_version < versions.len();
        let spaced = next_version == 1 || last_change.elapsed() >= Duration::from_millis(300);
        if due && spaced {
            replace_atomically(&path, &text(&versions[next_version]));
            last_change = Instant::now();
            next_version += 1;
        }
    }
    while next_version < versions.len() {
        thread::sleep(Duration::from_millis(300).saturating_sub(last_change.elapsed()));
        replace_atomically(&path, &text(&versions[next_version]));
        last_change = Instant::now();
        next_version += 1;
    }
    let mut read_version: BTreeMap<u32, usize> = BTreeMap::new();
    for r in &mut readers {
        let mut line = String::new();
        BufReader::new(r.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v = *by_sha
            .get(line.trim())
            .unwrap_or_else(|| panic!("a reader got bytes of no version: {line}"));
        read_version.insert(r.pid(), v);
    }
    let spread: BTreeSet<usize> = read_version.values().copied().collect();
    eprintln!("storm: readers per version read: {:?}", {
        let mut c = BTreeMap::new();
        for v in read_version.values() {
            *c.entry(v).or_insert(0) += 1;
        }
        c
    });
    assert!(
        spread.len() >= 2,
        "the readers raced the rotations: {spread:?}"
    );

    let last = versions.len() - 1;
    let expect = |v: usize| -> (BTreeSet<String>, BTreeSet<String>) {
        let read: BTreeSet<usize> = versions[v].iter().copied().collect();
        let now: BTreeSet<usize> = versions[last].iter().copied().collect();
        (
            now.difference(&read)
                .map(|i| cas[*i].sha256.clone())
                .collect(),
            read.difference(&now)
                .map(|i| cas[*i].sha256.clone())
                .collect(),
        )
    };
    let check = |p: &Value| -> Result<(), String> {
        let pid = p["pid"].as_u64().unwrap() as u32;
        let v = read_version[&pid];
        let f = p["files"]
            .as_array()
            .and_then(|f| f.iter().find(|f| f["path"] == path.to_str().unwrap()))
            .ok_or("no file entry")?;
        let want = if v == last { "fresh" } else { "stale" };
        if p["verdict"] != want {
            return Err(format!("read v{v}, verdict {} (want {want})", p["verdict"]));
        }
        let (missing, removed) = expect(v);
        let got_missing: BTreeSet<String> = shas(&f["missing_cas"]).into_iter().collect();
        let got_removed: BTreeSet<String> = shas(&f["removed_cas_trusted"]).into_iter().collect();
        if got_missing != missing || got_removed != removed {
            return Err(format!(
                "read v{v}: missing {got_missing:?} removed {got_removed:?}, want {missing:?} {removed:?}"
            ));
        }
        Ok(())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let listed = daemon.processes();
        let mut wrong = Vec::new();
        for pid in read_version.keys() {
            match listed.iter().find(|p| p["pid"] == *pid) {
                Some(p) => {
                    if let Err(e) = check(p) {
                        wrong.push(format!("{pid}: {e}"));
                    }
                }
                None => wrong.push(format!("{pid}: not listed")),
            }
        }
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {READERS} readers wrong, e.g. {:?}",
            wrong.len(),
            &wrong[..wrong.len().min(5)]
        );
        thread::sleep(Duration::from_millis(200));
    }
    record(
        "rotation-storm",
        "all 200 verdicts right",
        last_change.elapsed(),
    );
    let (status, metrics) = daemon.get("/metrics");
    assert_eq!(status, 200);
    let losses: u64 = metrics
        .as_str()
        .unwrap()
        .lines()
        .filter(|l| l.starts_with("trustdrift_events_lost_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert_eq!(
        losses,
        0,
        "nothing lost in the storm: {:?}",
        metrics
            .as_str()
            .unwrap()
            .lines()
            .filter(|l| l.starts_with("trustdrift_events_lost_total{") && !l.ends_with(" 0"))
            .collect::<Vec<_>>()
    );
}
