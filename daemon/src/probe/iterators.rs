//! The start-up iterators (`seed_files`, `seed_maps` in the probe): loaded and attached
//! with the probe, while the daemon still has its capabilities, as one seq file each.
//! Reading a seq file runs its program over every process at that moment and needs no
//! capability, so the start-up scan reads them after the capabilities are dropped.

use std::{
    fs::File,
    io::{self, Read},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf,
    maps::{Array, MapData},
    programs::Iter,
};
use trustdrift_common::{
    KernelOffsets, LibraryPrefix, MAX_TLS_LIBRARIES, SEED_PATH_CAP, SeedOffsets, SeedRecord,
    TlsLibraries,
};

use super::{explain, layout};
use crate::process::seed::TLS_LIBRARIES;

/// The probe's map of TLS library name prefixes (not pinned: only the iterators read it).
const TLS_LIBRARIES_MAP: &str = "TLS_LIBRARIES";

/// The iterators' seq files, each readable once, and once started their walks.
pub struct SeedIterators {
    files: Walk,
    maps: Walk,
}

/// One iterator: its seq file, or the thread reading it whole.
enum Walk {
    Open(File),
    Reading(JoinHandle<io::Result<Walked>>),
}

/// Everything one iterator sent, and how long its walk took.
struct Walked {
    bytes: Vec<u8>,
    took: Duration,
}

/// One record with its path, if it has one (as the kernel printed it, without its NUL).
pub struct SeedEntry<'a> {
    pub record: SeedRecord,
    pub path: Option<&'a [u8]>,
}

/// Kernel layout the iterators need beyond `KernelOffsets`.
pub fn offsets(btf: Option<&layout::Btf>) -> SeedOffsets {
    let off = |s: &str, m: &str| {
        btf.and_then(|b| b.offset_of(s, m))
            .unwrap_or(KernelOffsets::UNKNOWN)
    };
    SeedOffsets {
        task_tgid: off("task_struct", "tgid"),
        task_mm: off("task_struct", "mm"),
        mm_exe_file: off("mm_struct", "exe_file"),
        vma_file: off("vm_area_struct", "vm_file"),
        inode_mode: off("inode", "i_mode"),
        _pad: 0,
    }
}

/// The kernel's table of TLS library name prefixes, from `names` (prefix, label).
pub fn libraries(names: &[(&str, &str)]) -> Result<TlsLibraries> {
    if names.len() > MAX_TLS_LIBRARIES {
        bail!("at most {MAX_TLS_LIBRARIES} TLS libraries fit the probe's table");
    }
    let mut table = TlsLibraries::NONE;
    for (slot, (prefix, _)) in table.prefixes.iter_mut().zip(names) {
        *slot = LibraryPrefix::new(prefix.as_bytes())
            .ok_or_else(|| anyhow!("TLS library prefix {prefix} is longer than 16 bytes"))?;
    }
    table.count = names.len() as u32;
    Ok(table)
}

/// Whether `kernel` and `seed` have every offset the iterators read.
pub fn usable(kernel: &KernelOffsets, seed: &SeedOffsets) -> bool {
    seed.complete()
        && [
            kernel.task_group_leader,
            kernel.task_start_boottime,
            kernel.task_fs,
            kernel.fs_root,
            kernel.path_mnt,
            kernel.path_dentry,
            kernel.vfsmount_root,
            kernel.mount_mnt,
            kernel.mount_parent,
            kernel.file_inode,
            kernel.file_path,
            kernel.inode_ino,
            kernel.inode_sb,
            kernel.sb_dev,
            kernel.dentry_name,
            kernel.dentry_name_len,
        ]
        .iter()
        .all(|o| *o != KernelOffsets::UNKNOWN)
}

/// How the start-up scan learns what running processes hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SeedSource {
    /// The iterators where the kernel allows them, else /proc.
    Auto,
    /// /proc only.
    Procfs,
}

/// Loads both iterators, attaches them and opens their seq files. The programs stay
/// loaded only as long as the files: once read and dropped, nothing is left.
pub fn open(
    ebpf: &mut Ebpf,
    btf: &Btf,
    kernel: &KernelOffsets,
    seed: &SeedOffsets,
) -> Result<SeedIterators> {
    if !usable(kernel, seed) {
        bail!("kernel BTF lacks a member the iterators read");
    }
    let mut table: Array<&mut MapData, TlsLibraries> =
        Array::try_from(ebpf.map_mut(TLS_LIBRARIES_MAP).ok_or_else(|| {
            anyhow!("the probe object has no map {TLS_LIBRARIES_MAP} (stale build?)")
        })?)
        .with_context(|| format!("map {TLS_LIBRARIES_MAP} has an unexpected type or layout"))?;
    table
        .set(0, libraries(TLS_LIBRARIES)?, 0)
        .context("writing the TLS library table")?;
    Ok(SeedIterators {
        files: Walk::Open(open_one(ebpf, btf, "seed_files", "task_file")?),
        maps: Walk::Open(open_one(ebpf, btf, "seed_maps", "task_vma")?),
    })
}

fn open_one(ebpf: &mut Ebpf, btf: &Btf, program: &str, target: &str) -> Result<File> {
    let prog: &mut Iter = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the probe object has no program {program} (stale build?)"))?
        .try_into()?;
    prog.load(target, btf).map_err(|e| explain(program, e))?;
    let id = prog
        .attach()
        .with_context(|| format!("attaching the {target} iterator {program}"))?;
    let file = prog
        .take_link(id)?
        .into_file()
        .with_context(|| format!("opening the {target} iterator {program}"))?;
    // The seq file holds the program: aya's own fd is not needed any more.
    prog.unload()
        .with_context(|| format!("releasing the program {program}"))?;
    Ok(file)
}

impl SeedIterators {
    /// Starts both walks, each on a thread of its own: they run while the rest of the
    /// start-up does (restoring the ledger, loading the stores), on whatever CPU is free.
    /// Call it after the capabilities are dropped: the threads inherit the caller's.
    pub fn start(&mut self) {
        for (walk, program) in [
            (&mut self.files, "seed_files"),
            (&mut self.maps, "seed_maps"),
        ] {
            let Walk::Open(file) = walk else {
                continue;
            };
            let Ok(file) = file.try_clone() else {
                continue;
            };
            let started = std::thread::Builder::new()
                .name(format!("td-{program}"))
                .spawn(move || walk_whole(file));
            // No thread: the walk runs when it is read.
            if let Ok(handle) = started {
                *walk = Walk::Reading(handle);
            }
        }
    }

    /// Hands every record of both iterators to `each`, the fds' first (a file both
    /// open and mapped is known by its fd). A walk not started runs now.
    pub fn read(self, mut each: impl FnMut(SeedEntry<'_>)) -> io::Result<()> {
        for (walk, program) in [(self.files, "seed_files"), (self.maps, "seed_maps")] {
            let walked = match walk {
                Walk::Open(file) => walk_whole(file)?,
                Walk::Reading(handle) => handle.join().map_err(|_| {
                    io::Error::other(format!("the thread reading {program} panicked"))
                })??,
            };
            let records = read_records(walked.bytes.as_slice(), &mut each)?;
            tracing::debug!(
                program,
                records,
                ms = walked.took.as_millis() as u64,
                "read a start-up iterator"
            );
        }
        Ok(())
    }
}

/// Runs an iterator's walk (its program runs inside these reads): what it sent is kept
/// whole, a few bytes per process (one 40-byte record, and some for the few processes
/// holding what the filter may want).
fn walk_whole(mut file: File) -> io::Result<Walked> {
    let started = Instant::now();
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(Walked {
        bytes,
        took: started.elapsed(),
    })
}

const RECORD: usize = size_of::<SeedRecord>();

/// Hands every record of `file` to `each`; how many there were.
fn read_records(mut file: impl Read, each: &mut impl FnMut(SeedEntry<'_>)) -> io::Result<u64> {
    // The kernel fills a read with whole records, up to its seq buffer (a few pages);
    // a record cut across reads is completed by the next one all the same.
    let mut buf = vec![0u8; 64 << 10];
    let mut held = 0;
    let mut records = 0;
    loop {
        if held == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
        let n = match file.read(&mut buf[held..]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        held += n;
        let (used, count) = decode(&buf[..held], each)?;
        records += count;
        buf.copy_within(used..held, 0);
        held -= used;
    }
    if held != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the iterator ended inside a record ({held} bytes left)"),
        ));
    }
    Ok(records)
}

/// Hands the whole records at the start of `bytes` to `each`; how many bytes they took
/// and how many records they were.
fn decode(bytes: &[u8], each: &mut impl FnMut(SeedEntry<'_>)) -> io::Result<(usize, u64)> {
    let mut at = 0;
    let mut count = 0;
    while bytes.len() - at >= RECORD {
        let record: SeedRecord = bytemuck_read(&bytes[at..at + RECORD]);
        let path_len = record.path_len as usize;
        if path_len > SEED_PATH_CAP {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("an iterator record announces a path of {path_len} bytes"),
            ));
        }
        if bytes.len() - at - RECORD < path_len {
            break;
        }
        let path = (path_len > 0).then(|| {
            let raw = &bytes[at + RECORD..at + RECORD + path_len];
            raw.strip_suffix(&[0]).unwrap_or(raw)
        });
        each(SeedEntry { record, path });
        at += RECORD + path_len;
        count += 1;
    }
    Ok((at, count))
}

/// A `SeedRecord` from its bytes (plain data: any bytes are a valid record).
fn bytemuck_read(bytes: &[u8]) -> SeedRecord {
    let mut record = SeedRecord::default();
    // SAFETY: SeedRecord is `#[repr(C)]` plain integers (aya::Pod), `bytes` has its size.
    unsafe {
        std::ptr::copy_nonoverlapping(
            bytes.as_ptr(),
            std::ptr::from_mut(&mut record).cast::<u8>(),
            RECORD,
        );
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(record: SeedRecord, path: &[u8]) -> Vec<u8> {
        let mut record = record;
        record.path_len = path.len() as u32;
        // SAFETY: plain data of its own size.
        let bytes =
            unsafe { std::slice::from_raw_parts(std::ptr::from_ref(&record).cast::<u8>(), RECORD) };
        [bytes, path].concat()
    }

    /// Hands out at most `step` bytes per read, as a small seq buffer would.
    struct Trickle(Vec<u8>, usize);
    impl Read for Trickle {
        fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
            let n = self.1.min(self.0.len()).min(out.len());
            out[..n].copy_from_slice(&self.0[..n]);
            self.0.drain(..n);
            Ok(n)
        }
    }

    #[test]
    fn records_cut_across_reads_are_put_back_together() {
        let a = SeedRecord {
            kind: 1,
            tgid: 42,
            detail: 7,
            ..SeedRecord::default()
        };
        let b = SeedRecord {
            kind: 4,
            tgid: 43,
            ino: 9,
            ..SeedRecord::default()
        };
        let stream = [raw(a, b"/etc/ssl/cert.pem\0"), raw(b, b"")].concat();
        for step in [1, 7, 40, 1000] {
            let mut seen = Vec::new();
            read_records(Trickle(stream.clone(), step), &mut |e: SeedEntry<'_>| {
                seen.push((e.record.tgid, e.path.map(<[u8]>::to_vec)));
            })
            .unwrap();
            assert_eq!(
                seen,
                vec![(42, Some(b"/etc/ssl/cert.pem".to_vec())), (43, None)]
            );
        }
    }

    #[test]
    fn a_stream_ending_inside_a_record_is_an_error() {
        let a = raw(SeedRecord::default(), b"/x\0");
        let cut = a[..a.len() - 1].to_vec();
        assert!(read_records(Trickle(cut, 100), &mut |_: SeedEntry<'_>| {}).is_err());
    }

    #[test]
    fn the_tls_library_table_fits_the_probe() {
        let t = libraries(&[("libssl.so", "libssl"), ("libjvm.so", "java")]).unwrap();
        assert_eq!(t.count, 2);
        assert!(libraries(&[("a-very-long-library-name.so", "x")]).is_err());
    }
}
