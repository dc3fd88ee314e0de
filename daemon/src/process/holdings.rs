//! What the probe's start-up iterators say running processes hold, gathered per process
//! and narrowed to what a verdict needs: trust files open or mapped (the probe's filter
//! is a superset; the exact rules apply here), TLS libraries mapped, and for the rest
//! their executable, so that a Go binary is examined once however many processes run it.
//! /proc is then read only for the processes kept.

use std::{
    collections::{BTreeMap, HashMap},
    ffi::OsStr,
    os::unix::ffi::OsStrExt,
    path::PathBuf,
};

use trustdrift_common::{SeedRecord, seed_flags, seed_kind};

use crate::{
    events::decode::userspace_dev,
    probe::{
        iterators::{SeedEntry, SeedIterators},
        trust_paths::TrustPaths,
    },
    process::{
        deadline::Deadline,
        procfs,
        seed::{self, Found, GoBinaries, Held, TLS_LIBRARIES},
    },
};

/// What the iterators said about one process.
#[derive(Debug, Default)]
struct Holding {
    start_ns: u64,
    /// Files it holds that the probe's filter let through, as the kernel names them.
    files: Vec<HeldFile>,
    tls: Option<&'static str>,
    /// (dev, ino) of its executable, the kernel's encoding.
    exe: Option<(u32, u64)>,
    /// Its root is elsewhere than its paths say (see `seed_flags::ROOT_ELSEWHERE`).
    root_elsewhere: bool,
    /// A file it holds had a path too long to send: read its fds and maps from /proc.
    incomplete: bool,
}

#[derive(Debug)]
struct HeldFile {
    path: PathBuf,
    dev: u32,
    ino: u64,
    fd: Option<i32>,
}

/// Every process the iterators reported, by tgid.
#[derive(Debug, Default)]
pub struct Holdings {
    by_tgid: BTreeMap<u32, Holding>,
    pub records: u64,
}

impl Holdings {
    /// Runs the iterators and gathers what they send.
    pub fn read(iterators: SeedIterators) -> std::io::Result<Self> {
        let mut holdings = Self::default();
        iterators.read(|entry| holdings.add(&entry))?;
        Ok(holdings)
    }

    fn add(&mut self, entry: &SeedEntry<'_>) {
        let r: &SeedRecord = &entry.record;
        self.records += 1;
        let h = self.by_tgid.entry(r.tgid).or_default();
        h.start_ns = r.start_ns;
        h.root_elsewhere |= r.flags & seed_flags::ROOT_ELSEWHERE != 0;
        match r.kind {
            seed_kind::FD | seed_kind::MAPPED => {
                let Some(path) = entry.path else {
                    h.incomplete |= r.flags & seed_flags::PATH_TOO_LONG != 0;
                    return;
                };
                let fd = (r.kind == seed_kind::FD).then_some(r.detail as i32);
                h.files.push(HeldFile {
                    path: PathBuf::from(OsStr::from_bytes(path)),
                    dev: r.dev,
                    ino: r.ino,
                    fd,
                });
            }
            seed_kind::TLS_LIBRARY => {
                if let Some((_, label)) = TLS_LIBRARIES.get(r.detail as usize) {
                    h.tls.get_or_insert(label);
                }
            }
            seed_kind::EXE => h.exe = Some((r.dev, r.ino)),
            _ => {}
        }
    }

    /// Processes a file of which the iterators could not name (its path too long, or
    /// its walk cut short): [`Holdings::found`] reads them from /proc.
    pub fn incomplete(&self) -> usize {
        self.by_tgid.values().filter(|h| h.incomplete).count()
    }

    pub fn processes(&self) -> usize {
        self.by_tgid.len()
    }

    /// The processes that hold trust files or use TLS, with what /proc says of them.
    pub fn found(
        self,
        paths: &TrustPaths,
        go: &mut GoBinaries,
        io: &mut Deadline,
        cmdline: bool,
    ) -> Vec<Found> {
        let me = std::process::id();
        let mut found = Vec::new();
        // Where init is hidden from the iterators (as in some VMs), /proc may still say.
        if !self.by_tgid.contains_key(&1) {
            found.extend(seed::scan_one_procfs(1, paths, go, io, cmdline));
        }
        let mut kept: Vec<(u32, Holding, Vec<Held>)> = Vec::new();
        // Processes with nothing but an executable, by that executable.
        let mut by_exe: HashMap<(u32, u64), Vec<(u32, Holding)>> = HashMap::new();
        for (tgid, mut h) in self.by_tgid {
            if tgid == me {
                continue;
            }
            if h.incomplete {
                // Rare (a path over PATH_MAX): this one process the long way.
                found.extend(seed::scan_one_procfs(tgid, paths, go, io, cmdline));
                continue;
            }
            let held = trust_files(tgid, &mut h, paths);
            if !held.is_empty() || h.tls.is_some() {
                kept.push((tgid, h, held));
            } else if let Some(exe) = h.exe {
                by_exe.entry(exe).or_default().push((tgid, h));
            }
        }
        // One Go check per executable: any process running it answers for all of them.
        for (_, group) in by_exe {
            let links_x509 = group
                .iter()
                .take(3)
                .find(|(tgid, h)| procfs::is_same_process(*tgid, h.start_ns))
                .is_some_and(|(tgid, _)| go.uses_crypto_x509(io, *tgid));
            if links_x509 {
                for (tgid, mut h) in group {
                    h.tls = Some("go crypto/x509");
                    kept.push((tgid, h, Vec::new()));
                }
            }
        }
        for (tgid, h, held) in kept {
            let Some(mut process) = seed::describe(tgid, Some(h.start_ns), cmdline) else {
                continue;
            };
            process.trust_files = held;
            process.tls = h.tls.map(str::to_owned);
            found.push(process);
        }
        found.sort_by_key(|f| f.pid);
        found
    }
}

/// The trust files among what `h` holds, as paths inside the process's root.
fn trust_files(tgid: u32, h: &mut Holding, paths: &TrustPaths) -> Vec<Held> {
    let root = if h.root_elsewhere && !h.files.is_empty() {
        procfs::root_path(tgid)
    } else {
        None
    };
    let mut out = Vec::new();
    for f in h.files.drain(..) {
        let path = match &root {
            Some(root) => procfs::strip_root(&f.path, root),
            None => f.path,
        };
        if path.is_absolute() && paths.matches(&path.to_string_lossy()) {
            seed::add_held(
                &mut out,
                Held {
                    path,
                    identity: Some((userspace_dev(f.dev), f.ino)),
                    fd: f.fd,
                },
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        kind: u32,
        tgid: u32,
        path: Option<&'static [u8]>,
    ) -> (SeedRecord, Option<&'static [u8]>) {
        (
            SeedRecord {
                kind,
                tgid,
                start_ns: 5,
                ino: 9,
                dev: 0x0fe0_0001,
                detail: 3,
                ..SeedRecord::default()
            },
            path,
        )
    }

    #[test]
    fn records_gather_per_process_and_the_exact_filter_applies() {
        let mut h = Holdings::default();
        for (record, path) in [
            entry(
                seed_kind::FD,
                10,
                Some(b"/etc/ssl/certs/ca-certificates.crt"),
            ),
            entry(seed_kind::FD, 10, Some(b"/etc/ssl/openssl.cnf")),
            entry(seed_kind::TLS_LIBRARY, 11, None),
            entry(seed_kind::EXE, 12, None),
        ] {
            h.add(&SeedEntry { record, path });
        }
        assert_eq!(h.processes(), 3);
        let mut ten = h.by_tgid.remove(&10).unwrap();
        let held = trust_files(10, &mut ten, &TrustPaths::defaults());
        assert_eq!(
            held,
            vec![Held {
                path: "/etc/ssl/certs/ca-certificates.crt".into(),
                identity: Some((userspace_dev(0x0fe0_0001), 9)),
                fd: Some(3),
            }]
        );
        assert_eq!(h.by_tgid[&11].tls, Some(TLS_LIBRARIES[3].1));
        assert_eq!(h.by_tgid[&12].exe, Some((0x0fe0_0001, 9)));
    }
}
