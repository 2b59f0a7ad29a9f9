//! Platform discovery from ACPI: RSDP, XSDT/RSDT, MADT, MCFG, FADT and the `\_S5`
//! sleep type in the DSDT.

use alloc::vec::Vec;

use crate::ioapic::IoApic;

/// What the probe learns from the tables.
#[derive(Clone, Debug, Default)]
pub struct Platform {
    /// Physical address of the RSDP.
    pub rsdp: u64,
    /// Table signatures seen (for the report).
    pub tables: Vec<[u8; 4]>,
    /// Local APIC MMIO base.
    pub lapic_base: u64,
    /// APIC IDs of the enabled processors, in MADT order.
    pub cpus: Vec<u32>,
    /// IOAPICs.
    pub ioapics: Vec<IoApic>,
    /// Interrupt source overrides: (ISA IRQ, GSI, MPS flags).
    pub overrides: Vec<(u8, u32, u16)>,
    /// Whether the MADT says there is an 8259 pair (PCAT_COMPAT).
    pub pcat_compat: bool,
    /// ECAM base of segment 0 and its bus range.
    pub ecam: Option<(u64, u8, u8)>,
    /// How to power off (S5).
    pub poweroff: Option<PowerOff>,
    /// From the DMAR table: (host address width, DRHD register base, INCLUDE_PCI_ALL,
    /// IOAPIC scope source ID).
    pub dmar: Option<Dmar>,
}

/// What the DMAR table says.
#[derive(Clone, Copy, Debug, Default)]
pub struct Dmar {
    /// Host address width in bits.
    pub haw: u8,
    /// Register base of the first DRHD.
    pub base: u64,
    /// DRHD flags bit 0.
    pub include_all: bool,
    /// Source ID of the first IOAPIC device scope (bus << 8 | devfn).
    pub ioapic_sid: Option<u16>,
}

fn parse_dmar(t: &[u8]) -> Option<Dmar> {
    let mut d = Dmar {
        haw: t.get(36)?.wrapping_add(1),
        ..Default::default()
    };
    let mut o = 48;
    while o + 4 <= t.len() {
        let (ty, len) = (u16_at(t, o), usize::from(u16_at(t, o + 2)));
        if len < 4 || o + len > t.len() {
            break;
        }
        if ty == 0 && len >= 16 && d.base == 0 {
            d.base = u64_at(t, o + 8);
            d.include_all = t[o + 4] & 1 != 0;
            let mut s = o + 16;
            while s + 6 <= o + len {
                let slen = usize::from(t[s + 1]);
                if slen < 6 || s + slen > o + len {
                    break;
                }
                if t[s] == 3 && slen >= 8 {
                    let devfn = (t[s + 6] << 3) | (t[s + 7] & 7);
                    d.ioapic_sid = Some((u16::from(t[s + 5]) << 8) | u16::from(devfn));
                }
                s += slen;
            }
        }
        o += len;
    }
    (d.base != 0).then_some(d)
}

/// An S5 request.
#[derive(Clone, Copy, Debug)]
pub enum PowerOff {
    /// Hardware-reduced ACPI: write `(typ << 2) | 0x20` to the sleep control I/O port.
    SleepControl {
        /// Port.
        port: u16,
        /// SLP_TYP.
        typ: u8,
    },
    /// Legacy: enable ACPI mode through SMI_CMD if needed, then write
    /// `(typ << 10) | 0x2000` to PM1a_CNT.
    Pm1a {
        /// Port.
        port: u16,
        /// SLP_TYP.
        typ: u8,
        /// SMI command port (0: none).
        smi_cmd: u16,
        /// Value that switches to ACPI mode.
        acpi_enable: u8,
    },
}

impl Platform {
    /// The GSI of ISA IRQ `irq` and whether it is level-triggered / active-low.
    pub fn isa_gsi(&self, irq: u8) -> (u32, bool, bool) {
        for &(src, gsi, flags) in &self.overrides {
            if src == irq {
                let level = flags & 0xc == 0xc;
                let low = flags & 0x3 == 0x3;
                return (gsi, level, low);
            }
        }
        (u32::from(irq), false, false)
    }

    /// The IOAPIC serving `gsi` and the pin on it.
    pub fn pin(&self, gsi: u32) -> Option<(IoApic, u32)> {
        self.ioapics.iter().find_map(|io| {
            let (_, pins) = io.version();
            (gsi >= io.gsi_base && gsi < io.gsi_base + pins).then(|| (*io, gsi - io.gsi_base))
        })
    }
}

/// Copies `len` bytes of guest-physical memory (identity-mapped, below 4 GiB).
fn phys(addr: u64, len: usize) -> Option<&'static [u8]> {
    if addr == 0 || addr.checked_add(len as u64)? > 0x1_0000_0000 || len > 1 << 20 {
        return None;
    }
    // SAFETY: the first 4 GiB are identity-mapped and readable (RAM or MMIO that
    // reads as something); the range was bounds-checked above.
    Some(unsafe { core::slice::from_raw_parts(addr as *const u8, len) })
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    b.get(o..o + 2)
        .map_or(0, |s| u16::from_le_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from(u32_at(b, o)) | (u64::from(u32_at(b, o + 4)) << 32)
}

fn checksum_ok(b: &[u8]) -> bool {
    b.iter().fold(0u8, |a, &x| a.wrapping_add(x)) == 0
}

/// A table with a valid header and checksum at `addr`.
fn table(addr: u64) -> Option<&'static [u8]> {
    let hdr = phys(addr, 36)?;
    let len = u32_at(hdr, 4) as usize;
    if len < 36 {
        return None;
    }
    let t = phys(addr, len)?;
    checksum_ok(t).then_some(t)
}

fn rsdp_at(addr: u64) -> bool {
    phys(addr, 20).is_some_and(|b| &b[0..8] == b"RSD PTR " && checksum_ok(b))
}

/// Finds the RSDP: the address the loader gave, else the EBDA and the BIOS area.
pub fn find_rsdp(hint: u64) -> Option<u64> {
    if hint != 0 && rsdp_at(hint) {
        return Some(hint);
    }
    let ebda = phys(0x40e, 2).map_or(0, |b| u64::from(u16_at(b, 0)) << 4);
    let ranges = [(ebda, ebda + 1024), (0xe0000, 0x100000)];
    for (start, end) in ranges {
        if start == 0 {
            continue;
        }
        let mut a = start & !15;
        while a < end {
            if rsdp_at(a) {
                return Some(a);
            }
            a += 16;
        }
    }
    None
}

/// Reads the platform description starting from the RSDP at `rsdp`.
pub fn discover(rsdp: u64) -> Result<Platform, &'static str> {
    let r = phys(rsdp, 36).ok_or("RSDP unreadable")?;
    let mut p = Platform {
        rsdp,
        lapic_base: 0xfee0_0000,
        ..Default::default()
    };
    let (root, entry) = if r[15] >= 2 && u64_at(r, 24) != 0 {
        (u64_at(r, 24), 8)
    } else {
        (u64::from(u32_at(r, 16)), 4)
    };
    let root = table(root).ok_or("XSDT/RSDT missing or bad checksum")?;
    let mut off = 36;
    while off + entry <= root.len() {
        let a = if entry == 8 {
            u64_at(root, off)
        } else {
            u64::from(u32_at(root, off))
        };
        off += entry;
        let Some(t) = table(a) else { continue };
        let mut sig = [0u8; 4];
        sig.copy_from_slice(&t[0..4]);
        p.tables.push(sig);
        match &sig {
            b"APIC" => parse_madt(t, &mut p),
            b"MCFG" if t.len() >= 60 => p.ecam = Some((u64_at(t, 44), t[54], t[55])),
            b"FACP" => p.poweroff = parse_fadt(t),
            b"DMAR" => p.dmar = parse_dmar(t),
            _ => {}
        }
    }
    if p.cpus.is_empty() {
        return Err("no MADT or no enabled processor in it");
    }
    Ok(p)
}

fn parse_madt(t: &[u8], p: &mut Platform) {
    p.lapic_base = u64::from(u32_at(t, 36));
    p.pcat_compat = u32_at(t, 40) & 1 != 0;
    let mut o = 44;
    while o + 2 <= t.len() {
        let (ty, len) = (t[o], usize::from(t[o + 1]));
        if len < 2 || o + len > t.len() {
            break;
        }
        let e = &t[o..o + len];
        match ty {
            0 if len >= 8 && u32_at(e, 4) & 1 != 0 => p.cpus.push(u32::from(e[3])),
            1 if len >= 12 => p.ioapics.push(IoApic {
                id: e[2],
                base: u64::from(u32_at(e, 4)),
                gsi_base: u32_at(e, 8),
            }),
            2 if len >= 10 => p.overrides.push((e[3], u32_at(e, 4), u16_at(e, 8))),
            5 if len >= 12 => p.lapic_base = u64_at(e, 4),
            9 if len >= 16 && u32_at(e, 8) & 1 != 0 => {
                let id = u32_at(e, 4);
                if !p.cpus.contains(&id) {
                    p.cpus.push(id);
                }
            }
            _ => {}
        }
        o += len;
    }
}

fn parse_fadt(t: &[u8]) -> Option<PowerOff> {
    let dsdt = if t.len() >= 148 && u64_at(t, 140) != 0 {
        u64_at(t, 140)
    } else {
        u64::from(u32_at(t, 40))
    };
    let typ = table(dsdt).and_then(s5_type).unwrap_or(0);
    let hw_reduced = t.len() >= 116 && u32_at(t, 112) & (1 << 20) != 0;
    if hw_reduced && t.len() >= 256 && t[244] == 1 {
        return Some(PowerOff::SleepControl {
            port: u64_at(t, 248) as u16,
            typ,
        });
    }
    let pm1a = u32_at(t, 64);
    (pm1a != 0).then_some(PowerOff::Pm1a {
        port: pm1a as u16,
        typ,
        smi_cmd: u32_at(t, 48) as u16,
        acpi_enable: t.get(52).copied().unwrap_or(0),
    })
}

/// SLP_TYPa of the `\_S5` package in AML (`Name(_S5, Package(){ a, b, .. })`).
fn s5_type(dsdt: &[u8]) -> Option<u8> {
    let pos = dsdt.windows(4).position(|w| w == b"_S5_")?;
    let mut i = pos + 4;
    if *dsdt.get(i)? != 0x12 {
        return None; // not a PackageOp
    }
    i += 1;
    let lead = *dsdt.get(i)?;
    i += 1 + usize::from(lead >> 6); // PkgLength bytes
    i += 1; // NumElements
    match *dsdt.get(i)? {
        0x0a => dsdt.get(i + 1).copied(), // BytePrefix
        0x00 => Some(0),
        0x01 => Some(1),
        b => Some(b),
    }
}

impl PowerOff {
    /// Requests S5 (returns if the platform ignored it).
    pub fn request(self) {
        use crate::cpu::{inw, outb, outw, wait_until};
        match self {
            Self::SleepControl { port, typ } => outb(port, ((typ & 7) << 2) | 0x20),
            Self::Pm1a {
                port,
                typ,
                smi_cmd,
                acpi_enable,
            } => {
                const SCI_EN: u16 = 1;
                if inw(port) & SCI_EN == 0 && smi_cmd != 0 && acpi_enable != 0 {
                    outb(smi_cmd, acpi_enable);
                    wait_until(100_000_000, || inw(port) & SCI_EN != 0);
                }
                let v = (inw(port) & !(7 << 10)) | (u16::from(typ & 7) << 10) | 0x2000;
                outw(port, v);
            }
        }
    }
}
