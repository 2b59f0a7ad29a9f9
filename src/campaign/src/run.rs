//! The campaign runner behind `faultvisor campaign FILE.toml`: many short VMs, each with a fault plan, run in
//! parallel (one VMM process each, a timeout each); sweeps expanded into runs, a
//! fault-free golden run per guest configuration, every faulty run classified against
//! it (the engine is the `campaign` crate); results as JSON Lines, a Markdown report,
//! JUnit XML and a self-contained HTML report (each run's event trace, `trace.json`,
//! opens in Perfetto); `faultvisor merge` joins the outputs of shards.
//!
//! A campaign file (see resources/campaigns/):
//!
//! ```toml
//! [campaign]
//! name = "probe-faults"
//! seed = 42            # for "rand:LO..HI" values; --seed overrides
//! timeout_s = 20       # per run
//! golden = true        # a fault-free golden run per configuration (default)
//!
//! [defaults]           # any experiment field
//! guest = "probe"
//! devices = ["test", "edu"]
//! disks = ["path={rootfs},snapshot=on"]   # {rootfs}: the default guest's root disk
//!
//! [[experiment]]
//! name = "drop-msis"
//! probe_tests = "opt.watch"
//! repeat = 3                     # runs per sweep point
//! [experiment.sweep]             # lists or "range:LO..HI[:STEP]"; cross product
//! vcpus = [1, 2]
//! "fault.1.count" = "range:1..4"
//! [[experiment.fault]]
//! at = "# watch: ready"          # wait for this console text, or after_ms / after_dmas
//! inject = "drop-irq"            # then the API's fields, as `faultvisor inject` sends
//! device = "00:01.0"
//! count = 3
//! [[experiment.fault]]           # at + after_ms: the delay runs from the marker
//! inject = "spurious-irq"        # the scenario's "go": part of the workload, so the
//! vector = 0xee                  # golden run sends it too
//! cpu = 0
//! stimulus = true
//! [experiment.outcome]           # added to the guest's default classification rules
//! detected = ["my-driver: retry"]
//! hang_s = 5
//! [experiment.after]             # a second boot once the VM has ended (same guest
//! cmdline = "probe.tests=boot.*" # and disks; a disk "path={copy:IMG}" is the run's
//!                                # own copy of IMG, shared by both boots)
//! [experiment.expect]            # optional expectations on top of the outcome
//! exit_code = 0
//! log_contains = ["msi_received=7"]
//! log_absent = ["not ok"]
//! stats = { "irq_injection.dropped" = ">= 3" }
//! alive = true                   # the VM still answers after the fault plan
//! ```

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmm::api::client;

use serde::Deserialize;
use serde_json::{json, Value};

/// A campaign that cannot run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The campaign file or an option is wrong (the message names line and field).
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("cannot read {what} '{path}': {reason}")]
    File {
        /// Which file.
        what: &'static str,
        /// Path.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

impl Error {
    /// [`Error::File`] for `path`, with `e` as the reason.
    fn file(what: &'static str, path: &Path, e: impl std::fmt::Display) -> Self {
        Error::File {
            what,
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    }
}

/// What `faultvisor campaign` asks for.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The campaign file (TOML).
    pub file: PathBuf,
    /// Runs at once (default: the host's CPUs).
    pub jobs: Option<usize>,
    /// Output directory.
    pub out: PathBuf,
    /// "I/N": run slice I of N.
    pub shard: Option<String>,
    /// Seed for random values (overrides the file's).
    pub seed: Option<u64>,
    /// Replay one run (with its golden run).
    pub only: Option<String>,
    /// Runs per sweep point for every experiment, instead of each one's `repeat`.
    pub repeat: Option<u32>,
    /// The faultvisor executable each run starts (`faultvisor run ...`).
    pub vmm: PathBuf,
    /// The probe guest's ELF (written to the output directory).
    pub probe_elf: &'static [u8],
    /// The default Linux guest's directory (vmlinux, initramfs.cpio, rootfs.ext4).
    pub guest_dir: PathBuf,
}

/// Locks a mutex, recovering the data if a holder panicked.
fn lock_or_recover<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CampaignFile {
    campaign: Meta,
    #[serde(default)]
    defaults: Experiment,
    #[serde(default, rename = "experiment")]
    experiments: Vec<toml::Spanned<Experiment>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Meta {
    name: String,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    timeout_s: Option<u64>,
    #[serde(default)]
    description: Option<String>,
    /// One fault-free golden run per configuration (default true).
    #[serde(default)]
    golden: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Experiment {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    guest: Option<String>,
    #[serde(default)]
    probe_tests: Option<String>,
    #[serde(default)]
    kernel: Option<String>,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    cmdline: Option<String>,
    #[serde(default)]
    devices: Option<Vec<String>>,
    #[serde(default)]
    disks: Option<Vec<String>>,
    #[serde(default)]
    vcpus: Option<u32>,
    #[serde(default)]
    memory: Option<String>,
    #[serde(default)]
    iommu: Option<String>,
    #[serde(default)]
    timeout_s: Option<u64>,
    #[serde(default)]
    repeat: Option<u32>,
    #[serde(default, rename = "fault")]
    faults: Vec<toml::Spanned<FaultStep>>,
    #[serde(default)]
    expect: Option<Expect>,
    /// Swept parameters: key → list or "range:LO..HI[:STEP]".
    #[serde(default)]
    sweep: Option<BTreeMap<String, toml::Value>>,
    /// Outcome rules added to the guest's defaults.
    #[serde(default)]
    outcome: Option<crate::outcome::RuleSpec>,
    /// A second boot of the same guest and disks once the first VM has ended (e.g.
    /// to check a filesystem after a power cut); its console joins the run's.
    #[serde(default)]
    after: Option<After>,
    /// Overrides the campaign's `golden` for this experiment.
    #[serde(default)]
    golden: Option<bool>,
}

/// `[experiment.after]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct After {
    /// The second boot's kernel command line.
    cmdline: String,
    /// Its own timeout (default: the experiment's).
    #[serde(default)]
    timeout_s: Option<u64>,
}

#[derive(Clone, Debug, Deserialize)]
struct FaultStep {
    #[serde(default)]
    at: Option<String>,
    /// Milliseconds after the previous step: a number or "rand:LO..HI" (uniform).
    #[serde(default)]
    after_ms: Option<toml::Value>,
    #[serde(default)]
    after_dmas: Option<u64>,
    inject: String,
    /// Part of the workload (e.g. the watch scenario's "go" interrupt): the golden
    /// run sends it too.
    #[serde(default)]
    stimulus: bool,
    #[serde(flatten)]
    params: BTreeMap<String, toml::Value>,
}

/// One step of a run's plan, every value drawn.
#[derive(Clone, Debug)]
struct Step {
    at: Option<String>,
    after_ms: Option<u64>,
    after_dmas: Option<u64>,
    inject: String,
    stimulus: bool,
    /// False for a fault step of a golden run: its condition is waited for (so that
    /// the stimuli after it keep their timing), nothing is injected.
    injects: bool,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    #[serde(default)]
    exit_code: Option<i32>,
    #[serde(default)]
    log_contains: Vec<String>,
    #[serde(default)]
    log_absent: Vec<String>,
    #[serde(default)]
    stats: BTreeMap<String, String>,
    #[serde(default)]
    alive: Option<bool>,
}

/// One run ready to go.
#[derive(Clone, Debug)]
struct Plan {
    index: usize,
    /// The run ID (`--only`).
    name: String,
    experiment: String,
    /// The configuration key (runs with the same one share a golden run).
    config: String,
    golden: bool,
    /// The sweep point's values.
    point: Vec<(String, Value)>,
    guest: String,
    args: Vec<String>,
    faults: Vec<(Step, Value)>,
    expect: Expect,
    rules: crate::outcome::Rules,
    timeout: Duration,
    seed: u64,
    /// The second boot: its `faultvisor run` options and timeout.
    after: Option<(Vec<String>, Duration)>,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn file_err(path: &Path, line: usize, msg: impl std::fmt::Display) -> Error {
    Error::Usage(format!("{}:{line}: {msg}", path.display()))
}

/// A SplitMix64 generator: small, and the same sequence on every host.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// Converts a TOML value to JSON, drawing "rand:LO..HI" strings from `rng`.
fn to_json(v: &toml::Value, rng: &mut Rng) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => match s.strip_prefix("rand:") {
            Some(range) => {
                let (lo, hi) = range
                    .split_once("..")
                    .ok_or_else(|| format!("'{s}': use rand:LO..HI"))?;
                let parse = |x: &str| {
                    let x = x.trim();
                    match x.strip_prefix("0x") {
                        Some(h) => u64::from_str_radix(h, 16),
                        None => x.parse(),
                    }
                    .map_err(|_| format!("'{s}': {x} is not a number"))
                };
                let (lo, hi) = (parse(lo)?, parse(hi)?);
                if hi < lo {
                    return Err(format!("'{s}': empty range"));
                }
                json!(lo + rng.next() % (hi - lo + 1))
            }
            None => json!(s),
        },
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => json!(b),
        other => return Err(format!("{other} is not a number, string or boolean")),
    })
}

fn merged(d: &Experiment, e: &Experiment) -> Experiment {
    Experiment {
        name: e.name.clone(),
        guest: e.guest.clone().or_else(|| d.guest.clone()),
        probe_tests: e.probe_tests.clone().or_else(|| d.probe_tests.clone()),
        kernel: e.kernel.clone().or_else(|| d.kernel.clone()),
        initrd: e.initrd.clone().or_else(|| d.initrd.clone()),
        cmdline: e.cmdline.clone().or_else(|| d.cmdline.clone()),
        devices: e.devices.clone().or_else(|| d.devices.clone()),
        disks: e.disks.clone().or_else(|| d.disks.clone()),
        vcpus: e.vcpus.or(d.vcpus),
        memory: e.memory.clone().or_else(|| d.memory.clone()),
        iommu: e.iommu.clone().or_else(|| d.iommu.clone()),
        timeout_s: e.timeout_s.or(d.timeout_s),
        repeat: e.repeat.or(d.repeat),
        faults: if e.faults.is_empty() {
            d.faults.clone()
        } else {
            e.faults.clone()
        },
        expect: e.expect.clone().or_else(|| d.expect.clone()),
        sweep: e.sweep.clone().or_else(|| d.sweep.clone()),
        outcome: e.outcome.clone().or_else(|| d.outcome.clone()),
        after: e.after.clone().or_else(|| d.after.clone()),
        golden: e.golden.or(d.golden),
    }
}

/// Guest-configuration keys a sweep may vary (the rest are `fault.N.FIELD`).
const CONFIG_KEYS: [&str; 5] = ["vcpus", "memory", "iommu", "cmdline", "probe_tests"];

/// `e` with the guest-configuration values of a sweep point.
fn with_point(e: &Experiment, point: &[(String, Value)]) -> Result<Experiment, String> {
    let mut e = e.clone();
    for (k, v) in point {
        let text = || match v {
            Value::String(s) => Ok(s.clone()),
            Value::Number(n) => Ok(n.to_string()),
            other => Err(format!("sweep '{k}': {other} is not a string or number")),
        };
        match k.as_str() {
            "vcpus" => {
                e.vcpus = Some(
                    v.as_u64()
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| format!("sweep 'vcpus': {v} is not a count"))?,
                )
            }
            "memory" => e.memory = Some(text()?),
            "iommu" => e.iommu = Some(text()?),
            "cmdline" => e.cmdline = Some(text()?),
            "probe_tests" => e.probe_tests = Some(text()?),
            _ => {}
        }
    }
    Ok(e)
}

/// Where a campaign's guests come from.
#[derive(Clone, Debug)]
pub struct GuestPaths {
    /// The probe guest's ELF.
    pub probe: PathBuf,
    /// The default Linux guest's directory.
    pub guest_dir: PathBuf,
}

/// Reads and checks a campaign file; returns (name, plans) for `seed`.
fn load(
    path: &Path,
    seed_override: Option<u64>,
    repeat_override: Option<u32>,
    paths: &GuestPaths,
) -> Result<(String, Vec<Plan>, u64), Error> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::file("campaign file", path, e))?;
    parse(&text, path, seed_override, repeat_override, paths)
}

/// Runs one campaign may expand to, at most.
pub const MAX_RUNS: usize = 100_000;

/// The largest `repeat` (and `--repeat`).
pub const MAX_REPEAT: u32 = 1000;

/// The largest trace file a campaign reads back (the VMM's timeline is bounded well
/// below this; a results directory is input, though).
const MAX_TRACE_BYTES: u64 = 64 << 20;

/// A run's `trace.json`, if it exists, is at most [`MAX_TRACE_BYTES`] and parses.
fn read_trace(path: &Path) -> Option<Value> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_TRACE_BYTES + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_TRACE_BYTES {
        return None;
    }
    serde_json::from_slice(&bytes).ok()
}

/// Checks the text of a campaign file the way `faultvisor campaign` does (for fuzzing
/// and tools); returns the number of experiments it expands to, or the one-line error.
pub fn check_text(text: &str, seed: Option<u64>) -> Result<usize, String> {
    let paths = GuestPaths {
        probe: "/probe.elf".into(),
        guest_dir: "/guest".into(),
    };
    parse(text, Path::new("campaign.toml"), seed, None, &paths)
        .map(|(_, plans, _)| plans.len())
        .map_err(|e| e.to_string())
}

fn parse(
    text: &str,
    path: &Path,
    seed_override: Option<u64>,
    repeat_override: Option<u32>,
    paths: &GuestPaths,
) -> Result<(String, Vec<Plan>, u64), Error> {
    let text = text.to_string();
    let file: CampaignFile = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |s| line_of(&text, s.start));
        file_err(path, line, e.message().replace('\n', " "))
    })?;
    if file.experiments.is_empty() {
        return Err(file_err(path, 1, "no [[experiment]] in the campaign"));
    }
    let seed = seed_override.or(file.campaign.seed).unwrap_or(0);
    let default_timeout = file.campaign.timeout_s.unwrap_or(30);
    let mut plans = Vec::new();
    let mut names = std::collections::HashSet::new();
    // Configurations that have their golden run, in order.
    let mut golden_configs: Vec<String> = Vec::new();
    for spanned in &file.experiments {
        let line = line_of(&text, spanned.span().start);
        let e = merged(&file.defaults, spanned.get_ref());
        let err = |field: &str, msg: String| {
            file_err(path, line, format!("experiment field '{field}': {msg}"))
        };
        let name = e
            .name
            .clone()
            .ok_or_else(|| err("name", "missing".into()))?;
        if !names.insert(name.clone()) {
            return Err(err("name", format!("'{name}' is used twice")));
        }
        // The name becomes a directory under --out: nothing that could leave it.
        if name.trim().is_empty()
            || name.len() > 100
            || name.starts_with('.')
            || name
                .chars()
                .any(|c| c == '/' || c == '\\' || c.is_control())
        {
            return Err(err(
                "name",
                format!(
                    "'{}' is not a valid name: 1 to 100 characters, no '/', '\\' or control characters, not starting with '.'",
                    name.chars().take(100).collect::<String>()
                ),
            ));
        }
        let repeat = repeat_override
            .or(e.repeat)
            .unwrap_or(1)
            .clamp(1, MAX_REPEAT);
        // The sweep's axes: guest configuration keys, or fault.N.FIELD.
        let mut axes = Vec::new();
        for (k, v) in e.sweep.clone().unwrap_or_default() {
            if v.is_table() {
                return Err(err(
                    &format!("sweep.{k}"),
                    format!("a dotted sweep key must be quoted: \"{k}.N.FIELD\" = [...]"),
                ));
            }
            let key_ok = CONFIG_KEYS.contains(&k.as_str())
                || k.strip_prefix("fault.")
                    .and_then(|r| r.split_once('.'))
                    .and_then(|(n, f)| n.parse::<usize>().ok().map(|n| (n, f)))
                    .is_some_and(|(n, f)| n >= 1 && n <= e.faults.len() && !f.is_empty());
            if !key_ok {
                return Err(err(
                    &format!("sweep.{k}"),
                    format!(
                        "not a sweep key: use one of {} or fault.N.FIELD (N = 1..{} counts this experiment's fault steps)",
                        CONFIG_KEYS.join(", "),
                        e.faults.len()
                    ),
                ));
            }
            let json = toml_json(&v).map_err(|m| err(&format!("sweep.{k}"), m))?;
            let values = crate::sweep::values(&json)
                .map_err(|m| err(&format!("sweep.{k}"), m.to_string()))?
                .ok_or_else(|| {
                    err(
                        &format!("sweep.{k}"),
                        "a swept value is a list or \"range:LO..HI[:STEP]\"".into(),
                    )
                })?;
            axes.push(crate::sweep::Axis { key: k, values });
        }
        let points = crate::sweep::expand(&axes).map_err(|m| err("sweep", m.to_string()))?;
        let swept = !axes.is_empty();
        let want_golden = e.golden.or(file.campaign.golden).unwrap_or(true)
            && e.faults.iter().any(|f| !f.get_ref().stimulus);
        for (pi, point) in points.iter().enumerate() {
            let e = with_point(&e, point).map_err(|m| err("sweep", m))?;
            let (guest, args) = guest_args(&e, paths, &err)?;
            let config = config_key(&guest, &args);
            let rules = crate::outcome::Rules::new(&guest, &e.outcome.clone().unwrap_or_default())
                .map_err(|m| err("outcome", m.to_string()))?;
            let timeout =
                Duration::from_secs(e.timeout_s.unwrap_or(default_timeout).clamp(1, 3600));
            let after = e.after.as_ref().map(|a| {
                let mut second = args.clone();
                if let Some(i) = second.iter().position(|x| x == "--cmdline") {
                    if let Some(c) = second.get_mut(i + 1) {
                        *c = a.cmdline.clone();
                    }
                }
                let t = a
                    .timeout_s
                    .map_or(timeout, |t| Duration::from_secs(t.clamp(1, 3600)));
                (second, t)
            });
            let mut runs: Vec<(String, bool)> = Vec::new();
            if want_golden && !golden_configs.contains(&config) {
                runs.push((format!("golden-{}", golden_configs.len()), true));
                golden_configs.push(config.clone());
            }
            for r in 0..repeat {
                let mut id = name.clone();
                if swept {
                    id.push_str(&format!("@p{pi}"));
                }
                if repeat > 1 {
                    id.push_str(&format!("#{r}"));
                }
                runs.push((id, false));
            }
            if plans.len() + runs.len() > MAX_RUNS {
                return Err(err(
                    "repeat",
                    format!("the campaign expands to more than {MAX_RUNS} runs"),
                ));
            }
            for (id, golden) in runs {
                let exp_seed = seed ^ (plans.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
                let mut rng = Rng(exp_seed);
                let faults = steps(&e, point, golden, &mut rng, &text, path, &name)?;
                let expect = if golden {
                    Expect::default()
                } else {
                    e.expect.clone().unwrap_or_default()
                };
                for (k, v) in &expect.stats {
                    parse_cmp(v).map_err(|m| err(&format!("expect.stats.{k}"), m))?;
                }
                plans.push(Plan {
                    index: plans.len(),
                    name: id,
                    experiment: if golden {
                        "golden".into()
                    } else {
                        name.clone()
                    },
                    config: config.clone(),
                    golden,
                    point: point.clone(),
                    guest: guest.clone(),
                    args: args.clone(),
                    faults,
                    expect,
                    rules: rules.clone(),
                    timeout,
                    seed: exp_seed,
                    after: after.clone(),
                });
            }
        }
    }
    let _ = &file.campaign.description;
    Ok((file.campaign.name, plans, seed))
}

/// The `faultvisor run` options of experiment `e` (its guest kind first).
fn guest_args(
    e: &Experiment,
    paths: &GuestPaths,
    err: &dyn Fn(&str, String) -> Error,
) -> Result<(String, Vec<String>), Error> {
    let guest = e.guest.clone().unwrap_or_else(|| "probe".into());
    let mut args: Vec<String> = Vec::new();
    match guest.as_str() {
        "probe" => {
            args.extend(["--kernel".into(), paths.probe.display().to_string()]);
            let tests = e
                .probe_tests
                .clone()
                .ok_or_else(|| err("probe_tests", "a probe guest needs probe_tests".into()))?;
            let mut c = format!("probe.tests={tests}");
            if let Some(extra) = &e.cmdline {
                c.push(' ');
                c.push_str(extra);
            }
            args.extend(["--cmdline".into(), c]);
        }
        "linux" => {
            let dir = paths.guest_dir.clone();
            let kernel = e
                .kernel
                .clone()
                .unwrap_or_else(|| dir.join("vmlinux").display().to_string());
            let initrd = e
                .initrd
                .clone()
                .unwrap_or_else(|| dir.join("initramfs.cpio").display().to_string());
            args.extend(["--kernel".into(), kernel, "--initrd".into(), initrd]);
            let c = e
                .cmdline
                .clone()
                .ok_or_else(|| err("cmdline", "a linux guest needs a cmdline".into()))?;
            args.extend(["--cmdline".into(), c]);
        }
        other => {
            return Err(err(
                "guest",
                format!("'{other}' is not a guest (probe or linux)"),
            ))
        }
    }
    for d in e.devices.clone().unwrap_or_default() {
        d.parse::<vmm::DeviceSpec>()
            .map_err(|m| err("devices", m))?;
        args.extend(["--device".into(), d]);
    }
    // Disks after the devices; {rootfs} is the default guest's root disk.
    for d in e.disks.clone().unwrap_or_default() {
        let rootfs = paths.guest_dir.join("rootfs.ext4");
        let d = d.replace("{rootfs}", &rootfs.display().to_string());
        // {copy:PATH}: the run gets its own copy of PATH (see run_one).
        let (plain, _) = copy_placeholder(&d);
        plain
            .parse::<vmm::DiskSpec>()
            .map_err(|m| err("disks", m))?;
        args.extend(["--disk".into(), d]);
    }
    if let Some(v) = e.vcpus {
        if v == 0 || v > vmm::MAX_VCPUS {
            return Err(err(
                "vcpus",
                format!("{v} is not between 1 and {}", vmm::MAX_VCPUS),
            ));
        }
        args.extend(["--vcpus".into(), v.to_string()]);
    }
    args.extend([
        "--memory".into(),
        e.memory.clone().unwrap_or_else(|| {
            if guest == "probe" {
                "64M".into()
            } else {
                "512M".into()
            }
        }),
    ]);
    if let Some(i) = &e.iommu {
        i.parse::<vmm::IommuConfig>().map_err(|m| err("iommu", m))?;
        args.extend(["--iommu".into(), i.clone()]);
    }
    Ok((guest, args))
}

/// A TOML value as JSON, unchanged (lists kept).
fn toml_json(v: &toml::Value) -> Result<Value, String> {
    Ok(match v {
        toml::Value::String(s) => json!(s),
        toml::Value::Integer(i) => json!(i),
        toml::Value::Float(f) => json!(f),
        toml::Value::Boolean(b) => json!(b),
        toml::Value::Array(a) => Value::Array(a.iter().map(toml_json).collect::<Result<_, _>>()?),
        other => return Err(format!("{other} is not a number, string, boolean or list")),
    })
}

/// A disk spec with `{copy:PATH}` replaced by PATH, and PATH (None without one).
fn copy_placeholder(spec: &str) -> (String, Option<String>) {
    let Some(start) = spec.find("{copy:") else {
        return (spec.to_string(), None);
    };
    let rest = &spec[start + 6..];
    let Some(end) = rest.find('}') else {
        return (spec.to_string(), None);
    };
    let path = &rest[..end];
    (
        format!("{}{path}{}", &spec[..start], &rest[end + 1..]),
        Some(path.to_string()),
    )
}

/// A configuration's key: the guest's `faultvisor run` options without the kernel and
/// initrd paths (every run with the same key shares one golden run).
fn config_key(guest: &str, args: &[String]) -> String {
    let mut parts = vec![guest.to_string()];
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--kernel" || a == "--initrd" {
            it.next();
            continue;
        }
        parts.push(a.clone());
    }
    parts.join(" ")
}

/// The fault plan of one run: `e`'s steps with the sweep point's `fault.N.FIELD`
/// values, random values drawn from `rng`; a golden run keeps only the stimuli.
fn steps(
    e: &Experiment,
    point: &[(String, Value)],
    golden: bool,
    rng: &mut Rng,
    text: &str,
    path: &Path,
    name: &str,
) -> Result<Vec<(Step, Value)>, Error> {
    let mut out = Vec::new();
    for (k, step) in e.faults.iter().enumerate() {
        let sline = line_of(text, step.span().start);
        let s = step.get_ref();
        let serr = |field: &str, msg: String| {
            file_err(
                path,
                sline,
                format!("experiment '{name}' fault {} field '{field}': {msg}", k + 1),
            )
        };
        let mut params: BTreeMap<String, toml::Value> = s.params.clone();
        let mut step_out = Step {
            at: s.at.clone(),
            after_ms: None,
            after_dmas: s.after_dmas,
            inject: s.inject.clone(),
            stimulus: s.stimulus,
            injects: !golden || s.stimulus,
        };
        let mut after = s.after_ms.clone();
        let prefix = format!("fault.{}.", k + 1);
        for (key, v) in point {
            let Some(field) = key.strip_prefix(&prefix) else {
                continue;
            };
            let tv = match v {
                Value::String(x) => toml::Value::String(x.clone()),
                Value::Bool(b) => toml::Value::Boolean(*b),
                Value::Number(n) => match n.as_i64() {
                    Some(i) => toml::Value::Integer(i),
                    None => toml::Value::Float(n.as_f64().unwrap_or(0.0)),
                },
                other => return Err(serr(field, format!("{other} cannot be swept"))),
            };
            match (field, &tv) {
                ("inject", toml::Value::String(x)) => step_out.inject = x.clone(),
                ("at", toml::Value::String(x)) => step_out.at = Some(x.clone()),
                ("after_ms", _) => after = Some(tv.clone()),
                ("after_dmas", toml::Value::Integer(n)) if *n >= 0 => {
                    step_out.after_dmas = Some(*n as u64)
                }
                ("inject" | "at" | "after_dmas", _) => {
                    return Err(serr(field, format!("{tv} is not a valid value")))
                }
                _ => {
                    params.insert(field.to_string(), tv);
                }
            }
        }
        if let Some(a) = &after {
            let j = to_json(a, rng).map_err(|m| serr("after_ms", m))?;
            step_out.after_ms =
                Some(j.as_u64().ok_or_else(|| {
                    serr("after_ms", format!("{a} is not a number of milliseconds"))
                })?);
        }
        let mut body = json!({ "fault": step_out.inject });
        for (key, v) in &params {
            body[key] = to_json(v, rng).map_err(|m| serr(key, m))?;
        }
        vmm::api::validate_inject(&body)
            .map_err(|(f, m)| serr(if f == "fault" { "inject" } else { &f }, m))?;
        // at + after_ms: the delay runs from the marker.
        if step_out.after_dmas.is_some() && (step_out.at.is_some() || step_out.after_ms.is_some()) {
            return Err(serr(
                "after_dmas",
                "after_dmas goes alone (at and after_ms may be combined)".into(),
            ));
        }
        out.push((step_out, body));
    }
    Ok(out)
}

/// Parses "OP N" with OP one of ==, !=, >=, <=, >, < (a bare number means ==).
fn parse_cmp(s: &str) -> Result<(String, f64), String> {
    let t = s.trim();
    for op in ["==", "!=", ">=", "<=", ">", "<"] {
        if let Some(rest) = t.strip_prefix(op) {
            let n = rest
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("'{s}': '{}' is not a number", rest.trim()))?;
            return Ok((op.to_string(), n));
        }
    }
    t.parse::<f64>()
        .map(|n| ("==".to_string(), n))
        .map_err(|_| format!("'{s}' is not a comparison like '>= 16'"))
}

fn compare(op: &str, a: f64, b: f64) -> bool {
    match op {
        "==" => a == b,
        "!=" => a != b,
        ">=" => a >= b,
        "<=" => a <= b,
        ">" => a > b,
        _ => a < b,
    }
}

/// What happened in one experiment.
#[derive(Debug)]
struct Outcome {
    exit_code: Option<i32>,
    console: String,
    vmm_log: String,
    stats: Value,
    alive: Option<bool>,
    injected: Vec<Value>,
    fault_at_ms: Option<u128>,
    /// Fault → the guest's first acknowledgement in the trace, µs.
    trace_reaction_us: Option<u64>,
    duration_ms: u128,
    error: Option<String>,
    facts: crate::outcome::Facts,
    /// The second boot's exit status.
    after_exit_code: Option<i32>,
}

impl Outcome {
    /// A run whose VM never started, for `why`.
    fn not_started(why: String) -> Self {
        Self {
            exit_code: None,
            console: String::new(),
            vmm_log: String::new(),
            stats: json!({}),
            alive: None,
            injected: Vec::new(),
            fault_at_ms: None,
            trace_reaction_us: None,
            duration_ms: 0,
            error: Some(why),
            facts: crate::outcome::Facts::default(),
            after_exit_code: None,
        }
    }
}

/// A thread that copies `pipe` into `sink` chunk by chunk (not by lines: a line
/// without end must not grow a buffer), handing each chunk to `also` too.
fn drain(
    mut pipe: Box<dyn Read + Send>,
    sink: Arc<Mutex<BoundedOutput>>,
    mut also: impl FnMut(&[u8]) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 8192];
        while let Ok(n @ 1..) = pipe.read(&mut chunk) {
            lock_or_recover(&sink).push(&chunk[..n]);
            also(&chunk[..n]);
        }
    })
}

fn lookup(v: &Value, dotted: &str) -> Option<f64> {
    let mut cur = v;
    for part in dotted.split('.') {
        cur = cur.get(part)?;
    }
    cur.as_f64()
}

/// The VMM's last word on the VT-d unit ("VT-d: N DMA requests, N page walks, ...").
fn vtd_from_log(log: &str, stats: &mut Value) {
    let Some(line) = log.lines().rev().find(|l| l.contains("VT-d: ")) else {
        return;
    };
    let text = line.split("VT-d: ").nth(1).unwrap_or("");
    let keys = [
        ("DMA requests", "dma_requests"),
        ("page walks", "walks"),
        ("faults recorded", "faults_recorded"),
        ("dropped (overflow)", "faults_overflowed"),
        ("suppressed (FPD)", "faults_suppressed"),
        ("fault events", "fault_events"),
    ];
    for part in text.split(", ") {
        let Some((n, what)) = part.split_once(' ') else {
            continue;
        };
        if let (Ok(n), Some((_, key))) = (n.parse::<u64>(), keys.iter().find(|(w, _)| *w == what)) {
            stats["vtd"][*key] = json!(n);
        }
    }
}

fn checks(p: &Plan, o: &Outcome) -> Vec<(String, String, String, bool)> {
    let mut c = Vec::new();
    let e = &p.expect;
    if let Some(want) = e.exit_code {
        let got = o
            .exit_code
            .map_or("none (timeout)".to_string(), |c| c.to_string());
        c.push((
            "exit code".into(),
            want.to_string(),
            got,
            o.exit_code == Some(want),
        ));
    }
    for pat in &e.log_contains {
        let ok = o.console.contains(pat.as_str());
        c.push((
            format!("log contains '{pat}'"),
            "present".into(),
            if ok { "present" } else { "absent" }.into(),
            ok,
        ));
    }
    for pat in &e.log_absent {
        let ok = !o.console.contains(pat.as_str());
        c.push((
            format!("log lacks '{pat}'"),
            "absent".into(),
            if ok { "absent" } else { "present" }.into(),
            ok,
        ));
    }
    for (k, v) in &e.stats {
        let (op, n) = parse_cmp(v).unwrap_or(("==".into(), f64::NAN));
        let got = lookup(&o.stats, k);
        let ok = got.is_some_and(|g| compare(&op, g, n));
        c.push((
            format!("stat {k}"),
            format!("{op} {n}"),
            got.map_or("missing".into(), |g| g.to_string()),
            ok,
        ));
    }
    if let Some(want) = e.alive {
        let got = o.alive.unwrap_or(false);
        c.push((
            "alive after the faults".into(),
            want.to_string(),
            got.to_string(),
            got == want,
        ));
    }
    if let Some(err) = &o.error {
        c.push(("fault plan ran".into(), "yes".into(), err.clone(), false));
    }
    c
}

fn socket_path(index: usize) -> PathBuf {
    std::env::temp_dir().join(format!("fv-c{}-{index}.sock", std::process::id()))
}

fn run_one(p: &Plan, out: &Path, vmm: &Path) -> Outcome {
    let t0 = Instant::now();
    let dir = out.join(sanitize(&p.name));
    let _ = std::fs::create_dir_all(&dir);
    let sock = socket_path(p.index);
    let exe = vmm;
    // Disks written {copy:PATH}: this run's own copy of PATH (shared with its second
    // boot), removed when the run is over.
    let mut copies: Vec<PathBuf> = Vec::new();
    let mut copy_err = None;
    let mut localize = |args: &[String], make: bool| -> Vec<String> {
        let mut k = 0;
        let mut out = Vec::with_capacity(args.len());
        for (i, a) in args.iter().enumerate() {
            let is_disk = i > 0 && args[i - 1] == "--disk";
            match (is_disk, copy_placeholder(a)) {
                (true, (plain, Some(src))) => {
                    let dst = dir.join(format!("disk{k}.img"));
                    if make {
                        if let Err(e) = std::fs::copy(&src, &dst) {
                            copy_err = Some(format!("cannot copy the disk {src}: {e}"));
                        }
                        copies.push(dst.clone());
                    }
                    k += 1;
                    out.push(plain.replace(&src, &dst.display().to_string()));
                }
                _ => out.push(a.clone()),
            }
        }
        out
    };
    let args = localize(&p.args, true);
    let after_args = p.after.as_ref().map(|(a, t)| (localize(a, false), *t));
    let cleanup = |copies: &[PathBuf]| {
        for c in copies {
            let _ = std::fs::remove_file(c);
        }
    };
    if let Some(e) = copy_err {
        cleanup(&copies);
        return Outcome::not_started(e);
    }
    // A trace left by an earlier campaign in this directory is not this run's.
    let trace_path = dir.join("trace.json");
    let _ = std::fs::remove_file(&trace_path);
    let spawned = Command::new(exe)
        .arg("run")
        .args(&args)
        .args(["--serial", "stdio", "--log-level", "info", "--api-socket"])
        .arg(&sock)
        .arg("--trace-file")
        .arg(&trace_path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child: Child = match spawned {
        Ok(c) => c,
        Err(e) => {
            cleanup(&copies);
            return Outcome::not_started(format!("cannot start faultvisor: {e}"));
        }
    };
    let console = Arc::new(Mutex::new(BoundedOutput::new()));
    let vmm_log = Arc::new(Mutex::new(BoundedOutput::new()));
    let watcher = Arc::new(Mutex::new(crate::outcome::Watcher::new(p.rules.clone())));
    let mut readers = Vec::new();
    for (is_console, pipe, sink) in [
        (
            true,
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            console.clone(),
        ),
        (
            false,
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            vmm_log.clone(),
        ),
    ] {
        if let Some(pipe) = pipe {
            let watcher = watcher.clone();
            readers.push(drain(pipe, sink, move |bytes| {
                if is_console {
                    let at = t0.elapsed().as_millis() as u64;
                    lock_or_recover(&watcher).feed(bytes, at);
                }
            }));
        }
    }
    let deadline = t0 + p.timeout;
    let mut stats = json!({});
    let mut injected = Vec::new();
    let mut error = None;
    let mut fault_at_ms = None;
    // How many injections (stimuli) the trace shows before the first fault's.
    let mut first_fault_injection = None;
    let mut alive = None;
    // The API socket appears once the VM is built.
    let up = wait(deadline, || {
        sock.exists() || child.try_wait().ok().flatten().is_some()
    });
    if up && sock.exists() {
        let mut step_start = Instant::now();
        for (step, body) in &p.faults {
            let mut ended = false;
            let mut gone = || {
                ended = ended || child.try_wait().ok().flatten().is_some();
                ended
            };
            let ready = if let Some(pat) = &step.at {
                let seen = wait(deadline, || {
                    lock_or_recover(&console).contains(pat.as_str()) || gone()
                });
                match step.after_ms {
                    Some(ms) if seen => {
                        let due = Instant::now() + Duration::from_millis(ms);
                        wait(deadline, || Instant::now() >= due || gone())
                    }
                    _ => seen,
                }
            } else if let Some(ms) = step.after_ms {
                let due = step_start + Duration::from_millis(ms);
                wait(deadline, || Instant::now() >= due || gone())
            } else if let Some(n) = step.after_dmas {
                wait(deadline, || {
                    std::thread::sleep(Duration::from_millis(2));
                    gone()
                        || client::request(&sock, "GET", "/v1/stats", None)
                            .ok()
                            .and_then(|(_, s)| s["vtd"]["dma_requests"].as_u64())
                            .is_some_and(|d| d >= n)
                })
            } else {
                true
            };
            let ready = ready && !gone();
            if !ready {
                error = Some(format!(
                    "the condition of fault '{}' was not met before the VM ended or timed out",
                    step.inject
                ));
                break;
            }
            if !step.injects {
                step_start = Instant::now();
                continue;
            }
            match client::request(&sock, "POST", "/v1/inject", Some(body)) {
                Ok((200, r)) => {
                    // A stimulus is workload, not the fault whose effect is measured.
                    if !step.stimulus && fault_at_ms.is_none() {
                        fault_at_ms = Some(t0.elapsed().as_millis());
                        first_fault_injection = Some(injected.len());
                    }
                    injected.push(json!({"fault": body, "response": r}));
                }
                Ok((st, r)) => {
                    error = Some(format!(
                        "the VMM refused '{}' ({st}): {}",
                        step.inject, r["error"]
                    ));
                    break;
                }
                Err(e) => {
                    error = Some(format!("'{}' not injected: {e}", step.inject));
                    break;
                }
            }
            step_start = Instant::now();
        }
        if let Ok((200, s)) = client::request(&sock, "GET", "/v1/stats", None) {
            stats = s;
        }
        if p.expect.alive.is_some() {
            alive = Some(matches!(
                client::request(&sock, "GET", "/v1/vm", None),
                Ok((200, _))
            ));
        }
    }
    // Keep the counters fresh until the guest ends it, time runs out, or it stops
    // making progress.
    let mut killed = None;
    let exit_code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        let stalled = lock_or_recover(&watcher).stalled(t0.elapsed().as_millis() as u64);
        if Instant::now() >= deadline || stalled {
            killed = Some(if stalled {
                crate::outcome::Killed::NoProgress
            } else {
                crate::outcome::Killed::Timeout
            });
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        if let Ok((200, s)) = client::request(&sock, "GET", "/v1/stats", None) {
            stats = s;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        let _ = r.join();
    }
    let _ = std::fs::remove_file(&sock);
    let mut console = lock_or_recover(&console).text();
    let mut vmm_log = lock_or_recover(&vmm_log).text();
    // The second boot, on the same disks.
    let mut after_exit_code = None;
    if let Some((a, timeout)) = &after_args {
        let (code, c, l) = boot(exe, a, *timeout);
        after_exit_code = code;
        lock_or_recover(&watcher).feed(c.as_bytes(), t0.elapsed().as_millis() as u64);
        let mark = format!(
            "\n[faultvisor campaign: second boot, exit code {}]\n",
            code.map_or("none (timeout)".to_string(), |c| c.to_string())
        );
        console.push_str(&mark);
        console.push_str(&c);
        vmm_log.push_str(&mark);
        vmm_log.push_str(&l);
    }
    cleanup(&copies);
    vtd_from_log(&vmm_log, &mut stats);
    // The VMM writes its trace as it exits (not when it is killed).
    let trace_reaction_us = first_fault_injection
        .and_then(|k| crate::outcome::trace_reaction_us(&read_trace(&trace_path)?, k));
    let _ = std::fs::write(dir.join("console.log"), &console);
    let _ = std::fs::write(dir.join("vmm.log"), &vmm_log);
    let duration_ms = t0.elapsed().as_millis();
    let watcher = match Arc::try_unwrap(watcher) {
        Ok(m) => m.into_inner().unwrap_or_else(|p| p.into_inner()),
        Err(shared) => {
            // A reader thread that did not end: classify from a copy of what it saw.
            let rules = p.rules.clone();
            let mut w = crate::outcome::Watcher::new(rules);
            w.feed(console.as_bytes(), duration_ms as u64);
            drop(shared);
            w
        }
    };
    let facts = watcher.finish(exit_code, killed, duration_ms as u64);
    Outcome {
        after_exit_code,
        facts,
        exit_code,
        console,
        vmm_log,
        stats,
        alive,
        injected,
        fault_at_ms,
        trace_reaction_us,
        duration_ms,
        error,
    }
}

/// One plain VM (`faultvisor run ARGS`, console on stdout) until it ends or `timeout`
/// passes; returns its exit status (None: killed) and its bounded console and log.
fn boot(exe: &Path, args: &[String], timeout: Duration) -> (Option<i32>, String, String) {
    let spawned = Command::new(exe)
        .arg("run")
        .args(args)
        .args(["--serial", "stdio", "--log-level", "info"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return (None, String::new(), format!("cannot start faultvisor: {e}")),
    };
    let mut readers = Vec::new();
    let sinks = [
        Arc::new(Mutex::new(BoundedOutput::new())),
        Arc::new(Mutex::new(BoundedOutput::new())),
    ];
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    for (pipe, sink) in pipes.into_iter().zip(sinks.iter().cloned()) {
        if let Some(pipe) = pipe {
            readers.push(drain(pipe, sink, |_| {}));
        }
    }
    let deadline = Instant::now() + timeout;
    let code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for r in readers {
        let _ = r.join();
    }
    let [c, l] = sinks;
    let out = (lock_or_recover(&c).text(), lock_or_recover(&l).text());
    (code, out.0, out.1)
}

fn wait(deadline: Instant, mut cond: impl FnMut() -> bool) -> bool {
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A directory name for an experiment: names are checked at load time, and this keeps
/// even a repetition suffix (`name#3`) or a leading dot from leaving `--out`.
fn sanitize(name: &str) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if c.is_ascii_alphanumeric() || "-_".contains(c) || (c == '.' && i > 0) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Output of one VM kept in memory: the first and the last [`OUTPUT_HALF`] bytes,
/// with the cut marked (a guest printing without end cannot grow the runner).
pub(crate) struct BoundedOutput {
    head: Vec<u8>,
    tail: std::collections::VecDeque<u8>,
    cut: u64,
}

/// Bytes kept at each end of a VM's console and log.
pub(crate) const OUTPUT_HALF: usize = 512 * 1024;

impl BoundedOutput {
    pub(crate) fn new() -> Self {
        Self {
            head: Vec::new(),
            tail: std::collections::VecDeque::new(),
            cut: 0,
        }
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        let room = OUTPUT_HALF.saturating_sub(self.head.len());
        let (h, rest) = bytes.split_at(room.min(bytes.len()));
        self.head.extend_from_slice(h);
        for &b in rest {
            if self.tail.len() == OUTPUT_HALF {
                self.tail.pop_front();
                if self.cut == 0 {
                    devices::limits::hit(devices::limits::Cap::CampaignOutput);
                }
                self.cut += 1;
            }
            self.tail.push_back(b);
        }
    }

    /// The text kept, with a line marking what was cut.
    pub(crate) fn text(&self) -> String {
        let mut s = String::from_utf8_lossy(&self.head).into_owned();
        if self.cut > 0 {
            s.push_str(&format!(
                "\n[faultvisor campaign: {} bytes cut here; the first and last {} KiB are kept]\n",
                self.cut,
                OUTPUT_HALF / 1024
            ));
        }
        let (a, b) = self.tail.as_slices();
        s.push_str(&String::from_utf8_lossy(a));
        s.push_str(&String::from_utf8_lossy(b));
        s
    }

    /// Whether `pat` occurs in a complete line of what is kept (a marker counts once
    /// its line is finished, as a reader of lines would see it).
    pub(crate) fn contains(&self, pat: &str) -> bool {
        let t = self.text();
        let complete = t.rfind('\n').map_or("", |i| &t[..i]);
        complete.contains(pat)
    }
}

fn result_line(campaign: &str, p: &Plan, o: &Outcome) -> Value {
    let cs = checks(p, o);
    let verdict = if cs.is_empty() {
        "none"
    } else if cs.iter().all(|c| c.3) && (o.exit_code.is_some() || p.expect.exit_code.is_some()) {
        "pass"
    } else {
        "fail"
    };
    let mut failed: Vec<String> = cs
        .iter()
        .filter(|c| !c.3)
        .map(|(w, e, g, _)| format!("{w}: expected {e}, observed {g}"))
        .collect();
    if verdict == "fail" && failed.is_empty() {
        failed.push("the VM did not finish".into());
    }
    let faults: Vec<String> = p
        .faults
        .iter()
        .filter(|(s, _)| s.injects && !s.stimulus)
        .map(|(s, _)| s.inject.clone())
        .collect();
    let plan: Vec<Value> = p
        .faults
        .iter()
        .map(|(s, body)| {
            json!({
                "at": s.at, "after_ms": s.after_ms, "after_dmas": s.after_dmas,
                "stimulus": s.stimulus, "injected": s.injects, "body": body,
            })
        })
        .collect();
    let point: serde_json::Map<String, Value> = p.point.iter().cloned().collect();
    json!({
        "campaign": campaign,
        "index": p.index,
        "run": p.name,
        "experiment": p.experiment,
        "config": p.config,
        "golden": p.golden,
        "point": point,
        "guest": p.guest,
        "seed": p.seed,
        "faults": faults,
        "plan": plan,
        "injected": o.injected,
        "checks": cs.iter().map(|(w, e, g, ok)| json!({"check": w, "expected": e, "observed": g, "ok": ok})).collect::<Vec<_>>(),
        "verdict": verdict,
        "failed_checks": failed,
        "exit_code": o.exit_code,
        "after_exit_code": o.after_exit_code,
        "fault_at_ms": o.fault_at_ms.map(|t| t as u64),
        "trace_reaction_us": o.trace_reaction_us,
        "duration_ms": o.duration_ms as u64,
        "facts": o.facts,
        "degraded_factor": p.rules.degraded_factor,
        "stats": o.stats,
        "vmm_log_tail": o.vmm_log.lines().rev().take(3).collect::<Vec<_>>(),
        "trace": format!("{}/trace.json", sanitize(&p.name)),
    })
}

/// Writes report.md, report.html and junit.xml for `results` (sorted by run index
/// first); run traces are looked for under `trace_dirs`. Returns (passed, failed).
fn write_report(
    out: &Path,
    title: &str,
    results: &mut [Value],
    trace_dirs: &[PathBuf],
) -> Result<(usize, usize), Error> {
    results.sort_by_key(|r| r["index"].as_u64().unwrap_or(u64::MAX));
    let pass = results.iter().filter(|r| r["verdict"] == "pass").count();
    let fail = results.iter().filter(|r| r["verdict"] == "fail").count();
    let golden = results.iter().filter(|r| r["golden"] == true).count();
    let mut records: Vec<crate::report::RunRecord> = results
        .iter()
        .filter_map(|r| serde_json::from_value(r.clone()).ok())
        .collect();
    let classified = crate::report::classify_all(&mut records);
    let summaries = crate::report::summarize(&records, &classified);
    let outcome_of: BTreeMap<usize, &'static str> = classified
        .iter()
        .map(|c| {
            (
                records[c.record].index,
                c.outcome.map_or("unclassified", |o| o.name()),
            )
        })
        .collect();
    let mut md = format!(
        "# Campaign {title}\n\n{} runs ({golden} golden): **{pass} passed, {fail} failed** \
         their expectations.\n\n",
        results.len()
    );
    // Without golden runs (`golden = false`) there is nothing to classify against.
    if golden > 0 && !summaries.is_empty() {
        md.push_str(&crate::report::markdown(&summaries));
        md.push('\n');
        let parts = crate::report::breakdown(&records, &classified);
        if parts.len() > 1 {
            md.push_str(&crate::report::breakdown_markdown(&parts));
            md.push('\n');
        }
        if summaries
            .iter()
            .any(|s| !s.reactions.is_empty() || !s.trace_reactions.is_empty())
        {
            md.push_str(&crate::report::latency_markdown(&summaries));
            md.push('\n');
        }
    }
    md.push_str(
        "## Runs\n\n| run | fault | expected | observed | verdict | outcome | latency |\n|---|---|---|---|---|---|---|\n",
    );
    for r in results.iter() {
        let checks = r["checks"].as_array().cloned().unwrap_or_default();
        let expected: Vec<String> = checks
            .iter()
            .map(|c| {
                format!(
                    "{} {}",
                    c["check"].as_str().unwrap_or(""),
                    c["expected"].as_str().unwrap_or("")
                )
            })
            .collect();
        let observed: Vec<String> = checks
            .iter()
            .map(|c| {
                let mark = if c["ok"] == true { "" } else { "**✗** " };
                format!("{mark}{}", c["observed"].as_str().unwrap_or(""))
            })
            .collect();
        let faults: Vec<String> = r["faults"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|f| f.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        let acked = r["trace_reaction_us"]
            .as_u64()
            .map_or(String::new(), |us| format!(", acknowledged after {us} µs"));
        let latency = match r["fault_at_ms"].as_u64() {
            Some(f) => format!("fault at {f} ms{acked}, {} ms total", r["duration_ms"]),
            None => format!("{} ms total", r["duration_ms"]),
        };
        let outcome = if r["golden"] == true {
            "golden"
        } else {
            r["index"]
                .as_u64()
                .and_then(|i| outcome_of.get(&(i as usize)).copied())
                .unwrap_or("–")
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {outcome} | {latency} |\n",
            r["run"].as_str().unwrap_or("?"),
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            },
            expected.join("; ").replace('|', "\\|"),
            observed.join("; ").replace('|', "\\|"),
            match r["verdict"].as_str() {
                Some("pass") => "PASS",
                Some("fail") => "**FAIL**",
                _ => "–",
            },
        ));
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).map_err(|e| Error::file("report", &path, e))?;
    // The HTML report: the same tables as plots, and the timelines of runs that went
    // wrong (failed expectations first, then hang, crash, SDC, detected).
    let mut wrong: Vec<(u8, &Value, String)> = Vec::new();
    for r in results.iter() {
        let o = r["index"]
            .as_u64()
            .and_then(|i| outcome_of.get(&(i as usize)).copied())
            .unwrap_or("");
        let rank = if r["verdict"] == "fail" {
            0
        } else {
            match o {
                "hang" => 1,
                "crash" => 2,
                "sdc" => 3,
                "detected" => 4,
                _ => continue,
            }
        };
        let shown = if r["verdict"] == "fail" {
            "failed its expectations"
        } else {
            o
        };
        wrong.push((rank, r, shown.to_string()));
    }
    wrong.sort_by_key(|w| w.0);
    let mut timelines = Vec::new();
    for (_, r, shown) in wrong.iter().take(crate::html::MAX_TIMELINES) {
        let rel = r["trace"].as_str().unwrap_or("");
        // Only a relative path below an output directory (a results file is input).
        if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
            continue;
        }
        let trace = trace_dirs
            .iter()
            .map(|d| d.join(rel))
            .find(|p| p.exists())
            .and_then(|p| read_trace(&p));
        if let Some(t) = trace {
            timelines.push(crate::html::timeline(
                r["run"].as_str().unwrap_or("?"),
                shown,
                &t,
            ));
        }
    }
    let parts = crate::report::breakdown(&records, &classified);
    let page = crate::html::html(
        title,
        &format!(
            "{} runs ({golden} golden): {pass} passed, {fail} failed their expectations.",
            results.len()
        ),
        &summaries,
        &parts,
        &timelines,
    );
    let path = out.join("report.html");
    std::fs::write(&path, page).map_err(|e| Error::file("HTML report", &path, e))?;
    let path = out.join("junit.xml");
    std::fs::write(&path, crate::report::junit(title, &records, &classified))
        .map_err(|e| Error::file("JUnit report", &path, e))?;
    Ok((pass, fail))
}

fn parse_shard(s: &str) -> Result<(usize, usize), Error> {
    let bad = || {
        Error::Usage(format!(
            "invalid --shard '{s}': expected I/N with 0 <= I < N (e.g. 0/4)"
        ))
    };
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (i, n) = (
        i.parse::<usize>().map_err(|_| bad())?,
        n.parse::<usize>().map_err(|_| bad())?,
    );
    if n == 0 || i >= n {
        return Err(bad());
    }
    Ok((i, n))
}

/// `faultvisor campaign`.
/// Runs a campaign: every run, then results.jsonl, report.md, report.html and
/// junit.xml in `a.out`. Returns the exit status (0, or 1 when an expectation failed).
pub fn run(a: &RunOptions) -> Result<i32, Error> {
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    if a.jobs == Some(0) {
        return Err(Error::Usage("--jobs must be at least 1".into()));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| Error::file("output directory", &a.out, e))?;
    let probe = a.out.join("probe.elf");
    std::fs::write(&probe, a.probe_elf).map_err(|e| Error::file("probe output", &probe, e))?;
    let paths = GuestPaths {
        probe: probe.clone(),
        guest_dir: a.guest_dir.clone(),
    };
    let (name, mut plans, seed) = load(&a.file, a.seed, a.repeat, &paths)?;
    if let Some((i, n)) = shard {
        plans.retain(|p| p.index % n == i);
    }
    if let Some(id) = &a.only {
        if shard.is_some() {
            return Err(Error::Usage("--only and --shard exclude each other".into()));
        }
        let Some(want) = plans.iter().find(|p| &p.name == id).cloned() else {
            let mut ids: Vec<&str> = plans.iter().map(|p| p.name.as_str()).take(5).collect();
            if plans.len() > 5 {
                ids.push("...");
            }
            return Err(Error::Usage(format!(
                "no run '{id}' in {} (run IDs: {})",
                a.file.display(),
                ids.join(", ")
            )));
        };
        plans.retain(|p| p.index == want.index || (p.golden && p.config == want.config));
    }
    let jobs = a
        .jobs
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .min(plans.len().max(1));
    let total = plans.len();
    eprintln!(
        "campaign {name}: {total} experiment(s), {jobs} at a time, seed {seed}{}",
        shard.map_or(String::new(), |(i, n)| format!(", shard {i}/{n}"))
    );
    let queue = Arc::new(Mutex::new(
        plans.into_iter().collect::<std::collections::VecDeque<_>>(),
    ));
    let results = Arc::new(Mutex::new(Vec::new()));
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    // A bar on a terminal that can draw one; plain lines otherwise (CI logs, serial
    // consoles without TERM, TERM=dumb).
    let term_ok = std::env::var("TERM").is_ok_and(|t| !t.is_empty() && t != "dumb");
    let bar = (std::io::stderr().is_terminal() && term_ok).then(|| {
        let b = indicatif::ProgressBar::new(total as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} runs  {elapsed_precise} (eta {eta})  {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut workers = Vec::new();
    for _ in 0..jobs {
        let (queue, results, done, failed) =
            (queue.clone(), results.clone(), done.clone(), failed.clone());
        let (out, name, bar, vmm) = (a.out.clone(), name.clone(), bar.clone(), a.vmm.clone());
        workers.push(std::thread::spawn(move || loop {
            let Some(p) = lock_or_recover(&queue).pop_front() else {
                return;
            };
            let o = run_one(&p, &out, &vmm);
            let line = result_line(&name, &p, &o);
            let verdict = line["verdict"].as_str().unwrap_or("none").to_string();
            if verdict == "fail" {
                failed.fetch_add(1, Ordering::SeqCst);
            }
            let n = done.fetch_add(1, Ordering::SeqCst) + 1;
            let f = failed.load(Ordering::SeqCst);
            let shown = match verdict.as_str() {
                "pass" => "PASS",
                "fail" => "FAIL",
                _ if p.golden => "GOLDEN",
                _ => "DONE",
            };
            match &bar {
                Some(b) => {
                    b.inc(1);
                    b.set_message(format!(
                        "{f} failed  {}",
                        p.name.chars().take(40).collect::<String>()
                    ));
                }
                None => eprintln!("[{n}/{total}] {shown} {} ({} ms)", p.name, o.duration_ms),
            }
            lock_or_recover(&results).push((p.index, line));
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    if let Some(b) = &bar {
        b.finish();
    }
    let mut results = std::mem::take(&mut *lock_or_recover(&results));
    results.sort_by_key(|(i, _)| *i);
    let mut lines: Vec<Value> = results.into_iter().map(|(_, l)| l).collect();
    write_results(&a.out, &lines)?;
    let (pass, fail) = write_report(&a.out, &name, &mut lines, std::slice::from_ref(&a.out))?;
    println!(
        "campaign {name}: {pass} passed, {fail} failed; report {}",
        a.out.join("report.md").display()
    );
    Ok(if fail == 0 { 0 } else { 1 })
}

fn write_results(out: &Path, lines: &[Value]) -> Result<(), Error> {
    let path = out.join("results.jsonl");
    let mut f = std::fs::File::create(&path).map_err(|e| Error::file("results", &path, e))?;
    for l in lines {
        writeln!(f, "{l}").map_err(|e| Error::file("results", &path, e))?;
    }
    Ok(())
}

/// `faultvisor merge`.
/// Joins the outputs of shards into `out` (results and reports); returns the exit
/// status as [`run`] does.
pub fn merge(out: &Path, shards: &[PathBuf]) -> Result<i32, Error> {
    let mut lines = Vec::new();
    for dir in shards {
        let path = dir.join("results.jsonl");
        let text =
            std::fs::read_to_string(&path).map_err(|e| Error::file("shard results", &path, e))?;
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(l).map_err(|e| {
                Error::Usage(format!(
                    "{}:{}: not a result line: {e}",
                    path.display(),
                    i + 1
                ))
            })?;
            lines.push(v);
        }
    }
    std::fs::create_dir_all(out).map_err(|e| Error::file("output directory", out, e))?;
    let title = lines
        .first()
        .and_then(|l| l["campaign"].as_str())
        .unwrap_or("merged")
        .to_string();
    lines.sort_by_key(|r| r["index"].as_u64().unwrap_or(u64::MAX));
    write_results(out, &lines)?;
    let (pass, fail) = write_report(out, &title, &mut lines, shards)?;
    println!(
        "merged {} shard(s): {pass} passed, {fail} failed",
        shards.len()
    );
    Ok(if fail == 0 { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Vec<Plan>, String> {
        let dir = std::env::temp_dir().join(format!("fv-camp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let p = dir.join(format!("c{}.toml", text.len()));
        std::fs::write(&p, text).map_err(|e| e.to_string())?;
        let paths = GuestPaths {
            probe: "/probe.elf".into(),
            guest_dir: "/guest".into(),
        };
        load(&p, None, None, &paths)
            .map(|(_, plans, _)| plans)
            .map_err(|e| e.to_string())
    }

    const HEAD: &str = "[campaign]\nname = \"t\"\nseed = 7\n";

    #[test]
    fn experiment_names_cannot_leave_the_output_directory() {
        for bad in ["..", "../x", "a/b", ".hidden", "", " "] {
            let t = format!("{HEAD}[[experiment]]\nname = \"{bad}\"\nprobe_tests = \"msi.dest\"\n");
            let e = load_str(&t).expect_err(bad);
            assert!(e.contains("field 'name'"), "{bad}: {e}");
        }
        let t =
            format!("{HEAD}[[experiment]]\nname = \"ok-1.2_x y\"\nprobe_tests = \"msi.dest\"\n");
        assert!(load_str(&t).is_ok());
        assert_eq!(sanitize("..#3"), "_.#3".replace('#', "_"));
    }

    #[test]
    fn output_kept_per_vm_is_bounded() {
        let mut o = BoundedOutput::new();
        o.push(b"start\n");
        for _ in 0..5000 {
            o.push(&[b'x'; 1000]);
        }
        o.push(b"\nend marker\n");
        let t = o.text();
        assert!(t.len() < 2 * OUTPUT_HALF + 200, "{}", t.len());
        assert!(t.starts_with("start") && t.ends_with("end marker\n"));
        assert!(t.contains("bytes cut here"));
        assert!(o.contains("end marker"));
    }

    /// Every shipped example parses and expands (the Linux ones run only in the lab).
    #[test]
    fn example_files_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../resources/campaigns");
        let mut seen = 0;
        for e in std::fs::read_dir(&dir).expect("resources/campaigns") {
            let path = e.expect("entry").path();
            if path.extension().is_some_and(|x| x == "toml") {
                let text = std::fs::read_to_string(&path).expect("read");
                let runs =
                    check_text(&text, None).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(runs > 0, "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 4, "examples found: {seen}");
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            (format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\nfualt = 1\n"), ":7:", "fualt"),
            (format!("{HEAD}[[experiment]]\nprobe_tests = \"x\"\n"), ":4:", "'name'"),
            (format!("{HEAD}[[experiment]]\nname = \"a\"\nguest = \"windows\"\n"), ":4:", "'guest'"),
            (format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\ndevices = [\"gpu\"]\n"), ":4:", "'devices'"),
            (
                format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\n[[experiment.fault]]\ninject = \"dma\"\ndevice = \"00:01.0\"\ndirection = \"write\"\nlength = 4\n"),
                ":7:",
                "field 'iova'",
            ),
            (
                format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\n[[experiment.fault]]\ninject = \"teleport\"\n"),
                ":7:",
                "field 'inject'",
            ),
            (
                format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\n[experiment.expect]\nstats = {{ \"vtd.walks\" = \"lots\" }}\n"),
                ":4:",
                "'expect.stats.vtd.walks'",
            ),
            (format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\n[[experiment]]\nname = \"a\"\nprobe_tests = \"y\"\n"), ":7:", "used twice"),
            (HEAD.to_string(), ":1:", "no [[experiment]]"),
            ("[campaign]\nname = 3\n".to_string(), ":2:", "invalid type"),
        ];
        for (text, line, what) in cases {
            let e = load_str(&text).expect_err(&text);
            assert!(e.contains(line) && e.contains(what), "{text}\n=> {e}");
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn seeds_repeat_and_shards() {
        let text = format!(
            "{HEAD}[[experiment]]\nname = \"r\"\nrepeat = 3\nprobe_tests = \"opt.watch\"\n[[experiment.fault]]\ninject = \"drop-irq\"\nvector = \"rand:32..255\"\ncount = \"rand:1..5\"\n"
        );
        let a = load_str(&text).expect("load");
        let b = load_str(&text).expect("load");
        assert_eq!(a.len(), 4, "a golden run and three repetitions");
        assert!(a[0].golden && a[0].name == "golden-0");
        assert!(
            a[0].faults.iter().all(|(s, _)| !s.injects),
            "a golden run injects nothing"
        );
        let a: Vec<Plan> = a.into_iter().filter(|p| !p.golden).collect();
        let b: Vec<Plan> = b.into_iter().filter(|p| !p.golden).collect();
        assert_eq!(a[2].name, "r#2");
        let bodies = |p: &[Plan]| {
            p.iter()
                .map(|x| x.faults[0].1.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(bodies(&a), bodies(&b), "same seed, same draws");
        assert!(a
            .iter()
            .all(|p| (32..=255).contains(&p.faults[0].1["vector"].as_u64().unwrap_or(0))));
        assert_eq!(parse_shard("1/3").ok(), Some((1, 3)));
        assert!(
            parse_shard("3/3").is_err() && parse_shard("x").is_err() && parse_shard("0/0").is_err()
        );
    }

    #[test]
    fn sweeps_expand_with_golden_runs_per_configuration() {
        let text = format!(
            "{HEAD}[[experiment]]\nname = \"s\"\nprobe_tests = \"opt.watch\"\nrepeat = 2\n\
             [experiment.sweep]\nvcpus = [1, 2]\n\"fault.1.count\" = \"range:1..3\"\n\
             \"fault.1.device\" = [\"00:01.0\", \"00:02.0\"]\n\
             [[experiment.fault]]\nat = \"# watch: ready\"\ninject = \"drop-irq\"\ndevice = \"00:01.0\"\ncount = 1\n\
             [[experiment.fault]]\ninject = \"spurious-irq\"\nvector = 0xee\ncpu = 0\nstimulus = true\n\
             [[experiment]]\nname = \"t\"\nprobe_tests = \"opt.watch\"\nvcpus = 2\n\
             [[experiment.fault]]\nat = \"# watch: ready\"\ninject = \"drop-irq\"\ndevice = \"00:01.0\"\ncount = 5\n"
        );
        let plans = load_str(&text).expect("load");
        let golden: Vec<&Plan> = plans.iter().filter(|p| p.golden).collect();
        // 2 vCPU counts × 3 counts × 2 devices × 2 repetitions, and one golden run per
        // vCPU count; experiment t shares the 2-vCPU configuration's golden run.
        assert_eq!(plans.len(), 24 + 2 + 1);
        assert_eq!(
            golden.len(),
            2,
            "{:?}",
            golden.iter().map(|g| &g.config).collect::<Vec<_>>()
        );
        for g in &golden {
            // The fault's condition is still waited for; only the stimulus is sent.
            let sent: Vec<&str> = g
                .faults
                .iter()
                .filter(|(s, _)| s.injects)
                .map(|(s, _)| s.inject.as_str())
                .collect();
            assert_eq!(sent, ["spurious-irq"]);
            assert_eq!(g.faults[0].0.at.as_deref(), Some("# watch: ready"));
        }
        let ids: Vec<&str> = plans.iter().map(|p| p.name.as_str()).collect();
        // Axes in key order, the last (vcpus) varying fastest.
        assert_eq!(
            &ids[..5],
            &["golden-0", "s@p0#0", "s@p0#1", "golden-1", "s@p1#0"]
        );
        let p11 = plans
            .iter()
            .find(|p| p.name == "s@p11#1")
            .expect("last point");
        assert_eq!(p11.faults[0].1["device"], "00:02.0");
        assert_eq!(p11.faults[0].1["count"], 3);
        assert!(p11.args.contains(&"2".to_string()), "{:?}", p11.args);
        let t = plans.iter().find(|p| p.name == "t").expect("t");
        let s2 = plans.iter().find(|p| p.name == "s@p1#0").expect("vcpus=2");
        assert_eq!(t.config, s2.config, "same guest configuration");
        assert_ne!(t.config, plans[1].config);
        // Bad sweeps name their key.
        for (bad, want) in [
            (
                "[experiment.sweep]\n\"fault.9.count\" = [1]\n",
                "sweep.fault.9.count",
            ),
            (
                "[experiment.sweep]\nfault.1.count = [1]\n",
                "must be quoted",
            ),
            ("[experiment.sweep]\nvcpu = [1]\n", "sweep.vcpu"),
            ("[experiment.sweep]\nvcpus = 4\n", "a swept value is a list"),
            ("[experiment.sweep]\nvcpus = \"range:3..1\"\n", "range:3..1"),
            (
                "[experiment.outcome]\ndetected = [\"(\"]\n",
                "field 'outcome'",
            ),
        ] {
            let t = format!("{HEAD}[[experiment]]\nname = \"a\"\nprobe_tests = \"x\"\n{bad}");
            let e = load_str(&t).expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }

    #[test]
    fn second_boots_disk_copies_and_marker_delays() {
        let text = format!(
            "{HEAD}[[experiment]]\nname = \"p\"\nguest = \"linux\"\ncmdline = \"a\"\n\
             disks = [\"path={{copy:/img}},serial=x\"]\n\
             [[experiment.fault]]\nat = \"M\"\nafter_ms = \"rand:10..20\"\ninject = \"power-cut\"\n\
             [experiment.after]\ncmdline = \"b\"\ntimeout_s = 7\n"
        );
        let plans = load_str(&text).expect("load");
        let p = plans.iter().find(|p| !p.golden).expect("run");
        let (second, t) = p.after.clone().expect("a second boot");
        assert_eq!(t, Duration::from_secs(7));
        let at = |a: &[String], k: &str| a.iter().position(|x| x == k).map(|i| a[i + 1].clone());
        assert_eq!(at(&p.args, "--cmdline").as_deref(), Some("a"));
        assert_eq!(at(&second, "--cmdline").as_deref(), Some("b"));
        assert_eq!(
            at(&second, "--disk").as_deref(),
            Some("path={copy:/img},serial=x")
        );
        let step = &p.faults[0].0;
        assert_eq!(step.at.as_deref(), Some("M"));
        assert!((10..=20).contains(&step.after_ms.unwrap_or(0)), "{step:?}");
        assert_eq!(
            copy_placeholder("path={copy:/a/b.img},readonly=on"),
            (
                "path=/a/b.img,readonly=on".to_string(),
                Some("/a/b.img".to_string())
            )
        );
        assert_eq!(copy_placeholder("path=/x"), ("path=/x".to_string(), None));
        let bad = format!(
            "{HEAD}[[experiment]]\nname = \"q\"\nprobe_tests = \"x\"\n[[experiment.fault]]\n\
             at = \"M\"\nafter_dmas = 3\ninject = \"drop-irq\"\nvector = 0x40\ncount = 1\n"
        );
        assert!(load_str(&bad)
            .expect_err("after_dmas with at")
            .contains("after_dmas goes alone"));
    }

    #[test]
    fn comparisons_and_vtd_log() {
        assert_eq!(parse_cmp(">= 16"), Ok((">=".into(), 16.0)));
        assert_eq!(parse_cmp("3"), Ok(("==".into(), 3.0)));
        assert!(parse_cmp(">= x").is_err());
        let mut s = json!({});
        vtd_from_log("[x INFO] VT-d: 5 DMA requests, 2 page walks, 17 faults recorded, 24 dropped (overflow), 0 suppressed (FPD), 2 fault events, 5 invalidations", &mut s);
        assert_eq!(lookup(&s, "vtd.faults_recorded"), Some(17.0));
        assert_eq!(lookup(&s, "vtd.faults_overflowed"), Some(24.0));
        assert_eq!(lookup(&s, "vtd.dma_requests"), Some(5.0));
    }
}
