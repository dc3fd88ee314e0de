//! The path under test: copy it from user memory once, decide whether it is trust
//! material (prefix trie, suffix rules), and hash it into the `ACCESSES` key.
//!
//! Cost matters here more than anywhere: this runs for every read-only open on the host,
//! so the common case (an unrelated path) is one user copy and two bitmap probes.

use aya_ebpf::{helpers::generated::bpf_probe_read_user_str, maps::lpm_trie::Key};
use trustdrift_common::{
    FilterTable, MAX_SUFFIXES, PATH_CAP, PREFIX_CAP, QUICK_WORDS, ascii_lower_word, low_bytes_mask,
    match_flags, quick_slot,
};

use crate::maps::{FILTER, PATH_WORD_OFFSET, PREFIXES, PathScratch, SCRATCH, SCRATCH_WORDS};

/// Whether `bitmap` may hold `word` (see `quick_slot`).
#[inline(always)]
fn quick_maybe(bitmap: &[u64; QUICK_WORDS], word: u64) -> bool {
    let (index, bit) = quick_slot(word);
    bitmap[(index as usize) & (QUICK_WORDS - 1)] & bit != 0
}

/// Why a path could not be examined.
pub enum CopyError {
    /// The filter was not written yet or the scratch is missing: nothing to match against.
    NotReady,
    /// The path could not be read from user memory.
    Unreadable,
}

/// A path copied into the per-CPU scratch, with the filter to judge it by.
pub struct CopiedPath {
    pub filter: &'static FilterTable,
    scratch: *mut PathScratch,
    /// Length without the NUL.
    pub len: usize,
    pub truncated: bool,
}

/// Copies the NUL-terminated user string at `ptr` into the per-CPU scratch.
#[inline(always)]
pub fn copy_from_user(ptr: *const u8) -> Result<CopiedPath, CopyError> {
    let filter = FILTER.get_ptr(0).ok_or(CopyError::NotReady)?;
    let scratch = SCRATCH.get_ptr_mut(0).ok_or(CopyError::NotReady)?;
    // SAFETY: the scratch slot is this CPU's and the probe is not re-entered on it; the
    // helper is fault-safe and writes at most PATH_CAP bytes, NUL included.
    let copied = unsafe {
        bpf_probe_read_user_str(
            (*scratch).path.as_mut_ptr().cast(),
            PATH_CAP as u32,
            ptr.cast(),
        )
    };
    if copied <= 0 {
        return Err(CopyError::Unreadable);
    }
    let len = (copied as usize - 1) & (PATH_CAP - 1);
    Ok(CopiedPath {
        // SAFETY: a valid map value the daemon replaces whole.
        filter: unsafe { &*filter },
        scratch,
        len,
        // The helper leaves room for the NUL: a full buffer means the path was cut.
        truncated: len >= PATH_CAP - 1,
    })
}

impl CopiedPath {
    #[inline(always)]
    fn word(&self, index: usize) -> u64 {
        if index >= SCRATCH_WORDS {
            return 0;
        }
        // SAFETY: index is bounded by the size of `PathScratch`, which is 8-byte aligned.
        unsafe { *(self.scratch as *const u64).add(index) }
    }

    /// The first 8 bytes of the path (garbage after the NUL for short paths).
    #[inline(always)]
    fn head(&self) -> u64 {
        self.word(PATH_WORD_OFFSET)
    }

    #[inline(always)]
    pub fn is_absolute(&self) -> bool {
        self.len > 0 && self.head() as u8 == b'/'
    }

    /// The value of the longest configured prefix that starts the path: include (1) or
    /// exclude (0); `None` when no prefix does.
    #[inline(always)]
    pub fn prefix_verdict(&self) -> Option<u8> {
        let head_len = self.filter.head_len;
        if head_len == 0 || self.len < head_len as usize {
            return None;
        }
        if !quick_maybe(&self.filter.heads, self.head() & low_bytes_mask(head_len)) {
            return None;
        }
        let len = if self.len > PREFIX_CAP {
            PREFIX_CAP
        } else {
            self.len
        };
        // SAFETY: scratch is a valid map value; `prefixlen` followed by `path` has the layout
        // of an LPM key, and the kernel reads only the key size of the trie.
        unsafe {
            (*self.scratch).prefixlen = (len * 8) as u32;
            let key = &*(&raw const (*self.scratch).prefixlen).cast::<Key<[u8; PREFIX_CAP]>>();
            let verdict = PREFIXES.get(key).copied();
            // The suffix window of short paths reads these bytes as zeros.
            (*self.scratch).prefixlen = 0;
            verdict
        }
    }

    /// Whether one of the configured suffixes ends the path (ASCII case-insensitive).
    #[inline(always)]
    pub fn matches_suffix(&self) -> bool {
        let tail_len = self.filter.tail_len;
        if tail_len == 0 || tail_len > 8 || self.len < tail_len as usize {
            return false;
        }
        // The last 8 bytes, lower-cased; the last `tail_len` of them sit at the top.
        let last = ascii_lower_word(self.word_ending_at(self.len));
        if !quick_maybe(&self.filter.tails, last >> ((8 - tail_len) * 8)) {
            return false;
        }
        let before = if self.len >= 8 {
            ascii_lower_word(self.word_ending_at(self.len - 8))
        } else {
            0
        };
        let window = [before, last];
        let count = self.filter.suffix_count as usize;
        let mut i = 0;
        while i < MAX_SUFFIXES {
            if i >= count {
                break;
            }
            if self.filter.rules[i].matches(window) {
                return true;
            }
            i += 1;
        }
        false
    }

    /// The 8 path bytes ending just before path offset `end` (which may be below 8: bytes
    /// before the path are the scratch's zeros), as a little-endian word.
    #[inline(always)]
    fn word_ending_at(&self, end: usize) -> u64 {
        // Byte offset of the word's first byte inside the scratch.
        let start = PATH_WORD_OFFSET * 8 + end - 8;
        let base = start / 8;
        let shift = (start % 8) as u32 * 8;
        if shift == 0 {
            self.word(base)
        } else {
            (self.word(base) >> shift) | (self.word(base + 1) << (64 - shift))
        }
    }

    /// A 64-bit hash of the path bytes (the daemon treats it as opaque).
    #[inline(always)]
    pub fn hash(&self) -> u64 {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ self.len as u64;
        let words = self.len.div_ceil(8);
        let tail = self.len % 8;
        let mut i = 0;
        while i < PATH_CAP / 8 {
            if i >= words {
                break;
            }
            let mut w = self.word(PATH_WORD_OFFSET + i);
            if i + 1 == words && tail != 0 {
                // Bytes after the NUL are leftovers of earlier paths.
                w &= (1u64 << (tail * 8)) - 1;
            }
            h = (h ^ w).wrapping_mul(PRIME);
            h ^= h >> 29;
            i += 1;
        }
        h
    }

    #[inline(always)]
    pub fn flags(&self) -> u32 {
        if self.truncated {
            match_flags::TRUNCATED
        } else {
            0
        }
    }
}
