//! Verdicts: does what each process read still match what is on disk now?

pub mod renewal;
pub mod verdict;
