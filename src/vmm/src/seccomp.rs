//! Per-thread seccomp filters (`seccompiler`), as Firecracker and cloud-hypervisor use
//! them: each kind of thread (vCPU, event loop and API, workers, the main thread after
//! start-up) gets its own allow-list, compiled from `resources/seccomp/*.json` (which
//! sit next to nothing else, so that a change adding a system call shows in review)
//! and installed by the thread itself before it handles anything a guest or client
//! sends.
//!
//! `--seccomp on` (the default) ends the VMM at the first forbidden call with one line
//! naming the thread and the call; `log` lets the call through and has the kernel log
//! it (the audit log); `off` installs nothing. Threads other than the main one also get
//! a second, stacked filter (`deny_open`) that makes every `open` fail with EACCES: glibc's
//! allocator probes files such as `/proc/sys/vm/overcommit_memory` lazily, from whichever
//! thread gets there first, and copes with a failed open, so the call is refused
//! gracefully instead of ending the VMM, and no such thread can open a file. `ioctl` is allowed only with the request
//! numbers each thread needs (KVM's and a few terminal and socket ones); the test
//! `ioctl_numbers_match_kvm` checks those numbers against kvm-bindings' structures.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::VmmError;

/// What the filters do.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SeccompMode {
    /// A forbidden call ends the VMM (SIGSYS, reported on one line).
    #[default]
    On,
    /// A forbidden call is allowed and logged by the kernel.
    Log,
    /// No filter.
    Off,
}

impl std::str::FromStr for SeccompMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "on" => Ok(Self::On),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            _ => Err(format!("'{s}' is not a seccomp mode (on, log or off)")),
        }
    }
}

/// The kinds of threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// A vCPU thread.
    Vcpu,
    /// The event loop (console input and the API socket).
    EventLoop,
    /// API workers, device workers and the interrupt timer.
    Worker,
    /// The main thread once the VM runs (waits, then tears down).
    Main,
}

impl ThreadKind {
    /// The filter's name in the JSON file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Vcpu => "vcpu",
            Self::EventLoop => "event_loop",
            Self::Worker => "worker",
            Self::Main => "main",
        }
    }
}

/// The stacked filter that refuses `open` calls with EACCES.
const DENY_OPEN: &str = "deny_open";

/// The filters, as shipped.
const FILTERS: &str = include_str!("../../../resources/seccomp/x86_64.json");

/// Exit status after a seccomp violation (an internal error: the VMM made a call it
/// never should).
pub const EXIT_SECCOMP: i32 = 70;

/// Compiles every filter for `mode` (done once, before any thread needs one).
fn compile(mode: SeccompMode) -> Result<HashMap<String, seccompiler::BpfProgram>, VmmError> {
    let mut v: Value = serde_json::from_str(FILTERS)
        .map_err(|e| VmmError::Setup(format!("seccomp filters: {e}")))?;
    if let Some(m) = v.as_object_mut() {
        for (name, f) in m.iter_mut() {
            if name == DENY_OPEN {
                continue;
            }
            f["default_action"] = Value::from(match mode {
                SeccompMode::Log => "log",
                _ => "trap",
            });
        }
    }
    let text = v.to_string();
    seccompiler::compile_from_json(text.as_bytes(), seccompiler::TargetArch::x86_64)
        .map_err(|e| VmmError::Setup(format!("seccomp filters: {e}")))
}

thread_local! {
    /// The thread's name, kept where the SIGSYS handler can read it without a call.
    static NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

type Programs = HashMap<String, seccompiler::BpfProgram>;

/// The compiled filters (or why they could not be), compiled once per process.
static PROGRAMS: std::sync::OnceLock<Result<Programs, String>> = std::sync::OnceLock::new();

/// The SIGSYS handler's installation, once per process.
static SIGSYS: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();

/// The filters for `mode`, compiled at the first call.
fn programs(mode: SeccompMode) -> Result<&'static Programs, VmmError> {
    PROGRAMS
        .get_or_init(|| {
            let t0 = std::time::Instant::now();
            let p = compile(mode).map_err(|e| e.to_string());
            log::debug!(
                "seccomp filters compiled in {} us",
                t0.elapsed().as_micros()
            );
            p
        })
        .as_ref()
        .map_err(|e| VmmError::Setup(e.clone()))
}

/// Compiles the filters for `mode` now, while the vCPU set-up thread is still busy,
/// rather than on the start-up's critical path. An error is kept and reported by the
/// first [`thread_filter`].
pub fn precompile(mode: SeccompMode) {
    if mode != SeccompMode::Off {
        let _ = programs(mode);
    }
}

/// A closure that installs the filter of `kind` on the thread that calls it (a no-op
/// with `--seccomp off`). Filters are compiled at the first call, so a broken file is
/// a set-up error, not a thread's.
pub fn thread_filter(
    mode: SeccompMode,
    kind: ThreadKind,
) -> Result<Arc<dyn Fn() + Send + Sync>, VmmError> {
    if mode == SeccompMode::Off {
        return Ok(Arc::new(|| {}));
    }
    let all = programs(mode)?;
    SIGSYS
        .get_or_init(|| install_sigsys_handler().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(|e| VmmError::Setup(e.clone()))?;
    let get = |name: &str| {
        all.get(name)
            .cloned()
            .ok_or_else(|| VmmError::Setup(format!("no seccomp filter named {name}")))
    };
    let mut programs = vec![get(kind.name())?];
    if kind != ThreadKind::Main {
        programs.push(get(DENY_OPEN)?);
    }
    Ok(Arc::new(move || install(kind, &programs)))
}

/// Installs `programs` on this thread; a thread that cannot be filtered ends the VMM.
fn install(kind: ThreadKind, programs: &[seccompiler::BpfProgram]) {
    remember_name();
    for program in programs {
        if let Err(e) = seccompiler::apply_filter(program) {
            eprintln!(
                "faultvisor: error: cannot install the {} seccomp filter: {e}",
                kind.name()
            );
            std::process::exit(crate::EXIT_VMM_ERROR);
        }
    }
    self_test(kind);
}

/// Keeps this thread's name for the violation message.
fn remember_name() {
    let mut b = [0u8; 16];
    let name = std::thread::current()
        .name()
        .unwrap_or("faultvisor")
        .as_bytes()
        .to_vec();
    let n = name.len().min(15);
    b[..n].copy_from_slice(&name[..n]);
    NAME.with(|c| c.set(b));
}

/// `FAULTVISOR_SECCOMP_SELFTEST=<kind>` makes the first thread of that kind make a
/// forbidden call right after its filter is in place (for the test suite).
fn self_test(kind: ThreadKind) {
    static DONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if std::env::var("FAULTVISOR_SECCOMP_SELFTEST").ok().as_deref() == Some(kind.name())
        && !DONE.swap(true, std::sync::atomic::Ordering::SeqCst)
    {
        let mut u: libc::utsname = unsafe_zeroed_utsname();
        // SAFETY: uname writes into the struct we own; the call itself is harmless,
        // and is in no filter, which is the point.
        unsafe { libc::uname(&mut u) };
    }
}

fn unsafe_zeroed_utsname() -> libc::utsname {
    // SAFETY: utsname is a plain C struct of byte arrays; all zeroes is a valid value.
    unsafe { std::mem::zeroed() }
}

/// Installs the SIGSYS handler that reports a violation and ends the process.
fn install_sigsys_handler() -> Result<(), VmmError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, sigsys_handler)
        .map_err(|e| VmmError::Setup(format!("cannot install the SIGSYS handler: {e}")))
}

/// Appends `s` to `buf` at `*n` (no allocation: this runs in a signal handler).
fn put(buf: &mut [u8], n: &mut usize, s: &[u8]) {
    for &b in s {
        if *n < buf.len() {
            buf[*n] = b;
            *n += 1;
        }
    }
}

fn put_num(buf: &mut [u8], n: &mut usize, mut v: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(buf, n, &digits[i..]);
}

extern "C" fn sigsys_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo for SIGSYS: si_call_addr (pointer) at 16, si_syscall (int) at 24.
    // SAFETY: the kernel passes a valid siginfo_t for SIGSYS with SA_SIGINFO, and the
    // offsets are those of the x86_64 `_sigsys` member.
    let nr = unsafe { (info as *const u8).add(24).cast::<i32>().read_unaligned() };
    let name = NAME.with(|c| c.get());
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let mut buf = [0u8; 256];
    let mut n = 0;
    put(
        &mut buf,
        &mut n,
        b"faultvisor: internal error: seccomp: thread ",
    );
    put(&mut buf, &mut n, &name[..len]);
    put(&mut buf, &mut n, b" made a forbidden system call: ");
    let call = usize::try_from(nr)
        .ok()
        .and_then(|i| crate::seccomp_names::NAMES.get(i))
        .copied()
        .unwrap_or("");
    if call.is_empty() {
        put(&mut buf, &mut n, b"#");
    } else {
        put(&mut buf, &mut n, call.as_bytes());
        put(&mut buf, &mut n, b" (");
    }
    put_num(&mut buf, &mut n, nr.max(0) as u64);
    if !call.is_empty() {
        put(&mut buf, &mut n, b")");
    }
    put(&mut buf, &mut n, b"; ending the VMM\n");
    // SAFETY: write(2) and _exit(2) are async-signal-safe and allowed by every filter.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), n);
        libc::_exit(EXIT_SECCOMP);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_in_both_modes() {
        for mode in [SeccompMode::On, SeccompMode::Log] {
            let m = compile(mode).expect("compiles");
            for k in [
                ThreadKind::Vcpu,
                ThreadKind::EventLoop,
                ThreadKind::Worker,
                ThreadKind::Main,
            ] {
                assert!(m.contains_key(k.name()), "{}", k.name());
            }
        }
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("maybe".parse::<SeccompMode>().is_err());
    }

    /// _IOC(dir, 0xAE, nr, size) as Linux encodes it.
    fn kvm_ioc(dir: u64, nr: u64, size: usize) -> u64 {
        (dir << 30) | ((size as u64) << 16) | (0xae << 8) | nr
    }

    #[test]
    fn ioctl_numbers_match_kvm() {
        use kvm_bindings::*;
        use std::mem::size_of;
        let want: HashMap<&str, u64> = [
            ("KVM_RUN", kvm_ioc(0, 0x80, 0)),
            (
                "KVM_INTERRUPT",
                kvm_ioc(1, 0x86, size_of::<kvm_interrupt>()),
            ),
            ("KVM_SET_REGS", kvm_ioc(1, 0x82, size_of::<kvm_regs>())),
            ("KVM_SET_SREGS", kvm_ioc(1, 0x84, size_of::<kvm_sregs>())),
            (
                "KVM_SET_MP_STATE",
                kvm_ioc(1, 0x99, size_of::<kvm_mp_state>()),
            ),
            ("KVM_GET_REGS", kvm_ioc(2, 0x81, size_of::<kvm_regs>())),
            ("KVM_GET_SREGS", kvm_ioc(2, 0x83, size_of::<kvm_sregs>())),
            (
                "KVM_GET_LAPIC",
                kvm_ioc(2, 0x8e, size_of::<kvm_lapic_state>()),
            ),
            (
                "KVM_SET_GSI_ROUTING",
                kvm_ioc(1, 0x6a, size_of::<kvm_irq_routing>()),
            ),
            ("KVM_IRQFD", kvm_ioc(1, 0x76, size_of::<kvm_irqfd>())),
            ("KVM_SIGNAL_MSI", kvm_ioc(1, 0xa5, size_of::<kvm_msi>())),
            (
                "KVM_IOEVENTFD",
                kvm_ioc(1, 0x79, size_of::<kvm_ioeventfd>()),
            ),
        ]
        .into_iter()
        .collect();
        let v: Value = serde_json::from_str(FILTERS).expect("json");
        let mut seen = 0;
        for f in v.as_object().expect("object").values() {
            for rule in f["filter"].as_array().expect("rules") {
                let Some(args) = rule["args"].as_array() else {
                    continue;
                };
                for a in args {
                    let c = a["comment"].as_str().unwrap_or("");
                    if let Some(n) = want.get(c) {
                        assert_eq!(a["val"].as_u64(), Some(*n), "{c}");
                        seen += 1;
                    }
                }
            }
        }
        assert!(seen >= 12, "KVM ioctls in the filters: {seen}");
    }

    #[test]
    fn violation_message_is_built_without_allocation() {
        let mut buf = [0u8; 32];
        let mut n = 0;
        put(&mut buf, &mut n, b"call ");
        put_num(&mut buf, &mut n, 63);
        assert_eq!(&buf[..n], b"call 63");
        assert_eq!(crate::seccomp_names::NAMES[63], "uname");
    }
}
