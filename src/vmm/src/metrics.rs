//! Counters of a running VM, as JSON (`GET /v1/stats`, `--metrics-file`) and in the
//! Prometheus text format (`GET /metrics`): IOAPIC pins, MSI/MSI-X vectors by device
//! and destination, interrupt injection, the VT-d unit (translations, IOTLB hits and
//! misses, faults by reason, overflows) and VM exits by reason per vCPU.

use std::fmt::Write;

use devices::interrupt::MsiSource;
use devices::pci::Bdf;
use devices::sync::lock;
use serde_json::{json, Value};

use crate::api::ApiContext;

fn source_labels(source: MsiSource) -> String {
    match source {
        MsiSource::Ioapic { pin } => format!("source=\"ioapic\",pin=\"{pin}\""),
        MsiSource::Pci { bdf, vector } => {
            let b = Bdf {
                bus: (bdf >> 8) as u8,
                device: ((bdf >> 3) & 0x1f) as u8,
                function: (bdf & 7) as u8,
            };
            format!("source=\"pci\",device=\"{b}\",msi_index=\"{vector}\"")
        }
        MsiSource::Platform => "source=\"platform\"".into(),
    }
}

/// Everything, as JSON.
pub fn json(ctx: &ApiContext) -> Value {
    let vtd = ctx.vtd.as_ref().map(|v| {
        let s = v.stats();
        let by_reason: serde_json::Map<String, Value> = s
            .faults_by_reason
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(r, n)| (format!("{r:#04x}"), json!(n)))
            .collect();
        json!({
            "dma_requests": s.dma_requests,
            "walks": s.walks,
            "iotlb_hits": s.dma_requests.saturating_sub(s.walks),
            "iotlb_misses": s.walks,
            "faults_recorded": s.faults_recorded,
            "faults_by_reason": by_reason,
            "faults_overflowed": s.faults_overflowed,
            "faults_suppressed": s.faults_suppressed,
            "fault_events": s.fault_events,
            "completion_events": s.completion_events,
            "interrupt_remapping": {
                "enabled": v.remapping(),
                "remapped": s.ir_remapped,
                "blocked": s.ir_blocked,
                "passed_compat": s.ir_passed,
            },
            "invalidations": s.invalidations,
            "qi_descriptors": s.qi_descriptors,
            "caching": caching_name(v),
            "stale_uses": stale_counts(v),
        })
    });
    let f = ctx.irq.faults().stats();
    let io = lock(&ctx.ioapic);
    let pins: Vec<Value> = (0..devices::ioapic::NUM_PINS)
        .filter_map(|p| io.stats(p).map(|s| (p, s)))
        .filter(|(_, s)| s.raised > 0)
        .map(|(p, s)| {
            json!({"pin": p, "raised": s.raised, "delivered": s.delivered,
                   "masked": s.masked, "coalesced": s.coalesced})
        })
        .collect();
    drop(io);
    let msis: Vec<Value> = ctx
        .irq
        .gsi_counters()
        .into_iter()
        .filter(|c| !matches!(c.source, MsiSource::Ioapic { .. }))
        .map(|c| {
            let mut v = json!({"gsi": c.gsi, "vector": c.msg.vector(), "dest": c.msg.destination(),
                               "raised": c.raised, "delivered": c.delivered});
            route_fields(&mut v, &c.route);
            if let MsiSource::Pci { bdf, vector } = c.source {
                v["device"] = json!(Bdf {
                    bus: (bdf >> 8) as u8,
                    device: ((bdf >> 3) & 0x1f) as u8,
                    function: (bdf & 7) as u8
                }
                .to_string());
                v["msi_index"] = json!(vector);
            }
            v
        })
        .collect();
    let exits: Vec<Value> = ctx
        .vcpu_stats
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let m: serde_json::Map<String, Value> = s
                .exits()
                .into_iter()
                .map(|(r, n)| (r.to_string(), json!(n)))
                .collect();
            json!({"vcpu": i, "exits": m})
        })
        .collect();
    json!({
        "uptime_ms": ctx.start.elapsed().as_millis() as u64,
        "vtd": vtd,
        "irq_injection": {"dropped": f.dropped, "delayed": f.delayed, "duplicated": f.duplicated,
                           "irte_faults": f.irte_faults,
                           "rules_armed": ctx.irq.faults().rules().len(),
                           "pending": ctx.irq.faults().pending(),
                           "scheduled": ctx.irq.scheduled(),
                           "signalled": ctx.irq.signalled()},
        "irq_refused_drops": ctx.irq.refused_drops(),
        "caps": caps_json(),
        "ioapic": pins,
        "msi": msis,
        "vcpus": exits,
    })
}

/// Hits of every cap (see `devices::limits`), by name.
fn caps_json() -> Value {
    let m: serde_json::Map<String, Value> = devices::limits::snapshot()
        .into_iter()
        .map(|(i, n)| (i.name.to_string(), json!(n)))
        .collect();
    Value::Object(m)
}

struct Prom(String);

impl Prom {
    fn family(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP faultvisor_{name} {help}");
        let _ = writeln!(self.0, "# TYPE faultvisor_{name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &str, v: impl std::fmt::Display) {
        if labels.is_empty() {
            let _ = writeln!(self.0, "faultvisor_{name} {v}");
        } else {
            let _ = writeln!(self.0, "faultvisor_{name}{{{labels}}} {v}");
        }
    }
}

/// Everything, in the Prometheus text exposition format (version 0.0.4).
pub fn prometheus(ctx: &ApiContext) -> String {
    let mut p = Prom(String::new());
    p.family("uptime_seconds", "Time since the VMM started.", "gauge");
    p.sample("uptime_seconds", "", ctx.start.elapsed().as_secs_f64());
    {
        let io = lock(&ctx.ioapic);
        let stats: Vec<_> = (0..devices::ioapic::NUM_PINS)
            .filter_map(|pin| io.stats(pin).map(|s| (pin, s)))
            .filter(|(_, s)| s.raised > 0)
            .collect();
        drop(io);
        for (name, help, get) in [
            (
                "ioapic_raised_total",
                "Interrupts raised on an IOAPIC pin.",
                0,
            ),
            (
                "ioapic_delivered_total",
                "Interrupts the IOAPIC delivered.",
                1,
            ),
            (
                "ioapic_masked_total",
                "Raises that found the pin masked.",
                2,
            ),
            (
                "ioapic_coalesced_total",
                "Level raises while remote IRR was set.",
                3,
            ),
        ] {
            p.family(name, help, "counter");
            for (pin, s) in &stats {
                let v = [s.raised, s.delivered, s.masked, s.coalesced][get];
                p.sample(name, &format!("pin=\"{pin}\""), v);
            }
        }
    }
    let gsis = ctx.irq.gsi_counters();
    for (name, help, delivered) in [
        (
            "msi_raised_total",
            "Messages raised per MSI/MSI-X vector, IOAPIC entry or platform source.",
            false,
        ),
        (
            "msi_delivered_total",
            "Messages written to KVM (raised minus dropped plus duplicates).",
            true,
        ),
    ] {
        p.family(name, help, "counter");
        for c in &gsis {
            let labels = format!(
                "gsi=\"{}\",{},vector=\"{:#04x}\",dest=\"{}\"",
                c.gsi,
                source_labels(c.source),
                c.msg.vector(),
                c.msg.destination()
            );
            p.sample(
                name,
                &labels,
                if delivered { c.delivered } else { c.raised },
            );
        }
    }
    let f = ctx.irq.faults().stats();
    p.family(
        "irq_injected_total",
        "Interrupts changed by fault injection.",
        "counter",
    );
    p.sample("irq_injected_total", "action=\"dropped\"", f.dropped);
    p.sample("irq_injected_total", "action=\"delayed\"", f.delayed);
    p.sample("irq_injected_total", "action=\"duplicated\"", f.duplicated);
    p.family(
        "irq_signalled_total",
        "One-off messages sent (spurious interrupts, storms).",
        "counter",
    );
    p.sample("irq_signalled_total", "", ctx.irq.signalled());
    p.family(
        "irq_refused_drops_total",
        "Messages dropped because KVM refused their route (reserved address bits).",
        "counter",
    );
    p.sample("irq_refused_drops_total", "", ctx.irq.refused_drops());
    p.family(
        "cap_hits_total",
        "Times a cap on guest- or client-driven growth was reached.",
        "counter",
    );
    for (i, n) in devices::limits::snapshot() {
        p.sample("cap_hits_total", &format!("cap=\"{}\"", i.name), n);
    }
    if let Some(v) = &ctx.vtd {
        let s = v.stats();
        for (name, help, val) in [
            (
                "iommu_translations_total",
                "DMA requests translated by the VT-d unit.",
                s.dma_requests,
            ),
            (
                "iommu_iotlb_hits_total",
                "Requests served from a device's IOTLB.",
                s.dma_requests.saturating_sub(s.walks),
            ),
            (
                "iommu_iotlb_misses_total",
                "Requests that walked the page tables.",
                s.walks,
            ),
            (
                "iommu_fault_overflows_total",
                "Faults dropped because every record was pending.",
                s.faults_overflowed,
            ),
            (
                "iommu_faults_suppressed_total",
                "Faults suppressed by FPD.",
                s.faults_suppressed,
            ),
            (
                "iommu_fault_events_total",
                "Fault-event interrupts sent.",
                s.fault_events,
            ),
            (
                "iommu_invalidations_total",
                "Cache invalidations.",
                s.invalidations,
            ),
            (
                "iommu_ir_remapped_total",
                "Interrupt messages translated through an IRTE.",
                s.ir_remapped,
            ),
            (
                "iommu_ir_blocked_total",
                "Interrupt messages blocked by a failed IRTE lookup.",
                s.ir_blocked,
            ),
        ] {
            p.family(name, help, "counter");
            p.sample(name, "", val);
        }
        p.family(
            "iommu_stale_uses_total",
            "Uses of cached VT-d entries whose tables changed without the required invalidation (caching=exact).",
            "counter",
        );
        let (stale, _) = v.stale_uses();
        for (k, n) in devices::iommu::StaleKind::ALL.iter().zip(stale) {
            p.sample(
                "iommu_stale_uses_total",
                &format!("cache=\"{}\"", k.name()),
                n,
            );
        }
        p.family(
            "iommu_faults_total",
            "Faults recorded, by reason.",
            "counter",
        );
        for (r, n) in s.faults_by_reason.iter().enumerate() {
            if (0x1..=0xc).contains(&r) || (0x20..=0x26).contains(&r) {
                p.sample("iommu_faults_total", &format!("reason=\"{r:#04x}\""), n);
            }
        }
    }
    p.family(
        "vm_exits_total",
        "VM exits handled in userspace, by vCPU and reason.",
        "counter",
    );
    for (i, s) in ctx.vcpu_stats.iter().enumerate() {
        for (reason, n) in s.exits() {
            p.sample(
                "vm_exits_total",
                &format!("vcpu=\"{i}\",reason=\"{reason}\""),
                n,
            );
        }
    }
    p.0
}

/// The IOAPIC's redirection table, decoded.
pub fn ioapic(ctx: &ApiContext) -> Value {
    let routes: Vec<(u8, crate::irq::RouteState)> = ctx
        .irq
        .gsi_counters()
        .into_iter()
        .filter_map(|c| match c.source {
            MsiSource::Ioapic { pin } => Some((pin, c.route)),
            _ => None,
        })
        .collect();
    let io = lock(&ctx.ioapic);
    let pins: Vec<Value> = (0..devices::ioapic::NUM_PINS)
        .filter_map(|pin| io.entry(pin).map(|e| (pin, e, io.stats(pin))))
        .map(|(pin, e, s)| {
            json!({
                "pin": pin,
                "raw": format!("{:#018x}", e.0),
                "vector": e.vector(),
                "delivery_mode": e.delivery_mode(),
                "dest": e.destination(),
                "dest_mode": if e.dest_logical() { "logical" } else { "physical" },
                "trigger": if e.level_triggered() { "level" } else { "edge" },
                "polarity": if e.active_low() { "low" } else { "high" },
                "masked": e.masked(),
                "remote_irr": e.remote_irr(),
                "delivery_status": e.delivery_status(),
                "raised": s.map_or(0, |s| s.raised),
                "delivered": s.map_or(0, |s| s.delivered),
            })
        })
        .map(|mut v| {
            let pin = v["pin"].as_u64().unwrap_or(u64::MAX);
            if let Some((_, r)) = routes.iter().find(|(p, _)| u64::from(*p) == pin) {
                route_fields(&mut v, r);
            }
            v
        })
        .collect();
    json!({ "pins": pins })
}

/// The VT-d unit's state and its last `n` faults.
pub fn iommu(ctx: &ApiContext, n: usize) -> Option<Value> {
    let v = ctx.vtd.as_ref()?;
    let st = v.state();
    let faults: Vec<Value> = v
        .fault_history()
        .into_iter()
        .rev()
        .take(n)
        .map(|(us, f)| {
            let b = Bdf {
                bus: (f.sid >> 8) as u8,
                device: ((f.sid >> 3) & 0x1f) as u8,
                function: (f.sid & 7) as u8,
            };
            if f.reason >= 0x20 {
                json!({
                    "at_us": us,
                    "device": b.to_string(),
                    "kind": "interrupt",
                    "index": format!("{:#x}", f.page >> 48),
                    "reason": format!("{:#04x}", f.reason),
                    "text": reason_text(f.reason),
                })
            } else {
                json!({
                    "at_us": us,
                    "device": b.to_string(),
                    "kind": "dma",
                    "direction": if f.read { "read" } else { "write" },
                    "address": format!("{:#x}", f.page),
                    "reason": format!("{:#04x}", f.reason),
                    "text": reason_text(f.reason),
                })
            }
        })
        .collect();
    Some(json!({
        "translation": st.gsts & devices::iommu::gcmd::TE != 0,
        "queued_invalidation": st.gsts & devices::iommu::gcmd::QIE != 0,
        "gsts": format!("{:#010x}", st.gsts),
        "root_table": format!("{:#x}", st.root),
        "fsts": format!("{:#010x}", st.fsts),
        "fault_event": {
            "masked": st.fectl & (1 << 31) != 0,
            "pending": st.fectl & (1 << 30) != 0,
            "vector": st.fe_msi.vector(),
            "dest": st.fe_msi.destination(),
        },
        "invalidation_queue": {"iqa": format!("{:#x}", st.iqa), "head": st.iqh >> 4, "tail": st.iqt >> 4},
        "interrupt_remapping": ir_table(ctx, v),
        "caching": caching_name(v),
        "stale_uses": stale_uses(v),
        "faults": faults,
    }))
}

fn caching_name(v: &devices::iommu::Vtd) -> &'static str {
    match v.caching() {
        devices::iommu::CachingMode::Simple => "simple",
        devices::iommu::CachingMode::Exact => "exact",
    }
}

/// Stale uses per cache (exact caching mode counts them).
fn stale_counts(v: &devices::iommu::Vtd) -> Value {
    let (n, _) = v.stale_uses();
    json!({"context": n[0], "iotlb": n[1], "irte": n[2],
           "invalidation_log_overruns": v.invalidation_overruns()})
}

/// The stale-use detector's counters and its history, newest first: each distinct stale
/// entry with the device, domain, address or index, uses and the missing invalidation.
fn stale_uses(v: &devices::iommu::Vtd) -> Value {
    let (_, hist) = v.stale_uses();
    let recent: Vec<Value> = hist
        .iter()
        .rev()
        .map(|r| {
            let sid = r.what.sid;
            let b = Bdf {
                bus: (sid >> 8) as u8,
                device: ((sid >> 3) & 0x1f) as u8,
                function: (sid & 7) as u8,
            };
            let mut e = json!({
                "cache": r.what.kind.name(),
                "device": b.to_string(),
                "uses": r.uses,
                "last_us": r.last_us,
                "missing": r.what.missing(),
                "text": r.what.describe(),
            });
            if r.what.kind == devices::iommu::StaleKind::Irte {
                e["index"] = json!(r.what.at);
            } else {
                e["domain"] = json!(r.what.did);
                e["iova"] = json!(format!("{:#x}", r.what.at));
            }
            e
        })
        .collect();
    let mut c = stale_counts(v);
    c["recent"] = json!(recent);
    c
}

/// Rows of the interrupt remapping table shown at most.
const IR_ROWS: u32 = 256;

/// The interrupt remapping table decoded: each present or cached entry with what it
/// routes (source, vector, destination, mode) and whether the cached copy is stale.
fn ir_table(ctx: &ApiContext, v: &devices::iommu::Vtd) -> Value {
    let t = v.ir_table();
    let st = v.state();
    // Who uses each index now (the raw messages of the routed GSIs).
    let users: Vec<(u32, String)> = ctx
        .irq
        .gsi_counters()
        .into_iter()
        .filter_map(|c| {
            let i = devices::iommu::ir::index_of(&c.msg)?;
            Some((i, source_text(c.source)))
        })
        .collect();
    let mut rows = Vec::new();
    for index in 0..t.entries.min(65536) {
        if rows.len() as u32 >= IR_ROWS {
            break;
        }
        let (mem, cached) = v.irte(index);
        let shown = cached.or(mem);
        let Some(e) = shown.filter(|e| e.present() || cached.is_some()) else {
            continue;
        };
        let used: Vec<&str> = users
            .iter()
            .filter(|(i, _)| *i == index)
            .map(|(_, s)| s.as_str())
            .collect();
        rows.push(json!({
            "index": index,
            "present": e.present(),
            "vector": format!("{:#04x}", e.vector()),
            "destination": e.destination(t.eime),
            "mode": if e.dest_logical() { "logical" } else { "physical" },
            "trigger": if e.level() { "level" } else { "edge" },
            "delivery": e.delivery_mode(),
            "sid": format!("{:#06x}", e.sid()),
            "svt": e.svt(),
            "cached": cached.is_some(),
            "stale": cached.is_some() && mem != cached,
            "users": used,
        }));
    }
    json!({
        "enabled": v.remapping(),
        "compat_allowed": st.gsts & devices::iommu::gcmd::CFI != 0,
        "table": format!("{:#x}", t.base),
        "entries": t.entries,
        "x2apic": t.eime,
        "rows": rows,
    })
}

/// Adds where a GSI's messages go under interrupt remapping to its JSON row: the IRTE
/// index and the vector and destination it translates to (`vector`/`dest` then name
/// what the guest receives; `raw_vector` keeps the programmed field), or why it is
/// blocked.
fn route_fields(v: &mut Value, r: &crate::irq::RouteState) {
    use crate::irq::RouteState;
    match r {
        RouteState::Direct => {}
        RouteState::Remapped { index, msg } => {
            v["raw_vector"] = v["vector"].clone();
            v["irte"] = json!(index);
            v["vector"] = json!(msg.vector());
            v["dest"] = json!(msg.destination());
        }
        RouteState::Blocked(f) => {
            v["irte"] = json!(f.index);
            v["blocked"] = json!(format!(
                "IR fault {:#x} ({})",
                f.reason as u8,
                f.reason.linux_text()
            ));
        }
        RouteState::Refused => v["blocked"] = json!("route refused by KVM"),
    }
}

fn source_text(s: MsiSource) -> String {
    match s {
        MsiSource::Ioapic { pin } => format!("IOAPIC pin {pin}"),
        MsiSource::Pci { bdf, vector } => format!(
            "MSI {:02x}:{:02x}.{} #{vector}",
            bdf >> 8,
            (bdf >> 3) & 0x1f,
            bdf & 7
        ),
        MsiSource::Platform => "platform".into(),
    }
}

fn reason_text(r: u8) -> &'static str {
    if let Some(ir) = devices::iommu::ir::IrFaultReason::from_code(r) {
        return ir.linux_text();
    }
    use devices::iommu::FaultReason::*;
    [
        RootNotPresent,
        ContextNotPresent,
        ContextInvalid,
        BeyondMgaw,
        WriteDenied,
        ReadDenied,
        NextTableInvalid,
        RootTableInvalid,
        ContextTableInvalid,
        RootReserved,
        ContextReserved,
        PteReserved,
    ]
    .into_iter()
    .find(|f| *f as u8 == r)
    .map_or("Unknown", |f| f.linux_text())
}
