//! Moving the probe's records out of the kernel's ring buffer as soon as they arrive, on a
//! thread of their own. The engine handles records at its own pace (a snapshot, a save
//! or a storm of new processes can hold it for milliseconds); the ring buffer only has to
//! hold what arrives while this thread is off the CPU, not while the engine is busy.
//!
//! Records wait for the engine in a queue bounded in bytes. When it is full, the thread
//! stops draining: the ring buffer fills and the probe counts what it cannot send as
//! `ringbuf_full`, so nothing is dropped without being counted.
//!
//! Each record is copied into the crash journal before its ring-buffer space is given
//! back: from then on a SIGKILL of the daemon cannot lose it (the next start replays
//! what the last save did not hold).

use std::{
    os::fd::AsRawFd,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;

use super::journal::{Kind, SharedJournal, lock};
use crate::allocator;

/// Records as they came out of the ring buffer: each one a `u32` length (native endian)
/// and its bytes, padded to 8 so every record starts aligned.
pub struct Batch {
    bytes: Vec<u8>,
    records: usize,
    /// The journal's sequence number of the last record journalled.
    last_seq: Option<u64>,
}

impl Batch {
    fn new() -> Self {
        Self {
            bytes: Vec::new(),
            records: 0,
            last_seq: None,
        }
    }

    /// Once the batch is handled, the ledger holds the journal's ring records up to this.
    pub fn last_seq(&self) -> Option<u64> {
        self.last_seq
    }

    fn push(&mut self, record: &[u8]) {
        let start = self.bytes.len();
        self.bytes
            .extend_from_slice(&(record.len() as u32).to_ne_bytes());
        self.bytes.resize(start + 8, 0);
        self.bytes.extend_from_slice(record);
        self.bytes.resize(self.bytes.len().next_multiple_of(8), 0);
        self.records += 1;
    }

    pub fn len(&self) -> usize {
        self.records
    }

    pub fn is_empty(&self) -> bool {
        self.records == 0
    }

    /// Bytes the batch holds, as counted against the queue's bound.
    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The records, in the order the probe sent them.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.bytes[..];
        std::iter::from_fn(move || {
            let len = u32::from_ne_bytes(rest.get(..4)?.try_into().ok()?) as usize;
            let record = rest.get(8..8 + len)?;
            rest = rest.get((8 + len).next_multiple_of(8)..).unwrap_or(&[]);
            Some(record)
        })
    }
}

/// A batch grows to at most this many bytes before it is handed over. Above glibc's mmap
/// threshold (256 KiB), a big batch's memory goes back to the kernel when it is dropped.
const BATCH_BYTES: usize = 256 * 1024;

/// After a pass that found records, the thread waits this long before the next one
/// instead of being woken by each record: a storm then costs a wake-up per millisecond,
/// not per record, and a record waits at most this long more.
const BATCH_PAUSE: Duration = Duration::from_millis(1);

/// Passes with records after which falling idle hands the thread's allocator cache back.
const IDLE_WORTH: u64 = 512;

/// How often an idle thread checks that the engine still listens.
const IDLE_POLL_MS: i32 = 200;

/// The engine's end of the intake.
pub struct Intake {
    pub batches: mpsc::UnboundedReceiver<Batch>,
    queued: Arc<AtomicU64>,
    unjournalled: Arc<AtomicU64>,
}

impl Intake {
    /// Starts the thread that drains `ring` into a queue of at most `max_queued` bytes,
    /// journalling each record first when there is a `journal`.
    pub fn start(
        ring: RingBuf<MapData>,
        max_queued: u64,
        journal: Option<SharedJournal>,
    ) -> Result<Self> {
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicU64::new(0));
        let unjournalled = Arc::new(AtomicU64::new(0));
        let shared = Arc::clone(&queued);
        let source = Ring {
            ring,
            journal,
            unjournalled: Arc::clone(&unjournalled),
        };
        thread::Builder::new()
            .name("td-intake".into())
            .spawn(move || drain(source, tx, &shared, max_queued))
            .context("starting the ring-buffer intake thread")?;
        Ok(Self {
            batches: rx,
            queued,
            unjournalled,
        })
    }

    /// Records taken while the journal was full: a crash before the next save would
    /// have lost them.
    pub fn unjournalled(&self) -> u64 {
        self.unjournalled.load(Ordering::Relaxed)
    }

    /// The engine is done with `batch`: its bytes leave the queue.
    pub fn handled(&self, batch: &Batch) {
        self.queued.fetch_sub(batch.size(), Ordering::Relaxed);
    }

    /// Bytes taken from the ring buffer and not yet handled.
    pub fn queued_bytes(&self) -> u64 {
        self.queued.load(Ordering::Relaxed)
    }
}

/// Where records come from: the probe's ring buffer (or, in tests, a list).
trait Source {
    /// Copies the next record into `batch`, consuming it; false when there is none.
    fn take_into(&mut self, batch: &mut Batch) -> bool;
    /// Waits until a record may be there, or `timeout_ms` passed.
    fn wait(&self, timeout_ms: i32);
}

/// The probe's ring buffer, and the journal each record is copied into first.
struct Ring {
    ring: RingBuf<MapData>,
    journal: Option<SharedJournal>,
    unjournalled: Arc<AtomicU64>,
}

impl Source for Ring {
    fn take_into(&mut self, batch: &mut Batch) -> bool {
        let Some(record) = self.ring.next() else {
            return false;
        };
        // Journalled while the record still holds its ring-buffer space (given back when
        // `record` drops): there is no moment at which a crash loses it.
        if let Some(journal) = &self.journal {
            match lock(journal).append(Kind::Ring, &record) {
                Some(seq) => batch.last_seq = Some(seq),
                None => {
                    self.unjournalled.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        batch.push(&record);
        true
    }

    fn wait(&self, timeout_ms: i32) {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call. An error (EINTR) is
        // only an early return: the caller drains whatever is there either way.
        unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    }
}

/// The engine dropped its end: the thread has nobody to hand records to.
#[derive(Debug, PartialEq, Eq)]
struct EngineGone;

/// One pass: moves records into batches until the source is empty or the queue is full.
/// Whether it found any.
fn drain_once(
    source: &mut impl Source,
    tx: &mpsc::UnboundedSender<Batch>,
    queued: &AtomicU64,
    max_queued: u64,
) -> Result<bool, EngineGone> {
    let mut batch = Batch::new();
    let mut found = false;
    // A full queue stops the draining here; the ring buffer keeps the rest (and the
    // probe counts what does not fit).
    while queued.load(Ordering::Relaxed) + batch.size() < max_queued && source.take_into(&mut batch)
    {
        found = true;
        if batch.bytes.len() >= BATCH_BYTES {
            queued.fetch_add(batch.size(), Ordering::Relaxed);
            tx.send(std::mem::replace(&mut batch, Batch::new()))
                .map_err(|_| EngineGone)?;
        }
    }
    if !batch.is_empty() {
        queued.fetch_add(batch.size(), Ordering::Relaxed);
        tx.send(batch).map_err(|_| EngineGone)?;
    }
    Ok(found)
}

fn drain(
    mut source: impl Source,
    tx: mpsc::UnboundedSender<Batch>,
    queued: &AtomicU64,
    max_queued: u64,
) {
    while !tx.is_closed() {
        let Ok(found) = drain_once(&mut source, &tx, queued, max_queued) else {
            return;
        };
        if found || queued.load(Ordering::Relaxed) >= max_queued {
            allocator::worked(1);
            thread::sleep(BATCH_PAUSE);
        } else {
            allocator::falling_idle(IDLE_WORTH);
            source.wait(IDLE_POLL_MS);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    impl Source for VecDeque<Vec<u8>> {
        fn take_into(&mut self, batch: &mut Batch) -> bool {
            self.pop_front().map(|r| batch.push(&r)).is_some()
        }

        fn wait(&self, _: i32) {}
    }

    #[test]
    fn a_full_queue_leaves_the_rest_in_the_ring_buffer_until_the_engine_catches_up() {
        let record = vec![0xabu8; 200];
        let mut ring: VecDeque<Vec<u8>> = (0..1000).map(|_| record.clone()).collect();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let queued = AtomicU64::new(0);
        // 200 bytes a record, 208 with its length and padding: 100 fit in 20,800 bytes.
        let bound = 20_800;
        assert_eq!(drain_once(&mut ring, &tx, &queued, bound), Ok(true));
        assert_eq!(ring.len(), 900, "the bound stops the draining");
        assert_eq!(queued.load(Ordering::Relaxed), bound);
        // Nothing moves while the engine handles nothing.
        assert_eq!(drain_once(&mut ring, &tx, &queued, bound), Ok(false));
        assert_eq!(ring.len(), 900);
        // The engine handles what it got: as much again can be drained.
        let batch = rx.try_recv().unwrap();
        assert_eq!(batch.len(), 100);
        assert!(batch.records().all(|r| r == record));
        queued.fetch_sub(batch.size(), Ordering::Relaxed);
        assert_eq!(drain_once(&mut ring, &tx, &queued, bound), Ok(true));
        assert_eq!(ring.len(), 800);
        // The engine gone, the thread stops.
        drop(rx);
        queued.store(0, Ordering::Relaxed);
        assert_eq!(drain_once(&mut ring, &tx, &queued, bound), Err(EngineGone));
    }

    #[test]
    fn a_batch_gives_back_its_records_in_order_and_aligned() {
        let mut batch = Batch::new();
        let records: [&[u8]; 4] = [b"first", &[7u8; 24], b"", &[1, 2, 3, 4, 5, 6, 7, 8, 9]];
        for r in records {
            batch.push(r);
        }
        assert_eq!(batch.len(), 4);
        assert_eq!(batch.size() % 8, 0);
        let back: Vec<&[u8]> = batch.records().collect();
        assert_eq!(back, records);
        // Every record starts 8-byte aligned within the batch, as in the ring buffer.
        let base = batch.bytes.as_ptr() as usize;
        for r in batch.records() {
            assert_eq!((r.as_ptr() as usize - base) % 8, 0);
        }
    }
}
