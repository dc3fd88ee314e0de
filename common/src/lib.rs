//! Types shared by the kernel probe (`ebpf/`) and the daemon (`daemon/`), one concept per
//! module: the ring buffer's [`records`], the maps' keys and values ([`tables`]), the
//! kernel [`filter`], the [`loss`] reasons, the [`kernel`] struct offsets, the maps' names
//! and sizes ([`maps`]), and the [`layout`] both sides must agree on.
//!
//! Everything here is `#[repr(C)]` plain data: the probe writes it into BPF maps and the
//! ring buffer, the daemon reads it back byte for byte. Padding is always explicit so both
//! sides agree on every offset, and enums cross the boundary as `u32` that the daemon
//! decodes with `TryFrom` (an unknown value is an error, never a transmute).
#![no_std]

pub mod filter;
pub mod iter;
pub mod kernel;
pub mod layout;
pub mod loss;
pub mod maps;
pub mod records;
pub mod tables;

pub use filter::{
    FilterTable, PrefixKey, QUICK_WORDS, SuffixRule, ascii_lower_word, low_bytes_mask,
    prefix_value, quick_slot,
};
pub use iter::{
    LibraryPrefix, MAX_TLS_LIBRARIES, SEED_PATH_CAP, SeedOffsets, SeedRecord, TlsLibraries,
    seed_flags, seed_kind,
};
pub use kernel::KernelOffsets;
pub use loss::{LOSS_REASONS, Loss};
pub use records::{
    ACCESS_RECORD_CAP, AccessEvent, EventHeader, EventKind, ProcEvent, RereadCause, RereadEvent,
    kpath_flags, match_flags,
};
pub use tables::{
    AccessKey, AccessStats, FdKey, MatchedOpen, OwnerKey, OwnerQuotas, OwnerUsage, ProcState,
    owner_kind,
};

/// Bytes of a path the probe copies from user memory, NUL included. Longer paths are
/// truncated, flagged in the event and counted as [`Loss::PathTruncated`].
pub const PATH_CAP: usize = 512;
/// Bytes of the kernel's path of an opened file the probe sends, NUL included. A longer one
/// is flagged `kpath_flags::TRUNCATED` and the daemon does without it.
pub const KPATH_CAP: usize = 512;
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
/// Slots of the per-fd-number pre-filter (a power of two): how many tracked fds, in any
/// process, have a number that falls into the slot. Zero lets a read, close or dup skip
/// everything else, without even asking which process it is.
pub const FD_FILTER_SLOTS: usize = 1 << 10;
/// Bytes of the node's key for keyed digests (the `NODE_KEY` map's value).
pub const NODE_KEY_BYTES: usize = 32;

/// A `u32` that is not an [`EventKind`], [`Loss`] or other wire enum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnknownDiscriminant(pub u32);

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
    unsafe impl aya::Pod for OwnerKey {}
    unsafe impl aya::Pod for OwnerUsage {}
    unsafe impl aya::Pod for OwnerQuotas {}
    unsafe impl aya::Pod for EventHeader {}
    unsafe impl aya::Pod for AccessEvent {}
    unsafe impl aya::Pod for ProcEvent {}
    unsafe impl aya::Pod for RereadEvent {}
    unsafe impl aya::Pod for SeedRecord {}
    unsafe impl aya::Pod for SeedOffsets {}
    unsafe impl aya::Pod for TlsLibraries {}
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
        assert_eq!(EventKind::try_from(4), Ok(EventKind::Reread));
        assert_eq!(RereadCause::try_from(2), Ok(RereadCause::Read));
        assert!(RereadCause::try_from(0).is_err());
    }
}
