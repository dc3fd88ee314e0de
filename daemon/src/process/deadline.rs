//! Blocking work on other processes' files, under a deadline.
//!
//! Anything that touches a file a process on the node controls can block for ever: a FIFO,
//! a FUSE file whose server never answers, a hung NFS mount. Even an `O_PATH` open or an
//! `fstat` asks the filesystem. Such work runs here, on a worker thread, while the caller
//! waits at most a deadline. A worker that does not come back is left to its fate (no
//! syscall can be cancelled) and a fresh one takes the next job; the number left behind is
//! bounded, and past the bound jobs are refused at once rather than queued for ever.
//!
//! What timed out is quarantined by its key with a growing back-off, so one hostile path
//! costs the caller one deadline per back-off period, not one per look; and a key whose
//! job is still blocked is not tried again at all, so one hung mount holds at most one
//! worker however long it stays hung.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
        mpsc,
    },
    thread,
    time::{Duration, Instant},
};

use thiserror::Error;

use crate::allocator;

/// A worker without a job for this long is idle, and after this many jobs its allocator
/// cache goes back (see [`allocator::falling_idle`]).
const IDLE_AFTER: Duration = Duration::from_secs(2);
const IDLE_WORTH: u64 = 512;

/// Why a job did not give its result.
#[derive(Clone, Copy, Debug, Error, PartialEq, Eq)]
pub enum Refused {
    /// It did not finish within the deadline (it may still be blocked).
    #[error("timed out")]
    TimedOut,
    /// Its key timed out recently: not tried again before its back-off ends.
    #[error("timed out earlier; retried after a back-off")]
    Quarantined,
    /// Too many workers are blocked already.
    #[error("every worker is blocked on earlier jobs")]
    Saturated,
}

/// The bounds of a [`Deadline`] pool.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long a caller waits for one job.
    pub timeout: Duration,
    /// Workers that may be blocked at once; past it, jobs are refused.
    pub max_blocked: usize,
    /// First quarantine of a key after a time-out; it doubles at each further one.
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(2),
            max_blocked: 32,
            backoff: Duration::from_secs(30),
            max_backoff: Duration::from_secs(15 * 60),
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// One worker thread: its queue, and whether it was left behind on a blocked job.
struct Worker {
    jobs: mpsc::Sender<Job>,
    abandoned: Arc<AtomicBool>,
}

/// Counts of what happened, for the metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub timed_out: u64,
    pub quarantined: u64,
    pub saturated: u64,
}

/// A key's quarantine: until when, and the back-off that set it.
#[derive(Clone, Copy, Debug)]
struct Quarantine {
    until: Instant,
    backoff: Duration,
}

/// A key for [`Deadline::run`] from whatever names what a job touches.
pub fn key(what: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    what.hash(&mut h);
    h.finish()
}

/// The pool. Used from one thread (the engine); workers are its own.
pub struct Deadline {
    limits: Limits,
    worker: Option<Worker>,
    /// Workers abandoned on a job that have not come back yet.
    blocked: Arc<AtomicUsize>,
    /// Keys of the jobs those workers are blocked on.
    blocked_keys: Arc<Mutex<HashSet<u64>>>,
    quarantine: HashMap<u64, Quarantine>,
    counts: Counts,
    spawned: u64,
}

impl Deadline {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            worker: None,
            blocked: Arc::new(AtomicUsize::new(0)),
            blocked_keys: Arc::default(),
            quarantine: HashMap::new(),
            counts: Counts::default(),
            spawned: 0,
        }
    }

    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Workers blocked on jobs that timed out and never came back (yet).
    pub fn blocked(&self) -> usize {
        self.blocked.load(Ordering::SeqCst)
    }

    /// Whether `key` is quarantined now.
    pub fn is_quarantined(&self, key: u64) -> bool {
        self.quarantine
            .get(&key)
            .is_some_and(|q| Instant::now() < q.until)
            || self.still_blocked(key)
    }

    fn still_blocked(&self, key: u64) -> bool {
        self.blocked_keys
            .lock()
            .is_ok_and(|keys| keys.contains(&key))
    }

    /// Runs `job` on a worker and waits for it at most the deadline. `key` names what the
    /// job touches (a file in a root, say): a key that timed out is quarantined.
    pub fn run<T, F>(&mut self, key: u64, job: F) -> Result<T, Refused>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        if self.is_quarantined(key) {
            self.counts.quarantined += 1;
            return Err(Refused::Quarantined);
        }
        if self.blocked.load(Ordering::SeqCst) >= self.limits.max_blocked {
            self.counts.saturated += 1;
            return Err(Refused::Saturated);
        }
        let (tx, rx) = mpsc::sync_channel(1);
        let blocked_keys = Arc::clone(&self.blocked_keys);
        let boxed: Job = Box::new(move || {
            // The caller may have given up: a closed channel is not an error here.
            let _ = tx.send(job());
            // Back: whatever blocked it is not blocking any more.
            if let Ok(mut keys) = blocked_keys.lock() {
                keys.remove(&key);
            }
        });
        let worker = self.worker()?;
        if worker.jobs.send(boxed).is_err() {
            // The worker died (a panic in a job): start another for the next one.
            self.worker = None;
            return Err(Refused::TimedOut);
        }
        match rx.recv_timeout(self.limits.timeout) {
            Ok(value) => {
                self.quarantine.remove(&key);
                Ok(value)
            }
            Err(_) => {
                self.counts.timed_out += 1;
                if let Ok(mut keys) = self.blocked_keys.lock() {
                    keys.insert(key);
                }
                self.abandon();
                let backoff = self.quarantine.get(&key).map_or(self.limits.backoff, |q| {
                    (q.backoff * 2).min(self.limits.max_backoff)
                });
                self.quarantine.insert(
                    key,
                    Quarantine {
                        until: Instant::now() + backoff,
                        backoff,
                    },
                );
                if self.quarantine.len() > 4096 {
                    let now = Instant::now();
                    self.quarantine.retain(|_, q| now < q.until);
                }
                Err(Refused::TimedOut)
            }
        }
    }

    /// Leaves the current worker to its blocked job; the next job gets a new one.
    fn abandon(&mut self) {
        if let Some(w) = self.worker.take() {
            // Counted before it is flagged, so the worker never uncounts itself first.
            self.blocked.fetch_add(1, Ordering::SeqCst);
            w.abandoned.store(true, Ordering::SeqCst);
        }
    }

    fn worker(&mut self) -> Result<&Worker, Refused> {
        if self.worker.is_none() {
            let (tx, rx) = mpsc::channel::<Job>();
            let abandoned = Arc::new(AtomicBool::new(false));
            let (flag, blocked) = (Arc::clone(&abandoned), Arc::clone(&self.blocked));
            self.spawned += 1;
            let spawned = thread::Builder::new()
                .name(format!("td-io-{}", self.spawned))
                // Parsing a certificate is the deepest thing a job does.
                .stack_size(1 << 20)
                .spawn(move || {
                    loop {
                        let job = match rx.recv_timeout(IDLE_AFTER) {
                            Ok(job) => job,
                            Err(mpsc::RecvTimeoutError::Timeout) => {
                                allocator::falling_idle(IDLE_WORTH);
                                continue;
                            }
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        };
                        job();
                        allocator::worked(1);
                        if flag.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                    // Came back after it was given up on (its queue is gone then too): no
                    // longer blocked, and no longer anyone's worker.
                    if flag.load(Ordering::SeqCst) {
                        blocked.fetch_sub(1, Ordering::SeqCst);
                    }
                });
            if spawned.is_err() {
                self.counts.saturated += 1;
                return Err(Refused::Saturated);
            }
            self.worker = Some(Worker {
                jobs: tx,
                abandoned,
            });
        }
        self.worker.as_ref().ok_or(Refused::Saturated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quick() -> Limits {
        Limits {
            timeout: Duration::from_millis(100),
            max_blocked: 2,
            backoff: Duration::from_millis(300),
            max_backoff: Duration::from_secs(1),
        }
    }

    #[test]
    fn a_job_that_answers_in_time_gives_its_result() {
        let mut d = Deadline::new(quick());
        assert_eq!(d.run(1, || 40 + 2), Ok(42));
        assert_eq!(d.run(1, || "again"), Ok("again"));
        assert_eq!(d.counts(), Counts::default());
    }

    #[test]
    fn a_blocked_job_times_out_its_key_is_quarantined_and_others_go_on() {
        let mut d = Deadline::new(quick());
        let (release, wait) = mpsc::channel::<()>();
        let started = Instant::now();
        assert_eq!(
            d.run(7, move || {
                let _ = wait.recv();
            }),
            Err(Refused::TimedOut)
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(d.blocked(), 1);
        // The same key is not tried again during its back-off; another key is, at once.
        assert_eq!(d.run(7, || ()), Err(Refused::Quarantined));
        assert_eq!(d.run(8, || 1), Ok(1));
        // Nor after its back-off while its first job is still blocked.
        thread::sleep(Duration::from_millis(350));
        assert_eq!(d.run(7, || ()), Err(Refused::Quarantined));
        // The blocked worker coming back is no longer counted as blocked.
        release.send(()).unwrap();
        for _ in 0..100 {
            if d.blocked() == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d.blocked(), 0);
        // After the back-off the key is tried again.
        thread::sleep(Duration::from_millis(350));
        assert_eq!(d.run(7, || 2), Ok(2));
        assert_eq!(d.counts().timed_out, 1);
        assert_eq!(d.counts().quarantined, 2);
    }

    #[test]
    fn past_the_bound_of_blocked_workers_jobs_are_refused_at_once() {
        let mut d = Deadline::new(quick());
        let mut releases = Vec::new();
        for key in 0..2 {
            let (release, wait) = mpsc::channel::<()>();
            releases.push(release);
            assert_eq!(
                d.run(key, move || {
                    let _ = wait.recv();
                }),
                Err(Refused::TimedOut)
            );
        }
        let started = Instant::now();
        assert_eq!(d.run(99, || ()), Err(Refused::Saturated));
        assert!(started.elapsed() < Duration::from_millis(50));
        drop(releases);
        for _ in 0..100 {
            if d.blocked() == 0 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(d.run(99, || 3), Ok(3));
    }
}
