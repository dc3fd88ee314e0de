//! `cargo xtask bench overhead`: what watching trust files costs work that has nothing to
//! do with them. Two workloads, both pinned to one CPU: an open+read+close loop on an
//! unrelated file (the per-syscall cost), and reading every file of a tree (a
//! file-heavy program, as % slowdown). Variants, each paired with a baseline measured
//! just before it: the floor of trustdrift's hooks (empty programs), trustdrift full and
//! lean, a bpftrace script with trustdrift's prefix filter, and auditd read watches on
//! the same prefixes: what users would reach for instead.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Read},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use self::attach::{Setup, Variant, attach, default_prefixes, detach};
use super::{median, pin, verdict, write_section};

mod attach;

#[derive(clap::Args)]
pub struct Args {
    /// Interleaved rounds; medians are taken over them.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    /// open+read+close iterations per loop measurement.
    #[arg(long, default_value_t = 200_000)]
    iterations: u64,
    /// The tree the file-heavy workload reads (default: /usr/include, else /usr/share/man).
    #[arg(long)]
    tree: Option<PathBuf>,
    /// Passes over the tree per measurement (the median is kept).
    #[arg(long, default_value_t = 3)]
    passes: u64,
    /// CPU the workloads are pinned to.
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Leave auditd out (it is started, given watches, and stopped again otherwise).
    #[arg(long)]
    no_auditd: bool,
    /// Print only; leave docs/benchmarks.md alone.
    #[arg(long)]
    no_write: bool,
}

#[derive(clap::Args)]
pub struct WorkloadArgs {
    /// File to open, read and close in a loop.
    #[arg(long, conflicts_with = "tree")]
    path: Option<PathBuf>,
    /// Read every regular file under this directory, `passes` times.
    #[arg(long)]
    tree: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    iterations: u64,
    #[arg(long, default_value_t = 3)]
    passes: u64,
    #[arg(long, default_value_t = 1)]
    cpu: usize,
    /// Timed batches the loop's iterations are split into.
    #[arg(long, default_value_t = 20)]
    batches: u64,
}

/// The workload itself, in its own process: pinned, warmed up, then timed. Prints ns per
/// iteration (loop) or per pass (tree).
pub fn workload(args: &WorkloadArgs) -> Result<()> {
    pin(args.cpu)?;
    match (&args.path, &args.tree) {
        (Some(path), None) => loop_workload(path, args),
        (None, Some(tree)) => tree_workload(tree, args.passes),
        _ => bail!("give --path or --tree"),
    }
}

fn loop_workload(path: &Path, args: &WorkloadArgs) -> Result<()> {
    let mut buf = [0u8; 4096];
    let mut once = || -> Result<()> {
        let mut f = fs::File::open(path)?;
        let _ = f.read(&mut buf)?;
        Ok(())
    };
    for _ in 0..(args.iterations / 10).max(1000) {
        once()?;
    }
    // Many short batches: the fastest ones are the least disturbed by interrupts and by
    // whatever else the machine does; the median of the fastest half is what we report.
    let batches = args.batches.max(1);
    let per_batch = (args.iterations / batches).max(1);
    let mut times = Vec::with_capacity(batches as usize);
    for _ in 0..batches {
        let start = Instant::now();
        for _ in 0..per_batch {
            once()?;
        }
        times.push(start.elapsed().as_nanos() as f64 / per_batch as f64);
    }
    times.sort_by(f64::total_cmp);
    let fastest_half = &times[..times.len().div_ceil(2)];
    println!("{:.1}", fastest_half[fastest_half.len() / 2]);
    Ok(())
}

/// Every regular file under `root`, in a stable order.
fn files_under(root: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut dirs = vec![root.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                dirs.push(entry.path());
            } else if kind.is_file() {
                out.push(entry.path());
            }
        }
    }
    out.sort();
    if out.is_empty() {
        bail!("no files under {}", root.display());
    }
    Ok(out)
}

/// Lists the tree and reads every file, as a compiler or a backup does: the listing is
/// part of the work (getdents), so it is redone on every pass.
fn tree_workload(root: &Path, passes: u64) -> Result<()> {
    let mut buf = Vec::with_capacity(1 << 20);
    let mut pass = || -> Result<Duration> {
        let start = Instant::now();
        for file in files_under(root)? {
            buf.clear();
            // Unreadable files are part of any real tree: skipped, as `tar` would.
            if let Ok(mut f) = fs::File::open(&file) {
                let _ = f.read_to_end(&mut buf);
            }
        }
        Ok(start.elapsed())
    };
    pass()?; // warm the page cache and the dentry cache
    let mut times: Vec<f64> = (0..passes.max(1))
        .map(|_| pass().map(|d| d.as_nanos() as f64))
        .collect::<Result<_>>()?;
    println!("{:.0}", median(&mut times));
    Ok(())
}

/// Runs the workload subprocess (`xtask workload …`) and returns what it prints.
fn run_workload(args: &[&str]) -> Result<f64> {
    let out = Command::new(std::env::current_exe()?)
        .arg("workload")
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!("workload failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

struct Workloads {
    file: PathBuf,
    tree: PathBuf,
    iterations: u64,
    passes: u64,
    cpu: usize,
}

impl Workloads {
    fn looped(&self) -> Result<f64> {
        run_workload(&[
            "--path",
            &self.file.to_string_lossy(),
            "--iterations",
            &self.iterations.to_string(),
            "--cpu",
            &self.cpu.to_string(),
        ])
    }

    fn tree(&self) -> Result<f64> {
        run_workload(&[
            "--tree",
            &self.tree.to_string_lossy(),
            "--passes",
            &self.passes.to_string(),
            "--cpu",
            &self.cpu.to_string(),
        ])
    }

    /// Syscalls one pass over the tree makes, counted once with `strace -c` (the
    /// process's start-up adds a few hundred to tens of thousands).
    fn tree_syscalls(&self) -> Result<u64> {
        let summary = std::env::temp_dir().join("trustdrift-bench-strace.txt");
        let status = Command::new("strace")
            .args(["-f", "-c", "-o"])
            .arg(&summary)
            .arg(std::env::current_exe()?)
            .args(["workload", "--tree"])
            .arg(&self.tree)
            .args(["--passes", "1", "--cpu", &self.cpu.to_string()])
            .stdout(Stdio::null())
            .status()
            .context("running strace")?;
        if !status.success() {
            bail!("strace -c of the tree workload failed");
        }
        let text = fs::read_to_string(&summary)?;
        let _ = fs::remove_file(&summary);
        // `strace -c`'s last line: "100.00  seconds  usecs/call  calls  errors  total".
        let total = text
            .lines()
            .rev()
            .find(|l| l.trim_end().ends_with("total"))
            .context("no total in strace -c output")?;
        let calls: u64 = total
            .split_whitespace()
            .nth(3)
            .context("no call count")?
            .parse()?;
        // The workload reads the tree twice (a warm-up and one timed pass).
        Ok(calls / 2)
    }
}

/// Per-program kernel accounting printed by `trustdrift attach --stats` on exit.
fn program_stats(text: &str) -> Vec<(String, u64, u64)> {
    text.lines()
        .filter_map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).ok()?;
            Some((
                v.get("program")?.as_str()?.to_owned(),
                v.get("run_time_ns")?.as_u64()?,
                v.get("run_cnt")?.as_u64()?,
            ))
        })
        .collect()
}

fn set_bpf_stats(on: bool) -> Result<()> {
    fs::write(
        "/proc/sys/kernel/bpf_stats_enabled",
        if on { "1" } else { "0" },
    )
    .context("toggling kernel.bpf_stats_enabled")
}

fn available(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Medians of one workload: absolute per variant, and added over the paired baseline.
#[derive(Default)]
struct Figures {
    absolute: BTreeMap<usize, Vec<f64>>,
    added: BTreeMap<usize, Vec<f64>>,
}

impl Figures {
    fn record(&mut self, idx: usize, base: f64, with: f64) {
        self.absolute.entry(0).or_default().push(base);
        self.absolute.entry(idx).or_default().push(with);
        self.added.entry(idx).or_default().push(with - base);
    }

    fn medians(mut self, n: usize) -> (Vec<f64>, Vec<f64>) {
        let med = |m: &mut BTreeMap<usize, Vec<f64>>, i: usize| {
            m.get_mut(&i).map_or(0.0, |v| median(v.as_mut_slice()))
        };
        let abs = (0..n).map(|i| med(&mut self.absolute, i)).collect();
        let add = (0..n).map(|i| med(&mut self.added, i)).collect();
        (abs, add)
    }
}

pub fn run(args: &Args, trustdrift: &Path) -> Result<()> {
    // Removed when the run ends, however it ends.
    let dir = trustdrift_testkit::TempDir::try_new("bench-overhead")
        .context("a directory for the workload's file")?;
    let file = dir.join("unrelated-data.txt");
    fs::write(&file, vec![b'x'; 512])?;
    let tree = match &args.tree {
        Some(t) => t.clone(),
        None => ["/usr/include", "/usr/share/man"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.is_dir())
            .context("neither /usr/include nor /usr/share/man: give --tree")?,
    };
    let work = Workloads {
        file,
        tree,
        iterations: args.iterations,
        passes: args.passes,
        cpu: args.cpu,
    };
    // `cargo xtask bench` installs them first (xtask's bench_packages).
    let needed = ["strace", "bpftrace"]
        .into_iter()
        .chain((!args.no_auditd).then_some("auditctl"));
    for program in needed {
        if !trustdrift_testkit::has_program(program) {
            bail!("{program} is missing: `cargo xtask bench overhead` installs it");
        }
    }
    let prefixes = default_prefixes();
    let setup = Setup {
        trustdrift,
        prefixes: &prefixes,
    };

    let mut variants = vec![Variant::Baseline];
    for lean in [false, true] {
        for floor in [true, false] {
            variants.push(Variant::Trustdrift { floor, lean });
        }
    }
    if available("bpftrace") {
        variants.push(Variant::Bpftrace);
    }
    if !args.no_auditd {
        variants.push(Variant::Auditd);
    }
    let files = files_under(&work.tree)?.len();
    let syscalls = work.tree_syscalls()?;
    eprintln!(
        "xtask: tree {}: {files} files, {syscalls} syscalls per pass",
        work.tree.display()
    );

    // Each measurement of a variant is paired with a baseline measured just before it:
    // this VM's speed drifts by several percent over seconds, and the pairing cancels it.
    let (mut looped, mut treed) = (Figures::default(), Figures::default());
    for round in 0..args.rounds {
        // Rotate the order each round so no variant always follows another.
        for i in 1..variants.len() {
            let idx = 1 + (i - 1 + round) % (variants.len() - 1);
            let v = &variants[idx];
            let (base_loop, base_tree) = (work.looped()?, work.tree()?);
            let attached = attach(v, &setup, false)?;
            let measured = work.looped().and_then(|l| Ok((l, work.tree()?)));
            detach(attached)?;
            let (with_loop, with_tree) = measured?;
            eprintln!(
                "xtask: round {} {:<42} loop {with_loop:>7.1} ns ({:+.1}), tree {:>6.1} ms ({:+.2}%)",
                round + 1,
                v.name(),
                with_loop - base_loop,
                with_tree / 1e6,
                (with_tree / base_tree - 1.0) * 100.0
            );
            looped.record(idx, base_loop, with_loop);
            treed.record(idx, base_tree, with_tree);
        }
    }
    let n = variants.len();
    let (loop_abs, loop_added) = looped.medians(n);
    let (tree_abs, tree_added) = treed.medians(n);

    // Kernel accounting in a separate pass: bpf_stats itself costs time per invocation,
    // so the empty floor programs are accounted too and subtracted. The copy floor (the
    // same hook copying each read-only open's path, nothing more) splits the probe's own
    // work into that copy and the rest. Interleaved rounds, medians: one loop on this
    // kind of VM swings by 10 ns per invocation.
    set_bpf_stats(true)?;
    let mut accounting = Vec::new();
    for lean in [false, true] {
        let mut rounds = Vec::new();
        for _ in 0..args.rounds {
            let mut round = Vec::new();
            for stand_in in [
                Variant::Trustdrift { floor: true, lean },
                Variant::CopyFloor { lean },
                Variant::Trustdrift { floor: false, lean },
            ] {
                let attached = attach(&stand_in, &setup, true)?;
                let measured = work.looped();
                let printed = detach(attached);
                measured?;
                round.push(program_stats(&printed?));
            }
            rounds.push(round);
        }
        accounting.push(Accounting::from_rounds(lean, rounds));
    }
    set_bpf_stats(false)?;

    let report = Report {
        variants: &variants,
        loop_abs,
        loop_added,
        tree_abs,
        tree_added,
        accounting,
        args,
        work: &work,
        files,
        syscalls,
    }
    .render();
    print!("{report}");
    if !args.no_write {
        write_section("overhead", &report)?;
        eprintln!("xtask: wrote docs/benchmarks.md");
    }
    Ok(())
}

/// Kernel accounting of one mode, medians over rounds of ns per hook invocation: the
/// empty floor programs, the copy floor, the probe (and its programs, from one round).
struct Accounting {
    lean: bool,
    rounds: usize,
    floor: f64,
    copy_floor: f64,
    probe: f64,
    probe_programs: Vec<(String, u64, u64)>,
}

/// ns per invocation of the syscall hooks among `programs` (the `sched_` ones follow
/// exec and exit, not the workload's syscalls).
fn per_invocation(programs: &[(String, u64, u64)]) -> f64 {
    let (time, count) = programs
        .iter()
        .filter(|(name, _, _)| !name.starts_with("sched_"))
        .fold((0u64, 0u64), |(t, c), (_, pt, pc)| (t + pt, c + pc));
    if count == 0 {
        0.0
    } else {
        time as f64 / count as f64
    }
}

struct Report<'a> {
    variants: &'a [Variant],
    loop_abs: Vec<f64>,
    loop_added: Vec<f64>,
    tree_abs: Vec<f64>,
    tree_added: Vec<f64>,
    accounting: Vec<Accounting>,
    args: &'a Args,
    work: &'a Workloads,
    files: usize,
    syscalls: u64,
}

/// Syscalls per loop iteration: openat, read, close.
const LOOP_SYSCALLS: f64 = 3.0;

impl Report<'_> {
    fn find(&self, pred: impl Fn(&Variant) -> bool) -> Option<usize> {
        self.variants.iter().position(pred)
    }

    fn trustdrift(&self, floor: bool, lean: bool) -> Option<usize> {
        self.find(
            |v| matches!(v, Variant::Trustdrift { floor: f, lean: l } if *f == floor && *l == lean),
        )
    }

    fn render(&self) -> String {
        let (full, lean) = (self.trustdrift(false, false), self.trustdrift(false, true));
        let (floor_full, floor_lean) = (self.trustdrift(true, false), self.trustdrift(true, true));
        let bpftrace = self.find(|v| matches!(v, Variant::Bpftrace));
        let auditd = self.find(|v| matches!(v, Variant::Auditd));
        let slowdown = |i: usize| self.tree_added[i] / self.tree_abs[0] * 100.0;

        let mut s = String::new();
        let host = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
        s.push_str(&format!(
            "Kernel {}, {cpus} CPUs; workloads pinned to CPU {}; {} interleaved rounds, each \
             variant paired with a baseline measured just before it; medians.\n\n",
            host.trim(),
            self.args.cpu,
            self.args.rounds,
        ));
        s.push_str(&format!(
            "**Loop**: open+read+close of a 512-byte unrelated file, {} iterations per \
             measurement (3 syscalls each).\n\n",
            self.args.iterations
        ));
        s.push_str(
            "| variant | ns/iteration | added ns (paired) | added ns per syscall | slowdown | vs floor of its hooks |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
        for (i, v) in self.variants.iter().enumerate() {
            let vs = match v {
                Variant::Trustdrift { floor: false, lean } => {
                    let f = if *lean { floor_lean } else { floor_full };
                    f.map(|f| format!("{:.2}x", self.loop_added[i] / self.loop_added[f]))
                        .unwrap_or_default()
                }
                _ => String::new(),
            };
            s.push_str(&format!(
                "| {} | {:.1} | {:+.1} | {:+.1} | {:+.1}% | {vs} |\n",
                v.name(),
                self.loop_abs[i],
                self.loop_added[i],
                self.loop_added[i] / LOOP_SYSCALLS,
                self.loop_added[i] / self.loop_abs[0] * 100.0,
            ));
        }
        s.push_str(&format!(
            "\n**Tree**: every file under `{}` ({} files, {} syscalls per pass by `strace -c`: \
             getdents, openat, statx, read, close), listed and read {} times per measurement, \
             page cache warm.\n\n",
            self.work.tree.display(),
            self.files,
            self.syscalls,
            self.args.passes
        ));
        s.push_str(
            "| variant | ms/pass | added ms (paired) | added ns per syscall | slowdown |\n\
             |---|---:|---:|---:|---:|\n",
        );
        for (i, v) in self.variants.iter().enumerate() {
            s.push_str(&format!(
                "| {} | {:.1} | {:+.2} | {:+.1} | {:+.2}% |\n",
                v.name(),
                self.tree_abs[i] / 1e6,
                self.tree_added[i] / 1e6,
                self.tree_added[i] / self.syscalls.max(1) as f64,
                slowdown(i),
            ));
        }
        s.push('\n');

        let mut targets = Vec::new();
        let ratio = |a: usize, b: usize| self.loop_added[a] / self.loop_added[b];
        if let (Some(full), Some(a)) = (full, auditd) {
            let r = ratio(full, a);
            targets.push(format!(
                "- trustdrift (full) adds {r:.2}x what auditd read watches add (target <= 0.5x): {}",
                verdict(r <= 0.5)
            ));
        }
        if let (Some(full), Some(bt)) = (full, bpftrace) {
            let r = ratio(full, bt);
            targets.push(format!(
                "- trustdrift full (opens and reads) adds {r:.2}x the bpftrace opens-only \
                 script (target <= 1.3x): {}",
                verdict(r <= 1.3)
            ));
        }
        if let (Some(lean), Some(bt)) = (lean, bpftrace) {
            let r = ratio(lean, bt);
            targets.push(format!(
                "- trustdrift lean (opens only) adds {r:.2}x the bpftrace opens-only script \
                 (target < 1.0x): {}",
                verdict(r < 1.0)
            ));
        }
        for (name, idx) in [("full", full), ("lean", lean)] {
            if let Some(i) = idx {
                let pct = slowdown(i);
                targets.push(format!(
                    "- file-heavy workload, trustdrift {name}: {pct:+.2}% (target <= 5%): {}",
                    verdict(pct <= 5.0)
                ));
            }
        }
        if let (Some(full), Some(floor)) = (full, floor_full) {
            targets.push(format!(
                "- of what trustdrift full adds on the loop, {:.0}% is the floor of its hooks \
                 (the slow syscall path any syscall hook forces)",
                self.loop_added[floor] / self.loop_added[full] * 100.0
            ));
        }
        if let (Some(floor), Some(bt)) = (floor_full, bpftrace) {
            targets.push(format!(
                "- that floor alone is {:.2}x what the whole bpftrace opens-only script adds",
                ratio(floor, bt)
            ));
        }
        for a in &self.accounting {
            targets.push(a.line());
        }
        s.push_str(&targets.join("\n"));
        s.push('\n');
        s
    }
}

impl Accounting {
    /// `rounds` holds, per round, the floor's, the copy floor's and the probe's stats.
    fn from_rounds(lean: bool, rounds: Vec<Vec<Vec<(String, u64, u64)>>>) -> Accounting {
        let column = |i: usize| {
            let mut v: Vec<f64> = rounds
                .iter()
                .filter_map(|r| r.get(i))
                .map(|p| per_invocation(p))
                .collect();
            median(&mut v)
        };
        Accounting {
            lean,
            rounds: rounds.len(),
            floor: column(0),
            copy_floor: column(1),
            probe: column(2),
            probe_programs: rounds
                .last()
                .and_then(|r| r.get(2))
                .cloned()
                .unwrap_or_default(),
        }
    }

    fn line(&self) -> String {
        let (probe, floor, copy) = (self.probe, self.floor, self.copy_floor);
        let detail: Vec<String> = self
            .probe_programs
            .iter()
            .filter(|(_, _, c)| *c > 0)
            .map(|(name, t, c)| format!("{name} {:.1} ns x {c}", *t as f64 / *c as f64))
            .collect();
        format!(
            "- kernel accounting, {} mode (kernel.bpf_stats_enabled, medians of {} rounds): \
             {probe:.1} ns per hook invocation, of which the empty floor programs account \
             {floor:.1} ns (the accounting's own clock reads): the probe's own work is {:.1} \
             ns. The copy floor (the same hooks copying the path of every read-only open \
             from user memory, nothing else) accounts {copy:.1} ns: that copy, which any \
             path filter pays, is {:.1} ns of the own work, the rest of the probe {:.1} ns \
             (last round: {})",
            if self.lean { "lean" } else { "full" },
            self.rounds,
            probe - floor,
            copy - floor,
            probe - copy,
            detail.join(", ")
        )
    }
}
