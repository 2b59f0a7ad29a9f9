//! `--device KIND[,key=value...]`: which PCI devices (and ISA test devices) a VM gets.

use std::str::FromStr;

use devices::pci::Bdf;

/// Device models that `--device` can add.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceKind {
    /// `fv-test` (1234:fa17): raises MSI / MSI-X vectors and drives INTx on request;
    /// the probe guest's interrupt source.
    Test,
    /// edu-compatible (1234:11e8): QEMU's educational device with its DMA engine, whose
    /// transfers go through the IOMMU.
    Edu,
    /// virtio-rng over modern virtio-pci, offering VIRTIO_F_ACCESS_PLATFORM.
    VirtioRng,
    /// QEMU's pc-testdev (ISA ports 0xe0-0xeb and 0x2000-0x2017), for kvm-unit-tests.
    PcTestdev,
    /// The PC's cascaded 8259A pair (ports 0x20, 0xa0, 0x4d0) on vCPU 0's LINT0, for
    /// real-mode code.
    Pic,
    /// The MC146818 RTC and CMOS RAM (ports 0x70/0x71); its alarm wakes from ACPI S3.
    Rtc,
    /// virtio-blk (added with `--disk`, not `--device`).
    VirtioBlk,
}

impl DeviceKind {
    /// Names accepted on the command line.
    pub const NAMES: &'static [&'static str] =
        &["edu", "pc-testdev", "pic", "rtc", "test", "virtio-rng"];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Self::Test => "test",
            Self::Edu => "edu",
            Self::VirtioRng => "virtio-rng",
            Self::PcTestdev => "pc-testdev",
            Self::Pic => "pic",
            Self::Rtc => "rtc",
            Self::VirtioBlk => "virtio-blk",
        }
    }

    /// Whether the device sits on PCI (else it is an ISA device at fixed ports).
    pub fn is_pci(self) -> bool {
        !matches!(self, Self::PcTestdev | Self::Pic | Self::Rtc)
    }

    /// Whether the device does DMA (and so wants an IOMMU by default).
    pub fn does_dma(self) -> bool {
        matches!(self, Self::Edu | Self::VirtioRng | Self::VirtioBlk)
    }
}

/// One `--device` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceSpec {
    /// Model.
    pub kind: DeviceKind,
    /// Requested PCI address (`bdf=00:04.0`); the lowest free slot otherwise.
    pub bdf: Option<Bdf>,
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let name = parts.next().unwrap_or_default().trim();
        let kind = match name {
            "test" => DeviceKind::Test,
            "edu" => DeviceKind::Edu,
            "virtio-rng" => DeviceKind::VirtioRng,
            "pc-testdev" => DeviceKind::PcTestdev,
            "pic" => DeviceKind::Pic,
            "rtc" => DeviceKind::Rtc,
            "virtio-blk" => return Err("virtio-blk disks are added with --disk path=FILE".into()),
            "" => {
                return Err(format!(
                    "empty device name (known: {})",
                    DeviceKind::NAMES.join(", ")
                ))
            }
            other => {
                return Err(format!(
                    "unknown device '{other}' (known: {})",
                    DeviceKind::NAMES.join(", ")
                ))
            }
        };
        let mut spec = DeviceSpec { kind, bdf: None };
        for opt in parts {
            let (k, v) = opt
                .split_once('=')
                .ok_or_else(|| format!("device {name}: '{opt}' is not key=value"))?;
            match k {
                "bdf" if !kind.is_pci() => {
                    return Err(format!("device {name}: an ISA device has no PCI address"))
                }
                "bdf" => {
                    let bdf: Bdf = v.parse().map_err(|e| format!("device {name}: bdf: {e}"))?;
                    if bdf.bus != 0 || bdf.function != 0 || bdf.device == 0 {
                        return Err(format!(
                            "device {name}: bdf={v}: use 00:DD.0 with DD between 01 and 1f \
                             (00:00.0 is the host bridge)"
                        ));
                    }
                    spec.bdf = Some(bdf);
                }
                _ => return Err(format!("device {name}: unknown option '{k}' (known: bdf)")),
            }
        }
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let d: DeviceSpec = "test".parse().expect("test");
        assert_eq!(d.kind, DeviceKind::Test);
        assert_eq!(d.bdf, None);
        let d: DeviceSpec = "test,bdf=00:05.0".parse().expect("bdf");
        assert_eq!(d.bdf, Some(Bdf::new(5)));
        let d: DeviceSpec = "edu,bdf=00:04.0".parse().expect("edu");
        assert_eq!((d.kind, d.bdf), (DeviceKind::Edu, Some(Bdf::new(4))));
        assert!(d.kind.does_dma() && !DeviceKind::Test.does_dma());
        for (bad, msg) in [
            ("", "empty device name"),
            (
                "nope",
                "unknown device 'nope' (known: edu, pc-testdev, pic, rtc, test, virtio-rng)",
            ),
            ("test,bdf", "'bdf' is not key=value"),
            ("test,bdf=zz", "bdf: 'zz' is not a PCI address"),
            ("test,bdf=00:00.0", "00:00.0 is the host bridge"),
            ("test,bdf=01:02.0", "use 00:DD.0"),
            ("test,speed=3", "unknown option 'speed'"),
            ("pc-testdev,bdf=00:03.0", "an ISA device has no PCI address"),
            ("pic,bdf=00:03.0", "an ISA device has no PCI address"),
            ("rtc,bdf=00:03.0", "an ISA device has no PCI address"),
        ] {
            let e = bad.parse::<DeviceSpec>().expect_err(bad);
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }
}

/// `--iommu`: whether the VM gets the VT-d unit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum IommuMode {
    /// Intel VT-d when a device does DMA, none otherwise.
    #[default]
    Auto,
    /// Always an Intel VT-d unit (with its DMAR table).
    Intel,
    /// No IOMMU: devices reach guest memory directly.
    Off,
}

impl FromStr for IommuMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "intel" => Ok(Self::Intel),
            "off" => Ok(Self::Off),
            "auto" => Ok(Self::Auto),
            _ => Err(format!("'{s}' is not an IOMMU mode (intel, off or auto)")),
        }
    }
}

impl IommuMode {
    /// Whether a VM with `devices` gets the unit.
    pub fn enabled(self, devices: &[DeviceSpec]) -> bool {
        match self {
            Self::Intel => true,
            Self::Off => false,
            Self::Auto => devices.iter().any(|d| d.kind.does_dma()),
        }
    }
}

/// How the unit's caches follow invalidations (`caching=simple|exact`).
pub type Caching = devices::iommu::CachingMode;

/// `--iommu MODE[,OPTION=VALUE]...`: the unit and its options.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IommuConfig {
    /// Whether there is a unit.
    pub mode: IommuMode,
    /// Offer interrupt remapping (ECAP.IR and EIM, the DMAR INTR_REMAP flag).
    pub no_intremap: bool,
    /// How IOAPIC messages' source IDs are verified under interrupt remapping.
    pub ioapic_sid: devices::iommu::IoapicSidCheck,
    /// How the caches follow invalidations (exact mode also detects stale uses).
    pub caching: Caching,
    /// Leave out extended interrupt mode (ECAP.EIM; the DMAR table then opts out of
    /// x2APIC), as QEMU's `eim=off`: remapped interrupts reach 8-bit APIC IDs only.
    pub no_eim: bool,
}

impl FromStr for IommuConfig {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let mut c = IommuConfig {
            mode: parts.next().unwrap_or("").parse()?,
            ..Default::default()
        };
        for p in parts {
            let (k, v) = p
                .split_once('=')
                .ok_or_else(|| format!("'{p}' is not an IOMMU option (KEY=VALUE)"))?;
            match (k, v) {
                ("intremap", "on") => c.no_intremap = false,
                ("intremap", "off") => c.no_intremap = true,
                ("ioapic-sid", "strict") => c.ioapic_sid = devices::iommu::IoapicSidCheck::Strict,
                ("ioapic-sid", "any") => c.ioapic_sid = devices::iommu::IoapicSidCheck::Any,
                ("caching", "simple") => c.caching = Caching::Simple,
                ("caching", "exact") => c.caching = Caching::Exact,
                ("eim", "on") => c.no_eim = false,
                ("eim", "off") => c.no_eim = true,
                ("intremap" | "ioapic-sid" | "caching" | "eim", _) => {
                    return Err(format!(
                        "'{v}' is not a value of IOMMU option {k} ({})",
                        match k {
                            "intremap" | "eim" => "on or off",
                            "ioapic-sid" => "strict or any",
                            _ => "simple or exact",
                        }
                    ))
                }
                _ => {
                    return Err(format!(
                        "'{k}' is not an IOMMU option (intremap, ioapic-sid, caching, eim)"
                    ))
                }
            }
        }
        if c.mode == IommuMode::Off && s.contains(',') {
            return Err("IOMMU options need an IOMMU (intel or auto)".into());
        }
        Ok(c)
    }
}

impl IommuConfig {
    /// Whether a VM with `devices` gets the unit.
    pub fn enabled(self, devices: &[DeviceSpec]) -> bool {
        self.mode.enabled(devices)
    }
}

#[cfg(test)]
mod iommu_config_tests {
    use super::*;

    #[test]
    fn options_parse_and_errors_name_them() {
        let c: IommuConfig = "intel,ioapic-sid=any,caching=exact,intremap=off"
            .parse()
            .expect("valid");
        assert_eq!(c.mode, IommuMode::Intel);
        assert!(c.no_intremap);
        assert_eq!(c.caching, Caching::Exact);
        assert_eq!(c.ioapic_sid, devices::iommu::IoapicSidCheck::Any);
        assert_eq!("auto".parse::<IommuConfig>(), Ok(IommuConfig::default()));
        for (bad, want) in [
            ("intel,colour=red", "'colour' is not an IOMMU option"),
            ("intel,caching=lazy", "not a value of IOMMU option caching"),
            ("intel,ioapic-sid", "not an IOMMU option (KEY=VALUE)"),
            ("off,caching=exact", "need an IOMMU"),
            ("amd", "not an IOMMU mode"),
        ] {
            let e = bad.parse::<IommuConfig>().expect_err(bad);
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
