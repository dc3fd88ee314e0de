//! Every map of the probe, with its key, value and bound, and the read-only globals the
//! daemon sets at load time. The daemon may resize the bounded tables at load time
//! (`max_entries`); the defaults are `trustdrift_common::maps::capacity`, and each static
//! is named as `trustdrift_common::maps::name` says.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
};
pub use trustdrift_common::maps::counter;
use trustdrift_common::{
    AccessEvent, AccessKey, AccessStats, FD_FILTER_SLOTS, FdKey, FilterTable, KPATH_CAP,
    KernelOffsets, LOSS_REASONS, NODE_KEY_BYTES, OwnerKey, OwnerQuotas, OwnerUsage, PATH_CAP,
    PREFILTER_SLOTS, PREFIX_CAP, ProcState, SEED_PATH_CAP, SeedOffsets, TlsLibraries,
    maps::capacity,
};

/// tgid of the daemon: its own reads of trust files are not observations.
#[unsafe(no_mangle)]
pub static SELF_TGID: Global<u32> = Global::new(0);

/// Kernel layout from BTF, for what the probe reads of tasks and files without CO-RE.
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::NONE);

/// `max_entries` of `FDS` as loaded, to tell when the LRU starts evicting live handles.
#[unsafe(no_mangle)]
pub static FDS_CAPACITY: Global<u64> = Global::new(capacity::FDS as u64);

/// How many table entries one owner may hold, and paths one process may announce.
#[unsafe(no_mangle)]
pub static QUOTAS: Global<OwnerQuotas> = Global::new(OwnerQuotas::NONE);

/// Records for the daemon: only what is new (first access of a path by a process image,
/// exec, exit). Bound: 1 MiB of records; a failed reserve counts `Loss::RingbufFull`.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(capacity::RING_BUFFER_BYTES, 0);

/// Per-CPU loss counters. Key: `Loss` as u32. Value: count. Bound: `LOSS_REASONS`.
#[map]
pub static LOSSES: PerCpuArray<u64> = PerCpuArray::with_max_entries(LOSS_REASONS as u32, 0);

/// Trust prefixes. Key: path prefix bytes (longest-prefix match). Value: include (1) or
/// exclude (0). Bound: 256 prefixes, each at most `PREFIX_CAP` bytes.
#[map]
pub static PREFIXES: LpmTrie<[u8; PREFIX_CAP], u8> =
    LpmTrie::with_max_entries(capacity::PREFIXES, 0);

/// Quick-reject bitmaps over path heads and tails, their parameters, and the suffix
/// rules. Key: 0. Value: the whole table (16.5 KiB). Most paths on a host stop at the
/// bitmaps, without a trie lookup or a suffix loop. Bound: `MAX_SUFFIXES` rules.
#[map]
pub static FILTER: Array<FilterTable> = Array::with_max_entries(1, 0);

/// Aggregated accesses. Key: (tgid, exec_seq, start, path hash). Value: times, bytes and
/// counts, updated in place. Bound: 32768 (process, path) pairs, shared out by `OWNERS`;
/// the daemon deletes the entries of exited processes and those it refuses. A full table
/// counts `Loss::AccessTableFull`.
#[map]
pub static ACCESSES: HashMap<AccessKey, AccessStats> =
    HashMap::with_max_entries(capacity::ACCESSES, 0);

/// Accesses the daemon wants to hear about at their next re-open or read (it judged the
/// process stale and waits for it to re-read). Key: the `ACCESSES` key. Value: 1. Bound:
/// 4096, written by the daemon; the probe looks here only when it updates an existing
/// access, and removes the entry when it sends its `RereadEvent` (one shot).
#[map]
pub static REREAD_WATCH: HashMap<AccessKey, u8> =
    HashMap::with_max_entries(capacity::REREAD_WATCH, 0);

/// Open trust fds. Key: (tgid, fd), so a read by any thread is attributed. Value: the
/// `ACCESSES` key of the path. Bound: 16384, LRU; evicting a live entry counts
/// `Loss::FdTableEvicted`.
#[map]
pub static FDS: LruHashMap<FdKey, AccessKey> = LruHashMap::with_max_entries(capacity::FDS, 0);

/// Processes that touched trust files. Key: tgid. Value: identity, exec generation, the
/// slots of its tracked fds, its owner and how many paths it announced. Bound: 16384,
/// shared out by `OWNERS`; removed at exit.
#[map]
pub static PROCS: HashMap<u32, ProcState> = HashMap::with_max_entries(capacity::PROCS, 0);

/// Per-tgid pre-filter. Key: `tgid & (PREFILTER_SLOTS - 1)`. Value: tracked fds of the
/// processes in that slot. Zero lets reads and closes skip every other lookup.
/// Bound: `PREFILTER_SLOTS`.
#[map]
pub static PREFILTER: Array<u64> = Array::with_max_entries(PREFILTER_SLOTS as u32, 0);

/// Per-fd-number pre-filter, checked before anything else on a read, close or dup. Key:
/// `fd & (FD_FILTER_SLOTS - 1)`. Value: tracked fds (of any process) in that slot. Zero
/// skips even the helper call that names the process. Bound: `FD_FILTER_SLOTS`.
#[map]
pub static FD_FILTER: Array<u64> = Array::with_max_entries(FD_FILTER_SLOTS as u32, 0);

/// Global counters: live entries of the tables, so that their fill is known without
/// walking them. Key: `counter::*`. Value: count. Bound: `counter::SLOTS`.
#[map]
pub static COUNTERS: Array<u64> = Array::with_max_entries(counter::SLOTS, 0);

/// What each owner (a uid, a cgroup, a uid in a cgroup) holds of `PROCS` and `ACCESSES`.
/// Key: `OwnerKey`. Value: `OwnerUsage`. Bound: 16384, LRU (an evicted owner starts from
/// zero, which only loosens its quota for a while).
#[map]
pub static OWNERS: LruHashMap<OwnerKey, OwnerUsage> =
    LruHashMap::with_max_entries(capacity::OWNERS, 0);

/// This node's key for keyed digests: random, written by the first daemon and read by the
/// next (it is pinned with the other maps); it never leaves kernel memory otherwise. The
/// probe never reads it. Key: 0. Value: the key. Bound: 1.
#[map]
pub static NODE_KEY: Array<[u8; NODE_KEY_BYTES]> = Array::with_max_entries(1, 0);

/// Per-CPU scratch where a first-access record is assembled before it is copied into
/// `EVENTS` at its paths' length. Key: 0. Value: one record at its longest. Bound: 1.
#[map]
pub static ANNOUNCE: PerCpuArray<Announcement> = PerCpuArray::with_max_entries(1, 0);

/// An access record at its longest, with slack the verifier's bounds need: what
/// `ANNOUNCE` holds.
#[repr(C)]
pub struct Announcement {
    pub event: AccessEvent,
    /// The user path (with its NUL), then the kernel path (with its NUL).
    pub paths: [u8; 2 * (PATH_CAP + KPATH_CAP)],
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

/// Per-CPU state of the walk that rebuilds an opened file's path (see `kpath`). Key: 0.
/// Bound: 1.
#[map]
pub static WALK: PerCpuArray<WalkScratch> = PerCpuArray::with_max_entries(1, 0);

/// The same for the start-up iterator `seed_maps`, apart: a probe program may run on
/// this CPU while the iterator's program is preempted. Key: 0. Bound: 1.
#[map]
pub static SEED_WALK: PerCpuArray<WalkScratch> = PerCpuArray::with_max_entries(1, 0);

/// Where the walk is, and the path it built so far (from the end of `buf`).
#[repr(C)]
pub struct WalkScratch {
    pub state: WalkState,
    /// The path, built right to left so that it ends at `KPATH_CAP`; slack on both
    /// sides keeps every bounded access inside the value.
    pub buf: [u8; 2 * KPATH_CAP + 256],
}

/// The walk's position. Kept in the map, never in registers across steps: values loaded
/// from a map are unknown to the verifier, so the walk's states prune instead of
/// multiplying.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct WalkState {
    pub dentry: u64,
    pub vfsmnt: u64,
    pub mnt: u64,
    pub root_dentry: u64,
    pub root_mnt: u64,
    /// Start of the path built so far in `buf` (the path ends at `KPATH_CAP`).
    pub pos: u32,
    /// `kpath_flags`.
    pub flags: u32,
}

/// Kernel layout the start-up iterators need beyond `OFFSETS`.
#[unsafe(no_mangle)]
pub static SEED_OFFSETS: Global<SeedOffsets> = Global::new(SeedOffsets::NONE);

/// File name prefixes of the TLS libraries the start-up iterators look for in mappings.
/// Key: 0. Value: the table (a map, not a global: too big to copy onto the stack).
/// Bound: 1. Not pinned: the daemon writes it before the start-up reads.
#[map]
pub static TLS_LIBRARIES: Array<TlsLibraries> = Array::with_max_entries(1, 0);

/// Per-CPU scratch of the start-up iterators (`iter`): the path `bpf_d_path` writes, and
/// the last file handled. Key: 0. Bound: 1. Not pinned: only the start-up reads use it.
#[map]
pub static SEED_SCRATCH: PerCpuArray<SeedScratch> = PerCpuArray::with_max_entries(1, 0);

/// A path as `bpf_d_path` writes it, laid out so that the 8 bytes ending at any path
/// length are inside the value (zeros before a short path), and so that `&prefixlen`
/// is a valid `PREFIXES` key.
#[repr(C)]
pub struct SeedScratch {
    /// Always zero.
    pub zeros: u32,
    /// LPM key header, set just before the prefix lookup (zero otherwise).
    pub prefixlen: u32,
    pub path: [u8; SEED_PATH_CAP],
    pub slack: u64,
    /// The last (read session, task, file) the maps iterator handled.
    pub last_session: u64,
    pub last_task: u64,
    pub last_file: u64,
    /// Whether the root of task `elsewhere_task` (in read `elsewhere_session`) is elsewhere.
    pub elsewhere_session: u64,
    pub elsewhere_task: u64,
    pub elsewhere: u64,
}

/// What the maps iterator found a mapped file to be (`iter::file_class`), so that the
/// other processes mapping it (every process maps the same few libraries) skip the look.
/// Key: the file's (vfsmount, dentry) addresses, which make its path; valid while the
/// read runs (a mapped file holds them). Value: the class. Bound: 8192, LRU (a
/// forgotten file is looked at again). Not pinned.
#[map]
pub static SEED_FILE_CLASS: LruHashMap<[u64; 2], u32> = LruHashMap::with_max_entries(8192, 0);
