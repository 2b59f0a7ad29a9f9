//! Interrupt fault injection: drop, delay or duplicate the next N interrupts of a PCI
//! device, an IOAPIC pin or a vector.
//!
//! The VMM's interrupt controller asks [`IrqFaults::decide`] before it raises any
//! message; with no rule armed that is one atomic load, and with rules armed an
//! interrupt that no rule can match (checked against bitmaps of the targeted vectors
//! and pins) takes no lock either. At most [`MAX_RULES`] rules are armed at once, and
//! delayed or duplicated interrupts still to be delivered are budgeted: arming a rule
//! reserves what it may schedule, so that at most [`MAX_PENDING`] ever wait.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::interrupt::{MsiMessage, MsiSource};
use crate::sync::lock;

/// Which interrupts a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqTarget {
    /// Every message with this vector (of the message as the source sends it).
    Vector(u8),
    /// Every MSI/MSI-X message of this requester ID.
    Device(u16),
    /// Every message of this IOAPIC pin.
    Pin(u8),
    /// Every remappable-format message that looks up this interrupt index.
    Index(u16),
}

impl IrqTarget {
    fn matches(self, source: MsiSource, msg: &MsiMessage) -> bool {
        match (self, source) {
            (Self::Vector(v), _) => msg.vector() == v,
            (Self::Device(d), MsiSource::Pci { bdf, .. }) => bdf == d,
            (Self::Pin(p), MsiSource::Ioapic { pin }) => pin == p,
            (Self::Index(i), _) => crate::iommu::ir::index_of(msg) == Some(u32::from(i)),
            _ => false,
        }
    }
}

/// What happens to a matching interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqAction {
    /// It is lost.
    Drop,
    /// It arrives this much later.
    Delay(Duration),
    /// It arrives, then this many copies more.
    Duplicate(u32),
    /// Its interrupt-remapping lookup fails with this reason (recorded as a fault by
    /// the VT-d unit, as if its IRTE said so); nothing is delivered.
    IrteFault(crate::iommu::ir::IrFaultReason),
}

/// The verdict for one interrupt.
pub type Decision = Option<IrqAction>;

/// An armed rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqRule {
    /// Identifier returned when armed.
    pub id: u64,
    /// What it matches.
    pub target: IrqTarget,
    /// What it does.
    pub action: IrqAction,
    /// Interrupts it still applies to.
    pub remaining: u32,
}

/// Counters of what the rules did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqFaultStats {
    /// Interrupts dropped.
    pub dropped: u64,
    /// Interrupts delayed.
    pub delayed: u64,
    /// Interrupts duplicated (each counts once).
    pub duplicated: u64,
    /// Interrupts blocked by an injected IRTE fault.
    pub irte_faults: u64,
}

/// Rules armed at once, at most.
pub const MAX_RULES: usize = 64;
/// Delayed or duplicated interrupts armed or waiting, at most.
pub const MAX_PENDING: u64 = 65536;

/// Why a rule was not armed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ArmError {
    /// [`MAX_RULES`] rules are armed already.
    #[error("{MAX_RULES} interrupt rules are armed already; wait until some are used up")]
    TooManyRules,
    /// The rule would schedule more interrupts than the budget has left.
    #[error("the rule would schedule {wanted} delayed or duplicated interrupts, but only {available} of {MAX_PENDING} are left")]
    TooManyPending {
        /// What the rule needs.
        wanted: u64,
        /// What is left.
        available: u64,
    },
}

impl IrqAction {
    /// Interrupts one use of the rule schedules for later.
    fn scheduled(self) -> u64 {
        match self {
            Self::Drop | Self::IrteFault(_) => 0,
            Self::Delay(_) => 1,
            Self::Duplicate(n) => u64::from(n),
        }
    }
}

/// The rule set.
#[derive(Debug, Default)]
pub struct IrqFaults {
    armed: AtomicBool,
    next_id: AtomicU64,
    rules: Mutex<Vec<IrqRule>>,
    stats: Mutex<IrqFaultStats>,
    /// Vectors that a rule targets (256 bits).
    vectors: [AtomicU64; 4],
    /// Pins that a rule targets.
    pins: AtomicU64,
    /// Rules that target a device or an interrupt index.
    device_rules: AtomicU32,
    /// Interrupts reserved by armed rules or waiting in the scheduler.
    pending: AtomicU64,
}

impl IrqFaults {
    /// No rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a rule for the next `count` matching interrupts; returns its id.
    pub fn add(&self, target: IrqTarget, action: IrqAction, count: u32) -> Result<u64, ArmError> {
        let mut r = lock(&self.rules);
        if r.len() >= MAX_RULES {
            crate::limits::hit(crate::limits::Cap::IrqRules);
            return Err(ArmError::TooManyRules);
        }
        let wanted = action.scheduled().saturating_mul(u64::from(count));
        let reserved = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                p.checked_add(wanted).filter(|t| *t <= MAX_PENDING)
            });
        if let Err(p) = reserved {
            crate::limits::hit(crate::limits::Cap::PendingIrqs);
            return Err(ArmError::TooManyPending {
                wanted,
                available: MAX_PENDING.saturating_sub(p),
            });
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        r.push(IrqRule {
            id,
            target,
            action,
            remaining: count,
        });
        self.reindex(&r);
        self.armed.store(true, Ordering::Release);
        Ok(id)
    }

    /// Rebuilds the match bitmaps from the armed rules.
    fn reindex(&self, rules: &[IrqRule]) {
        let (mut vectors, mut pins, mut devices) = ([0u64; 4], 0u64, 0u32);
        for rule in rules {
            match rule.target {
                IrqTarget::Vector(v) => vectors[usize::from(v / 64)] |= 1 << (v % 64),
                IrqTarget::Pin(p) => pins |= 1u64.checked_shl(u32::from(p)).unwrap_or(0),
                IrqTarget::Device(_) | IrqTarget::Index(_) => devices += 1,
            }
        }
        for (a, v) in self.vectors.iter().zip(vectors) {
            a.store(v, Ordering::Release);
        }
        self.pins.store(pins, Ordering::Release);
        self.device_rules.store(devices, Ordering::Release);
    }

    /// Whether some armed rule could match (no lock).
    fn may_match(&self, source: MsiSource, msg: &MsiMessage) -> bool {
        let v = msg.vector();
        if self.vectors[usize::from(v / 64)].load(Ordering::Acquire) & (1 << (v % 64)) != 0 {
            return true;
        }
        match source {
            MsiSource::Ioapic { pin } => {
                self.pins.load(Ordering::Acquire) & 1u64.checked_shl(u32::from(pin)).unwrap_or(0)
                    != 0
                    // Index rules match IOAPIC messages too (remappable entries).
                    || self.device_rules.load(Ordering::Acquire) > 0
            }
            MsiSource::Pci { .. } => self.device_rules.load(Ordering::Acquire) > 0,
            MsiSource::Platform => false,
        }
    }

    /// One scheduled interrupt was delivered (or given up): its budget is free again.
    pub fn release(&self, n: u64) {
        let _ = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
                Some(p.saturating_sub(n))
            });
    }

    /// Delayed or duplicated interrupts armed or waiting.
    pub fn pending(&self) -> u64 {
        self.pending.load(Ordering::Acquire)
    }

    /// Whether any rule is armed (one atomic load).
    pub fn armed(&self) -> bool {
        self.armed.load(Ordering::Acquire)
    }

    /// Rules still armed.
    pub fn rules(&self) -> Vec<IrqRule> {
        lock(&self.rules).clone()
    }

    /// Counters.
    pub fn stats(&self) -> IrqFaultStats {
        *lock(&self.stats)
    }

    /// Decides the fate of one interrupt from `source` carrying `msg`: `None` delivers
    /// it normally. The first armed rule that matches applies and is used up.
    pub fn decide(&self, source: MsiSource, msg: &MsiMessage) -> Decision {
        if !self.armed() || !self.may_match(source, msg) {
            return None;
        }
        let mut rules = lock(&self.rules);
        let i = rules
            .iter()
            .position(|r| r.remaining > 0 && r.target.matches(source, msg))?;
        let action = rules[i].action;
        rules[i].remaining -= 1;
        if rules[i].remaining == 0 {
            rules.remove(i);
            self.reindex(&rules);
        }
        if rules.is_empty() {
            self.armed.store(false, Ordering::Release);
        }
        drop(rules);
        let mut s = lock(&self.stats);
        match action {
            IrqAction::Drop => s.dropped += 1,
            IrqAction::Delay(_) => s.delayed += 1,
            IrqAction::Duplicate(_) => s.duplicated += 1,
            IrqAction::IrteFault(_) => s.irte_faults += 1,
        }
        Some(action)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(v: u8) -> MsiMessage {
        MsiMessage {
            address: 0xfee0_0000,
            data: u32::from(v),
        }
    }

    #[test]
    fn rules_match_count_down_and_disarm() {
        let f = IrqFaults::new();
        let pci = MsiSource::Pci {
            bdf: 0x20,
            vector: 0,
        };
        assert_eq!(f.decide(pci, &msg(0x40)), None);
        f.add(IrqTarget::Device(0x20), IrqAction::Drop, 2)
            .expect("armed");
        f.add(IrqTarget::Vector(0x41), IrqAction::Duplicate(3), 1)
            .expect("armed");
        f.add(
            IrqTarget::Pin(4),
            IrqAction::Delay(Duration::from_millis(5)),
            1,
        )
        .expect("armed");
        assert_eq!(f.pending(), 4, "3 copies and 1 delay reserved");
        assert_eq!(
            f.decide(
                MsiSource::Pci {
                    bdf: 0x28,
                    vector: 0
                },
                &msg(0x40)
            ),
            None
        );
        assert_eq!(f.decide(pci, &msg(0x40)), Some(IrqAction::Drop));
        assert_eq!(f.decide(pci, &msg(0x40)), Some(IrqAction::Drop));
        assert_eq!(f.decide(pci, &msg(0x40)), None, "used up");
        assert_eq!(
            f.decide(MsiSource::Ioapic { pin: 4 }, &msg(0x41)),
            Some(IrqAction::Duplicate(3)),
            "the vector rule was armed first"
        );
        assert_eq!(
            f.decide(MsiSource::Ioapic { pin: 4 }, &msg(0x41)),
            Some(IrqAction::Delay(Duration::from_millis(5)))
        );
        assert!(f.rules().is_empty());
        assert_eq!(
            f.stats(),
            IrqFaultStats {
                dropped: 2,
                delayed: 1,
                duplicated: 1,
                irte_faults: 0
            }
        );
        assert_eq!(f.decide(MsiSource::Platform, &msg(0x41)), None);
        f.release(4);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn rules_and_pending_interrupts_are_capped() {
        let f = IrqFaults::new();
        for i in 0..MAX_RULES {
            f.add(IrqTarget::Pin((i % 24) as u8), IrqAction::Drop, 1)
                .expect("under the cap");
        }
        assert_eq!(
            f.add(IrqTarget::Pin(1), IrqAction::Drop, 1),
            Err(ArmError::TooManyRules)
        );
        let f = IrqFaults::new();
        f.add(IrqTarget::Vector(0x40), IrqAction::Duplicate(100), 600)
            .expect("60000 copies fit");
        assert_eq!(
            f.add(IrqTarget::Vector(0x40), IrqAction::Duplicate(100), 100),
            Err(ArmError::TooManyPending {
                wanted: 10_000,
                available: MAX_PENDING - 60_000
            })
        );
        // Interrupts that no rule targets never take the lock.
        assert!(!f.may_match(MsiSource::Ioapic { pin: 3 }, &msg(0x41)));
        assert!(f.may_match(MsiSource::Ioapic { pin: 3 }, &msg(0x40)));
    }
}
