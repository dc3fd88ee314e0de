//! What crosses the ring buffer: records of first accesses, execs and exits. Every record
//! starts with an [`EventHeader`]; its size is fixed at compile time (asserted below), so
//! that the daemon and the probe can never disagree on it silently.

use core::mem::size_of;

use crate::{COMM_LEN, KPATH_CAP, PATH_CAP, UnknownDiscriminant, tables::AccessKey};

/// What a ring-buffer record is. Every record starts with an [`EventHeader`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// A process opened a trust path for the first time (in its current image).
    Access = 1,
    /// A process that had touched trust files replaced its image: its old view is gone.
    Exec = 2,
    /// A process that had touched trust files exited.
    Exit = 3,
    /// A process re-opened or read a path the daemon watches (`REREAD_WATCH`).
    Reread = 4,
}

impl TryFrom<u32> for EventKind {
    type Error = UnknownDiscriminant;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Access),
            2 => Ok(Self::Exec),
            3 => Ok(Self::Exit),
            4 => Ok(Self::Reread),
            other => Err(UnknownDiscriminant(other)),
        }
    }
}

/// Identity of a process image plus context, at the head of every ring-buffer record.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct EventHeader {
    /// [`EventKind`] as `u32`.
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    pub uid: u32,
    /// Process start, `CLOCK_BOOTTIME` ns (`task->group_leader->start_boottime`); 0 when the
    /// kernel layout was unknown and the daemon must read `/proc/<pid>/stat` instead.
    pub start_ns: u64,
    /// When it happened, `CLOCK_BOOTTIME` ns.
    pub ts_ns: u64,
    /// `bpf_get_current_cgroup_id()`: the cgroup v2 id of the task.
    pub cgroup_id: u64,
    /// Inode number of the task's mount namespace (0 when unknown).
    pub mnt_ns: u32,
    /// Exec generation of the process (see [`AccessKey::exec_seq`]).
    pub exec_seq: u32,
    pub comm: [u8; COMM_LEN],
}

/// How a matched path was matched.
pub mod match_flags {
    pub const PREFIX: u32 = 1;
    pub const SUFFIX: u32 = 1 << 1;
    /// Relative path opened through a directory fd that is itself a tracked trust path.
    pub const TRACKED_DIRFD: u32 = 1 << 2;
    /// The path filled [`super::PATH_CAP`] and was cut.
    pub const TRUNCATED: u32 = 1 << 3;
    /// Seen in lean mode: the open was observed on entry only, success is inferred.
    pub const LEAN: u32 = 1 << 4;
}

/// What the walk that rebuilt the kernel's path of an opened file met.
pub mod kpath_flags {
    /// It reached the process's root: the path is whole and names the file in that root.
    pub const REACHED_ROOT: u32 = 1;
    /// It crossed at least one mount on the way.
    pub const CROSSED_MOUNT: u32 = 1 << 1;
    /// The file is not under the process's root (a dirfd from outside a chroot).
    pub const UNREACHABLE: u32 = 1 << 2;
    /// Longer than [`super::KPATH_CAP`], or deeper than the walk goes: cut.
    pub const TRUNCATED: u32 = 1 << 3;
    /// A kernel read failed (the file was closed under the walk): no path.
    pub const FAILED: u32 = 1 << 4;
}

/// First open of a trust path by a process image. The record is this fixed part, then the
/// path as the process wrote it (`path_len` bytes and a NUL), then the path of the file the
/// open got as the kernel knew it (`kpath_len` bytes and a NUL, when `kpath_len > 0`).
/// Records are only as long as their paths: most trust paths are under 64 bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct AccessEvent {
    pub header: EventHeader,
    pub key: AccessKey,
    /// With [`match_flags::TRACKED_DIRFD`]: the path hash of the directory `dirfd` was
    /// opened on (announced earlier by the same process), so a relative path resolves
    /// even after the process is gone. 0 otherwise.
    pub dir_path_hash: u64,
    /// `open(2)` flags as passed.
    pub open_flags: u32,
    /// `dirfd` as passed (`AT_FDCWD` = -100 for cwd-relative).
    pub dirfd: i32,
    /// The fd the open returned; -1 in lean mode (not observed).
    pub fd: i32,
    /// [`match_flags`].
    pub match_flags: u32,
    /// Inode number of the file the open returned (0 when unknown: lean mode, or a
    /// kernel layout the daemon could not read), so the daemon knows which version of
    /// the file the process got even if the path has been replaced since.
    pub ino: u64,
    /// `super_block.s_dev` of that file, the kernel's encoding (MAJOR << 20 | MINOR).
    pub dev: u32,
    /// Length of the path that follows, without its NUL (at most `PATH_CAP - 1`).
    pub path_len: u32,
    /// Length of the kernel's path of the opened file that follows the path's NUL, without
    /// its own NUL (0: none; at most `KPATH_CAP - 1`).
    pub kpath_len: u32,
    /// [`kpath_flags`].
    pub kpath_flags: u32,
}

/// Bytes of the longest access record: the fixed part and both paths at their longest.
pub const ACCESS_RECORD_CAP: usize = size_of::<AccessEvent>() + PATH_CAP + KPATH_CAP;

/// Exec or exit of a process that had touched trust files.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub header: EventHeader,
}

/// What brought a watched access back (see [`RereadEvent`]).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RereadCause {
    /// A new open of the path by the same process image.
    Open = 1,
    /// A read on an fd the process holds on the path.
    Read = 2,
}

impl TryFrom<u32> for RereadCause {
    type Error = UnknownDiscriminant;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Open),
            2 => Ok(Self::Read),
            other => Err(UnknownDiscriminant(other)),
        }
    }
}

/// A watched access moved: the daemon asked (`REREAD_WATCH`) to hear of the next open of,
/// or read on, this (process image, path), and the probe sends it once, removing the
/// watch. The header names the process as the access key does; its `mnt_ns` is 0 (the
/// daemon knows the process from the access it watches).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct RereadEvent {
    pub header: EventHeader,
    pub key: AccessKey,
    /// [`RereadCause`] as `u32`.
    pub cause: u32,
    pub _pad: u32,
}

// The wire sizes. A change here is a change of the record format: both sides are built
// from this crate, but a pinned probe of an older build may still be writing records, and
// the pinned-layout hash (see `layout`) keeps the two apart.
const _: () = assert!(size_of::<EventHeader>() == 64);
const _: () = assert!(size_of::<AccessEvent>() == 136);
const _: () = assert!(size_of::<ProcEvent>() == 64);
const _: () = assert!(size_of::<RereadEvent>() == 96);
