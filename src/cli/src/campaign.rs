//! `faultvisor campaign FILE.toml`: many short VMs, each with a fault plan and
//! expectations, run in parallel (one VMM process each, a timeout each); results as JSON
//! Lines and a Markdown report (each failed experiment links its VM's event trace,
//! `trace.json`, which opens in Perfetto); `faultvisor merge` joins the outputs of
//! shards.
//!
//! A campaign file (see resources/campaigns/):
//!
//! ```toml
//! [campaign]
//! name = "probe-faults"
//! seed = 42            # for "rand:LO..HI" values; --seed overrides
//! timeout_s = 20       # per experiment
//!
//! [defaults]           # any experiment field
//! guest = "probe"
//! devices = ["test", "edu"]
//! disks = ["path={rootfs},snapshot=on"]   # {rootfs}: the default guest's root disk
//!
//! [[experiment]]
//! name = "drop-3-msis"
//! probe_tests = "opt.watch"
//! [[experiment.fault]]
//! at = "# watch: ready"          # wait for this console text, or after_ms / after_dmas
//! inject = "drop-irq"            # then the API's fields, as `faultvisor inject` sends
//! device = "00:01.0"
//! count = 3
//! [experiment.expect]
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

use clap::Args;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::client;
use crate::CliError;

pub(crate) const CAMPAIGN_EXAMPLES: &str = "\
Examples:
  faultvisor campaign resources/campaigns/probe.toml --jobs 2 --out /tmp/probe-campaign
  faultvisor campaign campaign.toml --shard 0/4 --out shard0     # slice 0 of 4
  faultvisor merge --out all shard0 shard1 shard2 shard3

Exit status: 0 when every expectation held, 1 when one failed (the report shows which),
2 when the campaign file or the options are wrong (the message names line and field).";

/// Arguments of `faultvisor campaign`.
#[derive(Debug, Args, Clone)]
pub struct CampaignArgs {
    /// The campaign file (TOML).
    pub file: PathBuf,
    /// Experiments run at once (default: the number of host CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// Output directory (results.jsonl, report.md, one directory per experiment).
    #[arg(long, default_value = "campaign-out")]
    pub out: PathBuf,
    /// Run only slice I of N (0-based), e.g. 2/8: experiments whose index % N == I.
    #[arg(long, value_name = "I/N")]
    pub shard: Option<String>,
    /// Seed for the random values ("rand:LO..HI"); overrides the file's.
    #[arg(long)]
    pub seed: Option<u64>,
}

/// Arguments of `faultvisor merge`.
#[derive(Debug, Args, Clone)]
pub struct MergeArgs {
    /// Where to write the merged results.jsonl and report.md.
    #[arg(long)]
    pub out: PathBuf,
    /// Output directories of the shards.
    #[arg(required = true)]
    pub shards: Vec<PathBuf>,
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
}

#[derive(Clone, Debug, Deserialize)]
struct FaultStep {
    #[serde(default)]
    at: Option<String>,
    #[serde(default)]
    after_ms: Option<u64>,
    #[serde(default)]
    after_dmas: Option<u64>,
    inject: String,
    #[serde(flatten)]
    params: BTreeMap<String, toml::Value>,
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

/// One experiment ready to run.
#[derive(Clone, Debug)]
struct Plan {
    index: usize,
    name: String,
    guest: String,
    args: Vec<String>,
    faults: Vec<(FaultStep, Value)>,
    expect: Expect,
    timeout: Duration,
    seed: u64,
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

fn file_err(path: &Path, line: usize, msg: impl std::fmt::Display) -> CliError {
    CliError::Usage(format!("{}:{line}: {msg}", path.display()))
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
    }
}

/// Reads and checks a campaign file; returns (name, plans) for `seed`.
fn load(
    path: &Path,
    seed_override: Option<u64>,
    probe: &Path,
) -> Result<(String, Vec<Plan>, u64), CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| CliError::File {
        what: "campaign file",
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    parse(&text, path, seed_override, probe)
}

/// Runs one campaign may expand to, at most.
pub const MAX_RUNS: usize = 100_000;

/// Checks the text of a campaign file the way `faultvisor campaign` does (for fuzzing
/// and tools); returns the number of experiments it expands to, or the one-line error.
pub fn check_text(text: &str, seed: Option<u64>) -> Result<usize, String> {
    parse(
        text,
        Path::new("campaign.toml"),
        seed,
        Path::new("/probe.elf"),
    )
    .map(|(_, plans, _)| plans.len())
    .map_err(|e| e.to_string())
}

fn parse(
    text: &str,
    path: &Path,
    seed_override: Option<u64>,
    probe: &Path,
) -> Result<(String, Vec<Plan>, u64), CliError> {
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
        let guest = e.guest.clone().unwrap_or_else(|| "probe".into());
        let mut args: Vec<String> = Vec::new();
        match guest.as_str() {
            "probe" => {
                args.extend(["--kernel".into(), probe.display().to_string()]);
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
                let dir = crate::default_guest_dir();
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
            let rootfs = crate::default_guest_dir().join("rootfs.ext4");
            let d = d.replace("{rootfs}", &rootfs.display().to_string());
            d.parse::<vmm::DiskSpec>().map_err(|m| err("disks", m))?;
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
        let repeat = e.repeat.unwrap_or(1).clamp(1, 1000);
        if plans.len() + repeat as usize > MAX_RUNS {
            return Err(err(
                "repeat",
                format!("the campaign expands to more than {MAX_RUNS} runs"),
            ));
        }
        for r in 0..repeat {
            let exp_seed = seed ^ (plans.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut rng = Rng(exp_seed);
            let mut faults = Vec::new();
            for (k, step) in e.faults.iter().enumerate() {
                let sline = line_of(&text, step.span().start);
                let s = step.get_ref();
                let serr = |field: &str, msg: String| {
                    file_err(
                        path,
                        sline,
                        format!("experiment '{name}' fault {} field '{field}': {msg}", k + 1),
                    )
                };
                let mut body = json!({ "fault": s.inject });
                for (key, v) in &s.params {
                    body[key] = to_json(v, &mut rng).map_err(|m| serr(key, m))?;
                }
                vmm::api::validate_inject(&body)
                    .map_err(|(f, m)| serr(if f == "fault" { "inject" } else { &f }, m))?;
                if [s.at.is_some(), s.after_ms.is_some(), s.after_dmas.is_some()]
                    .iter()
                    .filter(|b| **b)
                    .count()
                    > 1
                {
                    return Err(serr(
                        "at",
                        "use at most one of at, after_ms, after_dmas".into(),
                    ));
                }
                faults.push((s.clone(), body));
            }
            let expect = e.expect.clone().unwrap_or_default();
            for (k, v) in &expect.stats {
                parse_cmp(v).map_err(|m| err(&format!("expect.stats.{k}"), m))?;
            }
            plans.push(Plan {
                index: plans.len(),
                name: if repeat > 1 {
                    format!("{name}#{r}")
                } else {
                    name.clone()
                },
                guest: guest.clone(),
                args: args.clone(),
                faults,
                expect,
                timeout: Duration::from_secs(e.timeout_s.unwrap_or(default_timeout).clamp(1, 3600)),
                seed: exp_seed,
            });
        }
    }
    let _ = &file.campaign.description;
    Ok((file.campaign.name, plans, seed))
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
    duration_ms: u128,
    error: Option<String>,
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

fn run_one(p: &Plan, out: &Path) -> Outcome {
    let t0 = Instant::now();
    let dir = out.join(sanitize(&p.name));
    let _ = std::fs::create_dir_all(&dir);
    let sock = socket_path(p.index);
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("faultvisor"));
    let spawned = Command::new(exe)
        .arg("run")
        .args(&p.args)
        .args(["--serial", "stdio", "--log-level", "info", "--api-socket"])
        .arg(&sock)
        .arg("--trace-file")
        .arg(dir.join("trace.json"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child: Child = match spawned {
        Ok(c) => c,
        Err(e) => {
            return Outcome {
                exit_code: None,
                console: String::new(),
                vmm_log: String::new(),
                stats: json!({}),
                alive: None,
                injected: Vec::new(),
                fault_at_ms: None,
                duration_ms: 0,
                error: Some(format!("cannot start faultvisor: {e}")),
            }
        }
    };
    let console = Arc::new(Mutex::new(BoundedOutput::new()));
    let vmm_log = Arc::new(Mutex::new(BoundedOutput::new()));
    let mut readers = Vec::new();
    for (pipe, sink) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            console.clone(),
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            vmm_log.clone(),
        ),
    ] {
        if let Some(pipe) = pipe {
            readers.push(std::thread::spawn(move || {
                // Chunks, not lines: a line without end must not grow a buffer.
                let mut pipe = pipe;
                let mut chunk = [0u8; 8192];
                loop {
                    match pipe.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => crate::lock_or_recover(&sink).push(&chunk[..n]),
                    }
                }
            }));
        }
    }
    let deadline = t0 + p.timeout;
    let mut stats = json!({});
    let mut injected = Vec::new();
    let mut error = None;
    let mut fault_at_ms = None;
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
                wait(deadline, || {
                    crate::lock_or_recover(&console).contains(pat.as_str()) || gone()
                })
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
            match client::request(&sock, "POST", "/v1/inject", Some(body)) {
                Ok((200, r)) => {
                    fault_at_ms.get_or_insert(t0.elapsed().as_millis());
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
    // Keep the counters fresh until the guest ends it, or time runs out.
    let exit_code = loop {
        if let Ok(Some(st)) = child.try_wait() {
            break st.code();
        }
        if Instant::now() >= deadline {
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
    let console = crate::lock_or_recover(&console).text();
    let vmm_log = crate::lock_or_recover(&vmm_log).text();
    vtd_from_log(&vmm_log, &mut stats);
    let _ = std::fs::write(dir.join("console.log"), &console);
    let _ = std::fs::write(dir.join("vmm.log"), &vmm_log);
    Outcome {
        exit_code,
        console,
        vmm_log,
        stats,
        alive,
        injected,
        fault_at_ms,
        duration_ms: t0.elapsed().as_millis(),
        error,
    }
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
    let pass = cs.iter().all(|c| c.3) && (o.exit_code.is_some() || p.expect.exit_code.is_some());
    let faults: Vec<String> = p.faults.iter().map(|(s, _)| s.inject.clone()).collect();
    json!({
        "campaign": campaign,
        "experiment": p.name,
        "guest": p.guest,
        "seed": p.seed,
        "faults": faults,
        "injected": o.injected,
        "checks": cs.iter().map(|(w, e, g, ok)| json!({"check": w, "expected": e, "observed": g, "ok": ok})).collect::<Vec<_>>(),
        "verdict": if pass { "pass" } else { "fail" },
        "exit_code": o.exit_code,
        "fault_at_ms": o.fault_at_ms,
        "duration_ms": o.duration_ms as u64,
        "stats": o.stats,
        "vmm_log_tail": o.vmm_log.lines().rev().take(3).collect::<Vec<_>>(),
        "trace": format!("{}/trace.json", sanitize(&p.name)),
    })
}

/// Writes report.md for `results`; returns (passed, failed).
fn write_report(out: &Path, title: &str, results: &[Value]) -> Result<(usize, usize), CliError> {
    let pass = results.iter().filter(|r| r["verdict"] == "pass").count();
    let fail = results.len() - pass;
    let mut md = format!(
        "# Campaign {title}\n\n{} experiments: **{pass} passed, {fail} failed**.\n\n| experiment | fault | expected | observed | verdict | latency |\n|---|---|---|---|---|---|\n",
        results.len()
    );
    for r in results {
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
        let latency = match r["fault_at_ms"].as_u64() {
            Some(f) => format!("fault at {f} ms, {} ms total", r["duration_ms"]),
            None => format!("{} ms total", r["duration_ms"]),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {} | {latency} |\n",
            r["experiment"].as_str().unwrap_or("?"),
            if faults.is_empty() {
                "none".into()
            } else {
                faults.join(", ")
            },
            expected.join("; ").replace('|', "\\|"),
            observed.join("; ").replace('|', "\\|"),
            if r["verdict"] == "pass" {
                "PASS"
            } else {
                "**FAIL**"
            },
        ));
    }
    let path = out.join("report.md");
    std::fs::write(&path, md).map_err(|e| CliError::File {
        what: "report",
        path,
        reason: e.to_string(),
    })?;
    Ok((pass, fail))
}

fn parse_shard(s: &str) -> Result<(usize, usize), CliError> {
    let bad = || {
        CliError::Usage(format!(
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
pub fn run(a: &CampaignArgs) -> Result<i32, CliError> {
    let shard = a.shard.as_deref().map(parse_shard).transpose()?;
    if a.jobs == Some(0) {
        return Err(CliError::Usage("--jobs must be at least 1".into()));
    }
    std::fs::create_dir_all(&a.out).map_err(|e| CliError::File {
        what: "output directory",
        path: a.out.clone(),
        reason: e.to_string(),
    })?;
    let probe = a.out.join("probe.elf");
    std::fs::write(&probe, crate::demo::PROBE_ELF).map_err(|e| CliError::File {
        what: "probe output",
        path: probe.clone(),
        reason: e.to_string(),
    })?;
    let (name, mut plans, seed) = load(&a.file, a.seed, &probe)?;
    if let Some((i, n)) = shard {
        plans.retain(|p| p.index % n == i);
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
    let tty = std::io::stderr().is_terminal();
    let mut workers = Vec::new();
    for _ in 0..jobs {
        let (queue, results, done, failed) =
            (queue.clone(), results.clone(), done.clone(), failed.clone());
        let (out, name) = (a.out.clone(), name.clone());
        workers.push(std::thread::spawn(move || loop {
            let Some(p) = crate::lock_or_recover(&queue).pop_front() else {
                return;
            };
            let o = run_one(&p, &out);
            let line = result_line(&name, &p, &o);
            let pass = line["verdict"] == "pass";
            if !pass {
                failed.fetch_add(1, Ordering::SeqCst);
            }
            let n = done.fetch_add(1, Ordering::SeqCst) + 1;
            let f = failed.load(Ordering::SeqCst);
            if tty {
                let width = 30;
                let filled = n * width / total.max(1);
                eprint!(
                    "\r[{}{}] {n}/{total}  {} passed, {f} failed  {:<30}",
                    "#".repeat(filled),
                    ".".repeat(width - filled),
                    n - f,
                    p.name.chars().take(30).collect::<String>()
                );
                if n == total {
                    eprintln!();
                }
            } else {
                eprintln!(
                    "[{n}/{total}] {} {} ({} ms)",
                    if pass { "PASS" } else { "FAIL" },
                    p.name,
                    o.duration_ms
                );
            }
            crate::lock_or_recover(&results).push((p.index, line));
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    let mut results = std::mem::take(&mut *crate::lock_or_recover(&results));
    results.sort_by_key(|(i, _)| *i);
    let lines: Vec<Value> = results.into_iter().map(|(_, l)| l).collect();
    write_results(&a.out, &lines)?;
    let (pass, fail) = write_report(&a.out, &name, &lines)?;
    println!(
        "campaign {name}: {pass} passed, {fail} failed; report {}",
        a.out.join("report.md").display()
    );
    Ok(if fail == 0 { 0 } else { 1 })
}

fn write_results(out: &Path, lines: &[Value]) -> Result<(), CliError> {
    let path = out.join("results.jsonl");
    let mut f = std::fs::File::create(&path).map_err(|e| CliError::File {
        what: "results",
        path: path.clone(),
        reason: e.to_string(),
    })?;
    for l in lines {
        writeln!(f, "{l}").map_err(|e| CliError::File {
            what: "results",
            path: path.clone(),
            reason: e.to_string(),
        })?;
    }
    Ok(())
}

/// `faultvisor merge`.
pub fn merge(a: &MergeArgs) -> Result<i32, CliError> {
    let mut lines = Vec::new();
    for dir in &a.shards {
        let path = dir.join("results.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| CliError::File {
            what: "shard results",
            path: path.clone(),
            reason: e.to_string(),
        })?;
        for (i, l) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let v: Value = serde_json::from_str(l).map_err(|e| {
                CliError::Usage(format!(
                    "{}:{}: not a result line: {e}",
                    path.display(),
                    i + 1
                ))
            })?;
            lines.push(v);
        }
    }
    std::fs::create_dir_all(&a.out).map_err(|e| CliError::File {
        what: "output directory",
        path: a.out.clone(),
        reason: e.to_string(),
    })?;
    let title = lines
        .first()
        .and_then(|l| l["campaign"].as_str())
        .unwrap_or("merged")
        .to_string();
    write_results(&a.out, &lines)?;
    let (pass, fail) = write_report(&a.out, &title, &lines)?;
    println!(
        "merged {} shard(s): {pass} passed, {fail} failed",
        a.shards.len()
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
        load(&p, None, Path::new("/probe.elf"))
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
        assert_eq!(a.len(), 3);
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
