//! Ring-buffer records decoded into owned, typed events. A record of unknown kind or the
//! wrong size is an error the caller counts, never a transmute.

use std::{ffi::OsStr, mem::size_of, os::unix::ffi::OsStrExt, path::PathBuf};

use thiserror::Error;
use trustdrift_common::{
    AccessEvent, AccessKey, COMM_LEN, EventHeader, EventKind, KPATH_CAP, PATH_CAP, ProcEvent,
    RereadCause, RereadEvent, UnknownDiscriminant, kpath_flags, match_flags,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is shorter than its {need}-byte {what}")]
    Short {
        what: &'static str,
        len: usize,
        need: usize,
    },
    #[error("record of unknown kind {0}")]
    UnknownKind(u32),
    #[error("access record claims a {0}-byte path, longer than the probe ever sends")]
    PathTooLong(u32),
    #[error("access record claims a {0}-byte kernel path, longer than the probe ever sends")]
    KernelPathTooLong(u32),
}

impl From<UnknownDiscriminant> for DecodeError {
    fn from(UnknownDiscriminant(v): UnknownDiscriminant) -> Self {
        DecodeError::UnknownKind(v)
    }
}

/// Who did it, as the probe saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// `CLOCK_BOOTTIME` ns; 0 when the probe could not read it.
    pub start_ns: u64,
    pub ts_ns: u64,
    pub cgroup_id: u64,
    pub mnt_ns: u32,
    pub exec_seq: u32,
    pub comm: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Access {
    pub task: Task,
    pub key: AccessKey,
    pub dir_path_hash: u64,
    pub open_flags: u32,
    pub dirfd: i32,
    /// -1 when not observed (lean mode).
    pub fd: i32,
    /// The opened file's inode and device (`st_ino`, `st_dev` as stat reports them), when
    /// the probe could read them.
    pub inode: Option<(u64, u64)>,
    pub match_flags: u32,
    /// The path exactly as the process passed it.
    pub path: PathBuf,
    /// The opened file's path in the process's root as the kernel knew it at the open
    /// (its dentries and mounts), when the probe could tell.
    pub kernel_path: Option<PathBuf>,
}

impl Access {
    /// How the kernel filter matched, for people.
    pub fn matched_by(&self) -> Vec<&'static str> {
        [
            (match_flags::PREFIX, "prefix"),
            (match_flags::SUFFIX, "suffix"),
            (match_flags::TRACKED_DIRFD, "tracked-dirfd"),
            (match_flags::TRUNCATED, "truncated"),
            (match_flags::LEAN, "lean"),
        ]
        .into_iter()
        .filter(|(bit, _)| self.match_flags & bit != 0)
        .map(|(_, name)| name)
        .collect()
    }
}

/// A watched access moved (see `Probe::watch_reread`): its process re-opened the path or
/// read from it. Sent once per watch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reread {
    /// Who, and when; `mnt_ns` is 0 (the access being watched says it already).
    pub task: Task,
    pub key: AccessKey,
    pub cause: RereadCause,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Access(Access),
    Exec(Task),
    Exit(Task),
    Reread(Reread),
}

fn read<T: aya::Pod>(bytes: &[u8], what: &'static str) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Short {
            what,
            len: bytes.len(),
            need: size_of::<T>(),
        });
    }
    // SAFETY: length checked; `Pod` promises any bytes are a valid T; read_unaligned
    // copes with the ring buffer's 8-byte alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// The kernel's internal dev_t (MAJOR << 20 | MINOR) as stat(2) reports it (glibc's
/// makedev encoding).
pub fn userspace_dev(kernel: u32) -> u64 {
    let major = u64::from(kernel >> 20);
    let minor = u64::from(kernel & 0xf_ffff);
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

fn comm(raw: &[u8; COMM_LEN]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(COMM_LEN);
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

fn task(h: &EventHeader) -> Task {
    Task {
        tgid: h.tgid,
        tid: h.tid,
        uid: h.uid,
        start_ns: h.start_ns,
        ts_ns: h.ts_ns,
        cgroup_id: h.cgroup_id,
        mnt_ns: h.mnt_ns,
        exec_seq: h.exec_seq,
        comm: comm(&h.comm),
    }
}

pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let header: EventHeader = read(bytes, "header")?;
    match EventKind::try_from(header.kind)? {
        EventKind::Access => {
            let e: AccessEvent = read(bytes, "access record")?;
            let len = e.path_len as usize;
            if len >= PATH_CAP {
                return Err(DecodeError::PathTooLong(e.path_len));
            }
            let path = bytes
                .get(size_of::<AccessEvent>()..)
                .and_then(|tail| tail.get(..len))
                .ok_or(DecodeError::Short {
                    what: "access record and its path",
                    len: bytes.len(),
                    need: size_of::<AccessEvent>() + len,
                })?;
            let klen = e.kpath_len as usize;
            if klen >= KPATH_CAP {
                return Err(DecodeError::KernelPathTooLong(e.kpath_len));
            }
            let kernel_path = if klen == 0 {
                None
            } else {
                let start = size_of::<AccessEvent>() + len + 1;
                let raw = bytes.get(start..start + klen).ok_or(DecodeError::Short {
                    what: "access record and its kernel path",
                    len: bytes.len(),
                    need: start + klen,
                })?;
                // Only a whole path in the process's root names the opened file there.
                let whole = e.kpath_flags & kpath_flags::REACHED_ROOT != 0
                    && e.kpath_flags
                        & (kpath_flags::TRUNCATED | kpath_flags::UNREACHABLE | kpath_flags::FAILED)
                        == 0
                    && raw.first() == Some(&b'/');
                whole.then(|| PathBuf::from(OsStr::from_bytes(raw)))
            };
            Ok(Event::Access(Access {
                task: task(&e.header),
                key: e.key,
                dir_path_hash: e.dir_path_hash,
                open_flags: e.open_flags,
                dirfd: e.dirfd,
                fd: e.fd,
                inode: (e.ino != 0).then(|| (e.ino, userspace_dev(e.dev))),
                match_flags: e.match_flags,
                path: PathBuf::from(OsStr::from_bytes(path)),
                kernel_path,
            }))
        }
        EventKind::Exec => {
            let e: ProcEvent = read(bytes, "exec record")?;
            Ok(Event::Exec(task(&e.header)))
        }
        EventKind::Exit => {
            let e: ProcEvent = read(bytes, "exit record")?;
            Ok(Event::Exit(task(&e.header)))
        }
        EventKind::Reread => {
            let e: RereadEvent = read(bytes, "re-read record")?;
            Ok(Event::Reread(Reread {
                task: task(&e.header),
                key: e.key,
                cause: RereadCause::try_from(e.cause)?,
            }))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: u32) -> EventHeader {
        let mut comm = [0u8; COMM_LEN];
        comm[..7].copy_from_slice(b"python3");
        EventHeader {
            kind,
            tgid: 42,
            tid: 43,
            uid: 0,
            start_ns: 7,
            ts_ns: 9,
            cgroup_id: 1,
            mnt_ns: 4026531841,
            exec_seq: 0,
            comm,
        }
    }

    fn bytes_of<T>(v: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-data value.
        unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), size_of::<T>()) }.to_vec()
    }

    fn access_record(path: &[u8]) -> Vec<u8> {
        let event = AccessEvent {
            header: header(EventKind::Access as u32),
            key: AccessKey {
                tgid: 42,
                exec_seq: 0,
                start_ns: 7,
                path_hash: 99,
            },
            dir_path_hash: 0,
            open_flags: 0,
            dirfd: -100,
            fd: 3,
            match_flags: match_flags::PREFIX | match_flags::SUFFIX,
            ino: 0,
            dev: 0,
            path_len: path.len() as u32,
            kpath_len: 0,
            kpath_flags: 0,
        };
        let mut bytes = bytes_of(&event);
        bytes.extend_from_slice(path);
        bytes.push(0);
        bytes
    }

    /// An access record with the kernel's path of the opened file after the path.
    fn access_record_with_kernel_path(path: &[u8], kpath: &[u8], flags: u32) -> Vec<u8> {
        let mut bytes = access_record(path);
        let mut event: AccessEvent = read(&bytes, "test").unwrap();
        event.kpath_len = kpath.len() as u32;
        event.kpath_flags = flags;
        bytes[..size_of::<AccessEvent>()].copy_from_slice(&bytes_of(&event));
        bytes.extend_from_slice(kpath);
        bytes.push(0);
        bytes
    }

    #[test]
    fn the_kernel_path_of_the_opened_file_follows_the_path_when_whole() {
        let whole = access_record_with_kernel_path(
            b"certs/ca.pem",
            b"/opt/app/certs/ca.pem",
            kpath_flags::REACHED_ROOT,
        );
        let Event::Access(a) = decode(&whole).unwrap() else {
            panic!("not an access");
        };
        assert_eq!(a.path, PathBuf::from("certs/ca.pem"));
        assert_eq!(a.kernel_path, Some(PathBuf::from("/opt/app/certs/ca.pem")));
        // Outside the process's root, or cut: not a path in its root, so not used.
        for flags in [
            kpath_flags::UNREACHABLE,
            kpath_flags::REACHED_ROOT | kpath_flags::TRUNCATED,
        ] {
            let r = access_record_with_kernel_path(b"ca.pem", b"/x/ca.pem", flags);
            assert!(matches!(decode(&r), Ok(Event::Access(a)) if a.kernel_path.is_none()));
        }
        // A length past the record is an error, not a read out of bounds.
        let mut cut = whole.clone();
        cut.truncate(cut.len() - 5);
        assert!(matches!(decode(&cut), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn a_reread_record_names_its_access_and_cause_and_rejects_an_unknown_cause() {
        let key = AccessKey {
            tgid: 42,
            exec_seq: 1,
            start_ns: 7,
            path_hash: 99,
        };
        let mut event = RereadEvent {
            header: header(EventKind::Reread as u32),
            key,
            cause: RereadCause::Read as u32,
            _pad: 0,
        };
        let Event::Reread(r) = decode(&bytes_of(&event)).unwrap() else {
            panic!("not a re-read");
        };
        assert_eq!((r.key, r.cause, r.task.tgid), (key, RereadCause::Read, 42));
        event.cause = 9;
        assert_eq!(decode(&bytes_of(&event)), Err(DecodeError::UnknownKind(9)));
        let short = &bytes_of(&event)[..size_of::<EventHeader>() + 4];
        assert!(matches!(decode(short), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn decodes_an_access_with_its_path() {
        let Event::Access(a) = decode(&access_record(b"/usr/lib/ssl/cert.pem")).unwrap() else {
            panic!("not an access");
        };
        assert_eq!(a.path, PathBuf::from("/usr/lib/ssl/cert.pem"));
        assert_eq!(a.task.comm, "python3");
        assert_eq!(a.fd, 3);
        assert_eq!(a.matched_by(), vec!["prefix", "suffix"]);
    }

    #[test]
    fn an_access_record_is_only_as_long_as_its_path() {
        let short = access_record(b"/etc/ssl/cert.pem");
        assert!(short.len() < size_of::<AccessEvent>() + 32);
        let longest = access_record_with_kernel_path(
            &[b'a'; PATH_CAP - 1],
            &[b'/'; KPATH_CAP - 1],
            kpath_flags::REACHED_ROOT,
        );
        assert_eq!(longest.len(), trustdrift_common::ACCESS_RECORD_CAP);
        assert!(
            matches!(decode(&longest), Ok(Event::Access(a)) if a.path.as_os_str().len() == PATH_CAP - 1)
        );
        // A path_len that runs past the record is an error, not a read out of bounds.
        let cut = &short[..short.len() - 4];
        assert!(matches!(decode(cut), Err(DecodeError::Short { .. })));
        let mut forged = access_record(&[b'a'; PATH_CAP]);
        assert_eq!(
            decode(&forged),
            Err(DecodeError::PathTooLong(PATH_CAP as u32))
        );
        forged.truncate(size_of::<AccessEvent>());
        assert!(decode(&forged).is_err());
    }

    #[test]
    fn rejects_unknown_kinds_and_short_records() {
        let bad = bytes_of(&header(77));
        assert_eq!(decode(&bad), Err(DecodeError::UnknownKind(77)));
        let short = bytes_of(&header(EventKind::Access as u32));
        assert!(matches!(decode(&short), Err(DecodeError::Short { .. })));
        assert!(matches!(decode(&[1, 2, 3]), Err(DecodeError::Short { .. })));
    }

    #[test]
    fn kernel_device_numbers_convert_to_what_stat_reports() {
        // 8:1 (sda1) and 259:3 (an NVMe partition), checked against makedev(3).
        assert_eq!(userspace_dev((8 << 20) | 1), 0x801);
        assert_eq!(userspace_dev((259 << 20) | 3), 0x10303);
        // A minor above 255 (overlay and tmpfs mounts often get one).
        assert_eq!(userspace_dev(300), 0x10_002c);
    }

    #[test]
    fn decodes_exit() {
        let e = ProcEvent {
            header: header(EventKind::Exit as u32),
        };
        assert!(matches!(decode(&bytes_of(&e)), Ok(Event::Exit(t)) if t.tgid == 42));
    }
}
