//! Types shared by the kernel probe (`ebpf/`) and the daemon (`daemon/`).
//!
//! Everything here is `#[repr(C)]` plain data: the probe writes it into BPF maps and the
//! ring buffer, the daemon reads it back byte for byte. Padding is always explicit so both
//! sides agree on every offset, and enums cross the boundary as `u32` that the daemon
//! decodes with `TryFrom` (an unknown value is an error, never a transmute).
#![no_std]

/// Bytes of a path the probe copies from user memory, NUL included. Longer paths are
/// truncated, flagged in the event and counted as [`Loss::PathTruncated`].
pub const PATH_CAP: usize = 512;
/// Bytes of a prefix the kernel's LPM trie accepts (`LPM_DATA_SIZE_MAX`).
pub const PREFIX_CAP: usize = 256;
/// Longest suffix rule, in bytes (two 64-bit words compared at the end of a path).
pub const SUFFIX_CAP: usize = 16;
/// Number of suffix rules the probe compares against every candidate path.
pub const MAX_SUFFIXES: usize = 16;
/// `TASK_COMM_LEN`.
pub const COMM_LEN: usize = 16;
/// Trust files one process may hold open at once and still have its reads attributed.
pub const PROC_FD_SLOTS: usize = 16;
/// Slots of the per-tgid pre-filter (a power of two): how many tracked fds live in
/// processes whose tgid falls into the slot. Zero lets a read skip the fd table.
pub const PREFILTER_SLOTS: usize = 1 << 16;

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
}

/// A `u32` that is not an [`EventKind`], [`Loss`] or other wire enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownDiscriminant(pub u32);

impl TryFrom<u32> for EventKind {
    type Error = UnknownDiscriminant;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            1 => Ok(Self::Access),
            2 => Ok(Self::Exec),
            3 => Ok(Self::Exit),
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

/// First open of a trust path by a process image. The record is this fixed part followed
/// by the path as the process wrote it: `path_len` bytes and a NUL. Records are only as
/// long as their path, not [`PATH_CAP`]: most trust paths are under 64 bytes, so the ring
/// buffer holds several times more announcements than fixed-size records would allow.
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
}

/// Bytes of the longest access record: the fixed part and a path of [`PATH_CAP`] bytes.
pub const ACCESS_RECORD_CAP: usize = core::mem::size_of::<AccessEvent>() + PATH_CAP;

/// Exec or exit of a process that had touched trust files.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcEvent {
    pub header: EventHeader,
}

/// Key of the `ACCESSES` map: one entry per (process image, path as written).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccessKey {
    pub tgid: u32,
    /// Bumped at each exec of the process: a new image starts with an empty trust view.
    pub exec_seq: u32,
    /// Process start (see [`EventHeader::start_ns`]), so a reused pid never merges.
    pub start_ns: u64,
    /// Hash of the path bytes as written (opaque to the daemon).
    pub path_hash: u64,
}

/// Value of the `ACCESSES` map, updated in place by the probe (atomics for the counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AccessStats {
    pub first_open_ns: u64,
    pub last_open_ns: u64,
    /// 0 until the first read.
    pub first_read_ns: u64,
    pub last_read_ns: u64,
    /// Bytes returned by reads (and directory entries listed) on the path's fds.
    pub bytes: u64,
    pub opens: u64,
    pub reads: u64,
    /// Inode and device of the file the latest open got (0 when unknown): which version a
    /// re-read took is decided by identity, not by comparing clocks, since a file renamed
    /// over the path in the same millisecond is otherwise indistinguishable.
    pub last_ino: u64,
    pub last_dev: u32,
    pub _pad: u32,
}

/// Key of the `FDS` map: an open file descriptor of a process.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// Value of the `PROCS` map: per-process state for processes that touched trust files.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ProcState {
    pub start_ns: u64,
    pub mnt_ns: u32,
    pub exec_seq: u32,
    /// Tracked fds of this process (-1 = free slot), so exec and exit can drop them.
    pub fds: [i32; PROC_FD_SLOTS],
}

/// A matched open, as the first-access record needs it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MatchedOpen {
    /// User pointer to the path, read again straight into the ring buffer for a first
    /// access.
    pub path_ptr: u64,
    pub path_hash: u64,
    /// See [`AccessEvent::dir_path_hash`].
    pub dir_path_hash: u64,
    pub open_flags: u32,
    pub dirfd: i32,
    pub match_flags: u32,
    pub _pad: u32,
}

/// Values of the `PREFIXES` LPM trie: the longest matching prefix decides.
pub mod prefix_value {
    /// Paths under it are trust material.
    pub const INCLUDE: u8 = 1;
    /// Paths under it are not, whatever their suffix (e.g. `/etc/ssl/openssl.cnf`).
    pub const EXCLUDE: u8 = 0;
}

/// Key of the `PREFIXES` LPM trie: `prefixlen` in bits, then the prefix bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PrefixKey {
    pub prefixlen: u32,
    pub data: [u8; PREFIX_CAP],
}

/// One suffix rule, right-aligned in a 16-byte window that ends where the path ends.
/// A path matches when `(window & mask) == value` for both words. Letters are compared
/// lower-case (the probe folds the window, the daemon stores lower-case values).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SuffixRule {
    pub mask: [u64; 2],
    pub value: [u64; 2],
}

/// Value of the single-entry `FILTER` array: the quick-reject bitmaps, their parameters
/// and the suffix rules; one lookup gives the probe all of it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FilterTable {
    /// Bytes of a path's start hashed into the prefix quick-reject bitmap: the shortest
    /// include prefix, at most 8. 0 = no prefixes (skip the trie).
    pub head_len: u32,
    /// Bytes of a path's end hashed into the suffix quick-reject bitmap: the shortest
    /// suffix, at most 8. 0 = no suffixes.
    pub tail_len: u32,
    pub suffix_count: u32,
    pub _pad: u32,
    pub rules: [SuffixRule; MAX_SUFFIXES],
    /// Bits set for the heads of include prefixes.
    pub heads: [u64; QUICK_WORDS],
    /// Bits set for the (lower-cased) tails of suffixes.
    pub tails: [u64; QUICK_WORDS],
}

impl Default for FilterTable {
    fn default() -> Self {
        Self {
            head_len: 0,
            tail_len: 0,
            suffix_count: 0,
            _pad: 0,
            rules: [SuffixRule::default(); MAX_SUFFIXES],
            heads: [0; QUICK_WORDS],
            tails: [0; QUICK_WORDS],
        }
    }
}

/// Words (64 bits each) of one quick-reject bitmap.
pub const QUICK_WORDS: usize = 1024;

/// Bitmap slot of a path head or tail (the first/last `len` bytes as a little-endian
/// word, zero-padded, suffix tails lower-cased): (word index, bit mask). A clear bit means
/// no configured prefix (suffix) can match; a set bit means "look closer". With a few
/// dozen entries in 65536 bits, about one unrelated path in a thousand looks closer.
#[inline(always)]
pub fn quick_slot(word: u64) -> (u32, u64) {
    let h = word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
    ((h >> 6) as u32 & (QUICK_WORDS as u32 - 1), 1u64 << (h & 63))
}

/// Mask keeping the low `len` bytes of a word (`len` in 0..=8).
#[inline(always)]
pub fn low_bytes_mask(len: u32) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (len * 8)) - 1
    }
}

impl SuffixRule {
    /// Builds the rule for `suffix` (at most [`SUFFIX_CAP`] bytes, matched case-insensitively
    /// for ASCII letters). Returns `None` for an empty or too long suffix.
    pub fn new(suffix: &[u8]) -> Option<Self> {
        if suffix.is_empty() || suffix.len() > SUFFIX_CAP {
            return None;
        }
        let mut window = [0u8; SUFFIX_CAP];
        let mut mask = [0u8; SUFFIX_CAP];
        let start = SUFFIX_CAP - suffix.len();
        let mut i = 0;
        while i < suffix.len() {
            window[start + i] = suffix[i].to_ascii_lowercase();
            mask[start + i] = 0xff;
            i += 1;
        }
        let word = |bytes: &[u8; SUFFIX_CAP], half: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[half * 8..half * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some(Self {
            mask: [word(&mask, 0), word(&mask, 1)],
            value: [word(&window, 0), word(&window, 1)],
        })
    }

    /// Whether the 16-byte window (already lower-cased) matches.
    #[inline(always)]
    pub fn matches(&self, window: [u64; 2]) -> bool {
        window[0] & self.mask[0] == self.value[0] && window[1] & self.mask[1] == self.value[1]
    }
}

/// ASCII lower-casing of eight bytes at once (bytes >= 0x80 are left alone).
#[inline(always)]
pub fn ascii_lower_word(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = x & !HIGH;
    // Bit 7 of each byte: set when the byte is >= 'A' / > 'Z' (no carries cross bytes
    // because the low seven bits plus the constant stay below 0x100).
    let ge_a = low7.wrapping_add(0x3f3f_3f3f_3f3f_3f3f);
    let gt_z = low7.wrapping_add(0x2525_2525_2525_2525);
    let upper = (ge_a ^ gt_z) & !x & HIGH;
    x | (upper >> 2)
}

/// Why an observation could not be kept. Index into the per-CPU `LOSSES` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// The ring buffer had no room for an event.
    RingbufFull = 0,
    /// `ACCESSES` was full: a new (process, path) could not be recorded.
    AccessTableFull = 1,
    /// `FDS` (an LRU) was at capacity: registering an fd evicted a live one.
    FdTableEvicted = 2,
    /// `PROCS` was full: a process's fds could not be tracked.
    ProcTableFull = 3,
    /// A matched path was longer than [`PATH_CAP`] and was cut.
    PathTruncated = 4,
    /// A process held more than [`PROC_FD_SLOTS`] trust fds: reads on the extra ones
    /// are not attributed.
    ProcFdSlotsFull = 5,
    /// The path could not be read from user memory (bad pointer or page not present).
    PathUnreadable = 6,
}

/// Number of [`Loss`] reasons (size of the `LOSSES` array).
pub const LOSS_REASONS: usize = 7;

impl Loss {
    pub const ALL: [Loss; LOSS_REASONS] = [
        Loss::RingbufFull,
        Loss::AccessTableFull,
        Loss::FdTableEvicted,
        Loss::ProcTableFull,
        Loss::PathTruncated,
        Loss::ProcFdSlotsFull,
        Loss::PathUnreadable,
    ];

    /// Stable name, used as a metric label.
    pub const fn name(self) -> &'static str {
        match self {
            Loss::RingbufFull => "ringbuf_full",
            Loss::AccessTableFull => "access_table_full",
            Loss::FdTableEvicted => "fd_table_evicted",
            Loss::ProcTableFull => "proc_table_full",
            Loss::PathTruncated => "path_truncated",
            Loss::ProcFdSlotsFull => "proc_fd_slots_full",
            Loss::PathUnreadable => "path_unreadable",
        }
    }
}

impl TryFrom<u32> for Loss {
    type Error = UnknownDiscriminant;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Loss::ALL
            .iter()
            .copied()
            .find(|l| *l as u32 == value)
            .ok_or(UnknownDiscriminant(value))
    }
}

/// Kernel struct member offsets the daemon reads from `/sys/kernel/btf/vmlinux` and hands
/// to the probe as a read-only global, so the probe reads process identity without CO-RE.
/// An offset of `u32::MAX` means "not available on this kernel".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.start_boottime`
    pub task_start_boottime: u32,
    /// `task_struct.nsproxy`
    pub task_nsproxy: u32,
    /// `nsproxy.mnt_ns`
    pub nsproxy_mnt_ns: u32,
    /// offset of `ns.inum` inside `mnt_namespace`
    pub mnt_ns_inum: u32,
    /// offset of `group_dead` in the `sched_process_exit` tracepoint record
    pub exit_group_dead: u32,
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    pub _pad: u32,
}

impl KernelOffsets {
    pub const UNKNOWN: u32 = u32::MAX;
    pub const NONE: KernelOffsets = KernelOffsets {
        task_group_leader: Self::UNKNOWN,
        task_start_boottime: Self::UNKNOWN,
        task_nsproxy: Self::UNKNOWN,
        nsproxy_mnt_ns: Self::UNKNOWN,
        mnt_ns_inum: Self::UNKNOWN,
        exit_group_dead: Self::UNKNOWN,
        task_files: Self::UNKNOWN,
        files_fdt: Self::UNKNOWN,
        fdt_fd: Self::UNKNOWN,
        file_inode: Self::UNKNOWN,
        inode_ino: Self::UNKNOWN,
        inode_sb: Self::UNKNOWN,
        sb_dev: Self::UNKNOWN,
        _pad: 0,
    };
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, `Copy`, contain only integers and arrays of
    // integers, and have their padding spelled out as fields, so any byte pattern is valid.
    unsafe impl aya::Pod for AccessKey {}
    unsafe impl aya::Pod for AccessStats {}
    unsafe impl aya::Pod for FdKey {}
    unsafe impl aya::Pod for ProcState {}
    unsafe impl aya::Pod for MatchedOpen {}
    unsafe impl aya::Pod for PrefixKey {}
    unsafe impl aya::Pod for SuffixRule {}
    unsafe impl aya::Pod for FilterTable {}
    unsafe impl aya::Pod for KernelOffsets {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;

    fn window_of(path: &[u8]) -> [u64; 2] {
        let mut w = [0u8; SUFFIX_CAP];
        let n = path.len().min(SUFFIX_CAP);
        w[SUFFIX_CAP - n..].copy_from_slice(&path[path.len() - n..]);
        let lo = u64::from_le_bytes(w[..8].try_into().unwrap());
        let hi = u64::from_le_bytes(w[8..].try_into().unwrap());
        [ascii_lower_word(lo), ascii_lower_word(hi)]
    }

    #[test]
    fn suffix_rules_match_the_end_of_a_path_case_insensitively() {
        let pem = SuffixRule::new(b".pem").unwrap();
        assert!(pem.matches(window_of(b"/tmp/x/leaf.pem")));
        assert!(pem.matches(window_of(b"/tmp/x/LEAF.PEM")));
        assert!(!pem.matches(window_of(b"/tmp/x/leaf.pem.bak")));
        assert!(!pem.matches(window_of(b"/tmp/x/leaf.crt")));
        let cacerts = SuffixRule::new(b"/security/cacerts").is_none();
        assert!(cacerts, "17 bytes is longer than SUFFIX_CAP");
        let long = SuffixRule::new(b"security/cacerts").unwrap();
        assert!(long.matches(window_of(b"/usr/lib/jvm/x/lib/security/cacerts")));
        assert!(!long.matches(window_of(b"/usr/lib/jvm/x/lib/security/cacerts2")));
    }

    #[test]
    fn lowercasing_touches_only_ascii_capitals() {
        let input = *b"AZaz@[`{";
        let out = ascii_lower_word(u64::from_le_bytes(input)).to_le_bytes();
        assert_eq!(&out, b"azaz@[`{");
        let high = [0xC3u8, 0x80, b'Q', 0xFF, b'A', 0, b'Z', 0x7F];
        let out = ascii_lower_word(u64::from_le_bytes(high)).to_le_bytes();
        assert_eq!(out, [0xC3, 0x80, b'q', 0xFF, b'a', 0, b'z', 0x7F]);
    }

    #[test]
    fn wire_enums_round_trip_and_reject_unknown_values() {
        for loss in Loss::ALL {
            assert_eq!(Loss::try_from(loss as u32), Ok(loss));
        }
        assert_eq!(Loss::try_from(99), Err(UnknownDiscriminant(99)));
        assert_eq!(EventKind::try_from(2), Ok(EventKind::Exec));
        assert!(EventKind::try_from(0).is_err());
    }
}
