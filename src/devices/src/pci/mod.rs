//! PCI: configuration space, MSI/MSI-X, the root bus (ECAM and ports 0xCF8/0xCFC), BAR
//! dispatch and the host bridge.
//!
//! A device implements [`PciDevice`]: it owns a [`PciConfig`] and answers BAR accesses.
//! [`PciInterrupts`] bundles MSI and MSI-X so that a device signals "vector n" and the
//! framework picks whichever the guest enabled.

pub mod bus;
pub mod config;
pub mod edu;
pub mod msi;
pub mod msix;
pub mod testdev;

pub use bus::{HostBridge, PciBarWindow, PciConfigIo, PciEcam, PciRoot};
pub use config::{Bar, BarKind, PciConfig};

/// A bus/device/function triple.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Bdf {
    /// Bus number.
    pub bus: u8,
    /// Device number (0..32).
    pub device: u8,
    /// Function number (0..8).
    pub function: u8,
}

impl Bdf {
    /// Device `device`, function 0, on bus 0.
    pub fn new(device: u8) -> Self {
        Self {
            bus: 0,
            device: device & 0x1f,
            function: 0,
        }
    }

    /// The 16-bit requester ID (bus 15:8, device 7:3, function 2:0).
    pub fn requester_id(&self) -> u16 {
        (u16::from(self.bus) << 8)
            | (u16::from(self.device & 0x1f) << 3)
            | u16::from(self.function & 7)
    }
}

impl std::fmt::Display for Bdf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:02x}:{:02x}.{}", self.bus, self.device, self.function)
    }
}

impl std::str::FromStr for Bdf {
    type Err = String;

    /// Parses `BB:DD.F` (hex bus and device, function 0..7), as lspci prints it.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let shown: String = s.chars().take(32).collect();
        let more = if s.chars().count() > 32 { "..." } else { "" };
        let err =
            || format!("'{shown}{more}' is not a PCI address of the form BB:DD.F (e.g. 00:04.0)");
        let (bus, rest) = s.split_once(':').ok_or_else(err)?;
        let (dev, func) = rest.split_once('.').ok_or_else(err)?;
        let bus = u8::from_str_radix(bus, 16).map_err(|_| err())?;
        let device = u8::from_str_radix(dev, 16).map_err(|_| err())?;
        let function = func.parse::<u8>().map_err(|_| err())?;
        if device > 0x1f || function > 7 {
            return Err(err());
        }
        Ok(Self {
            bus,
            device,
            function,
        })
    }
}

/// A PCI function as the bus sees it.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfig;
    /// Guest write to configuration space at `off` (already validated by the bus):
    /// the default applies the write masks. Devices with MSI/MSI-X override this to
    /// forward to [`PciInterrupts::config_write`].
    fn config_write(&mut self, off: usize, data: &[u8]);
    /// Guest read of BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// Guest write of BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// MSI and MSI-X of one function, with the "signal vector n" logic.
#[derive(Debug, Default)]
pub struct PciInterrupts {
    /// MSI capability, if the function has one.
    pub msi: Option<msi::Msi>,
    /// MSI-X capability, if the function has one.
    pub msix: Option<msix::Msix>,
    /// Messages not sent because bus mastering was off.
    pub blocked: u64,
}

/// What happened to a signalled vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// The message went out.
    Delivered,
    /// Masked: the pending bit is set.
    Pending,
    /// Neither MSI nor MSI-X is enabled, or the vector does not exist.
    Dropped,
    /// Bus mastering is off in the command register: the function may not send
    /// messages (an MSI is a memory write), so the interrupt is lost.
    Blocked,
}

impl PciInterrupts {
    /// Applies a configuration write and re-derives routes if it touched MSI or MSI-X.
    pub fn config_write(&mut self, config: &mut PciConfig, off: usize, data: &[u8]) {
        if !config.write(off, data) {
            return;
        }
        if let Some(m) = self.msi.as_mut().filter(|m| m.covers(off, data.len())) {
            m.update(config);
        }
        if let Some(m) = self.msix.as_mut().filter(|m| m.covers(off, data.len())) {
            m.update(config);
        }
    }

    /// Signals vector `v` through MSI-X if enabled, else MSI. Nothing goes out while
    /// the command register's bus-master bit is clear.
    pub fn signal(&mut self, config: &mut PciConfig, v: u16) -> Signal {
        let enabled = self.msix.as_ref().is_some_and(|m| m.enabled(config))
            || self.msi.as_ref().is_some_and(|m| m.enabled(config));
        if enabled && config.command() & config::CMD_BUS_MASTER == 0 {
            self.blocked += 1;
            return Signal::Blocked;
        }
        if let Some(m) = self.msix.as_mut().filter(|m| m.enabled(config)) {
            return match m.trigger(config, usize::from(v)) {
                true => Signal::Delivered,
                false if usize::from(v) < m.vectors() => Signal::Pending,
                false => Signal::Dropped,
            };
        }
        if let Some(m) = self.msi.as_mut().filter(|m| m.enabled(config)) {
            if !m.accepts(config, u32::from(v)) {
                return Signal::Dropped;
            }
            return match m.trigger(config, u32::from(v)) {
                true => Signal::Delivered,
                false => Signal::Pending,
            };
        }
        Signal::Dropped
    }

    /// Routes a BAR read to the MSI-X table/PBA if it lands there.
    pub fn bar_read(&self, bar: usize, offset: u64, data: &mut [u8]) -> bool {
        self.msix
            .as_ref()
            .is_some_and(|m| m.bar_read(bar, offset, data))
    }

    /// Routes a BAR write to the MSI-X table/PBA if it lands there.
    pub fn bar_write(&mut self, config: &PciConfig, bar: usize, offset: u64, data: &[u8]) -> bool {
        self.msix
            .as_mut()
            .is_some_and(|m| m.bar_write(config, bar, offset, data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bdf_parse_and_format() {
        let b: Bdf = "00:04.0".parse().expect("bdf");
        assert_eq!(b, Bdf::new(4));
        assert_eq!(b.to_string(), "00:04.0");
        assert_eq!(b.requester_id(), 0x20);
        for bad in ["", "4", "00:04", "00:20.0", "00:04.8", "zz:04.0", "00:04.x"] {
            assert!(bad.parse::<Bdf>().is_err(), "{bad}");
        }
    }
}
