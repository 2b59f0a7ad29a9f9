//! The control API under a hostile client: floods of connections, slow and silent
//! clients, oversized and ambiguous requests, caps on rules and storms, long jobs that
//! must not hold up the event loop, and garbage that must not grow the VMM.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn probe() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("faultvisor-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let p = dir.join("probe.elf");
    if !p.exists() {
        let out = common::run(&["demo", "--write-probe", p.to_str().expect("utf-8")]);
        assert!(out.status.success(), "{out:?}");
    }
    p
}

/// A probe VM waiting in `opt.watch` with an API socket.
struct Vm {
    child: Child,
    socket: PathBuf,
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

impl Vm {
    fn start(name: &str) -> Option<Self> {
        if !common::kvm_available(name) {
            return None;
        }
        let socket =
            std::env::temp_dir().join(format!("fv-api-{}-{name}.sock", std::process::id()));
        let child = Command::new(common::faultvisor())
            .args(["run", "--kernel"])
            .arg(probe())
            .args(["--memory", "64M", "--vcpus", "2", "--serial", "none"])
            .args(["--device", "test", "--device", "edu", "--api-socket"])
            .arg(&socket)
            .args(["--cmdline", "probe.tests=opt.watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn faultvisor");
        let vm = Self { child, socket };
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(20) {
            if vm.request("GET", "/v1/vm", "").0 == 200 {
                // Translation is on once the guest's watch scenario is ready.
                let t1 = Instant::now();
                while t1.elapsed() < Duration::from_secs(20) {
                    let (_, b) = vm.request("GET", "/v1/iommu", "");
                    if b.contains("\"translation\":true") {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                return Some(vm);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the API never answered");
    }

    fn connect(&self) -> UnixStream {
        UnixStream::connect(&self.socket).expect("connect")
    }

    /// Sends raw bytes, returns (status, body) of the reply.
    fn raw(&self, bytes: &[u8]) -> (u16, String) {
        let Ok(mut s) = UnixStream::connect(&self.socket) else {
            return (0, String::new());
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
        let _ = s.write_all(bytes);
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        (status, body)
    }

    fn request(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        self.raw(
            format!(
                "{method} {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    }

    fn inject(&self, body: &str) -> (u16, String) {
        self.request("POST", "/v1/inject", body)
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        s.lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    fn threads(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }
}

#[test]
fn past_64_connections_a_client_gets_a_json_503() {
    let Some(vm) = Vm::start("conn_cap") else {
        return;
    };
    // 64 clients that connect and say nothing hold every slot.
    let idle: Vec<UnixStream> = (0..64).map(|_| vm.connect()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let (status, body) = vm.request("GET", "/v1/vm", "");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many connections"), "{body}");
    drop(idle);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        vm.request("GET", "/v1/vm", "").0,
        200,
        "slots are free again"
    );
}

#[test]
fn silent_clients_are_closed_by_the_timer() {
    let Some(vm) = Vm::start("idle_reap") else {
        return;
    };
    let mut silent = vm.connect();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let t0 = Instant::now();
    let mut b = [0u8; 16];
    // No other client arrives: the server's own timer must close it.
    let n = silent.read(&mut b).unwrap_or(0);
    let waited = t0.elapsed();
    assert_eq!(n, 0, "closed without a reply");
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(25),
        "closed after {waited:?}"
    );
}

#[test]
fn oversized_and_ambiguous_requests_are_refused() {
    let Some(vm) = Vm::start("bad_http") else {
        return;
    };
    let mut head = b"GET /v1/vm HTTP/1.1\r\nX-Long: ".to_vec();
    head.extend(std::iter::repeat_n(b'a', 72 * 1024));
    head.extend_from_slice(b"\r\n\r\n");
    let cases: Vec<(Vec<u8>, u16)> = vec![
        (head, 431),
        (
            b"POST /v1/inject HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}"
                .to_vec(),
            400,
        ),
        (
            b"POST /v1/inject HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec(),
            501,
        ),
        (
            b"POST /v1/inject HTTP/1.1\r\nContent-Length: 100000\r\n\r\n".to_vec(),
            413,
        ),
        (b"GET /v1/vm HTTP/3.0\r\n\r\n".to_vec(), 505),
        (
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec(),
            400,
        ),
    ];
    for (req, want) in cases {
        let (status, body) = vm.raw(&req);
        assert_eq!(
            status,
            want,
            "{:.40}: {body}",
            String::from_utf8_lossy(&req)
        );
        assert!(body.starts_with('{'), "JSON error body: {body}");
    }
    assert_eq!(vm.request("GET", "/v1/vm", "").0, 200, "still serving");
}

#[test]
fn rules_storms_and_jobs_are_capped_with_429() {
    let Some(vm) = Vm::start("caps") else {
        return;
    };
    for i in 0..64 {
        let (st, b) = vm.inject(&format!(
            r#"{{"fault":"drop-irq","vector":{},"count":1}}"#,
            0x90 + (i % 16)
        ));
        assert_eq!(st, 200, "rule {i}: {b}");
    }
    let (st, b) = vm.inject(r#"{"fault":"drop-irq","vector":150,"count":1}"#);
    assert_eq!(st, 429, "{b}");
    assert!(b.contains(r#""field":"fault""#), "{b}");
    let baseline = vm.threads();
    for i in 0..4 {
        let (st, b) = vm.inject(
            r#"{"fault":"irq-storm","vector":200,"cpu":1,"rate_hz":100,"duration_ms":5000}"#,
        );
        assert_eq!(st, 200, "storm {i}: {b}");
    }
    let (st, b) =
        vm.inject(r#"{"fault":"irq-storm","vector":200,"cpu":1,"rate_hz":100,"duration_ms":5000}"#);
    assert_eq!(st, 429, "{b}");
    assert!(b.contains("interrupt storms"), "{b}");
    assert_eq!(
        vm.threads(),
        baseline,
        "storms run on the pool, not on new threads"
    );
    // 60 rules' worth of duplicates budget: ask for more than the whole budget.
    let vm2 = Vm::start("caps_pending").expect("second VM");
    let (st, b) = vm2.inject(r#"{"fault":"duplicate-irq","vector":64,"count":1000,"copies":100}"#);
    assert_eq!(st, 429, "{b}");
    assert!(b.contains(r#""field":"copies""#), "{b}");
    let (st, b) = vm2.inject(r#"{"fault":"context-invalid","device":"00:02.0","count":1000000}"#);
    assert_eq!(st, 200, "{b}");
    let (st, b) = vm2.inject(r#"{"fault":"context-invalid","device":"00:02.0","count":1}"#);
    assert_eq!(st, 429, "{b}");
    let (_, stats) = vm.request("GET", "/v1/stats", "");
    assert!(
        stats.contains(r#""irq_rules":1"#),
        "cap hit counted: {stats}"
    );
    assert!(
        stats.contains(r#""irq_storms":1"#),
        "cap hit counted: {stats}"
    );
}

#[test]
fn a_million_fault_storm_does_not_hold_up_other_clients() {
    let Some(vm) = Vm::start("storm_job") else {
        return;
    };
    let sock = vm.socket.clone();
    let storm = std::thread::spawn(move || {
        let mut s = UnixStream::connect(&sock).expect("connect");
        let body = r#"{"fault":"fault-storm","device":"00:02.0","count":1000000}"#;
        let _ = s.write_all(
            format!(
                "POST /v1/inject HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    });
    std::thread::sleep(Duration::from_millis(50));
    let mut answered_during = 0;
    while !storm.is_finished() {
        if vm.request("GET", "/v1/vm", "").0 == 200 {
            answered_during += 1;
        }
        if answered_during >= 5 {
            break;
        }
    }
    let reply = storm.join().expect("storm");
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"overflowed\""), "{reply}");
    assert!(
        answered_during > 0,
        "no other client was served while the storm ran"
    );
}

#[test]
fn slow_readers_and_silent_clients_leave_the_api_responsive() {
    let Some(vm) = Vm::start("slow") else {
        return;
    };
    // 40 clients send half a request; 20 ask for /metrics and never read.
    let mut held = Vec::new();
    for i in 0..60 {
        let mut s = vm.connect();
        if i % 3 == 0 {
            let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        } else {
            let _ = s.write_all(b"GET /v1/vm HTTP/1.1\r\nHost:");
        }
        held.push(s);
    }
    let (st, _) = vm
        .inject(r#"{"fault":"irq-storm","vector":200,"cpu":0,"rate_hz":10000,"duration_ms":2000}"#);
    assert_eq!(st, 200);
    for _ in 0..20 {
        let t0 = Instant::now();
        let (st, body) = vm.request("GET", "/v1/vm", "");
        assert_eq!(st, 200, "{body}");
        // A functional bound, far above the benchmark's: no client waits for another.
        assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
    }
    drop(held);
}

#[test]
fn garbage_bodies_do_not_grow_the_vmm() {
    let Some(vm) = Vm::start("garbage") else {
        return;
    };
    let junk = format!(r#"{{"fault":"dma","device":"{}"}}"#, "z".repeat(60 * 1024));
    for _ in 0..50 {
        vm.inject(&junk);
    }
    let before = vm.rss_kib();
    for _ in 0..1500 {
        let (st, _) = vm.inject(&junk);
        assert_eq!(st, 400);
    }
    let after = vm.rss_kib();
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB on refused bodies"
    );
}

#[test]
fn the_api_socket_never_replaces_a_regular_file() {
    if !common::kvm_available("socket_file") {
        return;
    }
    let path = std::env::temp_dir().join(format!("fv-api-file-{}", std::process::id()));
    std::fs::write(&path, b"precious").expect("write");
    let out = Command::new(common::faultvisor())
        .args(["run", "--kernel"])
        .arg(probe())
        .args(["--memory", "64M", "--serial", "none", "--api-socket"])
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("exists and is not a socket"), "{err}");
    assert_eq!(std::fs::read(&path).expect("read"), b"precious");
    let _ = std::fs::remove_file(&path);
}
