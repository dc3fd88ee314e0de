//! Every map of the probe: its key, value and bound. The daemon may resize the bounded
//! tables at load time (`max_entries`); the numbers here are the defaults.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
use trustdrift_common::{
    AccessEvent, AccessKey, AccessStats, FdKey, FilterTable, LOSS_REASONS, PATH_CAP,
    PREFILTER_SLOTS, PREFIX_CAP, ProcState,
};

/// Records for the daemon: only what is new (first access of a path by a process image,
/// exec, exit). Bound: 1 MiB of records; a failed reserve counts `Loss::RingbufFull`.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU loss counters. Key: `Loss` as u32. Value: count. Bound: `LOSS_REASONS`.
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_REASONS as u32, 0);

/// Trust prefixes. Key: path prefix bytes (longest-prefix match). Value: unused (1).
/// Bound: 256 prefixes, each at most `PREFIX_CAP` bytes.
#[map]
pub static PREFIXES: LpmTrie<[u8; PREFIX_CAP], u8> = LpmTrie::with_max_entries(256, 0);

/// Quick-reject bitmaps over path heads and tails, their parameters, and the suffix
/// rules. Key: 0. Value: the whole table (16.5 KiB). Most paths on a host stop at the
/// bitmaps, without a trie lookup or a suffix loop. Bound: `MAX_SUFFIXES` rules.
#[map]
pub static FILTER: Array<FilterTable> = Array::with_max_entries(1, 0);

/// Aggregated accesses. Key: (tgid, exec_seq, start, path hash). Value: times, bytes and
/// counts, updated in place. Bound: 32768 (process, path) pairs; the daemon deletes the
/// entries of exited processes. A full table counts `Loss::AccessTableFull`.
#[map]
pub static ACCESSES: HashMap<AccessKey, AccessStats> = HashMap::with_max_entries(32768, 0);

/// Open trust fds. Key: (tgid, fd), so a read by any thread is attributed. Value: the
/// `ACCESSES` key of the path. Bound: 16384, LRU; evicting a live entry counts
/// `Loss::FdTableEvicted`.
#[map]
pub static FDS: LruHashMap<FdKey, AccessKey> = LruHashMap::with_max_entries(16384, 0);

/// Processes that touched trust files. Key: tgid. Value: identity, exec generation and the
/// slots of its tracked fds. Bound: 16384; removed at exit.
#[map]
pub static PROCS: HashMap<u32, ProcState> = HashMap::with_max_entries(16384, 0);

/// Per-tgid pre-filter. Key: `tgid & (PREFILTER_SLOTS - 1)`. Value: tracked fds of the
/// processes in that slot. Zero lets reads and closes skip every other lookup.
/// Bound: `PREFILTER_SLOTS`.
#[map]
pub static PREFILTER: Array<u64> = Array::with_max_entries(PREFILTER_SLOTS as u32, 0);

/// Global counters. Key: `counter::*`. Value: count. Bound: 1.
#[map]
pub static COUNTERS: Array<u64> = Array::with_max_entries(1, 0);

pub mod counter {
    /// Live entries in `FDS`, to tell when the LRU starts evicting live fds.
    pub const FDS_LIVE: u32 = 0;
}

/// Per-CPU scratch where a first-access record is assembled before it is copied into
/// `EVENTS` at its path's length. Key: 0. Value: one record at its longest. Bound: 1.
#[map]
pub static ANNOUNCE: PerCpuArray<Announcement> = PerCpuArray::with_max_entries(1, 0);

/// An access record at its longest: what `ANNOUNCE` holds.
#[repr(C)]
pub struct Announcement {
    pub event: AccessEvent,
    pub path: [u8; PATH_CAP],
}

/// Per-CPU scratch for the path under test. Key: 0. Bound: 1.
#[map]
pub static SCRATCH: PerCpuArray<PathScratch> = PerCpuArray::with_max_entries(1, 0);

/// The path buffer, laid out so that `&prefixlen` is a valid `PREFIXES` key and the
/// 16-byte suffix window of a short path reads zeros before the path, never out of bounds.
#[repr(C)]
pub struct PathScratch {
    /// Always zero.
    pub zeros: [u64; 2],
    pub _pad: u32,
    /// LPM key header, set just before the prefix lookup (zero otherwise).
    pub prefixlen: u32,
    pub path: [u8; PATH_CAP],
    /// Slack after the path: the verifier tracks the window's offset less tightly than
    /// the arithmetic bounds it, and this keeps its estimate in bounds too.
    pub slack: [u64; 2],
}

/// Words of `PathScratch` before `path`.
pub const PATH_WORD_OFFSET: usize = 3;
/// `PathScratch` as u64 words.
pub const SCRATCH_WORDS: usize = PATH_WORD_OFFSET + PATH_CAP / 8 + 2;
