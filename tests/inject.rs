//! Fault injection through the API socket against the probe guest's `opt.watch`
//! scenario (which reports what the guest saw), and the API's answers to bad requests.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

fn probe() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("faultvisor-inject-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join("probe.elf");
    if !p.exists() {
        let out = common::run(&["demo", "--write-probe", p.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{out:?}");
    }
    p
}

/// A probe VM with an API socket, its console collected line by line.
struct Vm {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    socket: PathBuf,
}

impl Vm {
    fn start(name: &str, extra: &[&str], tests: &str) -> Option<Self> {
        if !common::kvm_available(name) {
            return None;
        }
        let socket = std::env::temp_dir().join(format!("fv-{}-{name}.sock", std::process::id()));
        let mut child = Command::new(common::faultvisor())
            .args(["run", "--kernel"])
            .arg(probe())
            .args([
                "--memory",
                "64M",
                "--vcpus",
                "2",
                "--serial",
                "stdio",
                "--api-socket",
            ])
            .arg(&socket)
            .args(extra)
            .args(["--cmdline", &format!("probe.tests={tests}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn faultvisor");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().expect("stdout");
        let l2 = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                l2.lock().expect("lines").push(line);
            }
        });
        Some(Self {
            child,
            lines,
            socket,
        })
    }

    fn wait_for(&self, marker: &str) {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if self
                .lines
                .lock()
                .expect("lines")
                .iter()
                .any(|l| l.contains(marker))
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!(
            "no '{marker}' from the guest: {:?}",
            self.lines.lock().expect("lines")
        );
    }

    fn inject(&self, args: &[&str]) -> (i32, String, String) {
        let s = self.socket.to_str().expect("utf-8");
        let mut all = vec!["inject", "--api-socket", s];
        all.extend_from_slice(args);
        let out = common::run(&all);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Sends "go", waits for the VM to end and returns the `# watch:` fields.
    fn finish(mut self) -> HashMap<String, u64> {
        let (rc, _, err) = self.inject(&["spurious-irq", "--vector", "0xee", "--cpu", "0"]);
        assert_eq!(rc, 0, "{err}");
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(st)) = self.child.try_wait() {
                assert_eq!(
                    st.code(),
                    Some(0),
                    "{:?}",
                    self.lines.lock().expect("lines")
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(50));
        let lines = self.lines.lock().expect("lines");
        let line = lines
            .iter()
            .find(|l| l.starts_with("# watch: go="))
            .unwrap_or_else(|| panic!("no report: {lines:?}"));
        line.trim_start_matches("# watch: ")
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .filter_map(|(k, v)| {
                let v = v
                    .strip_prefix("0x")
                    .map_or_else(|| v.parse().ok(), |h| u64::from_str_radix(h, 16).ok());
                v.map(|v| (k.to_string(), v))
            })
            .collect()
    }
}

fn watch(name: &str, injections: &[&[&str]]) -> Option<HashMap<String, u64>> {
    let vm = Vm::start(name, &["--device", "test", "--device", "edu"], "opt.watch")?;
    vm.wait_for("# watch: ready");
    for args in injections {
        let (rc, out, err) = vm.inject(args);
        assert_eq!(rc, 0, "{args:?}: {out} {err}");
    }
    Some(vm.finish())
}

// fv-test is at 00:01.0 (requester 0x08) and edu at 00:02.0: --device order.

#[test]
fn no_injection_baseline() {
    let Some(w) = watch("no_injection_baseline", &[]) else {
        return;
    };
    assert_eq!((w["go"], w["msi_raised"], w["msi_received"]), (1, 10, 10));
    assert_eq!(
        (w["fault_events"], w["records"], w["storm_irqs"]),
        (0, 0, 0)
    );
}

#[test]
fn dropped_interrupts_of_a_device() {
    let Some(w) = watch(
        "dropped",
        &[&["drop-irq", "--device", "00:01.0", "--count", "3"]],
    ) else {
        return;
    };
    assert_eq!(w["msi_received"], 7, "{w:?}");
}

#[test]
fn dropped_interrupts_of_a_vector() {
    let Some(w) = watch(
        "dropped_vector",
        &[&["drop-irq", "--vector", "0x71", "--count", "10"]],
    ) else {
        return;
    };
    assert_eq!(w["msi_received"], 0, "{w:?}");
}

#[test]
fn duplicated_interrupts() {
    let Some(w) = watch(
        "duplicated",
        &[&[
            "duplicate-irq",
            "--vector",
            "0x71",
            "--count",
            "2",
            "--copies",
            "1",
        ]],
    ) else {
        return;
    };
    assert_eq!(w["msi_received"], 12, "{w:?}");
}

#[test]
fn delayed_interrupts_still_arrive() {
    let Some(w) = watch(
        "delayed",
        &[&[
            "delay-irq",
            "--device",
            "00:01.0",
            "--count",
            "3",
            "--delay-ms",
            "30",
        ]],
    ) else {
        return;
    };
    assert_eq!(w["msi_received"], 10, "{w:?}");
}

#[test]
fn interrupt_storm_and_spurious() {
    let Some(w) = watch(
        "storm",
        &[
            &[
                "irq-storm",
                "--vector",
                "0xed",
                "--cpu",
                "1",
                "--rate-hz",
                "1000",
                "--duration-ms",
                "100",
            ],
            &["spurious-irq", "--vector", "0xed", "--cpu", "0"],
        ],
    ) else {
        return;
    };
    // 100 storm interrupts plus one spurious; the local APIC merges requests that
    // arrive while one of the same vector is pending, so some may coalesce.
    let n = w["storm_irqs"];
    assert!((60..=101).contains(&n), "{w:?}");
}

#[test]
fn dma_faults_reach_the_guest() {
    let Some(w) = watch(
        "dma",
        &[
            &[
                "dma", "--device", "00:02.0", "--iova", "0x1000", "--write", "--length", "64",
            ],
            &[
                "dma",
                "--device",
                "00:02.0",
                "--iova",
                "0x1000000000000",
                "--read",
                "--length",
                "8",
            ],
        ],
    ) else {
        return;
    };
    assert_eq!(w["records"], 2, "{w:?}");
    // The second fault may land while the first is still pending (PPF): then, as on
    // hardware, it raises no event of its own.
    assert!((1..=2).contains(&w["fault_events"]), "{w:?}");
}

#[test]
fn fault_storm_overflows_the_records() {
    let Some(w) = watch(
        "fault_storm",
        &[&["fault-storm", "--device", "00:02.0", "--count", "40"]],
    ) else {
        return;
    };
    assert_eq!((w["records"], w["pfo"]), (16, 1), "{w:?}");
    assert_eq!(w["fault_events"], 1, "one event for the burst: {w:?}");
}

#[test]
fn context_invalid_for_the_next_requests() {
    let Some(vm) = Vm::start(
        "context_invalid",
        &["--device", "test", "--device", "edu"],
        "opt.watch",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    let (rc, out, _) = vm.inject(&["context-invalid", "--device", "00:02.0", "--count", "2"]);
    assert_eq!(rc, 0, "{out}");
    for _ in 0..2 {
        let (_, out, _) = vm.inject(&["dma", "--device", "00:02.0", "--iova", "0x1000"]);
        assert!(out.contains(r#""reason":"0x03""#), "{out}");
    }
    // Then the normal walk again: the empty root table.
    let (_, out, _) = vm.inject(&["dma", "--device", "00:02.0", "--iova", "0x1000"]);
    assert!(out.contains(r#""reason":"0x01""#), "{out}");
    let w = vm.finish();
    assert_eq!(w["records"], 3, "{w:?}");
}

fn http(socket: &PathBuf, raw: &[u8]) -> (u16, serde_json::Value) {
    let mut s = UnixStream::connect(socket).expect("connect");
    s.write_all(raw).expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).expect("read");
    let (head, body) = resp.split_once("\r\n\r\n").expect("http");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    (
        status,
        serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
    )
}

fn post(socket: &PathBuf, body: &str) -> (u16, serde_json::Value) {
    let raw = format!(
        "POST /v1/inject HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http(socket, raw.as_bytes())
}

#[test]
fn bad_requests_get_4xx_naming_the_field() {
    let Some(vm) = Vm::start("api_errors", &["--device", "edu"], "opt.watch") else {
        return;
    };
    vm.wait_for("# watch: ready");
    let s = &vm.socket;
    for (body, status, field) in [
        (
            r#"{"fault":"dma","device":"00:01.0","direction":"write","length":4}"#,
            400,
            "iova",
        ),
        (r#"{"fault":"teleport"}"#, 400, "fault"),
        (
            r#"{"fault":"dma","device":"00:09.0","iova":1,"direction":"write","length":4}"#,
            400,
            "device",
        ),
        (
            r#"{"fault":"dma","device":"zz","iova":1,"direction":"write","length":4}"#,
            400,
            "device",
        ),
        (
            r#"{"fault":"dma","device":"00:01.0","iova":1,"direction":"sideways","length":4}"#,
            400,
            "direction",
        ),
        (
            r#"{"fault":"dma","device":"00:01.0","iova":1,"direction":"write","length":0}"#,
            400,
            "length",
        ),
        (
            r#"{"fault":"fault-storm","device":"00:01.0","count":0}"#,
            400,
            "count",
        ),
        (
            r#"{"fault":"spurious-irq","vector":3,"cpu":0}"#,
            400,
            "vector",
        ),
        (
            r#"{"fault":"spurious-irq","vector":64,"cpu":7}"#,
            400,
            "cpu",
        ),
        (r#"{"fault":"drop-irq","count":1}"#, 400, "device"),
        (
            r#"{"fault":"drop-irq","vector":64,"pin":3,"count":1}"#,
            400,
            "device",
        ),
        (
            r#"{"fault":"spurious-irq","vector":64,"cpu":0,"extra":1}"#,
            400,
            "extra",
        ),
        ("[1,2", 400, "body"),
    ] {
        let (st, v) = post(s, body);
        assert_eq!(st, status, "{body}: {v}");
        assert_eq!(v["field"], field, "{body}: {v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    assert_eq!(http(s, b"GET /v2/nothing HTTP/1.1\r\n\r\n").0, 404);
    assert_eq!(http(s, b"DELETE /v1/vm HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(s, b"POST /metrics HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(http(s, b"PUT /v1/ioapic HTTP/1.1\r\n\r\n").0, 405);
    assert_eq!(
        http(
            s,
            b"POST /v1/inject HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n"
        )
        .0,
        413
    );
    assert_eq!(http(s, b"nonsense\r\n\r\n").0, 400);
    assert_eq!(http(s, b"GET / HTTP/3\r\n\r\n").0, 505);
    // A client that hangs up mid-request does no harm.
    drop(UnixStream::connect(s).map(|mut c| c.write_all(b"POST /v1/inj")));
    let (st, v) = http(s, b"GET /v1/vm HTTP/1.1\r\n\r\n");
    assert_eq!(st, 200);
    assert_eq!(v["iommu"], "intel");
    assert_eq!(v["devices"][0]["kind"], "edu");
    // The CLI client: refused → 1 with the field, unreachable → 2.
    let (rc, _, err) = vm.inject(&["dma", "--device", "00:07.0", "--iova", "0x10"]);
    assert_eq!(rc, 1);
    assert!(
        err.contains("no device at 00:07.0 (field 'device')"),
        "{err}"
    );
    let out = common::run(&["stats", "--api-socket", "/nonexistent/fv.sock"]);
    assert_eq!(out.status.code(), Some(2));
    let w = vm.finish();
    assert_eq!(w["go"], 1);
}

/// Guest RAM is 2 MiB-aligned in the VMM's address space (so KVM can map it with
/// 2 MiB pages): the 64 MiB mapping of the running VMM, read from /proc/PID/maps.
#[test]
fn guest_ram_is_mapped_2m_aligned() {
    let Some(vm) = Vm::start("ram_alignment", &[], "opt.watch") else {
        return;
    };
    vm.wait_for("# watch: ready");
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", vm.child.id())).expect("maps");
    let ram: Vec<(u64, u64)> = maps
        .lines()
        .filter_map(|l| {
            let (lo, hi) = l.split_whitespace().next()?.split_once('-')?;
            let (lo, hi) = (
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            );
            (hi - lo == 64 << 20).then_some((lo, hi))
        })
        .collect();
    assert_eq!(ram.len(), 1, "one 64 MiB mapping for guest RAM:\n{maps}");
    assert_eq!(ram[0].0 % (2 << 20), 0, "guest RAM at {:#x}", ram[0].0);
    vm.finish();
}

/// A power cut stops the VM with exit code 6, and only after the client has its
/// reply: three cuts in a row, each read back in full by `faultvisor inject`.
#[test]
fn power_cut_replies_before_the_vm_stops() {
    if !common::kvm_available("power_cut_replies") {
        return;
    }
    let img = probe().with_file_name("power-cut.img");
    std::fs::write(&img, vec![0u8; 1 << 20]).expect("image");
    let disk = format!("path={}", img.display());
    for round in 0..3 {
        let vm = Vm::start(
            &format!("power_cut_{round}"),
            &["--disk", &disk],
            "opt.watch",
        )
        .expect("KVM checked above");
        vm.wait_for("# watch: ready");
        let (rc, out, err) = vm.inject(&["power-cut"]);
        assert_eq!(rc, 0, "round {round}: {err}");
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("round {round}: reply {out:?}: {e}"));
        assert_eq!(v["result"], "power cut", "{v}");
        assert_eq!(v["lost_bytes"], 0, "nothing was written: {v}");
        let mut child = vm.child;
        let t0 = Instant::now();
        let code = loop {
            if let Ok(Some(st)) = child.try_wait() {
                break st.code();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "round {round}: the VM did not stop"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(code, Some(6), "round {round}: the power-cut exit code");
    }
    let _ = std::fs::remove_file(&img);
}

#[test]
fn iommu_faults_need_an_iommu() {
    let Some(vm) = Vm::start(
        "no_iommu",
        &["--device", "edu", "--iommu", "off"],
        "opt.watch",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    let (st, v) = post(
        &vm.socket,
        r#"{"fault":"fault-storm","device":"00:01.0","count":4}"#,
    );
    assert_eq!(st, 409, "{v}");
    assert!(
        v["error"].as_str().is_some_and(|e| e.contains("no IOMMU")),
        "{v}"
    );
    let out = common::run(&["stats", "--api-socket", vm.socket.to_str().expect("utf-8")]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("vtd                 (no IOMMU)"));
    vm.finish();
}

#[test]
fn openapi_describes_every_fault_and_path() {
    let spec = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/resources/api/openapi.yaml"
    ))
    .expect("resources/api/openapi.yaml");
    for name in [
        "dma",
        "fault-storm",
        "context-invalid",
        "corrupt-descriptor",
        "drop-irq",
        "delay-irq",
        "duplicate-irq",
        "spurious-irq",
        "irq-storm",
        "irte-fault",
        "disk-error",
        "disk-dma-fault",
        "disk-delay",
        "power-cut",
        "stale_uses",
        "/v1/vm",
        "/v1/stats",
        "/v1/faults",
        "/v1/inject",
    ] {
        assert!(spec.contains(name), "openapi.yaml lacks {name}");
    }
    // The CLI offers the same faults.
    let help = common::run(&["inject", "--help"]);
    let text = String::from_utf8_lossy(&help.stdout);
    for name in [
        "dma",
        "fault-storm",
        "context-invalid",
        "drop-irq",
        "delay-irq",
        "duplicate-irq",
        "spurious-irq",
        "irq-storm",
        "irte-fault",
        "disk-error",
        "disk-dma-fault",
        "disk-delay",
        "power-cut",
    ] {
        assert!(text.contains(name), "inject --help lacks {name}");
    }
}

/// Prometheus text exposition: comments, or `name{labels} value` with a number.
fn check_prometheus(text: &str) -> HashMap<String, f64> {
    let mut samples = HashMap::new();
    let mut typed = std::collections::HashSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut w = rest.split_whitespace();
            let (name, kind) = (w.next().expect("name"), w.next().expect("kind"));
            assert!(["counter", "gauge"].contains(&kind), "{line}");
            typed.insert(name.to_string());
            continue;
        }
        if line.starts_with("# HELP ") || line.is_empty() {
            continue;
        }
        let (key, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample: {line}"));
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let name = key.split('{').next().expect("name");
        assert!(
            name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "{line}"
        );
        assert!(typed.contains(name), "sample before its TYPE: {line}");
        if let Some(labels) = key.strip_prefix(name) {
            if !labels.is_empty() {
                assert!(labels.starts_with('{') && labels.ends_with('}'), "{line}");
                for kv in labels[1..labels.len() - 1].split(',') {
                    let (k, v) = kv
                        .split_once('=')
                        .unwrap_or_else(|| panic!("label: {line}"));
                    assert!(
                        !k.is_empty() && v.starts_with('"') && v.ends_with('"'),
                        "{line}"
                    );
                }
            }
        }
        samples.insert(key.to_string(), v);
    }
    samples
}

#[test]
fn iommu_and_ioapic_commands() {
    let Some(vm) = Vm::start(
        "metrics",
        &["--device", "test", "--device", "edu"],
        "opt.watch",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    for args in [
        &["drop-irq", "--device", "00:01.0", "--count", "3"][..],
        &["fault-storm", "--device", "00:02.0", "--count", "20"][..],
    ] {
        assert_eq!(vm.inject(args).0, 0);
    }
    // The IOMMU view: translation on, the newest fault first, decoded like Linux.
    let s = vm.socket.to_str().expect("utf-8").to_string();
    let out = common::run(&["iommu", "--api-socket", &s, "--last", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("translation on"), "{text}");
    assert!(text.contains("last 2 fault(s)"), "{text}");
    // 20 faults, 16 recorded: the newest recorded is the 16th.
    let newest = "[DMA Write NO_PASID] Request device [00:02.0] fault addr 0x100000000f000 \
                  [fault reason 0x01] Present bit in root entry is clear";
    assert!(text.contains(newest), "{text}");
    let out = common::run(&["ioapic", "--api-socket", &s]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).lines().count(),
        25,
        "header + 24 pins"
    );
    let w = vm.finish();
    assert_eq!(w["msi_received"], 7, "{w:?}");
}

#[test]
fn prometheus_text_and_metrics_file() {
    if !common::kvm_available("prometheus") {
        return;
    }
    let metrics = std::env::temp_dir().join(format!("fv-metrics-{}.json", std::process::id()));
    let Some(vm) = Vm::start(
        "prometheus",
        &[
            "--device",
            "test",
            "--device",
            "edu",
            "--metrics-file",
            metrics.to_str().expect("utf-8"),
        ],
        "opt.watch",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    assert_eq!(
        vm.inject(&["drop-irq", "--device", "00:01.0", "--count", "2"])
            .0,
        0
    );
    assert_eq!(
        vm.inject(&["fault-storm", "--device", "00:02.0", "--count", "20"])
            .0,
        0
    );
    let raw = {
        let mut st = UnixStream::connect(&vm.socket).expect("connect");
        st.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("write");
        let mut r = String::new();
        st.read_to_string(&mut r).expect("read");
        r
    };
    let (head, body) = raw.split_once("\r\n\r\n").expect("http");
    assert!(
        head.contains("200 OK") && head.contains("text/plain; version=0.0.4"),
        "{head}"
    );
    let samples = check_prometheus(body);
    assert_eq!(
        samples.get("faultvisor_iommu_faults_total{reason=\"0x01\"}"),
        Some(&16.0),
        "{body}"
    );
    assert_eq!(
        samples.get("faultvisor_iommu_fault_overflows_total"),
        Some(&4.0)
    );
    assert_eq!(
        samples.get("faultvisor_irq_injected_total{action=\"dropped\"}"),
        Some(&0.0),
        "no MSI yet"
    );
    assert!(samples
        .keys()
        .any(|k| k.starts_with("faultvisor_vm_exits_total{vcpu=\"0\",reason=\"mmio_write\"}")));
    let w = vm.finish();
    assert_eq!(w["msi_received"], 8, "{w:?}");
    // At exit: the same counters as JSON, with what the guest saw matching.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&metrics).expect("metrics file"))
            .expect("json");
    assert_eq!(m["exit"]["code"], 0);
    assert_eq!(m["irq_injection"]["dropped"], 2);
    let fvt = m["msi"]
        .as_array()
        .expect("msi")
        .iter()
        .find(|x| x["device"] == "00:01.0")
        .cloned()
        .expect("fv-test MSI");
    assert_eq!(
        (fvt["raised"].as_u64(), fvt["delivered"].as_u64()),
        (Some(10), Some(8)),
        "{fvt}"
    );
    assert_eq!(m["vtd"]["faults_by_reason"]["0x01"], 16);
    assert!(m["vcpus"][0]["exits"]["mmio_write"].as_u64().unwrap_or(0) > 10);
}

#[test]
fn timeline_as_chrome_trace() {
    if !common::kvm_available("timeline") {
        return;
    }
    let trace = std::env::temp_dir().join(format!("fv-trace-{}.json", std::process::id()));
    let Some(vm) = Vm::start(
        "timeline",
        &[
            "--device",
            "test",
            "--device",
            "edu",
            "--trace-file",
            trace.to_str().expect("utf-8"),
        ],
        "opt.watch",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    assert_eq!(
        vm.inject(&["drop-irq", "--device", "00:01.0", "--count", "3"])
            .0,
        0
    );
    assert_eq!(
        vm.inject(&["dma", "--device", "00:02.0", "--iova", "0x5000"])
            .0,
        0
    );
    let w = vm.finish();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace file")).expect("json");
    let evs = v["traceEvents"].as_array().expect("events");
    let named = |n: &str| evs.iter().filter(|e| e["name"] == n).count();
    assert_eq!(named("interrupt dropped"), 3);
    assert_eq!(
        named("vector 0x71") as u64,
        w["msi_received"],
        "delivered MSIs are on the timeline"
    );
    assert_eq!(named("fault 0x01"), 1, "the injected DMA's fault");
    assert_eq!(named("fault event"), 1);
    assert!(named("injected") >= 3, "the API requests");
    // Timestamps never go backwards.
    let ts: Vec<u64> = evs.iter().filter_map(|e| e["ts"].as_u64()).collect();
    assert!(ts.windows(2).all(|p| p[0] <= p[1]));
}

#[test]
fn idt_dump_matches_the_probes_handlers() {
    let Some(vm) = Vm::start("idt", &["--device", "test", "--device", "edu"], "opt.watch") else {
        return;
    };
    vm.wait_for("# watch: ready");
    let s = vm.socket.to_str().expect("utf-8").to_string();
    let p = probe();
    for vcpu in ["0", "1"] {
        let out = common::run(&[
            "idt",
            "--api-socket",
            &s,
            "--vcpu",
            vcpu,
            "--symbols",
            p.to_str().expect("utf-8"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{text}");
        let gates: Vec<&str> = text
            .lines()
            .filter(|l| l.len() > 3 && l.as_bytes()[2] == b':')
            .collect();
        assert_eq!(gates.len(), 256, "{text}");
        // The probe installs stub n at isr_stubs + 16 * n, interrupt gates, DPL 0, IST 0.
        for (n, line) in gates.iter().enumerate() {
            let sym = if n == 0 {
                "isr_stubs ".to_string()
            } else {
                format!("isr_stubs+{:#x} ", 16 * n)
            };
            assert!(
                line.contains(&sym) && line.contains("int-gate dpl0 ist0"),
                "{line}"
            );
        }
        assert!(
            gates[0x71].contains("<- MSI 00:01.0 #0 -> APIC 0"),
            "{}",
            gates[0x71]
        );
        assert!(
            gates[0xa8].contains("<- VT-d fault event -> APIC 0"),
            "{}",
            gates[0xa8]
        );
    }
    let out = common::run(&["idt", "--api-socket", &s, "--vcpu", "9"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("vCPU 9 does not exist"));
    let out = common::run(&["idt", "--api-socket", &s, "--symbols", "/nonexistent.map"]);
    assert_eq!(out.status.code(), Some(2));
    vm.finish();
}

#[test]
fn demo_serves_the_api_too() {
    if !common::kvm_available("demo_api") {
        return;
    }
    let socket = std::env::temp_dir().join(format!("fv-demo-{}.sock", std::process::id()));
    let child = Command::new(common::faultvisor())
        .args(["demo", "--tests", "opt.watch", "--api-socket"])
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn demo");
    let t0 = Instant::now();
    while !socket.exists() && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let s = socket.to_str().expect("utf-8");
    for args in [
        &[
            "inject",
            "--api-socket",
            s,
            "drop-irq",
            "--vector",
            "0x71",
            "--count",
            "4",
        ][..],
        &[
            "inject",
            "--api-socket",
            s,
            "spurious-irq",
            "--vector",
            "0xee",
            "--cpu",
            "0",
        ][..],
    ] {
        assert_eq!(common::run(args).status.code(), Some(0), "{args:?}");
    }
    let out = child.wait_with_output().expect("demo");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("msi_received=6 "), "{text}");
    assert!(text.contains("faultvisor demo: PASS"), "{text}");
}

#[test]
fn irte_faults_and_remapped_routes() {
    // fv-test's MSI goes through IRTE 5 to vector 0x71 on the BSP.
    let Some(vm) = Vm::start(
        "irte",
        &["--device", "test", "--device", "edu"],
        "opt.watch_ir",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    let s = vm.socket.to_str().expect("utf-8").to_string();
    // The route shows the IRTE it goes through, on the vector the IRTE names.
    let out = common::run(&["idt", "--api-socket", &s, "--vcpu", "0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let gate = text
        .lines()
        .find(|l| l.starts_with("71:"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        gate.contains("<- MSI 00:01.0 #0 via IRTE 5 -> APIC 0"),
        "{gate}"
    );
    let st = http(&vm.socket, b"GET /v1/stats HTTP/1.1\r\n\r\n").1;
    let msi = &st["msi"][0];
    assert_eq!(
        (msi["irte"].as_u64(), msi["vector"].as_u64()),
        (Some(5), Some(0x71)),
        "{st}"
    );
    // The decoded table: entry 5, present, used by fv-test.
    let out = common::run(&["iommu", "--api-socket", &s]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("interrupt remapping on"), "{text}");
    let row = text
        .lines()
        .find(|l| l.trim_start().starts_with("5 "))
        .unwrap_or_else(|| panic!("no IRTE 5 row: {text}"));
    assert!(row.contains("0x71") && row.contains("00:01.0"), "{row}");
    let (rc, out, err) = vm.inject(&[
        "irte-fault",
        "--device",
        "00:01.0",
        "--reason",
        "not-present",
        "--count",
        "3",
    ]);
    assert_eq!(rc, 0, "{out} {err}");
    let (rc, _, err) = vm.inject(&["irte-fault", "--device", "00:01.0", "--reason", "0x27"]);
    assert_eq!(rc, 1, "{err}");
    assert!(err.contains("not an IRTE fault reason"), "{err}");
    let w = vm.finish();
    // Three of ten are blocked and each is recorded: index 5, reason 0x22.
    assert_eq!((w["msi_received"], w["records"]), (7, 3), "{w:?}");
}

#[test]
fn stale_uses_in_the_iommu_view_metrics_and_timeline() {
    // stale.iotlb leaves stale uses behind; opt.watch then keeps the VM up for queries.
    let trace = std::env::temp_dir().join(format!("fv-stale-{}.json", std::process::id()));
    let Some(vm) = Vm::start(
        "stale",
        &[
            "--device",
            "test",
            "--device",
            "edu",
            "--iommu",
            "intel,caching=exact",
            "--trace-file",
            trace.to_str().expect("utf-8"),
        ],
        "stale.iotlb,opt.watch",
    ) else {
        return;
    };
    vm.wait_for("# watch: ready");
    let (st, v) = http(&vm.socket, b"GET /v1/iommu HTTP/1.1\r\n\r\n");
    assert_eq!(st, 200);
    assert_eq!(v["caching"], "exact", "{v}");
    let su = &v["stale_uses"];
    assert!(su["iotlb"].as_u64().unwrap_or(0) >= 3, "{su}");
    let newest = &su["recent"][0];
    assert_eq!(
        (
            newest["cache"].as_str(),
            newest["device"].as_str(),
            newest["iova"].as_str(),
            newest["domain"].as_u64()
        ),
        (Some("iotlb"), Some("00:02.0"), Some("0x23000"), Some(1)),
        "{su}"
    );
    assert!(newest["missing"]
        .as_str()
        .unwrap_or("")
        .contains("an IOTLB invalidation of domain 1 covering IOVA 0x23000"));
    let s = vm.socket.to_str().expect("utf-8").to_string();
    let out = common::run(&["iommu", "--api-socket", &s]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("caching exact  stale uses: 0 context, "),
        "{text}"
    );
    assert!(
        text.contains("stale IOTLB entry of 00:02.0 (domain 1) used at IOVA 0x23000"),
        "{text}"
    );
    let raw = {
        let mut st = UnixStream::connect(&vm.socket).expect("connect");
        st.write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .expect("write");
        let mut r = String::new();
        st.read_to_string(&mut r).expect("read");
        r
    };
    let samples = check_prometheus(raw.split_once("\r\n\r\n").expect("http").1);
    assert!(
        samples
            .get("faultvisor_iommu_stale_uses_total{cache=\"iotlb\"}")
            .copied()
            .unwrap_or(0.0)
            >= 3.0,
        "{samples:?}"
    );
    assert_eq!(
        samples.get("faultvisor_iommu_stale_uses_total{cache=\"irte\"}"),
        Some(&0.0)
    );
    vm.finish();
    let t: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).expect("trace")).expect("json");
    let stale: Vec<&serde_json::Value> = t["traceEvents"]
        .as_array()
        .expect("events")
        .iter()
        .filter(|e| e["cat"] == "stale")
        .collect();
    assert!(stale.len() >= 3, "{stale:?}");
    assert_eq!(stale[0]["args"]["at"], "0x23000");
    let _ = std::fs::remove_file(&trace);
}
