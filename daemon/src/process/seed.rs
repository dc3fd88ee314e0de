//! What was already running when the daemon started. The probe only sees reads from
//! now on; for processes that predate it, the start-up scan tells which trust files they
//! hold open or mapped, and whether they use TLS at all (a TLS library mapped, a JVM, or
//! a Go binary linking crypto/x509).
//!
//! Two ways to learn it: the probe's task iterators ([`holdings`](super::holdings)), one
//! pass over the kernel's task lists whose cost hardly grows with the processes on the
//! node, then /proc only for the few processes they name; or, where the kernel does not
//! allow iterators (and in lean mode), a pass over /proc that reads each process's maps
//! and fds.

use std::{collections::HashMap, path::PathBuf};

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
    /// Trust files it holds open or mapped.
    pub trust_files: Vec<Held>,
    /// Why it is TLS-capable, if it is.
    pub tls: Option<String>,
}

/// Shared libraries that mean "this process does TLS". Prefixes of the soname (at most
/// 16 bytes: the probe's iterator compares them).
pub const TLS_LIBRARIES: &[(&str, &str)] = &[
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
    pub(super) fn uses_crypto_x509(&mut self, io: &mut Deadline, pid: u32) -> bool {
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

/// Reads only the ELF and section headers, the section names and, for Go binaries, the
/// function name table: never the symbol tables, which a binary with debug info has by
/// tens of MiB (a full parse of one took 60-230 ms, for every distinct executable).
fn go_links_crypto_x509(file: std::fs::File) -> bool {
    use object::{Endianness, FileKind, elf};
    let cache = object::ReadCache::new(file);
    match FileKind::parse(&cache) {
        Ok(FileKind::Elf64) => go_elf::<elf::FileHeader64<Endianness>>(&cache),
        Ok(FileKind::Elf32) => go_elf::<elf::FileHeader32<Endianness>>(&cache),
        _ => None,
    }
    .unwrap_or(false)
}

fn go_elf<Elf>(data: &object::ReadCache<std::fs::File>) -> Option<bool>
where
    Elf: object::read::elf::FileHeader<Endian = object::Endianness>,
{
    use object::read::elf::SectionHeader;
    let header = Elf::parse(data).ok()?;
    let endian = header.endian().ok()?;
    let sections = header.sections(endian, data).ok()?;
    sections.section_by_name(endian, b".go.buildinfo")?;
    // Function names survive stripping in .gopclntab (the runtime needs them).
    let (_, pclntab) = sections.section_by_name(endian, b".gopclntab")?;
    if pclntab.sh_size(endian).into() > MAX_PCLNTAB {
        return Some(false);
    }
    let names = pclntab.data(endian, data).ok()?;
    Some(names.windows(12).any(|w| w == b"crypto/x509."))
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

/// (path, identity) of the files in a maps text (`dev` as `major:minor` in hex, `inode`).
fn mapped_files(maps: &str) -> impl Iterator<Item = (&str, Option<(u64, u64)>)> {
    maps.lines().filter_map(|l| {
        let mut fields = l.split_whitespace();
        let dev = fields.nth(3)?;
        let ino = fields.next()?.parse::<u64>().ok();
        let path = fields.next().filter(|p| p.starts_with('/'))?;
        let (major, minor) = dev.split_once(':')?;
        let dev = u32::from_str_radix(major, 16)
            .ok()
            .zip(u32::from_str_radix(minor, 16).ok())
            .map(|(major, minor)| libc::makedev(major, minor));
        Some((path, dev.zip(ino)))
    })
}

/// A trust file a process holds: its path inside the process's root, and (when known)
/// the inode it holds, which is the only one a version may be attributed from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub path: PathBuf,
    /// (dev, ino), `st_dev` encoding.
    pub identity: Option<(u64, u64)>,
    /// The fd it is open on (`None`: mapped only), to read the very file if it was
    /// replaced since.
    pub fd: Option<i32>,
}

/// Adds `held` unless the same path is already there.
pub(super) fn add_held(list: &mut Vec<Held>, held: Held) {
    if !list.iter().any(|h| h.path == held.path) {
        list.push(held);
    }
}

/// The trust files `pid` holds open, inside its root.
fn open_trust_files(pid: u32, paths: &TrustPaths) -> Vec<Held> {
    let mut out = Vec::new();
    for fd in procfs::fds(pid) {
        let Ok(path) = procfs::base_dir(pid, fd) else {
            continue;
        };
        if path.is_absolute() && paths.matches(&path.to_string_lossy()) {
            let identity = procfs::fd_identity(pid, fd);
            add_held(
                &mut out,
                Held {
                    path,
                    identity,
                    fd: Some(fd),
                },
            );
        }
    }
    out
}

/// What the process `pid` that `candidate` found is, from /proc: `None` if `pid` is no
/// longer that process. Only for the few processes the scan keeps.
pub(super) fn describe(pid: u32, start_ns: Option<u64>, cmdline: bool) -> Option<Found> {
    let start_ticks = procfs::start_ticks(pid).ok()?;
    if let Some(ns) = start_ns.filter(|ns| *ns != 0)
        && procfs::start_ns_to_ticks(ns) != start_ticks
    {
        return None;
    }
    Some(Found {
        pid,
        start_ticks,
        comm: procfs::comm(pid).unwrap_or_default(),
        exe: procfs::exe_path(pid),
        cmdline: if cmdline { procfs::cmdline(pid) } else { None },
        uid: procfs::uid(pid).unwrap_or(0),
        trust_files: Vec::new(),
        tls: None,
    })
}

/// Every user process in /proc but ourselves, with what the daemon can learn about it:
/// each process's maps, and its fds, read one by one.
pub fn scan_procfs(
    paths: &TrustPaths,
    go: &mut GoBinaries,
    io: &mut Deadline,
    cmdline: bool,
) -> Vec<Found> {
    let me = std::process::id();
    procfs::pids()
        .into_iter()
        .filter(|pid| *pid != me)
        .filter_map(|pid| scan_one_procfs(pid, paths, go, io, cmdline))
        .collect()
}

/// What /proc says process `pid` holds, if it holds trust files or uses TLS.
pub(super) fn scan_one_procfs(
    pid: u32,
    paths: &TrustPaths,
    go: &mut GoBinaries,
    io: &mut Deadline,
    cmdline: bool,
) -> Option<Found> {
    let maps = procfs::maps(pid)?;
    // Kernel threads map nothing.
    if maps.is_empty() {
        return None;
    }
    let mut trust_files = open_trust_files(pid, paths);
    for (p, identity) in mapped_files(&maps) {
        if paths.matches(p) {
            let held = Held {
                path: PathBuf::from(p),
                identity,
                fd: None,
            };
            add_held(&mut trust_files, held);
        }
    }
    let tls = tls_library_in(&maps).map(str::to_owned).or_else(|| {
        go.uses_crypto_x509(io, pid)
            .then(|| "go crypto/x509".to_owned())
    });
    if trust_files.is_empty() && tls.is_none() {
        return None;
    }
    let mut process = describe(pid, None, cmdline)?;
    process.trust_files = trust_files;
    process.tls = tls;
    Some(process)
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
    fn a_go_binary_that_links_crypto_x509_is_told_from_the_rest() {
        let open = |p: &str| std::fs::File::open(p);
        assert!(!go_links_crypto_x509(open("/proc/self/exe").unwrap()));
        assert!(!go_links_crypto_x509(open("/bin/sh").unwrap()));
        // Go clients of TLS, where this machine has one.
        for go in ["/usr/bin/kubectl", "/usr/bin/prometheus"] {
            if let Ok(file) = open(go) {
                assert!(go_links_crypto_x509(file), "{go}");
            }
        }
    }

    #[test]
    fn mapped_files_carry_their_identity() {
        let maps = "7f0000000000-7f0000001000 r--s 00000000 fd:01 1234 /etc/ssl/certs/ca.pem\n\
                    7f0000002000-7f0000003000 rw-p 00000000 00:00 0 \n\
                    7f0-7f1 r-xp 0 00:00 0 [vdso]\n";
        let files: Vec<_> = mapped_files(maps).collect();
        assert_eq!(
            files,
            vec![(
                "/etc/ssl/certs/ca.pem",
                Some((libc::makedev(0xfd, 1), 1234))
            )]
        );
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
            found = scan_procfs(
                &TrustPaths::defaults(),
                &mut GoBinaries::default(),
                &mut Deadline::new(deadline::Limits::default()),
                false,
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
