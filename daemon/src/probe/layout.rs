//! The running kernel's struct layout, read from its BTF, so the probe can read process
//! identity (start time, mount namespace) at the right offsets without CO-RE.
//!
//! aya parses BTF but keeps member offsets crate-private, and the maintained standalone
//! parser (btf-rs) is LGPL; the part needed here (find a struct, walk its members) is
//! small and fully specified by the kernel's `Documentation/bpf/btf.rst`.

use std::{collections::HashMap, fs, path::Path};

use thiserror::Error;
use trustdrift_common::KernelOffsets;

#[derive(Debug, Error)]
pub enum LayoutError {
    #[error("reading {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("not BTF: {0}")]
    Malformed(&'static str),
}

const BTF_MAGIC: u16 = 0xeb9f;

mod kind {
    pub const INT: u32 = 1;
    pub const ARRAY: u32 = 3;
    pub const STRUCT: u32 = 4;
    pub const UNION: u32 = 5;
    pub const ENUM: u32 = 6;
    pub const TYPEDEF: u32 = 8;
    pub const VOLATILE: u32 = 9;
    pub const CONST: u32 = 10;
    pub const RESTRICT: u32 = 11;
    pub const FUNC_PROTO: u32 = 13;
    pub const VAR: u32 = 14;
    pub const DATASEC: u32 = 15;
    pub const DECL_TAG: u32 = 17;
    pub const TYPE_TAG: u32 = 18;
    pub const ENUM64: u32 = 19;
}

#[derive(Clone, Debug)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
enum Type {
    Composite {
        members: Vec<Member>,
    },
    /// typedef, const, volatile, restrict, type tag: the type they qualify.
    Alias(u32),
    Other,
}

/// The type graph of one BTF blob, reduced to what member lookups need.
pub struct Btf {
    types: Vec<Type>,
    structs_by_name: HashMap<String, u32>,
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    pub fn from_file(path: &Path) -> Result<Self, LayoutError> {
        let data = fs::read(path).map_err(|source| LayoutError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, LayoutError> {
        let bad = LayoutError::Malformed;
        if u16_at(data, 0) != Some(BTF_MAGIC) {
            return Err(bad("wrong magic (big-endian or not BTF)"));
        }
        let hdr_len = u32_at(data, 4).ok_or(bad("short header"))? as usize;
        let field = |at| {
            u32_at(data, at)
                .map(|v| v as usize)
                .ok_or(bad("short header"))
        };
        let (type_off, type_len) = (field(8)?, field(12)?);
        let (str_off, str_len) = (field(16)?, field(20)?);
        let types_bytes = data
            .get(hdr_len + type_off..hdr_len + type_off + type_len)
            .ok_or(bad("type section out of bounds"))?;
        let strings = data
            .get(hdr_len + str_off..hdr_len + str_off + str_len)
            .ok_or(bad("string section out of bounds"))?;
        let name = |off: u32| -> String {
            let start = off as usize;
            let Some(rest) = strings.get(start..) else {
                return String::new();
            };
            let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        };

        // Type ids start at 1; id 0 is void.
        let mut types = vec![Type::Other];
        let mut structs_by_name = HashMap::new();
        let mut at = 0usize;
        while at + 12 <= types_bytes.len() {
            let name_off = u32_at(types_bytes, at).ok_or(bad("truncated type"))?;
            let info = u32_at(types_bytes, at + 4).ok_or(bad("truncated type"))?;
            let size_or_type = u32_at(types_bytes, at + 8).ok_or(bad("truncated type"))?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kflag = info >> 31 == 1;
            at += 12;
            let ty = match kind {
                kind::STRUCT | kind::UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let m = at + i * 12;
                        let mname = u32_at(types_bytes, m).ok_or(bad("truncated member"))?;
                        let type_id = u32_at(types_bytes, m + 4).ok_or(bad("truncated member"))?;
                        let offset = u32_at(types_bytes, m + 8).ok_or(bad("truncated member"))?;
                        members.push(Member {
                            name: name(mname),
                            type_id,
                            // With kflag, the top 8 bits hold a bitfield size.
                            bit_offset: if kflag { offset & 0x00ff_ffff } else { offset },
                        });
                    }
                    at += vlen * 12;
                    if kind == kind::STRUCT && name_off != 0 {
                        structs_by_name
                            .entry(name(name_off))
                            .or_insert(types.len() as u32);
                    }
                    Type::Composite { members }
                }
                kind::TYPEDEF | kind::VOLATILE | kind::CONST | kind::RESTRICT | kind::TYPE_TAG => {
                    Type::Alias(size_or_type)
                }
                other => {
                    at += match other {
                        kind::INT | kind::VAR | kind::DECL_TAG => 4,
                        kind::ARRAY => 12,
                        kind::ENUM | kind::FUNC_PROTO => vlen * 8,
                        kind::DATASEC | kind::ENUM64 => vlen * 12,
                        _ => 0,
                    };
                    Type::Other
                }
            };
            types.push(ty);
        }
        Ok(Self {
            types,
            structs_by_name,
        })
    }

    fn resolve(&self, mut id: u32) -> Option<&Type> {
        for _ in 0..32 {
            match self.types.get(id as usize)? {
                Type::Alias(next) => id = *next,
                other => return Some(other),
            }
        }
        None
    }

    /// Byte offset and type of `member` in the composite type `id`, looking through
    /// anonymous struct and union members.
    fn member_in(&self, id: u32, member: &str) -> Option<(u32, u32)> {
        let Type::Composite { members } = self.resolve(id)? else {
            return None;
        };
        for m in members {
            if m.name == member {
                return Some((m.bit_offset / 8, m.type_id));
            }
        }
        for m in members.iter().filter(|m| m.name.is_empty()) {
            if let Some((inner, ty)) = self.member_in(m.type_id, member) {
                return Some((m.bit_offset / 8 + inner, ty));
            }
        }
        None
    }

    /// Byte offset of a dotted member path inside `struct name`, e.g. ("mnt_namespace",
    /// "ns.inum").
    pub fn offset_of(&self, name: &str, path: &str) -> Option<u32> {
        let mut id = *self.structs_by_name.get(name)?;
        let mut total = 0;
        for part in path.split('.') {
            let (offset, ty) = self.member_in(id, part)?;
            total += offset;
            id = ty;
        }
        Some(total)
    }
}

/// Offset of `field` in a classic tracepoint record, from its `format` file.
pub fn tracepoint_field_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (declaration, rest) = decl.split_once(';')?;
        let name = declaration.split_whitespace().last()?;
        if name.trim_start_matches('*') != field {
            return None;
        }
        rest.split(';')
            .find_map(|kv| kv.trim().strip_prefix("offset:"))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The offsets the probe needs; each unknown one disables only what depends on it.
pub fn discover(btf: Option<&Btf>, exit_format: Option<&str>) -> KernelOffsets {
    let unknown = KernelOffsets::UNKNOWN;
    let off = |s: &str, m: &str| btf.and_then(|b| b.offset_of(s, m)).unwrap_or(unknown);
    KernelOffsets {
        task_group_leader: off("task_struct", "group_leader"),
        task_start_boottime: off("task_struct", "start_boottime"),
        task_nsproxy: off("task_struct", "nsproxy"),
        nsproxy_mnt_ns: off("nsproxy", "mnt_ns"),
        mnt_ns_inum: off("mnt_namespace", "ns.inum"),
        exit_group_dead: exit_format
            .and_then(|f| tracepoint_field_offset(f, "group_dead"))
            .unwrap_or(unknown),
        task_files: off("task_struct", "files"),
        files_fdt: off("files_struct", "fdt"),
        fdt_fd: off("fdtable", "fd"),
        file_inode: off("file", "f_inode"),
        inode_ino: off("inode", "i_ino"),
        inode_sb: off("inode", "i_sb"),
        sb_dev: off("super_block", "s_dev"),
        fdt_max_fds: off("fdtable", "max_fds"),
        task_fs: off("task_struct", "fs"),
        fs_root: off("fs_struct", "root"),
        file_path: off("file", "f_path"),
        path_mnt: off("path", "mnt"),
        path_dentry: off("path", "dentry"),
        dentry_parent: off("dentry", "d_parent"),
        dentry_name_len: off("dentry", "d_name.len"),
        dentry_name: off("dentry", "d_name.name"),
        mount_parent: off("mount", "mnt_parent"),
        mount_mountpoint: off("mount", "mnt_mountpoint"),
        mount_mnt: off("mount", "mnt"),
        vfsmount_root: off("vfsmount", "mnt_root"),
        _pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hand-built BTF blob: struct outer { int a; struct { int pad; int inner; }; }.
    fn tiny_btf() -> Vec<u8> {
        let strings = b"\0int\0outer\0a\0inner\0pad\0";
        let s = |needle: &str| {
            let pos = strings
                .windows(needle.len() + 1)
                .position(|w| &w[..needle.len()] == needle.as_bytes() && w[needle.len()] == 0)
                .unwrap();
            pos as u32
        };
        let mut types = Vec::new();
        let push = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_le_bytes());
        // 1: int
        push(&mut types, s("int"));
        push(&mut types, kind::INT << 24);
        push(&mut types, 4);
        push(&mut types, 32);
        // 2: anonymous struct { int pad; int inner; }
        push(&mut types, 0);
        push(&mut types, (kind::STRUCT << 24) | 2);
        push(&mut types, 8);
        for (name, off) in [("pad", 0u32), ("inner", 32)] {
            push(&mut types, s(name));
            push(&mut types, 1);
            push(&mut types, off);
        }
        // 3: struct outer { int a; <anon> }
        push(&mut types, s("outer"));
        push(&mut types, (kind::STRUCT << 24) | 2);
        push(&mut types, 12);
        for (name, ty, off) in [("a", 1u32, 0u32), ("", 2, 32)] {
            push(&mut types, if name.is_empty() { 0 } else { s(name) });
            push(&mut types, ty);
            push(&mut types, off);
        }
        let mut blob = Vec::new();
        blob.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        blob.push(1);
        blob.push(0);
        push(&mut blob, 24);
        push(&mut blob, 0);
        push(&mut blob, types.len() as u32);
        push(&mut blob, types.len() as u32);
        push(&mut blob, strings.len() as u32);
        blob.extend_from_slice(&types);
        blob.extend_from_slice(strings);
        blob
    }

    #[test]
    fn finds_members_through_anonymous_structs() {
        let btf = Btf::parse(&tiny_btf()).unwrap();
        assert_eq!(btf.offset_of("outer", "a"), Some(0));
        assert_eq!(btf.offset_of("outer", "inner"), Some(8));
        assert_eq!(btf.offset_of("outer", "missing"), None);
        assert_eq!(btf.offset_of("nope", "a"), None);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"\x7fELF....").is_err());
        let mut truncated = tiny_btf();
        truncated.truncate(30);
        assert!(Btf::parse(&truncated).is_err());
    }

    #[test]
    fn reads_tracepoint_field_offsets() {
        let format = "name: sched_process_exit\nformat:\n\
            \tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:0;\n\
            \tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n\
            \tfield:bool group_dead;\toffset:32;\tsize:1;\tsigned:0;\n";
        assert_eq!(tracepoint_field_offset(format, "group_dead"), Some(32));
        assert_eq!(tracepoint_field_offset(format, "pid"), Some(24));
        assert_eq!(tracepoint_field_offset(format, "prio"), None);
    }

    #[test]
    fn the_running_kernel_exposes_what_the_probe_needs() {
        let path = Path::new("/sys/kernel/btf/vmlinux");
        if !path.exists() {
            eprintln!("no kernel BTF on this machine; layout discovery untestable here");
            return;
        }
        let btf = Btf::from_file(path).unwrap();
        let offsets = discover(Some(&btf), None);
        assert_ne!(offsets.task_group_leader, KernelOffsets::UNKNOWN);
        assert_ne!(offsets.task_start_boottime, KernelOffsets::UNKNOWN);
        assert_ne!(offsets.mnt_ns_inum, KernelOffsets::UNKNOWN);
        for (name, off) in [
            ("task_struct.files", offsets.task_files),
            ("files_struct.fdt", offsets.files_fdt),
            ("fdtable.fd", offsets.fdt_fd),
            ("file.f_inode", offsets.file_inode),
            ("inode.i_ino", offsets.inode_ino),
            ("inode.i_sb", offsets.inode_sb),
            ("super_block.s_dev", offsets.sb_dev),
        ] {
            assert_ne!(off, KernelOffsets::UNKNOWN, "{name}");
        }
    }
}
