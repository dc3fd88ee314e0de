//! What was already running when the daemon started. The probe only sees reads from
//! now on; for processes that predate it, /proc tells which trust files they hold open
//! or mapped, and whether they use TLS at all (a TLS library mapped, a JVM, or a Go
//! binary linking crypto/x509).

use std::{collections::HashMap, path::PathBuf};

use object::{Object, ObjectSection};

use crate::{
    probe::trust_paths::TrustPaths,
    process::{
        deadline::{self, Deadline},
        procfs, rootfs,
    },
    stores::identity::FileIdentity,
};

/// A process found in /proc at start-up.
#[derive(Clone, Debug)]
pub struct Found {
    pub pid: u32,
    pub start_ticks: u64,
    pub comm: String,
    pub exe: Option<String>,
    pub cmdline: Option<String>,
    pub uid: u32,
    /// Trust files it holds open or mapped, as paths inside its root.
    pub trust_files: Vec<PathBuf>,
    /// Why it is TLS-capable, if it is.
    pub tls: Option<String>,
}

/// Shared libraries that mean "this process does TLS". Prefixes of the soname.
const TLS_LIBRARIES: &[(&str, &str)] = &[
    ("libssl.so", "libssl"),
    ("libcrypto.so", "libcrypto"),
    ("libgnutls.so", "libgnutls"),
    ("libnss3.so", "libnss3"),
    ("libwolfssl.so", "libwolfssl"),
    ("libmbedtls.so", "libmbedtls"),
    // A JVM carries its own TLS (JSSE) and reads cacerts.
    ("libjvm.so", "java (libjvm)"),
];

/// Go binaries, by executable identity: whether they link crypto/x509.
#[derive(Default)]
pub struct GoBinaries {
    known: HashMap<(u64, u64), bool>,
}

/// The largest `.gopclntab` looked through: Kubernetes' own binaries have ~30 MiB.
const MAX_PCLNTAB: u64 = 256 << 20;

impl GoBinaries {
    /// Whether the executable `pid` runs is a Go binary that links crypto/x509. The very
    /// file the kernel executed is read (through `/proc/<pid>/exe`), under the deadline:
    /// it may sit on a filesystem that never answers.
    fn uses_crypto_x509(&mut self, io: &mut Deadline, pid: u32) -> bool {
        let Ok(handle) = rootfs::open_process_exe(pid) else {
            return false;
        };
        let Ok(id) = rootfs::cached_identity(&handle) else {
            return false;
        };
        if let Some(known) = self.known.get(&id) {
            return *known;
        }
        let answer = io
            .run(deadline::key(("dev", id.0)), move || {
                let st = rustix::fs::fstat(&handle).ok()?;
                let fd = rootfs::reopen_verified(&handle, &FileIdentity::of(&st)).ok()?;
                Some(go_links_crypto_x509(std::fs::File::from(fd)))
            })
            .ok()
            .flatten();
        // Unknown (timed out, unreadable) is not remembered: asked again next time.
        if let Some(answer) = answer {
            self.known.insert(id, answer);
        }
        answer.unwrap_or(false)
    }
}

/// Reads only the ELF headers and, for Go binaries, the function name table.
fn go_links_crypto_x509(file: std::fs::File) -> bool {
    let cache = object::ReadCache::new(file);
    let Ok(elf) = object::File::parse(&cache) else {
        return false;
    };
    if elf.section_by_name(".go.buildinfo").is_none() {
        return false;
    }
    // Function names survive stripping in .gopclntab (the runtime needs them).
    let Some(pclntab) = elf.section_by_name(".gopclntab") else {
        return false;
    };
    if pclntab.size() > MAX_PCLNTAB {
        return false;
    }
    pclntab
        .data()
        .is_ok_and(|d| d.windows(12).any(|w| w == b"crypto/x509."))
}

fn tls_library_in(maps: &str) -> Option<&'static str> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter_map(|p| p.rsplit('/').next())
        .find_map(|name| {
            TLS_LIBRARIES
                .iter()
                .find(|(prefix, _)| name.starts_with(prefix))
                .map(|(_, label)| *label)
        })
}

fn mapped_paths(maps: &str) -> impl Iterator<Item = &str> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| p.starts_with('/'))
}

/// Paths of the trust files `pid` holds open, inside its root.
fn open_trust_files(pid: u32, paths: &TrustPaths) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for fd in procfs::fds(pid) {
        let Ok(path) = procfs::base_dir(pid, fd) else {
            continue;
        };
        if path.is_absolute() && paths.matches(&path.to_string_lossy()) && !out.contains(&path) {
            out.push(path);
        }
    }
    out
}

/// Every user process in /proc but ourselves, with what the daemon can learn about it.
pub fn scan(paths: &TrustPaths, go: &mut GoBinaries, io: &mut Deadline) -> Vec<Found> {
    let me = std::process::id();
    let mut found = Vec::new();
    for pid in procfs::pids() {
        if pid == me {
            continue;
        }
        let Some(maps) = procfs::maps(pid) else {
            continue;
        };
        // Kernel threads map nothing.
        if maps.is_empty() {
            continue;
        }
        let Ok(start_ticks) = procfs::start_ticks(pid) else {
            continue;
        };
        let mut trust_files = open_trust_files(pid, paths);
        for p in mapped_paths(&maps) {
            let p = PathBuf::from(p);
            if paths.matches(&p.to_string_lossy()) && !trust_files.contains(&p) {
                trust_files.push(p);
            }
        }
        let tls = tls_library_in(&maps).map(str::to_owned).or_else(|| {
            go.uses_crypto_x509(io, pid)
                .then(|| "go crypto/x509".to_owned())
        });
        if trust_files.is_empty() && tls.is_none() {
            continue;
        }
        found.push(Found {
            pid,
            start_ticks,
            comm: procfs::comm(pid).unwrap_or_default(),
            exe: procfs::exe_path(pid),
            cmdline: procfs::cmdline(pid),
            uid: procfs::uid(pid).unwrap_or(0),
            trust_files,
            tls,
        });
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_libraries_are_recognised_in_maps() {
        let maps = "7f0000000000-7f0000001000 r-xp 00000000 08:01 1234 /usr/lib/x86_64-linux-gnu/libc.so.6\n\
                    7f0000002000-7f0000003000 r-xp 00000000 08:01 1235 /usr/lib/x86_64-linux-gnu/libssl.so.3\n";
        assert_eq!(tls_library_in(maps), Some("libssl"));
        assert_eq!(tls_library_in("7f0-7f1 r-xp 0 0:0 0 [vdso]\n"), None);
    }

    #[test]
    fn our_own_python_children_are_found_as_tls_capable() {
        let mut child = std::process::Command::new("python3")
            .args(["-c", "import ssl, sys; sys.stdin.read()"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("python3");
        // Give the interpreter time to import ssl (and map libssl).
        let pid = child.id();
        let mut found = None;
        for _ in 0..100 {
            std::thread::sleep(std::time::Duration::from_millis(50));
            found = scan(
                &TrustPaths::defaults(),
                &mut GoBinaries::default(),
                &mut Deadline::new(deadline::Limits::default()),
            )
            .into_iter()
            .find(|f| f.pid == pid && f.tls.is_some());
            if found.is_some() {
                break;
            }
        }
        drop(child.stdin.take());
        let _ = child.wait();
        let found = found.expect("python3 with ssl imported maps a TLS library");
        assert!(found.tls.unwrap().starts_with("lib"));
    }
}
