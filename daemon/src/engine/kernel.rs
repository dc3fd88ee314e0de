//! The kernel tables, as the engine sees them: a small trait in front of the probe's maps,
//! so that the engine's decisions can be tested without loading a probe.

use anyhow::Result;
use trustdrift_common::{AccessKey, AccessStats, Loss};

use crate::probe::{MapFill, Probe, ProgramStats, pinning::PinStatus, trust_paths::TrustPaths};

/// What the engine asks of the probe.
pub trait Kernel {
    /// The aggregate the probe keeps for `key`, if it still exists.
    fn access_stats(&self, key: &AccessKey) -> Option<AccessStats>;
    /// The aggregate of `key`, removed from the kernel in the same call (its process has
    /// exited: it cannot move again).
    fn take_access_stats(&mut self, key: &AccessKey) -> Option<AccessStats>;
    /// Drops an aggregate the daemon no longer needs (or refuses to keep).
    fn forget_access(&mut self, key: &AccessKey);
    /// Asks for one `Event::Reread` at the next re-open of, or read on, `key` (an error
    /// when the watch table is full: the aggregate's poll still sees the re-read).
    fn watch_reread(&mut self, key: &AccessKey) -> Result<()>;
    /// Withdraws a watch that has not fired (the access was forgotten or judged again).
    fn unwatch_reread(&mut self, key: &AccessKey);
    /// Observations the probe could not keep, by reason, since it was loaded.
    fn losses(&self) -> Vec<(Loss, u64)>;
    /// How full each bounded map is (may walk a map: now and then, not per record).
    fn map_fill(&self) -> Vec<MapFill>;
    /// The kernel's accounting of each program.
    fn program_stats(&self) -> Vec<ProgramStats>;
    /// Replaces the kernel filter.
    fn set_paths(&mut self, paths: &TrustPaths) -> Result<()>;
    /// Whether the probe outlives the daemon.
    fn pinning(&self) -> &PinStatus;
    /// Leaves nothing pinned behind.
    fn unpin(&mut self);
}

impl Kernel for Probe {
    fn access_stats(&self, key: &AccessKey) -> Option<AccessStats> {
        Probe::access_stats(self, key)
    }

    fn take_access_stats(&mut self, key: &AccessKey) -> Option<AccessStats> {
        Probe::take_access_stats(self, key)
    }

    fn forget_access(&mut self, key: &AccessKey) {
        Probe::forget_access(self, key);
    }

    fn watch_reread(&mut self, key: &AccessKey) -> Result<()> {
        Probe::watch_reread(self, key)
    }

    fn unwatch_reread(&mut self, key: &AccessKey) {
        Probe::unwatch_reread(self, key);
    }

    fn losses(&self) -> Vec<(Loss, u64)> {
        Probe::losses(self).to_vec()
    }

    fn map_fill(&self) -> Vec<MapFill> {
        Probe::map_fill(self)
    }

    fn program_stats(&self) -> Vec<ProgramStats> {
        Probe::program_stats(self)
    }

    fn set_paths(&mut self, paths: &TrustPaths) -> Result<()> {
        Probe::set_paths(self, paths)
    }

    fn pinning(&self) -> &PinStatus {
        &self.pinning
    }

    fn unpin(&mut self) {
        Probe::unpin(self);
    }
}
