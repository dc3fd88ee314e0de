//! The journal: every record taken out of the ring buffer, copied into a file mapped in
//! memory *before* its ring-buffer space is given back, until a save of the ledger covers
//! it. A SIGKILL at any moment then loses nothing: a record is either still in the ring
//! buffer (pinned, read by the next daemon) or in the journal (replayed by the next daemon
//! after it restores the last save).
//!
//! The mapping is shared with the page cache, so what is copied there survives the
//! process the instant the copy is made; no `write` or `fsync` per record. (A power cut
//! is another matter: the journal only protects against the daemon's death, which is what
//! a restart of the daemon is.)
//!
//! Layout: a 64-byte header (magic; the span of whole records, start and end in one
//! atomic word; the next sequence number; an epoch drawn when the file was made; the
//! boot it was made in, since pids and start times mean nothing across boots), then
//! records of `{len: u32, kind: u32, seq: u64, bytes, padding to 8}`. The span moves only
//! after a record is whole, and in one store, so neither a record cut by a crash nor a
//! half-made move is ever seen.

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use memmap2::MmapMut;
use trustdrift_common::{AccessKey, AccessStats};

const MAGIC: &[u8; 8] = b"TDJRNL02";
const HEADER: usize = 64;
/// The span of whole records: `start | end << 32`, offsets in the file.
const SPAN_AT: usize = 8;
/// The sequence number the next record gets.
const SEQ_AT: usize = 16;
const EPOCH_AT: usize = 24;
const BOOT_AT: usize = 32;
const RECORD_HEAD: usize = 16;
/// Its name in the state directory.
pub const FILE: &str = "journal";
/// Offsets are 32-bit.
const MAX_FILE: u64 = u32::MAX as u64 & !4095;
/// Pages past the records are given back when they come to more than this many bytes.
const PUNCH_ABOVE: usize = 1 << 20;

/// What a journal record holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Kind {
    /// A record of the probe, as it came out of the ring buffer.
    Ring = 1,
    /// An access's final aggregate (`AccessKey` then `AccessStats`), taken out of the
    /// kernel at its process's exit: the kernel no longer has it.
    Aggregate = 2,
}

impl Kind {
    fn from_raw(v: u32) -> Option<Self> {
        match v {
            1 => Some(Kind::Ring),
            2 => Some(Kind::Aggregate),
            _ => None,
        }
    }
}

/// One record read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub kind: Kind,
    pub bytes: Vec<u8>,
}

/// How far a save of the ledger covers the journal: records of `epoch` up to these
/// sequence numbers are in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mark {
    pub epoch: u64,
    /// The last ring record the ledger has handled (they are handled in order).
    pub ring_through: u64,
    /// The last aggregate taken (each is applied to the ledger as it is taken).
    pub aggregates_through: u64,
}

impl Mark {
    /// Whether a save with this mark holds what `entry` says (a mark of another journal
    /// covers nothing in this one).
    pub fn covers(&self, epoch: u64, kind: Kind, seq: u64) -> bool {
        self.epoch == epoch
            && match kind {
                Kind::Ring => seq <= self.ring_through,
                Kind::Aggregate => seq <= self.aggregates_through,
            }
    }
}

/// The journal, shared by the intake thread (ring records) and the engine (aggregates,
/// and forgetting what a save holds).
pub type SharedJournal = Arc<Mutex<Journal>>;

/// Locks the journal, whatever a panicking holder left: its state is always whole
/// (records become visible in one store).
pub fn lock(journal: &SharedJournal) -> MutexGuard<'_, Journal> {
    journal.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Journal {
    map: MmapMut,
    /// Keeps the file open for as long as it is mapped.
    file: File,
    /// The furthest the records reached since pages were last given back.
    high_water: usize,
}

impl Journal {
    /// Opens the journal in `file` (the daemon's own, private: the state directory's
    /// [`FILE`]) with room for about `capacity` bytes of records, keeping what an earlier
    /// run of the same `boot` (`/proc/sys/kernel/random/boot_id`) left in it.
    pub fn open(file: File, capacity: u64, boot: &str) -> io::Result<Self> {
        let size = (HEADER as u64 + capacity)
            .next_multiple_of(4096)
            .min(MAX_FILE);
        let had = file.metadata()?.len();
        if had < size {
            // Sparse: pages are only used as records fill them.
            file.set_len(size)?;
        }
        // SAFETY: the file is the daemon's own (0600 in its private state directory, which
        // one daemon uses at a time); nobody else maps or truncates it.
        let mut map = unsafe { MmapMut::map_mut(&file)? };
        let (start, end) = span(&map);
        let len = map.len();
        let mut boot_field = [0u8; HEADER - BOOT_AT];
        let n = boot.len().min(boot_field.len());
        boot_field[..n].copy_from_slice(&boot.as_bytes()[..n]);
        if &map[..8] != MAGIC
            || start < HEADER
            || start > end
            || end > len
            || map[BOOT_AT..HEADER] != boot_field
        {
            map[..HEADER].fill(0);
            map[BOOT_AT..HEADER].copy_from_slice(&boot_field);
            map[EPOCH_AT..EPOCH_AT + 8].copy_from_slice(&new_epoch().to_ne_bytes());
            cell(&map, SEQ_AT).store(1, Ordering::Release);
            set_span(&map, HEADER, HEADER);
            map[..8].copy_from_slice(MAGIC);
        }
        // Whatever an earlier run left past the records goes at the first release.
        let high_water = map.len();
        let journal = Self {
            map,
            file,
            high_water,
        };
        // A record made whole just before a crash, the sequence number not yet moved.
        let last = journal.entries().last().map_or(0, |e| e.seq);
        if journal.next_seq() <= last {
            cell(&journal.map, SEQ_AT).store(last + 1, Ordering::Release);
        }
        Ok(journal)
    }

    /// Drawn when the file was made: marks from another file's life cover nothing here.
    pub fn epoch(&self) -> u64 {
        u64::from_ne_bytes(
            self.map[EPOCH_AT..EPOCH_AT + 8]
                .try_into()
                .unwrap_or_default(),
        )
    }

    /// The sequence number the next record gets.
    pub fn next_seq(&self) -> u64 {
        cell(&self.map, SEQ_AT).load(Ordering::Acquire)
    }

    /// Bytes of records held.
    pub fn used(&self) -> u64 {
        let (start, end) = span(&self.map);
        (end - start) as u64
    }

    /// Bytes of records it can hold.
    pub fn capacity(&self) -> u64 {
        (self.map.len() - HEADER) as u64
    }

    /// Appends a record; its sequence number, or `None` when the journal is full.
    pub fn append(&mut self, kind: Kind, bytes: &[u8]) -> Option<u64> {
        let size = (RECORD_HEAD + bytes.len()).next_multiple_of(8);
        let (_, mut at) = span(&self.map);
        if at + size > self.map.len() {
            self.compact();
            at = span(&self.map).1;
            if at + size > self.map.len() {
                return None;
            }
        }
        let seq = self.next_seq();
        let record = &mut self.map[at..at + size];
        record[..4].copy_from_slice(&(bytes.len() as u32).to_ne_bytes());
        record[4..8].copy_from_slice(&(kind as u32).to_ne_bytes());
        record[8..16].copy_from_slice(&seq.to_ne_bytes());
        record[RECORD_HEAD..RECORD_HEAD + bytes.len()].copy_from_slice(bytes);
        // Only now is the record whole: the end moves past it.
        let (start, _) = span(&self.map);
        set_span(&self.map, start, at + size);
        cell(&self.map, SEQ_AT).store(seq + 1, Ordering::Release);
        self.high_water = self.high_water.max(at + size);
        Some(seq)
    }

    /// Every whole record, oldest first.
    pub fn entries(&self) -> Vec<Entry> {
        let mut out = Vec::new();
        self.walk(|at, kind, seq| {
            let len = self.len_at(at);
            out.push(Entry {
                seq,
                kind,
                bytes: self.map[at + RECORD_HEAD..at + RECORD_HEAD + len].to_vec(),
            });
            true
        });
        out
    }

    /// Forgets the records at the front that a save with `mark` covers. A record it does
    /// not cover (handed to the engine, not yet handled) keeps itself and all after it.
    pub fn discard(&mut self, mark: &Mark) {
        let epoch = self.epoch();
        let mut first_kept = None;
        let (_, end) = span(&self.map);
        self.walk(|at, kind, seq| {
            if mark.covers(epoch, kind, seq) {
                true
            } else {
                first_kept = Some(at);
                false
            }
        });
        match first_kept {
            Some(at) => set_span(&self.map, at, end),
            None => set_span(&self.map, HEADER, HEADER),
        }
    }

    fn len_at(&self, at: usize) -> usize {
        u32::from_ne_bytes(self.map[at..at + 4].try_into().unwrap_or_default()) as usize
    }

    /// Calls `each(offset, kind, seq)` for every whole record until it returns false.
    fn walk(&self, mut each: impl FnMut(usize, Kind, u64) -> bool) {
        let (mut at, end) = span(&self.map);
        while at + RECORD_HEAD <= end {
            let len = self.len_at(at);
            let kind = Kind::from_raw(u32::from_ne_bytes(
                self.map[at + 4..at + 8].try_into().unwrap_or_default(),
            ));
            let seq = u64::from_ne_bytes(self.map[at + 8..at + 16].try_into().unwrap_or_default());
            let size = (RECORD_HEAD + len).next_multiple_of(8);
            let Some(kind) = kind.filter(|_| at + size <= end) else {
                break;
            };
            if !each(at, kind, seq) {
                break;
            }
            at += size;
        }
    }

    /// Moves the records to the front when they fit in the room before them: copied
    /// first, into space no record uses, then the span moves in one store. A crash
    /// before the store leaves the old span, whole.
    fn compact(&mut self) {
        let (start, end) = span(&self.map);
        let len = end - start;
        if start == HEADER || len > start - HEADER {
            return;
        }
        self.map.copy_within(start..end, HEADER);
        set_span(&self.map, HEADER, HEADER + len);
    }

    /// Gives the pages past the records back to the file system (and out of the daemon's
    /// RSS). Not done when a save empties the journal: punching a hole takes a file
    /// system transaction, which may wait for a commit (a save's fsync), and the intake,
    /// waiting for this lock meanwhile, would let the ring buffer fill in a storm. The
    /// engine calls it once records stop coming.
    pub fn release_pages(&mut self) {
        let (_, end) = span(&self.map);
        let from = end.max(HEADER).next_multiple_of(4096);
        let to = self.high_water.min(self.map.len()).next_multiple_of(4096);
        if to <= from + PUNCH_ABOVE {
            return;
        }
        // SAFETY: a plain syscall on our own fd. A file system without hole punching
        // only keeps the pages (EOPNOTSUPP), which is harmless.
        unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                from as libc::off_t,
                (to - from) as libc::off_t,
            );
        }
        self.high_water = end;
    }
}

/// An aggregate's record: the key, then the stats, laid out as the kernel has them.
pub fn aggregate_bytes(key: &AccessKey, stats: &AccessStats) -> Vec<u8> {
    let mut out = pod_bytes(key).to_vec();
    out.extend_from_slice(pod_bytes(stats));
    out
}

/// An aggregate back from its record; `None` for a record of another size.
pub fn aggregate_of(bytes: &[u8]) -> Option<(AccessKey, AccessStats)> {
    let split = size_of::<AccessKey>();
    if bytes.len() != split + size_of::<AccessStats>() {
        return None;
    }
    Some((read_pod(&bytes[..split]), read_pod(&bytes[split..])))
}

fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: `Pod` types are plain bytes without padding; the slice lives as long as
    // the borrow of `value`.
    unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
}

/// `bytes` must be exactly a `T`'s size (checked by the caller).
fn read_pod<T: aya::Pod>(bytes: &[u8]) -> T {
    assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: the length is checked; `Pod` promises any bytes are a valid `T`;
    // `read_unaligned` copes with any alignment.
    unsafe { bytes.as_ptr().cast::<T>().read_unaligned() }
}

fn new_epoch() -> u64 {
    let mut b = [0u8; 8];
    // SAFETY: writes at most 8 bytes into `b`. On failure the epoch falls back to the
    // clock, which differs from any earlier file's all the same.
    let got = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if got == 8 {
        u64::from_ne_bytes(b)
    } else {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    }
}

fn cell(map: &MmapMut, at: usize) -> &AtomicU64 {
    // SAFETY: the header is 8-byte aligned (the mapping is page-aligned) and its words
    // are only ever accessed as atomics.
    unsafe { &*map.as_ptr().add(at).cast::<AtomicU64>() }
}

fn span(map: &MmapMut) -> (usize, usize) {
    let word = cell(map, SPAN_AT).load(Ordering::Acquire);
    ((word & 0xffff_ffff) as usize, (word >> 32) as usize)
}

fn set_span(map: &MmapMut, start: usize, end: usize) {
    cell(map, SPAN_AT).store(start as u64 | (end as u64) << 32, Ordering::Release);
}

#[cfg(test)]
mod tests {
    use super::*;

    const BOOT: &str = "f81d4fae-7dec-11d0-a765-00a0c91e6bf6";

    /// A journal file of its own, removed after the test.
    struct Dir(std::path::PathBuf);

    impl Dir {
        fn file(&self) -> File {
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&self.0)
                .unwrap()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn dir(name: &str) -> Dir {
        let p =
            std::env::temp_dir().join(format!("trustdrift-journal-{name}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        Dir(p)
    }

    fn mark(j: &Journal, ring: u64, aggregates: u64) -> Mark {
        Mark {
            epoch: j.epoch(),
            ring_through: ring,
            aggregates_through: aggregates,
        }
    }

    #[test]
    fn records_survive_the_process_and_come_back_in_order() {
        let d = dir("survive");
        let mut j = Journal::open(d.file(), 1 << 20, BOOT).unwrap();
        let epoch = j.epoch();
        assert_eq!(j.append(Kind::Ring, b"first"), Some(1));
        assert_eq!(j.append(Kind::Aggregate, &[7u8; 40]), Some(2));
        assert_eq!(j.append(Kind::Ring, b""), Some(3));
        // A new instance over the same file (a restarted daemon) sees the same records.
        drop(j);
        let j = Journal::open(d.file(), 1 << 20, BOOT).unwrap();
        assert_eq!(j.epoch(), epoch);
        let e = j.entries();
        assert_eq!(e.len(), 3);
        assert_eq!(
            (e[0].seq, e[0].kind, e[0].bytes.as_slice()),
            (1, Kind::Ring, &b"first"[..])
        );
        assert_eq!(e[1].kind, Kind::Aggregate);
        assert_eq!(j.next_seq(), 4);
    }

    #[test]
    fn a_save_discards_the_front_it_covers_and_keeps_what_was_not_handled() {
        let d = dir("discard");
        let mut j = Journal::open(d.file(), 1 << 20, BOOT).unwrap();
        for i in 0..5u8 {
            j.append(Kind::Ring, &[i; 9]).unwrap();
        }
        // Taken while ring records 4 and 5 waited in the queue.
        assert_eq!(j.append(Kind::Aggregate, b"agg"), Some(6));
        j.discard(&mark(&j, 3, 6));
        let seqs: Vec<u64> = j.entries().iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            vec![4, 5, 6],
            "the first record not handled keeps the rest"
        );
        assert_eq!(j.entries()[0].bytes, vec![3u8; 9]);
        // A mark of another journal covers nothing.
        j.discard(&Mark {
            epoch: j.epoch() ^ 1,
            ..mark(&j, 100, 100)
        });
        assert_eq!(j.entries().len(), 3);
        j.discard(&mark(&j, 5, 6));
        assert!(j.entries().is_empty());
        assert_eq!(j.used(), 0);
        // Numbers go on after a discard, and after a restart.
        assert_eq!(j.append(Kind::Ring, b"x"), Some(7));
        j.discard(&mark(&j, 7, 7));
        drop(j);
        let mut j = Journal::open(d.file(), 1 << 20, BOOT).unwrap();
        assert_eq!(j.append(Kind::Ring, b"y"), Some(8));
    }

    #[test]
    fn a_full_journal_moves_what_it_holds_to_the_front_then_refuses() {
        let d = dir("full");
        let mut j = Journal::open(d.file(), 4096, BOOT).unwrap();
        let mut n = 0;
        while j.append(Kind::Ring, &[1u8; 100]).is_some() {
            n += 1;
        }
        assert!(n > 10 && j.append(Kind::Ring, &[1u8; 100]).is_none());
        // Most of it handled and saved: the rest moves to the front to make room.
        j.discard(&mark(&j, n as u64 - 2, 0));
        assert_eq!(j.entries().len(), 2);
        let next = j
            .append(Kind::Ring, &[2u8; 100])
            .expect("room after the move");
        let e = j.entries();
        assert_eq!(
            e.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![next - 2, next - 1, next]
        );
        // Bytes past the end (a record being written when the process died) are ignored.
        let (_, end) = span(&j.map);
        if end + 32 < j.map.len() {
            j.map[end..end + 32].fill(0xff);
        }
        assert_eq!(j.entries().len(), 3);
    }

    #[test]
    fn pages_past_the_records_go_back_only_when_asked_not_when_a_save_empties_it() {
        use std::os::unix::fs::MetadataExt;
        let d = dir("release");
        let mut j = Journal::open(d.file(), 8 << 20, BOOT).unwrap();
        let blocks = |j: &Journal| j.file.metadata().unwrap().blocks();
        let mut n = 0;
        while n < 30_000 {
            j.append(Kind::Ring, &[7u8; 200]).unwrap();
            n += 1;
        }
        let full = blocks(&j);
        assert!(full * 512 > 6 << 20, "records take pages: {full}");
        // A save covers everything: the span empties, the pages stay (no hole punched
        // while the intake may be waiting on the lock).
        j.discard(&mark(&j, n, 0));
        assert!(j.entries().is_empty());
        assert_eq!(blocks(&j), full);
        // New records land at the front; the rest goes back when the engine asks.
        j.append(Kind::Ring, &[8u8; 200]).unwrap();
        j.release_pages();
        assert!(blocks(&j) * 512 < 1 << 20, "{} blocks left", blocks(&j));
        assert_eq!(j.entries().len(), 1, "the records kept are untouched");
        assert_eq!(j.entries()[0].bytes, vec![8u8; 200]);
    }

    #[test]
    fn a_torn_or_foreign_file_starts_a_new_journal() {
        let d = dir("torn");
        let mut j = Journal::open(d.file(), 1 << 16, BOOT).unwrap();
        j.append(Kind::Ring, b"kept").unwrap();
        let epoch = j.epoch();
        // The span claims more than the file holds.
        set_span(&j.map, HEADER, j.map.len() + 8);
        drop(j);
        let j = Journal::open(d.file(), 1 << 16, BOOT).unwrap();
        assert!(j.entries().is_empty());
        assert_ne!(j.epoch(), epoch, "a new journal: no earlier mark covers it");
    }

    #[test]
    fn an_aggregate_comes_back_as_it_was_taken() {
        let key = AccessKey {
            tgid: 42,
            exec_seq: 1,
            start_ns: 123_456_789,
            path_hash: 0xfeed_beef,
        };
        let stats = AccessStats {
            first_open_ns: 1,
            last_open_ns: 2,
            bytes: 4096,
            opens: 3,
            reads: 5,
            last_ino: 77,
            last_dev: 8,
            ..AccessStats::default()
        };
        let bytes = aggregate_bytes(&key, &stats);
        assert_eq!(aggregate_of(&bytes), Some((key, stats)));
        assert_eq!(aggregate_of(&bytes[1..]), None);
    }

    #[test]
    fn a_journal_of_another_boot_is_not_replayed() {
        let d = dir("boot");
        let mut j = Journal::open(d.file(), 1 << 16, BOOT).unwrap();
        j.append(Kind::Ring, b"before the reboot").unwrap();
        drop(j);
        let j = Journal::open(d.file(), 1 << 16, "0b1d4fae-7dec-11d0-a765-00a0c91e6bf6").unwrap();
        assert!(j.entries().is_empty());
    }
}
