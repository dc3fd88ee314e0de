//! Loading, configuring and attaching the kernel probe, and reading what it keeps in maps.
//! Dropping a [`Probe`] detaches every program.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{BtfTracePoint, ProgramError, TracePoint},
};
use trustdrift_common::{
    AccessKey, AccessStats, FilterTable, KernelOffsets, LOSS_REASONS, Loss, PREFIX_CAP,
};

use crate::{kernel_layout, privileges, tracefs, trust_paths::TrustPaths};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe.o"));

/// Which syscall hooks to attach.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Opens and reads: entry and exit hooks; fds and byte counts are observed.
    Full,
    /// Opens only, on the entry hook: cheapest; success and bytes are inferred.
    Lean,
}

/// What to attach: the probe, or (for benchmarks) empty programs on the same hooks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Programs {
    Probe,
    Floor,
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
            accesses: 32768,
            fds: 16384,
            procs: 16384,
            ringbuf_bytes: 1 << 20,
        }
    }
}

pub struct ProbeOptions {
    pub mode: Mode,
    pub programs: Programs,
    pub paths: TrustPaths,
    pub capacities: Capacities,
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
    losses: PerCpuArray<MapData, u64>,
    pub mode: Mode,
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

fn attach_btf(ebpf: &mut Ebpf, btf: &Btf, program: &str, tracepoint: &str) -> Result<()> {
    let prog: &mut BtfTracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the probe object has no program {program}"))?
        .try_into()?;
    prog.load(tracepoint, btf)
        .map_err(|e| explain(program, e))?;
    prog.attach()
        .with_context(|| format!("attaching {program} to the raw tracepoint {tracepoint}"))?;
    Ok(())
}

/// Lean mode's hooks: the classic entry tracepoint of every open syscall this
/// architecture has that can open for reading (open exists on x86_64, not on arm64).
/// creat(2) always opens for writing, which the filter drops by construction, so it is
/// not hooked at all.
fn attach_open_tracepoints(ebpf: &mut Ebpf, tracefs: &Path, program: &str) -> Result<()> {
    let prog: &mut TracePoint = ebpf
        .program_mut(program)
        .ok_or_else(|| anyhow!("the probe object has no program {program}"))?
        .try_into()?;
    prog.load().map_err(|e| explain(program, e))?;
    for (name, required) in [
        ("sys_enter_openat", true),
        ("sys_enter_openat2", false),
        ("sys_enter_open", false),
    ] {
        if !required && !tracefs.join("events/syscalls").join(name).exists() {
            continue;
        }
        prog.attach("syscalls", name).with_context(|| {
            format!(
                "attaching to tracepoint syscalls/{name}: lean mode needs the syscall \
                 tracepoints (CONFIG_FTRACE_SYSCALLS)"
            )
        })?;
    }
    Ok(())
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
        let layout = kernel_layout::Btf::from_file(btf_path).ok();
        let exit_format = tracefs::format(tracefs, "sched", "sched_process_exit")?;
        tracefs::format(tracefs, "sched", "sched_process_exec")?;
        let offsets = kernel_layout::discover(layout.as_ref(), Some(&exit_format));
        if offsets.task_start_boottime == KernelOffsets::UNKNOWN {
            tracing::warn!(
                "kernel BTF has no task_struct.start_boottime: process start times come from \
                 /proc, which is racy for processes that exit at once"
            );
        }

        let caps = options.capacities;
        let self_tgid = std::process::id();
        let fds_capacity = u64::from(caps.fds);
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&kernel_btf))
            .override_global("SELF_TGID", &self_tgid, true)
            .override_global("OFFSETS", &offsets, true)
            .override_global("FDS_CAPACITY", &fds_capacity, true)
            .map_max_entries("ACCESSES", caps.accesses)
            .map_max_entries("FDS", caps.fds)
            .map_max_entries("PROCS", caps.procs)
            .map_max_entries("EVENTS", caps.ringbuf_bytes)
            .load(OBJECT)
            .context("loading the eBPF object (is BPF enabled in this kernel?)")?;

        let mut filter = Filter {
            prefixes: take(&mut ebpf, "PREFIXES")?,
            table: take(&mut ebpf, "FILTER")?,
        };
        filter.write(&options.paths)?;

        match options.mode {
            Mode::Full => {
                let (enter, exit) = match options.programs {
                    Programs::Probe => ("sys_enter", "sys_exit"),
                    Programs::Floor => ("floor_sys_enter", "floor_sys_exit"),
                };
                attach_btf(&mut ebpf, &kernel_btf, enter, "sys_enter")?;
                attach_btf(&mut ebpf, &kernel_btf, exit, "sys_exit")?;
            }
            Mode::Lean => {
                let program = match options.programs {
                    Programs::Probe => "open_enter",
                    Programs::Floor => "floor_open_enter",
                };
                attach_open_tracepoints(&mut ebpf, tracefs, program)?;
            }
        }
        if options.programs == Programs::Probe {
            for name in ["sched_process_exec", "sched_process_exit"] {
                let prog: &mut TracePoint = ebpf
                    .program_mut(name)
                    .ok_or_else(|| anyhow!("the probe object has no program {name}"))?
                    .try_into()?;
                prog.load().map_err(|e| explain(name, e))?;
                prog.attach("sched", name).with_context(|| {
                    format!(
                        "attaching to tracepoint sched/{name}: trustdrift needs it to follow \
                         process exec and exit"
                    )
                })?;
            }
        }

        let accesses = take(&mut ebpf, "ACCESSES")?;
        let losses = take(&mut ebpf, "LOSSES")?;
        Ok(Self {
            ebpf,
            accesses,
            losses,
            mode: options.mode,
        })
    }

    /// The ring buffer of new accesses, execs and exits (can be taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        take(&mut self.ebpf, "EVENTS")
    }

    /// The aggregate the probe keeps for `key`, if it still exists.
    pub fn access_stats(&self, key: &AccessKey) -> Option<AccessStats> {
        self.accesses.get(key, 0).ok()
    }

    /// Drops the aggregate of an access the daemon no longer needs.
    pub fn forget_access(&mut self, key: &AccessKey) {
        let _ = self.accesses.remove(key);
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
    /// Writes the filter for `paths` into the probe's maps.
    fn write(&mut self, paths: &TrustPaths) -> Result<()> {
        for (key, value) in paths.prefix_entries() {
            self.prefixes
                .insert(&Key::new(key.prefixlen, key.data), value, 0)
                .context("writing a trust prefix into the kernel filter")?;
        }
        self.table
            .set(0, paths.filter_table(), 0)
            .context("writing the kernel filter")?;
        Ok(())
    }
}
