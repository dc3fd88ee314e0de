//! Kernel struct member offsets the daemon reads from `/sys/kernel/btf/vmlinux` and hands
//! to the probe as a read-only global, so the probe reads what it needs without CO-RE.

/// Member offsets; `u32::MAX` means "not available on this kernel".
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.group_leader`
    pub task_group_leader: u32,
    /// `task_struct.start_boottime`
    pub task_start_boottime: u32,
    /// `task_struct.nsproxy`
    pub task_nsproxy: u32,
    /// `nsproxy.mnt_ns`
    pub nsproxy_mnt_ns: u32,
    /// offset of `ns.inum` inside `mnt_namespace`
    pub mnt_ns_inum: u32,
    /// offset of `group_dead` in the `sched_process_exit` tracepoint record
    pub exit_group_dead: u32,
    /// `task_struct.files`
    pub task_files: u32,
    /// `files_struct.fdt`
    pub files_fdt: u32,
    /// `fdtable.fd`
    pub fdt_fd: u32,
    /// `file.f_inode`
    pub file_inode: u32,
    /// `inode.i_ino`
    pub inode_ino: u32,
    /// `inode.i_sb`
    pub inode_sb: u32,
    /// `super_block.s_dev`
    pub sb_dev: u32,
    /// `fdtable.max_fds`
    pub fdt_max_fds: u32,
    /// `task_struct.fs`
    pub task_fs: u32,
    /// `fs_struct.root` (a `struct path`)
    pub fs_root: u32,
    /// `file.f_path` (a `struct path`)
    pub file_path: u32,
    /// `path.mnt`
    pub path_mnt: u32,
    /// `path.dentry`
    pub path_dentry: u32,
    /// `dentry.d_parent`
    pub dentry_parent: u32,
    /// `dentry.d_name.len`
    pub dentry_name_len: u32,
    /// `dentry.d_name.name`
    pub dentry_name: u32,
    /// `mount.mnt_parent`
    pub mount_parent: u32,
    /// `mount.mnt_mountpoint`
    pub mount_mountpoint: u32,
    /// `mount.mnt` (the `vfsmount` embedded in a `mount`)
    pub mount_mnt: u32,
    /// `vfsmount.mnt_root`
    pub vfsmount_root: u32,
    pub _pad: u32,
}

impl KernelOffsets {
    pub const UNKNOWN: u32 = u32::MAX;
    pub const NONE: KernelOffsets = KernelOffsets {
        task_group_leader: Self::UNKNOWN,
        task_start_boottime: Self::UNKNOWN,
        task_nsproxy: Self::UNKNOWN,
        nsproxy_mnt_ns: Self::UNKNOWN,
        mnt_ns_inum: Self::UNKNOWN,
        exit_group_dead: Self::UNKNOWN,
        task_files: Self::UNKNOWN,
        files_fdt: Self::UNKNOWN,
        fdt_fd: Self::UNKNOWN,
        file_inode: Self::UNKNOWN,
        inode_ino: Self::UNKNOWN,
        inode_sb: Self::UNKNOWN,
        sb_dev: Self::UNKNOWN,
        fdt_max_fds: Self::UNKNOWN,
        task_fs: Self::UNKNOWN,
        fs_root: Self::UNKNOWN,
        file_path: Self::UNKNOWN,
        path_mnt: Self::UNKNOWN,
        path_dentry: Self::UNKNOWN,
        dentry_parent: Self::UNKNOWN,
        dentry_name_len: Self::UNKNOWN,
        dentry_name: Self::UNKNOWN,
        mount_parent: Self::UNKNOWN,
        mount_mountpoint: Self::UNKNOWN,
        mount_mnt: Self::UNKNOWN,
        vfsmount_root: Self::UNKNOWN,
        _pad: 0,
    };

    /// Whether the walk that rebuilds an opened file's path has every offset it needs.
    pub fn can_walk_paths(&self) -> bool {
        [
            self.task_files,
            self.files_fdt,
            self.fdt_fd,
            self.fdt_max_fds,
            self.task_fs,
            self.fs_root,
            self.file_path,
            self.path_mnt,
            self.path_dentry,
            self.dentry_parent,
            self.dentry_name_len,
            self.dentry_name,
            self.mount_parent,
            self.mount_mountpoint,
            self.mount_mnt,
            self.vfsmount_root,
        ]
        .iter()
        .all(|o| *o != Self::UNKNOWN)
    }
}
