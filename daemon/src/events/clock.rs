//! The probe stamps events with `CLOCK_BOOTTIME`; people and JSON want wall-clock time.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn now(clock: libc::clockid_t) -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec out-pointer and a clock id every Linux has.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// `CLOCK_BOOTTIME` now, in ns: what the probe would stamp.
pub fn boot_ns_now() -> u64 {
    now(libc::CLOCK_BOOTTIME).as_nanos() as u64
}

/// Wall-clock time of a `CLOCK_BOOTTIME` stamp.
pub fn wall_time(boot_ns: u64) -> SystemTime {
    let realtime = now(libc::CLOCK_REALTIME);
    let boot = now(libc::CLOCK_BOOTTIME);
    let booted_at = realtime.saturating_sub(boot);
    UNIX_EPOCH + booted_at + Duration::from_nanos(boot_ns)
}

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T17:08:01.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_446_481_123);
        assert_eq!(rfc3339(t), "2026-11-23T15:08:01.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn boot_stamps_map_near_now() {
        let boot_ns = now(libc::CLOCK_BOOTTIME).as_nanos() as u64;
        let wall = wall_time(boot_ns);
        let drift = SystemTime::now()
            .duration_since(wall)
            .unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_secs(1));
    }
}
