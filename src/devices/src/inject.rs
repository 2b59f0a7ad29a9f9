//! Interrupt fault injection: drop, delay or duplicate the next N interrupts of a PCI
//! device, an IOAPIC pin or a vector.
//!
//! The VMM's interrupt controller asks [`IrqFaults::decide`] before it raises any
//! message; with no rule armed that is one atomic load.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::interrupt::{MsiMessage, MsiSource};
use crate::sync::lock;

/// Which interrupts a rule matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IrqTarget {
    /// Every message with this vector.
    Vector(u8),
    /// Every MSI/MSI-X message of this requester ID.
    Device(u16),
    /// Every message of this IOAPIC pin.
    Pin(u8),
}

impl IrqTarget {
    fn matches(self, source: MsiSource, msg: &MsiMessage) -> bool {
        match (self, source) {
            (Self::Vector(v), _) => msg.vector() == v,
            (Self::Device(d), MsiSource::Pci { bdf, .. }) => bdf == d,
            (Self::Pin(p), MsiSource::Ioapic { pin }) => pin == p,
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
}

/// The rule set.
#[derive(Debug, Default)]
pub struct IrqFaults {
    armed: AtomicBool,
    next_id: AtomicU64,
    rules: Mutex<Vec<IrqRule>>,
    stats: Mutex<IrqFaultStats>,
}

impl IrqFaults {
    /// No rules.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms a rule for the next `count` matching interrupts; returns its id.
    pub fn add(&self, target: IrqTarget, action: IrqAction, count: u32) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut r = lock(&self.rules);
        r.push(IrqRule {
            id,
            target,
            action,
            remaining: count,
        });
        self.armed.store(true, Ordering::Release);
        id
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
        if !self.armed() {
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
        f.add(IrqTarget::Device(0x20), IrqAction::Drop, 2);
        f.add(IrqTarget::Vector(0x41), IrqAction::Duplicate(3), 1);
        f.add(
            IrqTarget::Pin(4),
            IrqAction::Delay(Duration::from_millis(5)),
            1,
        );
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
                duplicated: 1
            }
        );
        assert_eq!(f.decide(MsiSource::Platform, &msg(0x41)), None);
    }
}
