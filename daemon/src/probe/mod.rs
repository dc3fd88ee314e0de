//! Loading, configuring and attaching the kernel probe, and reading what it keeps in maps.
//! Dropping a [`Probe`] detaches every program.

pub mod iterators;
pub mod layout;
pub mod pinning;
pub mod privileges;
pub mod tracefs;
pub mod trust_paths;

use std::{
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{
        BtfTracePoint, ProgramError, TracePoint,
        links::{FdLink, PinnedLink},
    },
};
use trustdrift_common::{
    AccessKey, AccessStats, FilterTable, KernelOffsets, LOSS_REASONS, Loss, NODE_KEY_BYTES,
    OwnerQuotas, PREFIX_CAP, layout::LAYOUT, maps::capacity, maps::counter, maps::name, owner_kind,
};

use self::{
    iterators::{SeedIterators, SeedSource},
    pinning::PinStatus,
    trust_paths::TrustPaths,
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.o"));

/// Which syscall hooks to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Opens and reads: entry and exit hooks; fds and byte counts are observed.
    Full,
    /// Opens only, on the entry hook: cheapest; success and bytes are inferred.
    Lean,
}

/// What to attach: the probe, or (for benchmarks) stand-ins on the same hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    Probe,
    /// Empty programs: the cost of the hooks themselves.
    Floor,
    /// The floor plus the path copy of every read-only open, which no path filter can
    /// skip: what of the probe's own work is that copy.
    CopyFloor,
}

/// Table sizes (`max_entries`) of the probe's maps.
#[derive(Clone, Copy, Debug)]
pub struct Capacities {
    pub accesses: u32,
    pub fds: u32,
    pub procs: u32,
    pub ringbuf_bytes: u32,
}

impl Default for Capacities {
    fn default() -> Self {
        Self {
            accesses: capacity::ACCESSES,
            fds: capacity::FDS,
            procs: capacity::PROCS,
            ringbuf_bytes: capacity::RING_BUFFER_BYTES,
        }
    }
}

/// How the probe's tables are shared out (see `Loss::ProcessQuota`, `Loss::OwnerQuota`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shares {
    /// Distinct trust paths one process image may announce.
    pub paths_per_process: u32,
    /// Percent of each table one cgroup may hold. A uid within a cgroup gets half of it, a
    /// uid across cgroups (other than root) twice it.
    pub owner_percent: u32,
}

impl Default for Shares {
    fn default() -> Self {
        Self {
            paths_per_process: 256,
            owner_percent: 25,
        }
    }
}

impl Shares {
    /// The quotas the probe enforces, from the table sizes. No share is below 256
    /// entries (or the whole table, if smaller): a smaller one would cut a single busy
    /// service, not a flood.
    pub fn quotas(&self, caps: &Capacities) -> OwnerQuotas {
        let of = |cap: u32| {
            let cap = i64::from(cap);
            let floor = cap.min(256);
            let cgroup = cap * i64::from(self.owner_percent.min(100)) / 100;
            let mut q = [0; owner_kind::COUNT];
            q[owner_kind::CGROUP as usize] = cgroup.max(floor);
            q[owner_kind::CGROUP_UID as usize] = (cgroup / 2).max(floor);
            q[owner_kind::UID as usize] = (cgroup * 2).min(cap).max(floor);
            q
        };
        OwnerQuotas {
            procs: of(caps.procs),
            accesses: of(caps.accesses),
            paths_per_process: self.paths_per_process.max(1),
            _pad: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ProbeOptions {
    pub mode: Mode,
    pub programs: Programs,
    pub paths: TrustPaths,
    pub capacities: Capacities,
    pub shares: Shares,
    /// bpffs directory to pin maps and links in, so the probe outlives the daemon.
    pub pin_dir: Option<PathBuf>,
    /// Turn on the kernel's per-program run-time accounting while the probe lives.
    pub bpf_stats: bool,
    /// How the start-up scan learns what running processes hold.
    pub seed: SeedSource,
}

/// Fill of one bounded map, for the metrics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct MapFill {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// A link that keeps a program attached: owned by this process, or pinned in bpffs.
enum Attachment {
    Owned(#[expect(dead_code, reason = "held so that dropping it detaches")] FdLink),
    Pinned(PinnedLink),
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct ProgramStats {
    #[serde(rename = "program")]
    pub name: String,
    pub run_time_ns: u64,
    #[serde(rename = "run_cnt")]
    pub run_count: u64,
}

pub struct Probe {
    ebpf: Ebpf,
    accesses: HashMap<MapData, AccessKey, AccessStats>,
    /// The same map's fd, for the lookup-and-delete aya does not offer on hash maps.
    accesses_fd: OwnedFd,
    losses: PerCpuArray<MapData, u64>,
    counters: Array<MapData, u64>,
    /// What `counters`' `ACCESSES_DELETED` slot holds: only this daemon writes it, so it
    /// is read once, and each deletion costs one write, not a read and a write (a storm
    /// deletes one entry per record).
    accesses_deleted: u64,
    rereads: HashMap<MapData, AccessKey, u8>,
    filter: Filter,
    capacities: Capacities,
    /// This node's key for keyed digests (see `stores::digest`).
    node_key: [u8; NODE_KEY_BYTES],
    attachments: Vec<Attachment>,
    plan: Option<pinning::Plan>,
    _stats: Option<OwnedFd>,
    seed_iterators: Option<SeedIterators>,
    pub mode: Mode,
    pub pinning: PinStatus,
}

fn take<T>(ebpf: &mut Ebpf, name: &str) -> Result<T>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or_else(|| anyhow!("the probe object has no map {name} (stale build?)"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type or layout"))
}

/// The node's key from the `NODE_KEY` map: the one a previous run left in the pinned map,
/// or a new random one written there.
fn node_key(ebpf: &mut Ebpf) -> Result<[u8; NODE_KEY_BYTES]> {
    let mut map: Array<&mut MapData, [u8; NODE_KEY_BYTES]> = Array::try_from(
        ebpf.map_mut(name::NODE_KEY)
            .ok_or_else(|| anyhow!("the probe object has no map NODE_KEY (stale build?)"))?,
    )
    .context("map NODE_KEY has an unexpected type or layout")?;
    let current = map.get(&0, 0).context("reading the node key")?;
    if current != [0; NODE_KEY_BYTES] {
        return Ok(current);
    }
    let fresh = crate::stores::digest::NodeKey::random()
        .context("drawing the node's key")?
        .bytes();
    map.set(0, fresh, 0).context("storing the node key")?;
    Ok(fresh)
}

/// A load failure with the tail of the verifier log, which is where the reason is.
fn explain(program: &str, err: ProgramError) -> anyhow::Error {
    match err {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => {
            let log = verifier_log.to_string();
            let tail: Vec<&str> = log.lines().rev().take(25).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow!(
                "the kernel refused program {program}: {io_error}\nverifier log (tail):\n{}",
                tail.join("\n")
            )
        }
        other => anyhow!(other).context(format!("loading program {program}")),
    }
}

fn attach_btf(
    ebpf: &mut Ebpf,
    btf: &Btf,
    program: &str,
    tracepoint: &str,
) -> Result<Vec<(String, FdLink)>> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the probe object has no program {program}"))?
        .try_into()?;
    prog.load(tracepoint, btf)
        .map_err(|e| explain(program, e))?;
    let id = prog
        .attach()
        .with_context(|| format!("attaching {program} to the raw tracepoint {tracepoint}"))?;
    let link = FdLink::from(prog.take_link(id)?);
    Ok(vec![(program.to_owned(), link)])
}

fn attach_classic(
    ebpf: &mut Ebpf,
    program: &str,
    points: &[(&str, &str)],
    why: &str,
) -> Result<Vec<(String, FdLink)>> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the probe object has no program {program}"))?
        .try_into()?;
    prog.load().map_err(|e| explain(program, e))?;
    let mut links = Vec::new();
    for (category, name) in points {
        let id = prog
            .attach(category, name)
            .with_context(|| format!("attaching to tracepoint {category}/{name}: {why}"))?;
        let link = FdLink::try_from(prog.take_link(id)?)
            .with_context(|| format!("tracepoint {category}/{name} has no bpf_link"))?;
        links.push((format!("{program}-{name}"), link));
    }
    Ok(links)
}

/// Lean mode's hooks: the classic entry tracepoint of every open syscall this
/// architecture has that can open for reading (open exists on x86_64, not on arm64).
/// creat(2) always opens for writing, which the filter drops by construction, so it is
/// not hooked at all.
fn open_tracepoints(tracefs: &Path) -> Vec<(&'static str, &'static str)> {
    [
        ("sys_enter_openat", true),
        ("sys_enter_openat2", false),
        ("sys_enter_open", false),
    ]
    .into_iter()
    .filter(|(name, required)| *required || tracefs.join("events/syscalls").join(name).exists())
    .map(|(name, _)| ("syscalls", name))
    .collect()
}

/// A name for the maps' layout: every type size, field offset and constant the maps and
/// records depend on (`trustdrift_common::layout::LAYOUT`), the map names and the
/// capacities. Any change gives a different directory, so pinned maps are never reused
/// with a wrong layout.
fn layout_name(caps: &Capacities) -> String {
    let mut description = String::new();
    for (what, value) in LAYOUT {
        description.push_str(&format!("{what}={value};"));
    }
    for map in name::ALL {
        description.push_str(map);
        description.push(';');
    }
    description.push_str(&format!(
        "{}:{}:{}:{}",
        caps.accesses, caps.fds, caps.procs, caps.ringbuf_bytes
    ));
    let hash = description.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    });
    format!("layout-{hash:016x}")
}

impl Probe {
    /// Checks privileges, mounts tracefs if needed, loads the probe with its filter and
    /// attaches it.
    pub fn attach(options: ProbeOptions) -> Result<Self> {
        if OBJECT.is_empty() {
            bail!(
                "this trustdrift binary was built without its eBPF probe: build it with \
                 `cargo xtask build` (which compiles the probe, then the daemon)"
            );
        }
        privileges::check()?;
        privileges::lift_memlock();
        options.paths.validate().context("invalid trust paths")?;
        let tracefs = tracefs::ensure_mounted()?;

        let btf_path = Path::new("/sys/kernel/btf/vmlinux");
        let kernel_btf = Btf::from_sys_fs().map_err(|e| {
            anyhow!(
                "kernel BTF is unavailable ({}: {e}): trustdrift's syscall hooks are BTF \
                 tracepoints, which need a kernel built with CONFIG_DEBUG_INFO_BTF=y",
                btf_path.display()
            )
        })?;
        let layout = layout::Btf::from_file(btf_path).ok();
        let exit_format = tracefs::format(tracefs, "sched", "sched_process_exit")?;
        tracefs::format(tracefs, "sched", "sched_process_exec")?;
        let offsets = layout::discover(layout.as_ref(), Some(&exit_format));
        let seed_offsets = iterators::offsets(layout.as_ref());
        if offsets.task_start_boottime == KernelOffsets::UNKNOWN {
            tracing::warn!(
                "kernel BTF has no task_struct.start_boottime: process start times come from \
                 /proc, which is racy for processes that exit at once"
            );
        }

        let caps = options.capacities;
        let (plan, pinning) = match &options.pin_dir {
            None => (None, PinStatus::Disabled),
            Some(dir) => match pinning::prepare(dir, &layout_name(&caps)) {
                Ok(plan) => {
                    let status = PinStatus::Active {
                        dir: plan.dir.clone(),
                        reused: plan.reused,
                    };
                    (Some(plan), status)
                }
                Err(reason) => {
                    tracing::warn!(
                        "the probe cannot be pinned ({reason}): reads made while the daemon \
                         is down will not be known after it restarts"
                    );
                    (None, PinStatus::Unavailable(reason))
                }
            },
        };
        if !offsets.can_walk_paths() {
            tracing::warn!(
                "kernel BTF lacks what rebuilding an opened file's path needs: relative \
                 opens are resolved from the process's directory after the fact, and a path \
                 that leads elsewhere than the opened file is reported unverifiable"
            );
        }
        let self_tgid = std::process::id();
        let fds_capacity = u64::from(caps.fds);
        let quotas = options.shares.quotas(&caps);
        let mut loader = EbpfLoader::new();
        loader
            .btf(Some(&kernel_btf))
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("FDS_CAPACITY", &fds_capacity, true)
            .override_global("QUOTAS", &quotas, true)
            .override_global("SEED_OFFSETS", &seed_offsets, true)
            .map_max_entries(name::ACCESSES, caps.accesses)
            .map_max_entries(name::FDS, caps.fds)
            .map_max_entries(name::PROCS, caps.procs)
            .map_max_entries(name::EVENTS, caps.ringbuf_bytes);
        if let Some(plan) = &plan {
            for map in name::ALL {
                loader.map_pin_path(map, plan.maps.join(map));
            }
        }
        let mut ebpf = loader
            .load(OBJECT)
            .context("loading the eBPF object (is BPF enabled in this kernel?)")?;

        let mut filter = Filter {
            prefixes: take(&mut ebpf, name::PREFIXES)?,
            table: take(&mut ebpf, name::FILTER)?,
        };
        filter.write(&options.paths)?;

        let mut links = match options.mode {
            Mode::Full => {
                let exit = match options.programs {
                    Programs::Probe => "sys_exit",
                    Programs::Floor => "floor_sys_exit",
                    Programs::CopyFloor => "copy_floor_sys_exit",
                };
                attach_btf(&mut ebpf, &kernel_btf, exit, "sys_exit")?
            }
            Mode::Lean => {
                let program = match options.programs {
                    Programs::Probe => "open_enter",
                    Programs::Floor => "floor_open_enter",
                    Programs::CopyFloor => "copy_floor_open_enter",
                };
                attach_classic(
                    &mut ebpf,
                    program,
                    &open_tracepoints(tracefs),
                    "lean mode needs the syscall tracepoints (CONFIG_FTRACE_SYSCALLS)",
                )?
            }
        };
        if options.programs == Programs::Probe {
            for name in ["sched_process_exec", "sched_process_exit"] {
                links.extend(attach_classic(
                    &mut ebpf,
                    name,
                    &[("sched", name)],
                    "trustdrift needs it to follow process exec and exit",
                )?);
            }
        }
        let mut attachments = Vec::new();
        for (name, link) in links {
            attachments.push(match &plan {
                Some(plan) => {
                    Attachment::Pinned(plan.pin_link(&name, link).map_err(|e| anyhow!(e))?)
                }
                None => Attachment::Owned(link),
            });
        }
        if let Some(plan) = &plan {
            let retired = plan.retire_previous_links();
            if retired > 0 || plan.reused {
                tracing::info!(
                    dir = %plan.dir.display(),
                    retired,
                    "took over the pinned probe of a previous run: what it recorded meanwhile \
                     is kept"
                );
            }
        }
        // Lean mode is for kernels where tracing programs may not work: it seeds from /proc.
        let seed_iterators = if options.mode == Mode::Full
            && options.programs == Programs::Probe
            && options.seed == SeedSource::Auto
        {
            iterators::open(&mut ebpf, &kernel_btf, &offsets, &seed_offsets)
                .inspect_err(|e| {
                    tracing::warn!(
                        "BPF task iterators are unavailable ({e:#}): the start-up scan reads /proc"
                    );
                })
                .ok()
        } else {
            None
        };
        let stats = if options.bpf_stats {
            match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
                Ok(fd) => Some(fd),
                Err(e) => {
                    tracing::warn!("cannot enable BPF run-time statistics: {e}");
                    None
                }
            }
        } else {
            None
        };

        let access_map = ebpf
            .take_map(name::ACCESSES)
            .ok_or_else(|| anyhow!("the probe object has no map ACCESSES (stale build?)"))?;
        let accesses_fd = match &access_map {
            aya::maps::Map::HashMap(data) => data
                .fd()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating the ACCESSES map's fd")?,
            _ => bail!("map ACCESSES is not a hash map (stale build?)"),
        };
        let accesses = HashMap::try_from(access_map)
            .context("map ACCESSES has an unexpected type or layout")?;
        let losses = take(&mut ebpf, name::LOSSES)?;
        let counters: Array<MapData, u64> = take(&mut ebpf, name::COUNTERS)?;
        let accesses_deleted = counters.get(&counter::ACCESSES_DELETED, 0).unwrap_or(0);
        let mut rereads: HashMap<MapData, AccessKey, u8> = take(&mut ebpf, name::REREAD_WATCH)?;
        // Watches are this daemon's own questions: a previous run's (kept by a pinned
        // probe) are for judgements it no longer holds.
        let stale: Vec<AccessKey> = rereads.keys().filter_map(Result::ok).collect();
        for key in stale {
            let _ = rereads.remove(&key);
        }
        let node_key = node_key(&mut ebpf)?;
        Ok(Self {
            ebpf,
            accesses,
            accesses_fd,
            losses,
            counters,
            accesses_deleted,
            rereads,
            filter,
            capacities: caps,
            node_key,
            attachments,
            plan,
            _stats: stats,
            seed_iterators,
            mode: options.mode,
            pinning,
        })
    }

    /// This node's key for keyed digests: kept in the pinned `NODE_KEY` map, so it lasts
    /// as long as the pinned probe (until a reboot, or an upgrade that changes the layout)
    /// and is never written anywhere else.
    pub fn node_key(&self) -> [u8; NODE_KEY_BYTES] {
        self.node_key
    }

    /// The start-up iterators, once, their walks started (take them after dropping the
    /// capabilities: the walking threads inherit the caller's): `None` when the kernel
    /// does not allow them, in lean mode, or when the configuration asks for /proc.
    pub fn take_seed_iterators(&mut self) -> Option<SeedIterators> {
        let mut iterators = self.seed_iterators.take()?;
        iterators.start();
        Some(iterators)
    }

    /// Replaces the kernel filter (config reload) without detaching anything.
    pub fn set_paths(&mut self, paths: &TrustPaths) -> Result<()> {
        paths.validate().context("invalid trust paths")?;
        self.filter.write(paths)
    }

    /// How full each bounded map is, from the counters the probe keeps as it inserts and
    /// removes (and the daemon's own count of the `ACCESSES` entries it deleted): O(1),
    /// whatever is tracked.
    pub fn map_fill(&self) -> Vec<MapFill> {
        let get = |i: u32| self.counters.get(&i, 0).unwrap_or(0);
        // The daemon may delete an entry a moment before the probe counts its insert.
        let accesses =
            get(counter::ACCESSES_INSERTED).saturating_sub(get(counter::ACCESSES_DELETED));
        vec![
            MapFill {
                map: "accesses",
                entries: accesses,
                capacity: u64::from(self.capacities.accesses),
            },
            MapFill {
                map: "procs",
                entries: get(counter::PROCS_LIVE),
                capacity: u64::from(self.capacities.procs),
            },
            MapFill {
                map: "fds",
                entries: get(counter::FDS_LIVE),
                capacity: u64::from(self.capacities.fds),
            },
        ]
    }

    /// Counts `n` entries this daemon deleted from `ACCESSES`, in the pinned counters so
    /// the fill stays right across restarts. Only the daemon writes this slot.
    fn count_deleted(&mut self, n: u64) {
        self.accesses_deleted = self.accesses_deleted.wrapping_add(n);
        let slot = counter::ACCESSES_DELETED;
        if let Err(e) = self.counters.set(slot, self.accesses_deleted, 0) {
            tracing::debug!("counting deleted accesses: {e}");
        }
    }

    /// Leaves nothing behind: unpins maps and links (they go when this process exits).
    pub fn unpin(&mut self) {
        for a in self.attachments.drain(..) {
            if let Attachment::Pinned(link) = a {
                let _ = link.unpin();
            }
        }
        if let Some(plan) = self.plan.take() {
            if let Err(e) = plan.remove() {
                tracing::warn!("removing {}: {e}", plan.dir.display());
            }
        }
    }

    /// The ring buffer of new accesses, execs and exits (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        take(&mut self.ebpf, name::EVENTS)
    }

    /// The aggregate the probe keeps for `key`, if it still exists.
    pub fn access_stats(&self, key: &AccessKey) -> Option<AccessStats> {
        self.accesses.get(key, 0).ok()
    }

    /// The aggregate the probe kept for `key`, removed from the kernel in the same call:
    /// for a process that has exited, whose aggregates cannot move again and would
    /// otherwise hold a table entry until the daemon forgets the process.
    pub fn take_access_stats(&mut self, key: &AccessKey) -> Option<AccessStats> {
        /// `bpf_attr` for the element commands.
        #[repr(C)]
        struct ElemAttr {
            map_fd: u32,
            _pad: u32,
            key: u64,
            value: u64,
            flags: u64,
        }
        const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
        let mut value = AccessStats::default();
        let attr = ElemAttr {
            map_fd: self.accesses_fd.as_raw_fd() as u32,
            _pad: 0,
            key: std::ptr::from_ref(key) as u64,
            value: std::ptr::from_mut(&mut value) as u64,
            flags: 0,
        };
        // SAFETY: the attr points at a key and a value of the map's sizes, both alive for
        // the duration of the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_AND_DELETE_ELEM,
                &attr,
                std::mem::size_of::<ElemAttr>(),
            )
        };
        if rc == 0 {
            self.count_deleted(1);
            return Some(value);
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::ENOENT) => None,
            // Kernels before 5.14 have no lookup-and-delete on hash maps.
            _ => {
                let stats = self.access_stats(key);
                self.forget_access(key);
                stats
            }
        }
    }

    /// Drops the aggregate of an access the daemon no longer needs.
    pub fn forget_access(&mut self, key: &AccessKey) {
        if self.accesses.remove(key).is_ok() {
            self.count_deleted(1);
        }
    }

    /// Asks the probe for one re-read record (`Event::Reread`) at the next re-open of the
    /// path of `key` by its process image, or read on an fd it holds on it; the watch is
    /// gone once it fired. Fails when `REREAD_WATCH` is full: the caller then relies on
    /// polling the aggregate. Unwatch an access when forgetting it, or its entry stays
    /// until the next daemon start.
    pub fn watch_reread(&mut self, key: &AccessKey) -> Result<()> {
        self.rereads
            .insert(key, 1, 0)
            .context("adding a re-read watch (REREAD_WATCH full?)")
    }

    /// Withdraws a re-read watch that has not fired (no-op otherwise).
    pub fn unwatch_reread(&mut self, key: &AccessKey) {
        let _ = self.rereads.remove(key);
    }

    /// Losses counted by the probe since it was loaded, summed over CPUs.
    pub fn losses(&self) -> [(Loss, u64); LOSS_REASONS] {
        Loss::ALL.map(|loss| {
            let total = self
                .losses
                .get(&(loss as u32), 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .unwrap_or(0);
            (loss, total)
        })
    }

    /// The kernel's accounting of each attached program (non-zero only while
    /// `kernel.bpf_stats_enabled` is on).
    pub fn program_stats(&self) -> Vec<ProgramStats> {
        self.ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramStats {
                    name: name.to_owned(),
                    run_time_ns: info.run_time().as_nanos() as u64,
                    run_count: info.run_count(),
                })
            })
            .collect()
    }
}

/// The kernel filter's maps.
struct Filter {
    prefixes: LpmTrie<MapData, [u8; PREFIX_CAP], u8>,
    table: Array<MapData, FilterTable>,
}

impl Filter {
    /// Makes the maps say `paths`, whatever they held (a previous run's pinned filter, the
    /// configuration before a reload). While the update is in flight the bitmaps are the
    /// union of old and new and both prefix sets are in the trie, so no path both
    /// versions accept is dropped.
    fn write(&mut self, paths: &TrustPaths) -> Result<()> {
        let wanted = paths.prefix_entries();
        let table = paths.filter_table();
        if let Ok(old) = self.table.get(&0, 0) {
            self.table
                .set(0, TrustPaths::union_bitmaps(&old, &table), 0)
                .context("widening the kernel filter")?;
        }
        for (key, value) in &wanted {
            self.prefixes
                .insert(&Key::new(key.prefixlen, key.data), value, 0)
                .context("writing a trust prefix into the kernel filter")?;
        }
        let stale: Vec<Key<[u8; PREFIX_CAP]>> = self
            .prefixes
            .keys()
            .filter_map(Result::ok)
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|(w, _)| w.prefixlen == k.prefix_len() && w.data == k.data())
            })
            .collect();
        for key in stale {
            let _ = self.prefixes.remove(&key);
        }
        self.table
            .set(0, table, 0)
            .context("writing the kernel filter")?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_the_table_sizes_with_a_floor() {
        let q = Shares::default().quotas(&Capacities::default());
        let (cg, cg_uid, uid) = (
            owner_kind::CGROUP as usize,
            owner_kind::CGROUP_UID as usize,
            owner_kind::UID as usize,
        );
        // A cgroup a quarter of the table, a uid in it half that, a uid across cgroups
        // twice that.
        let table = i64::from(Capacities::default().accesses);
        assert_eq!(q.accesses[cg], table / 4);
        assert_eq!(q.accesses[cg_uid], table / 8);
        assert_eq!(q.accesses[uid], table / 2);
        assert_eq!(q.procs[cg], 4096);
        assert_eq!(q.paths_per_process, 256);
        // A tiny table (a test's) is not shared out below a useful size.
        let tiny = Capacities {
            accesses: 16,
            ..Capacities::default()
        };
        assert_eq!(Shares::default().quotas(&tiny).accesses, [16; 3]);
    }
}
