//! What the start-up iterators send: which processes hold (open or mapped) files the
//! trust filter may want, which map a TLS library, and which executable each runs. The
//! probe writes these records back to back into the iterator's seq file
//! (`bpf_seq_write`), each [`SeedRecord`] followed by its path when it has one; they
//! never cross a pinned map, so they are not part of the pinned layout.

use core::mem::size_of;

/// Bytes of a path the iterators send, NUL included (`PATH_MAX`). A longer one is
/// flagged [`seed_flags::PATH_TOO_LONG`] and sent without its path.
pub const SEED_PATH_CAP: usize = 4096;
/// TLS libraries the probe recognises by name.
pub const MAX_TLS_LIBRARIES: usize = 8;

/// What a [`SeedRecord`] says (`kind`).
pub mod seed_kind {
    /// An fd of the process (`detail`) is open on a regular file or directory the trust
    /// filter may want. Its path follows.
    pub const FD: u32 = 1;
    /// The process maps a regular file the trust filter may want. Its path follows.
    pub const MAPPED: u32 = 2;
    /// The process maps a TLS library: `detail` is its index in [`super::TlsLibraries`].
    pub const TLS_LIBRARY: u32 = 3;
    /// The file the process executes (`dev`, `ino`).
    pub const EXE: u32 = 4;
}

/// Flags of a [`SeedRecord`].
pub mod seed_flags {
    /// The process's root is neither the top of its mount tree nor the daemon's root (a
    /// chroot): its path is as the daemon sees it, and the probe did not filter it (the
    /// daemon strips the root, then filters).
    pub const ROOT_ELSEWHERE: u32 = 1;
    /// The path did not fit [`super::SEED_PATH_CAP`]: none follows.
    pub const PATH_TOO_LONG: u32 = 2;
}

/// One record of the start-up iterators.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SeedRecord {
    /// `seed_kind`.
    pub kind: u32,
    pub tgid: u32,
    /// The process's start (`CLOCK_BOOTTIME` ns of its thread group leader), to tell it
    /// from a later process with the same pid.
    pub start_ns: u64,
    pub ino: u64,
    /// The kernel's `dev_t` (not the user-space encoding).
    pub dev: u32,
    /// `seed_flags`.
    pub flags: u32,
    /// The fd (`FD`) or library index (`TLS_LIBRARY`).
    pub detail: u32,
    /// Bytes of path after the record, NUL included; 0: none.
    pub path_len: u32,
}

const _: () = assert!(size_of::<SeedRecord>() == 40);

/// Kernel struct member offsets the iterators need beyond `KernelOffsets`; `u32::MAX`
/// means unknown (the daemon then does not load them).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeedOffsets {
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.mm`
    pub task_mm: u32,
    /// `mm_struct.exe_file`
    pub mm_exe_file: u32,
    /// `vm_area_struct.vm_file`
    pub vma_file: u32,
    /// `inode.i_mode`
    pub inode_mode: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<SeedOffsets>() == 24);

impl SeedOffsets {
    pub const NONE: SeedOffsets = SeedOffsets {
        task_tgid: u32::MAX,
        task_mm: u32::MAX,
        mm_exe_file: u32::MAX,
        vma_file: u32::MAX,
        inode_mode: u32::MAX,
        _pad: 0,
    };

    pub fn complete(&self) -> bool {
        [
            self.task_tgid,
            self.task_mm,
            self.mm_exe_file,
            self.vma_file,
            self.inode_mode,
        ]
        .iter()
        .all(|o| *o != u32::MAX)
    }
}

/// One library name prefix, as the first 16 bytes of a file name compared under a mask.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LibraryPrefix {
    pub value: [u64; 2],
    pub mask: [u64; 2],
    /// Bytes of the prefix: a shorter name cannot match.
    pub len: u32,
    pub _pad: u32,
}

const _: () = assert!(size_of::<LibraryPrefix>() == 40);

impl LibraryPrefix {
    /// The rule for `prefix` (at most 16 bytes), or `None` if it is longer.
    pub const fn new(prefix: &[u8]) -> Option<Self> {
        if prefix.len() > 16 {
            return None;
        }
        let mut bytes = [0u8; 16];
        let mut mask = [0u8; 16];
        let mut i = 0;
        while i < prefix.len() {
            bytes[i] = prefix[i];
            mask[i] = 0xff;
            i += 1;
        }
        Some(Self {
            value: [word(&bytes, 0), word(&bytes, 8)],
            mask: [word(&mask, 0), word(&mask, 8)],
            len: prefix.len() as u32,
            _pad: 0,
        })
    }

    /// Whether a file name whose first 16 bytes are `head` (little-endian words) and
    /// whose length is `len` starts with this prefix.
    #[inline(always)]
    pub fn matches(&self, head: [u64; 2], len: u32) -> bool {
        len >= self.len
            && head[0] & self.mask[0] == self.value[0]
            && head[1] & self.mask[1] == self.value[1]
    }
}

const fn word(bytes: &[u8; 16], at: usize) -> u64 {
    let mut w = 0u64;
    let mut i = 0;
    while i < 8 {
        w |= (bytes[at + i] as u64) << (8 * i);
        i += 1;
    }
    w
}

/// The TLS libraries the probe recognises in a process's mappings, by file name prefix.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsLibraries {
    pub count: u32,
    pub _pad: u32,
    pub prefixes: [LibraryPrefix; MAX_TLS_LIBRARIES],
}

const _: () = assert!(size_of::<TlsLibraries>() == 8 + 40 * MAX_TLS_LIBRARIES);

impl TlsLibraries {
    pub const NONE: TlsLibraries = TlsLibraries {
        count: 0,
        _pad: 0,
        prefixes: [LibraryPrefix {
            value: [0; 2],
            mask: [0; 2],
            len: 0,
            _pad: 0,
        }; MAX_TLS_LIBRARIES],
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(name: &[u8]) -> [u64; 2] {
        let mut b = [0u8; 16];
        let n = name.len().min(16);
        b[..n].copy_from_slice(&name[..n]);
        [word(&b, 0), word(&b, 8)]
    }

    #[test]
    fn library_prefixes_match_the_start_of_a_name() {
        let ssl = LibraryPrefix::new(b"libssl.so").unwrap();
        assert!(ssl.matches(head(b"libssl.so.3"), 11));
        assert!(ssl.matches(head(b"libssl.so"), 9));
        assert!(!ssl.matches(head(b"libssl3.so"), 10));
        assert!(!ssl.matches(head(b"libss"), 5));
        let long = LibraryPrefix::new(b"libmbedtls.so").unwrap();
        assert!(long.matches(head(b"libmbedtls.so.14"), 16));
        assert!(LibraryPrefix::new(b"a-name-longer-than-16").is_none());
    }
}
