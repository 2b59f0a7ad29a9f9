//! ACPI tables (ACPI 6.4): RSDP → XSDT → {FADT → DSDT and FACS, MADT, MCFG, extra
//! tables}, built with the `acpi_tables` crate where it has a builder, placed in the
//! reserved area at [`layout::ACPI_START`]. The platform is hardware-reduced: no PM
//! timer, no SCI, no 8259 in the MADT; power-off and reset go through the FADT's
//! sleep-control and reset registers. The FADT also names the PM1a event and control
//! blocks and the FACS (waking vector), which firmware-style code uses for S3 and an OS
//! honouring HW_REDUCED_ACPI ignores.
//!
//! Extra tables (the IOMMU's DMAR comes this way) are passed in as finished bytes.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, EISAName, Interrupt, Name, Package,
    ResourceTemplate, IO,
};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout;

/// OEM ID in every table.
pub const OEM_ID: [u8; 6] = *b"FLTVSR";
/// OEM table ID in every table.
pub const OEM_TABLE_ID: [u8; 8] = *b"FAULTVSR";
const OEM_REVISION: u32 = 1;
/// IAPC_BOOT_ARCH: VGA not present (bit 2), CMOS RTC not present (bit 5). No 8042 bit:
/// the i8042 exists only for its reset line.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 5);

/// Platform facts the tables describe.
#[derive(Clone, Debug)]
pub struct AcpiConfig {
    /// Number of vCPUs (APIC IDs 0..n).
    pub nr_vcpus: u32,
    /// IOAPIC MMIO base.
    pub ioapic_address: u32,
    /// ECAM base (bus 0 only).
    pub ecam_base: u64,
    /// 32-bit PCI window (base, size).
    pub pci_mmio32: (u64, u64),
    /// 64-bit PCI window (base, size).
    pub pci_mmio64: (u64, u64),
    /// Port of the sleep control register; status is at +1, reset at +2.
    pub pm_port: u16,
    /// Value for the reset register.
    pub reset_value: u8,
    /// SLP_TYP value of S5.
    pub s5_slp_typ: u8,
    /// COM1 port and IRQ (GSI).
    pub com1: (u16, u32),
    /// Finished extra tables to list in the XSDT (e.g. DMAR).
    pub extra_tables: Vec<Vec<u8>>,
}

/// Errors of building the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit in the reserved area.
    #[error("ACPI tables ({0} bytes) do not fit in the reserved area")]
    TooBig(u64),
    /// Guest memory write failed.
    #[error("cannot write ACPI tables: {0}")]
    Memory(String),
    /// More vCPUs than the MADT's 8-bit APIC IDs allow.
    #[error("{0} vCPUs are more than the tables describe (max 4096)")]
    TooManyCpus(u32),
}

/// Interrupt Source Override (MADT type 2): bus, source IRQ, GSI, MPS INTI flags.
fn iso(bus: u8, source: u8, gsi: u32, flags: u16) -> Vec<u8> {
    let mut v = vec![2u8, 10, bus, source];
    v.extend_from_slice(&gsi.to_le_bytes());
    v.extend_from_slice(&flags.to_le_bytes());
    v
}

/// Local APIC NMI (MADT type 4): processor UID (0xff = all), flags, LINT number.
fn local_apic_nmi(uid: u8, flags: u16, lint: u8) -> Vec<u8> {
    let mut v = vec![4u8, 6, uid];
    v.extend_from_slice(&flags.to_le_bytes());
    v.push(lint);
    v
}

fn to_bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

/// Recomputes the checksum byte (offset 9) of a table.
pub fn fix_checksum(table: &mut [u8]) {
    if table.len() < 10 {
        return;
    }
    table[9] = 0;
    let sum = table.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    table[9] = 0u8.wrapping_sub(sum);
}

/// Whether a table's bytes sum to zero.
pub fn checksum_ok(table: &[u8]) -> bool {
    table.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

/// Processor Local x2APIC (MADT type 9), for APIC IDs of 255 and above.
fn local_x2apic(apic_id: u32, uid: u32) -> Vec<u8> {
    let mut v = vec![9u8, 16, 0, 0];
    v.extend_from_slice(&apic_id.to_le_bytes());
    v.extend_from_slice(&1u32.to_le_bytes()); // enabled
    v.extend_from_slice(&uid.to_le_bytes());
    v
}

/// Local x2APIC NMI (MADT type 0xA): processor UID (all ones = all), flags, LINT.
fn local_x2apic_nmi(uid: u32, flags: u16, lint: u8) -> Vec<u8> {
    let mut v = vec![0xa, 12];
    v.extend_from_slice(&flags.to_le_bytes());
    v.extend_from_slice(&uid.to_le_bytes());
    v.extend_from_slice(&[lint, 0, 0, 0]);
    v
}

/// The largest vCPU count the tables describe (x2APIC IDs are 32-bit; KVM's own limit
/// is lower).
pub const MAX_CPUS: u32 = 4096;

fn madt(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    if cfg.nr_vcpus > MAX_CPUS {
        return Err(AcpiError::TooManyCpus(cfg.nr_vcpus));
    }
    let mut m = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(layout::LAPIC_START as u32),
    );
    // APIC IDs below 255 in Processor Local APIC entries, the rest in Processor Local
    // x2APIC entries (ACPI 6.4 §5.2.12.12: IDs of 255 and above must use those).
    for i in 0..cfg.nr_vcpus.min(255) {
        m.add_structure(ProcessorLocalApic::new(
            i as u8,
            i as u8,
            EnabledStatus::Enabled,
        ));
    }
    m.add_structure(IoApic::new(0, cfg.ioapic_address, 0));
    let mut bytes = to_bytes(&m);
    for i in 255..cfg.nr_vcpus {
        bytes.extend(local_x2apic(i, i));
    }
    if cfg.nr_vcpus > 255 {
        bytes.extend(local_x2apic_nmi(u32::MAX, 0, 1));
    }
    // Interrupt source override: ISA IRQ 0 → GSI 2 (conventional; there is no PIT), and
    // the LINT1 NMI of every processor. The MADT flags stay 0: no PC-AT 8259s.
    bytes.extend(iso(0, 0, 2, 0));
    bytes.extend(local_apic_nmi(0xff, 0, 1));
    let len = bytes.len() as u32;
    bytes[4..8].copy_from_slice(&len.to_le_bytes());
    fix_checksum(&mut bytes);
    Ok(bytes)
}

/// The DMAR table (VT-d §8): host address width `haw_bits`, one DRHD at `reg_base`
/// with INCLUDE_PCI_ALL (every PCI device is behind it, whatever the topology), and a
/// device scope for the IOAPIC with MADT ID `ioapic_id` on the pseudo bus 0xFF (source
/// ID 0xFF00, as QEMU's Q35), which interrupt remapping needs. `intr_remap` sets the
/// INTR_REMAP flag (the x2APIC opt-out flag stays clear). No RMRR, no ATSR.
pub fn dmar(
    haw_bits: u8,
    reg_base: u64,
    ioapic_id: u8,
    intr_remap: bool,
    x2apic_opt_out: bool,
) -> Vec<u8> {
    let mut t = Sdt::new(*b"DMAR", 36, 1, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    t.append(haw_bits.saturating_sub(1)); // HAW is width - 1
                                          // Flags: bit 0 INTR_REMAP; bit 1 X2APIC_OPT_OUT (set when EIM is not offered).
    t.append(u8::from(intr_remap) | (u8::from(intr_remap && x2apic_opt_out) << 1));
    t.append_slice(&[0u8; 10]);
    // DRHD: type 0, length 16 + one 8-byte scope, INCLUDE_PCI_ALL, size 0 (4 KiB),
    // segment 0, register base.
    t.append(0u16);
    t.append(24u16);
    t.append(1u8);
    t.append(0u8);
    t.append(0u16);
    t.append(reg_base);
    // IOAPIC device scope: type 3, length 8, enumeration ID, start bus 0xFF, path 00.0.
    t.append_slice(&[3, 8, 0, 0, ioapic_id, 0xff, 0, 0]);
    let mut bytes = t.as_slice().to_vec();
    let len = bytes.len() as u32;
    bytes[4..8].copy_from_slice(&len.to_le_bytes());
    fix_checksum(&mut bytes);
    bytes
}

fn dsdt(cfg: &AcpiConfig) -> Vec<u8> {
    let (m32, s32) = cfg.pci_mmio32;
    let (m64, s64) = cfg.pci_mmio64;
    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_io = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_lo = AddressSpace::<u16>::new_io(0, 0xcf7, None);
    let io_hi = AddressSpace::<u16>::new_io(0xd00, 0xffff, None);
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m32 as u32,
        (m32 + s32 - 1) as u32,
        None,
    );
    let mem64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m64,
        m64 + s64 - 1,
        None,
    );
    let pci_crs = ResourceTemplate::new(vec![&bus, &cfg_io, &io_lo, &io_hi, &mem32, &mem64]);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let zero = 0u8;
    let pci_names = [
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_ADR".into(), &zero),
        Name::new("_SEG".into(), &zero),
        Name::new("_UID".into(), &zero),
        Name::new("_BBN".into(), &zero),
        Name::new("_CRS".into(), &pci_crs),
    ];
    let pci = aml::Device::new(
        "_SB_.PCI0".into(),
        pci_names.iter().map(|n| n as &dyn Aml).collect(),
    );
    let com_hid = EISAName::new("PNP0501");
    let one = 1u8;
    let com_io = IO::new(cfg.com1.0, cfg.com1.0, 1, 8);
    let com_irq = Interrupt::new(true, true, false, false, cfg.com1.1);
    let com_crs = ResourceTemplate::new(vec![&com_io, &com_irq]);
    let com_names = [
        Name::new("_HID".into(), &com_hid),
        Name::new("_UID".into(), &one),
        Name::new("_CRS".into(), &com_crs),
    ];
    let com1 = aml::Device::new(
        "_SB_.COM1".into(),
        com_names.iter().map(|n| n as &dyn Aml).collect(),
    );
    let slp = cfg.s5_slp_typ;
    let s5_pkg = Package::new(vec![&slp, &slp, &zero, &zero]);
    let s5 = Name::new("_S5_".into(), &s5_pkg);

    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for obj in [&pci as &dyn Aml, &com1, &s5] {
        t.append_slice(&to_bytes(obj));
    }
    t.update_checksum();
    t.as_slice().to_vec()
}

/// Where the FACS (firmware waking vector, global lock) is: right after the RSDP,
/// 64-byte aligned as ACPI requires.
pub const FACS_ADDRESS: u64 = (layout::ACPI_START + 36).next_multiple_of(64);
/// Offset of the FACS firmware waking vector (real mode: CS = vector >> 4).
pub const FACS_WAKING_VECTOR: u64 = 12;
/// PM1a event block (status, enable) offset from `AcpiConfig::pm_port`.
pub const PM1A_EVT_OFFSET: u16 = 4;
/// PM1a control block offset from `AcpiConfig::pm_port`.
pub const PM1A_CNT_OFFSET: u16 = 8;

fn fadt(cfg: &AcpiConfig, dsdt_addr: u64) -> Vec<u8> {
    let io8 = |port: u16| {
        GAS::new(
            GasSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .firmware_ctrl_32(FACS_ADDRESS as u32)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = io8(cfg.pm_port);
    b.sleep_status_reg = io8(cfg.pm_port + 1);
    b.reset_reg = io8(cfg.pm_port + 2);
    b.reset_value = cfg.reset_value;
    // The fixed-hardware PM1a blocks, for firmware-style code (kvm-unit-tests' s3); an
    // OS that honours HW_REDUCED_ACPI ignores them.
    let evt = cfg.pm_port + PM1A_EVT_OFFSET;
    let cnt = cfg.pm_port + PM1A_CNT_OFFSET;
    b.pm1a_evt_blk = u32::from(evt).into();
    b.pm1_evt_len = 4;
    b.pm1a_cnt_blk = u32::from(cnt).into();
    b.pm1_cnt_len = 2;
    b.x_pm1a_evt_blk = GAS::new(
        GasSpace::SystemIo,
        32,
        0,
        AccessSize::WordAccess,
        u64::from(evt),
    );
    b.x_pm1a_cnt_blk = GAS::new(
        GasSpace::SystemIo,
        16,
        0,
        AccessSize::WordAccess,
        u64::from(cnt),
    );
    b.hypervisor_vendor_identity = u64::from_le_bytes(*b"FLTVISOR").into();
    to_bytes(&b.finalize())
}

fn mcfg(cfg: &AcpiConfig) -> Vec<u8> {
    let mut m = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    m.add_ecam(cfg.ecam_base, 0, 0, 0);
    to_bytes(&m)
}

/// Builds every table into guest memory; returns the RSDP address.
pub fn create_acpi_tables(mem: &GuestMemoryMmap, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    let rsdp_addr = layout::ACPI_START;
    // The FACS first: it must be 64-byte aligned.
    mem.write_slice(&to_bytes(&FACS::new()), GuestAddress(FACS_ADDRESS))
        .map_err(|e| AcpiError::Memory(e.to_string()))?;
    let mut cursor = FACS_ADDRESS + FACS::len() as u64;
    let mut place = |bytes: &[u8]| -> Result<u64, AcpiError> {
        let at = cursor;
        let end = at + bytes.len() as u64;
        if end > layout::ACPI_END {
            return Err(AcpiError::TooBig(end - layout::ACPI_START));
        }
        mem.write_slice(bytes, GuestAddress(at))
            .map_err(|e| AcpiError::Memory(e.to_string()))?;
        cursor = end.next_multiple_of(16);
        Ok(at)
    };
    let dsdt_addr = place(&dsdt(cfg))?;
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    xsdt.add_entry(place(&fadt(cfg, dsdt_addr))?);
    xsdt.add_entry(place(&madt(cfg)?)?);
    xsdt.add_entry(place(&mcfg(cfg))?);
    for t in &cfg.extra_tables {
        let mut t = t.clone();
        fix_checksum(&mut t);
        xsdt.add_entry(place(&t)?);
    }
    let xsdt_addr = place(&to_bytes(&xsdt))?;
    let rsdp = to_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    mem.write_slice(&rsdp, GuestAddress(rsdp_addr))
        .map_err(|e| AcpiError::Memory(e.to_string()))?;
    Ok(rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(n: u32) -> AcpiConfig {
        AcpiConfig {
            nr_vcpus: n,
            ioapic_address: 0xfec0_0000,
            ecam_base: layout::ECAM_START,
            pci_mmio32: (layout::PCI_MMIO32_START, layout::PCI_MMIO32_SIZE),
            pci_mmio64: (1 << 32, 1 << 36),
            pm_port: 0x600,
            reset_value: 1,
            s5_slp_typ: 5,
            com1: (0x3f8, 4),
            extra_tables: Vec::new(),
        }
    }

    struct Parsed {
        tables: Vec<([u8; 4], Vec<u8>)>,
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).expect("read");
        v
    }

    fn table_at(mem: &GuestMemoryMmap, addr: u64) -> Vec<u8> {
        let hdr = read(mem, addr, 8);
        let len = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]) as usize;
        read(mem, addr, len)
    }

    fn parse(mem: &GuestMemoryMmap, rsdp: u64) -> Parsed {
        let r = read(mem, rsdp, 36);
        assert_eq!(&r[0..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]), "RSDP checksum");
        assert!(checksum_ok(&r), "RSDP extended checksum");
        assert_eq!(r[15], 2, "revision");
        let xsdt_addr = u64::from_le_bytes(r[24..32].try_into().expect("8"));
        let x = table_at(mem, xsdt_addr);
        assert_eq!(&x[0..4], b"XSDT");
        assert!(checksum_ok(&x));
        let mut tables = Vec::new();
        for c in x[36..].chunks(8) {
            let a = u64::from_le_bytes(c.try_into().expect("8"));
            let t = table_at(mem, a);
            assert!(checksum_ok(&t), "{:?} checksum", &t[0..4]);
            let sig: [u8; 4] = t[0..4].try_into().expect("4");
            if &sig == b"FACP" {
                let dsdt = u64::from_le_bytes(t[140..148].try_into().expect("8"));
                let d = table_at(mem, dsdt);
                assert!(checksum_ok(&d), "DSDT checksum");
                tables.push((*b"DSDT", d));
            }
            tables.push((sig, t));
        }
        Parsed { tables }
    }

    fn get<'a>(p: &'a Parsed, sig: &[u8; 4]) -> &'a [u8] {
        &p.tables.iter().find(|t| &t.0 == sig).expect("table").1
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).expect("mem")
    }

    #[test]
    fn tables_parse_back_with_valid_checksums() {
        let m = mem();
        let rsdp = create_acpi_tables(&m, &cfg(2)).expect("tables");
        assert_eq!(rsdp, layout::ACPI_START);
        let p = parse(&m, rsdp);
        for sig in [b"FACP", b"APIC", b"MCFG", b"DSDT"] {
            get(&p, sig);
        }
    }

    #[test]
    fn fadt_is_hardware_reduced_with_sleep_and_reset_registers() {
        let m = mem();
        let p = parse(&m, create_acpi_tables(&m, &cfg(1)).expect("tables"));
        let f = get(&p, b"FACP");
        let flags = u32::from_le_bytes(f[112..116].try_into().expect("4"));
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // Reset register GAS at 116: system I/O, port 0x602, value 1 at 128.
        assert_eq!(f[116], 1);
        assert_eq!(
            u64::from_le_bytes(f[120..128].try_into().expect("8")),
            0x602
        );
        assert_eq!(f[128], 1);
        // Sleep control (244) and status (256) registers.
        assert_eq!(
            u64::from_le_bytes(f[248..256].try_into().expect("8")),
            0x600
        );
        assert_eq!(
            u64::from_le_bytes(f[260..268].try_into().expect("8")),
            0x601
        );
        assert_eq!(u16::from_le_bytes([f[109], f[110]]), IAPC_BOOT_ARCH);
        // FIRMWARE_CTRL (36) → the FACS; PM1a_EVT_BLK (56), PM1a_CNT_BLK (64), lengths.
        let facs = u64::from(u32::from_le_bytes(f[36..40].try_into().expect("4")));
        assert_eq!(facs, FACS_ADDRESS);
        assert_eq!(facs % 64, 0);
        let mut sig = [0u8; 4];
        m.read_slice(&mut sig, GuestAddress(facs)).expect("facs");
        assert_eq!(&sig, b"FACS");
        assert_eq!(u32::from_le_bytes(f[56..60].try_into().expect("4")), 0x604);
        assert_eq!(u32::from_le_bytes(f[64..68].try_into().expect("4")), 0x608);
        assert_eq!((f[88], f[89]), (4, 2));
    }

    #[test]
    fn madt_lists_every_cpu_the_ioapic_and_no_pic() {
        for n in [1u32, 2, 4] {
            let m = mem();
            let p = parse(&m, create_acpi_tables(&m, &cfg(n)).expect("tables"));
            let t = get(&p, b"APIC");
            assert_eq!(
                u32::from_le_bytes(t[36..40].try_into().expect("4")),
                0xfee0_0000
            );
            assert_eq!(
                u32::from_le_bytes(t[40..44].try_into().expect("4")),
                0,
                "no PCAT_COMPAT"
            );
            let mut off = 44;
            let (mut lapics, mut ioapics, mut isos) = (Vec::new(), 0, 0);
            while off < t.len() {
                let (ty, len) = (t[off], usize::from(t[off + 1]));
                match ty {
                    0 => lapics.push(t[off + 3]),
                    1 => {
                        ioapics += 1;
                        let a = u32::from_le_bytes(t[off + 4..off + 8].try_into().expect("4"));
                        assert_eq!(a, 0xfec0_0000);
                    }
                    2 => isos += 1,
                    _ => {}
                }
                assert!(len > 0);
                off += len;
            }
            assert_eq!(lapics, (0..n as u8).collect::<Vec<_>>());
            assert_eq!((ioapics, isos), (1, 1));
        }
    }

    #[test]
    fn madt_uses_x2apic_entries_from_apic_id_255() {
        let m = mem();
        let p = parse(&m, create_acpi_tables(&m, &cfg(300)).expect("tables"));
        let t = get(&p, b"APIC");
        let mut off = 44;
        let (mut xapic, mut x2apic, mut x2nmi) = (Vec::new(), Vec::new(), 0);
        while off < t.len() {
            let (ty, len) = (t[off], usize::from(t[off + 1]));
            match ty {
                0 => xapic.push(u32::from(t[off + 3])),
                9 => {
                    assert_eq!(len, 16);
                    x2apic.push(u32::from_le_bytes(
                        t[off + 4..off + 8].try_into().expect("4"),
                    ));
                    assert_eq!(t[off + 8] & 1, 1, "enabled");
                }
                0xa => {
                    assert_eq!(len, 12);
                    x2nmi += 1;
                }
                _ => {}
            }
            off += len;
        }
        assert_eq!(xapic, (0..255).collect::<Vec<_>>());
        assert_eq!(x2apic, (255..300).collect::<Vec<_>>());
        assert_eq!(x2nmi, 1, "one x2APIC NMI structure for all");
    }

    #[test]
    fn mcfg_and_dsdt_contents() {
        let m = mem();
        let p = parse(&m, create_acpi_tables(&m, &cfg(1)).expect("tables"));
        let mc = get(&p, b"MCFG");
        assert_eq!(
            u64::from_le_bytes(mc[44..52].try_into().expect("8")),
            layout::ECAM_START
        );
        assert_eq!((mc[54], mc[55]), (0, 0), "bus range 0..0");
        let d = get(&p, b"DSDT");
        let has = |s: &[u8]| d.windows(s.len()).any(|w| w == s);
        assert!(has(b"PCI0") && has(b"COM1") && has(b"_S5_") && has(b"_CRS"));
    }

    #[test]
    fn extra_tables_are_listed_and_checksummed() {
        let m = mem();
        let mut c = cfg(1);
        let mut t = vec![0u8; 48];
        t[0..4].copy_from_slice(b"DMAR");
        t[4..8].copy_from_slice(&48u32.to_le_bytes());
        c.extra_tables.push(t);
        let p = parse(&m, create_acpi_tables(&m, &c).expect("tables"));
        assert_eq!(get(&p, b"DMAR").len(), 48);
    }

    #[test]
    fn dmar_layout() {
        assert_eq!(
            dmar(48, 0xfed9_0000, 0, false, false)[37],
            0,
            "no INTR_REMAP"
        );
        assert_eq!(
            dmar(48, 0xfed9_0000, 0, true, true)[37],
            3,
            "INTR_REMAP, x2APIC opt-out"
        );
        let d = dmar(48, 0xfed9_0000, 0, true, false);
        assert_eq!(&d[0..4], b"DMAR");
        assert_eq!(d.len(), 48 + 16 + 8, "72 bytes: header, DRHD, IOAPIC scope");
        assert_eq!(
            u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as usize,
            d.len()
        );
        assert!(checksum_ok(&d));
        assert_eq!(d[36], 47, "HAW = width - 1");
        assert_eq!(d[37], 1, "INTR_REMAP, no x2APIC opt-out");
        let drhd = &d[48..];
        assert_eq!(
            (drhd[0], drhd[2], drhd[4]),
            (0, 24, 1),
            "DRHD, length 24, INCLUDE_PCI_ALL"
        );
        assert_eq!(
            u64::from_le_bytes(drhd[8..16].try_into().expect("8")),
            0xfed9_0000
        );
        assert_eq!(&drhd[16..24], &[3, 8, 0, 0, 0, 0xff, 0, 0]);
    }

    #[test]
    fn limits() {
        let m = mem();
        assert!(matches!(
            create_acpi_tables(&m, &cfg(5000)),
            Err(AcpiError::TooManyCpus(5000))
        ));
        let mut c = cfg(1);
        c.extra_tables.push(vec![0u8; 200 * 1024]);
        assert!(matches!(
            create_acpi_tables(&m, &c),
            Err(AcpiError::TooBig(_))
        ));
    }
}
