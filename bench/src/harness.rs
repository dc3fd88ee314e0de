//! What the benchmarks and the soak share beyond the test kit (the daemon under test,
//! temporary directories, interrupts): workloads forked from this process (storms of
//! short-lived openers, fleets of readers that hold what they read), the daemon's figures
//! from /proc and /metrics, and the statistics and the machine for the reports.
//!
//! Workloads are forked rather than spawned so that 10,000 readers share one image's
//! pages and a storm measures process creation, not an interpreter's start-up. Forking is
//! only sound while this process is single-threaded (a child of a multi-threaded parent
//! inherits locks held by threads it does not have): nothing here starts a thread, and
//! children make only async-signal-safe calls until they `_exit`.

use std::{collections::BTreeSet, fs, time::Duration};

use trustdrift_testkit::Cert;
pub use trustdrift_testkit::{
    interrupt::{catch_interrupts, check_interrupt, sleep},
    random_u64,
};

pub mod fleet;
pub mod metrics;
pub mod procstat;
pub mod storm;

pub use metrics::{Metrics, Scrape, lost_between};

/// `n` self-signed CAs named `{tag} CA {i}`, the pool store versions are made of.
pub fn cas(tag: &str, n: usize) -> Vec<Cert> {
    (0..n).map(|i| Cert::ca(&format!("{tag} CA {i}"))).collect()
}

/// The PEM bundle of the CAs `which` (indexes into `cas`), in that order.
pub fn bundle(cas: &[Cert], which: &BTreeSet<usize>) -> String {
    let picked: Vec<&Cert> = which.iter().map(|i| &cas[*i]).collect();
    trustdrift_testkit::bundle(&picked)
}

/// xorshift64*: reproducible from a seed, which is printed so a run can be repeated.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn between(&mut self, lo: Duration, hi: Duration) -> Duration {
        lo + (hi.saturating_sub(lo)).mul_f64(self.unit())
    }
}

/// Nearest-rank percentile (`p` in 0..=100) of sorted values.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Kernel, CPUs and memory of this machine, for the reports.
pub fn machine() -> String {
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name")?.split_once(':'))
        .map_or("unknown model", |(_, m)| m.trim());
    let meminfo = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    format!(
        "kernel {}, {cpus} CPUs ({model}), {mem_gib:.0} GiB",
        kernel.trim()
    )
}

/// The soft limit on open files raised to the hard one: a fleet of readers and the
/// API clients need more than the usual 1024.
pub fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit on a valid struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub(crate) fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Seconds since the Unix epoch of an RFC 3339 UTC time as the API writes it
/// (`2026-11-23T18:30:46.446Z`).
pub fn parse_rfc3339(s: &str) -> Option<f64> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.splitn(3, ':');
    let (hh, mm) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let ss: f64 = t.next()?.parse().ok()?;
    // Days from civil (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + hh * 3_600 + mm * 60) as f64 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_as_the_api_writes_it() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00.000Z"), Some(0.0));
        assert_eq!(
            parse_rfc3339("2026-11-23T18:30:46.446Z"),
            Some(1_795_458_646.446)
        );
        assert_eq!(parse_rfc3339("2026-11-23 18:30:46Z"), None);
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert_eq!(percentile(&[3.0], 99.0), 3.0);
    }
}
