//! The kernel filter: which paths are trust material. Prefixes in an LPM trie, suffix rules
//! compared at the end of a path, and quick-reject bitmaps that let most paths on a host
//! stop after two probes.

use crate::{MAX_SUFFIXES, PREFIX_CAP, SUFFIX_CAP};

/// Values of the `PREFIXES` LPM trie: the longest matching prefix decides.
pub mod prefix_value {
    /// Paths under it are trust material.
    pub const INCLUDE: u8 = 1;
    /// Paths under it are not, whatever their suffix (e.g. `/etc/ssl/openssl.cnf`).
    pub const EXCLUDE: u8 = 0;
}

/// Key of the `PREFIXES` LPM trie: `prefixlen` in bits, then the prefix bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct PrefixKey {
    pub prefixlen: u32,
    pub data: [u8; PREFIX_CAP],
}

/// One suffix rule, right-aligned in a 16-byte window that ends where the path ends.
/// A path matches when `(window & mask) == value` for both words. Letters are compared
/// lower-case (the probe folds the window, the daemon stores lower-case values).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SuffixRule {
    pub mask: [u64; 2],
    pub value: [u64; 2],
}

/// Value of the single-entry `FILTER` array: the quick-reject bitmaps, their parameters
/// and the suffix rules; one lookup gives the probe all of it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FilterTable {
    /// Bytes of a path's start hashed into the prefix quick-reject bitmap: the shortest
    /// include prefix, at most 8. 0 = no prefixes (skip the trie).
    pub head_len: u32,
    /// Bytes of a path's end hashed into the suffix quick-reject bitmap: the shortest
    /// suffix, at most 8. 0 = no suffixes.
    pub tail_len: u32,
    pub suffix_count: u32,
    pub _pad: u32,
    pub rules: [SuffixRule; MAX_SUFFIXES],
    /// Bits set for the heads of include prefixes.
    pub heads: [u64; QUICK_WORDS],
    /// Bits set for the (lower-cased) tails of suffixes.
    pub tails: [u64; QUICK_WORDS],
}

impl Default for FilterTable {
    fn default() -> Self {
        Self {
            head_len: 0,
            tail_len: 0,
            suffix_count: 0,
            _pad: 0,
            rules: [SuffixRule::default(); MAX_SUFFIXES],
            heads: [0; QUICK_WORDS],
            tails: [0; QUICK_WORDS],
        }
    }
}

/// Words (64 bits each) of one quick-reject bitmap.
pub const QUICK_WORDS: usize = 1024;

/// Bitmap slot of a path head or tail (the first/last `len` bytes as a little-endian
/// word, zero-padded, suffix tails lower-cased): (word index, bit mask). A clear bit means
/// no configured prefix (suffix) can match; a set bit means "look closer". With a few
/// dozen entries in 65536 bits, about one unrelated path in a thousand looks closer.
#[inline(always)]
pub fn quick_slot(word: u64) -> (u32, u64) {
    let h = word.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 48;
    ((h >> 6) as u32 & (QUICK_WORDS as u32 - 1), 1u64 << (h & 63))
}

/// Mask keeping the low `len` bytes of a word (`len` in 0..=8).
#[inline(always)]
pub fn low_bytes_mask(len: u32) -> u64 {
    if len >= 8 {
        u64::MAX
    } else {
        (1u64 << (len * 8)) - 1
    }
}

impl SuffixRule {
    /// Builds the rule for `suffix` (at most [`SUFFIX_CAP`] bytes, matched case-insensitively
    /// for ASCII letters). Returns `None` for an empty or too long suffix.
    pub fn new(suffix: &[u8]) -> Option<Self> {
        if suffix.is_empty() || suffix.len() > SUFFIX_CAP {
            return None;
        }
        let mut window = [0u8; SUFFIX_CAP];
        let mut mask = [0u8; SUFFIX_CAP];
        let start = SUFFIX_CAP - suffix.len();
        let mut i = 0;
        while i < suffix.len() {
            window[start + i] = suffix[i].to_ascii_lowercase();
            mask[start + i] = 0xff;
            i += 1;
        }
        let word = |bytes: &[u8; SUFFIX_CAP], half: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&bytes[half * 8..half * 8 + 8]);
            u64::from_le_bytes(w)
        };
        Some(Self {
            mask: [word(&mask, 0), word(&mask, 1)],
            value: [word(&window, 0), word(&window, 1)],
        })
    }

    /// Whether the 16-byte window (already lower-cased) matches.
    #[inline(always)]
    pub fn matches(&self, window: [u64; 2]) -> bool {
        window[0] & self.mask[0] == self.value[0] && window[1] & self.mask[1] == self.value[1]
    }
}

/// ASCII lower-casing of eight bytes at once (bytes >= 0x80 are left alone).
#[inline(always)]
pub fn ascii_lower_word(x: u64) -> u64 {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let low7 = x & !HIGH;
    // Bit 7 of each byte: set when the byte is >= 'A' / > 'Z' (no carries cross bytes
    // because the low seven bits plus the constant stay below 0x100).
    let ge_a = low7.wrapping_add(0x3f3f_3f3f_3f3f_3f3f);
    let gt_z = low7.wrapping_add(0x2525_2525_2525_2525);
    let upper = (ge_a ^ gt_z) & !x & HIGH;
    x | (upper >> 2)
}
