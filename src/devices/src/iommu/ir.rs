//! VT-d interrupt remapping (spec ch. 5; ../shared/docs/vtd-reference.md §6): the
//! interrupt remapping table entry (IRTE), the remappable and compatibility request
//! formats, the lookup with every check that can fail (fault reasons 0x20–0x26), and the
//! translation of an IRTE into the compatibility-format MSI that KVM delivers.
//!
//! IRTE (128 bits) as this unit reads it (posted format not offered):
//!
//! | bits    | field | check |
//! |---------|-------|-------|
//! | 0       | P     | clear: fault 0x22 |
//! | 1       | FPD   | set: faults 0x22, 0x24, 0x26 of this entry are not recorded |
//! | 2       | DM    | destination mode (1 logical) |
//! | 3       | RH    | redirection hint |
//! | 4       | TM    | trigger mode (1 level) |
//! | 7:5     | DLM   | delivery mode; 3 and 6 are reserved: fault 0x24 |
//! | 11:8    | AVAIL | ignored |
//! | 14:12   | —     | reserved: fault 0x24 |
//! | 15      | IM    | posted format, not offered: fault 0x24 |
//! | 23:16   | V     | vector |
//! | 31:24   | —     | reserved: fault 0x24 |
//! | 63:32   | DST   | x2APIC ID (EIME = 1), or xAPIC ID in 47:40 with 63:48 and 39:32 reserved |
//! | 79:64   | SID   | source ID to verify |
//! | 81:80   | SQ    | which SID bits to ignore (function bits 2, 2:1, 2:0) |
//! | 83:82   | SVT   | 0 none, 1 SID/SQ, 2 bus range, 3 reserved: fault 0x24 |
//! | 127:84  | —     | reserved: fault 0x24 |

use crate::interrupt::{MsiMessage, MSI_ADDRESS_BASE};

/// Interrupt-remapping fault reasons.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum IrFaultReason {
    /// 0x20: reserved fields set in the interrupt request itself.
    RequestReserved = 0x20,
    /// 0x21: the index is beyond the table.
    IndexTooLarge = 0x21,
    /// 0x22: the entry's present bit is clear.
    NotPresent = 0x22,
    /// 0x23: the entry could not be read (outside guest memory).
    TableAccess = 0x23,
    /// 0x24: reserved fields set in the entry.
    EntryReserved = 0x24,
    /// 0x25: a compatibility-format request while CFI is clear.
    CompatBlocked = 0x25,
    /// 0x26: source-ID verification failed.
    SourceId = 0x26,
}

impl IrFaultReason {
    /// Linux's text for the reason (`irq_remap_fault_reasons[]`).
    pub fn linux_text(self) -> &'static str {
        match self {
            Self::RequestReserved => {
                "Detected reserved fields in the decoded interrupt-remapped request"
            }
            Self::IndexTooLarge => "Interrupt index exceeded the interrupt-remapping table size",
            Self::NotPresent => "Present field in the IRTE entry is clear",
            Self::TableAccess => "Error accessing interrupt-remapping table pointed by IRTA_REG",
            Self::EntryReserved => "Detected reserved fields in the IRTE entry",
            Self::CompatBlocked => "Blocked a compatibility format interrupt request",
            Self::SourceId => "Blocked an interrupt request due to source-id verification failure",
        }
    }

    /// The reason for a code (0x20..=0x26).
    pub fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0x20 => Self::RequestReserved,
            0x21 => Self::IndexTooLarge,
            0x22 => Self::NotPresent,
            0x23 => Self::TableAccess,
            0x24 => Self::EntryReserved,
            0x25 => Self::CompatBlocked,
            0x26 => Self::SourceId,
            _ => return None,
        })
    }

    /// Whether the entry's FPD bit suppresses recording of this reason.
    pub fn qualified(self) -> bool {
        matches!(
            self,
            Self::NotPresent | Self::EntryReserved | Self::SourceId
        )
    }
}

/// A failed lookup, as the fault record holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrFault {
    /// Source ID of the request.
    pub sid: u16,
    /// Interrupt index (0 for compatibility-format requests).
    pub index: u16,
    /// Why.
    pub reason: IrFaultReason,
    /// The entry asked not to record it (FPD).
    pub fpd: bool,
}

/// What kind of interrupt request a message is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Request {
    /// Compatibility format (address bit 4 clear): the classic MSI.
    Compat,
    /// Remappable format with its interrupt index.
    Remappable {
        /// The index (handle, plus the sub-handle when SHV is set).
        index: u32,
    },
    /// Remappable format with reserved fields set.
    Reserved {
        /// The index it names.
        index: u32,
    },
}

/// Decodes the request format of `msg`: address bit 4 is the format, bits 19:5 and 2
/// the handle, bit 3 SHV (the sub-handle is data 15:0).
pub fn decode(msg: &MsiMessage) -> Request {
    let a = msg.address;
    if a & (1 << 4) == 0 {
        return Request::Compat;
    }
    let handle = ((a >> 5) & 0x7fff) as u32 | (((a >> 2) & 1) as u32) << 15;
    let index = if a & (1 << 3) != 0 {
        handle + (msg.data & 0xffff)
    } else {
        handle
    };
    // Address bits 63:32 and 1:0 are reserved in the remappable format, and the data's
    // upper half must be zero when SHV is set.
    let reserved = a >> 32 != 0 || a & 3 != 0 || (a & (1 << 3) != 0 && msg.data >> 16 != 0);
    if reserved {
        Request::Reserved { index }
    } else {
        Request::Remappable { index }
    }
}

/// The index a message would look up, if it is in remappable format.
pub fn index_of(msg: &MsiMessage) -> Option<u32> {
    match decode(msg) {
        Request::Compat => None,
        Request::Remappable { index } | Request::Reserved { index } => Some(index),
    }
}

/// One interrupt remapping table entry.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Irte {
    /// Bits 63:0.
    pub lo: u64,
    /// Bits 127:64.
    pub hi: u64,
}

impl Irte {
    /// P.
    pub fn present(&self) -> bool {
        self.lo & 1 != 0
    }
    /// FPD.
    pub fn fpd(&self) -> bool {
        self.lo & 2 != 0
    }
    /// DM (logical destination).
    pub fn dest_logical(&self) -> bool {
        self.lo & 4 != 0
    }
    /// RH.
    pub fn redirection_hint(&self) -> bool {
        self.lo & 8 != 0
    }
    /// TM (level).
    pub fn level(&self) -> bool {
        self.lo & 0x10 != 0
    }
    /// DLM.
    pub fn delivery_mode(&self) -> u8 {
        ((self.lo >> 5) & 7) as u8
    }
    /// V.
    pub fn vector(&self) -> u8 {
        (self.lo >> 16) as u8
    }
    /// DST as the unit interprets it: the 32-bit x2APIC ID with `eime`, else the xAPIC
    /// ID in bits 47:40.
    pub fn destination(&self, eime: bool) -> u32 {
        let dst = (self.lo >> 32) as u32;
        if eime {
            dst
        } else {
            (dst >> 8) & 0xff
        }
    }
    /// SID.
    pub fn sid(&self) -> u16 {
        self.hi as u16
    }
    /// SQ.
    pub fn sq(&self) -> u8 {
        ((self.hi >> 16) & 3) as u8
    }
    /// SVT.
    pub fn svt(&self) -> u8 {
        ((self.hi >> 18) & 3) as u8
    }

    /// Whether reserved fields are set (for the unit's EIME setting).
    pub fn reserved(&self, eime: bool) -> bool {
        let lo_rsvd = 0xff00_f000u64 | (1 << 15);
        let dst_rsvd = if eime { 0 } else { 0xffff_00ff_0000_0000u64 };
        let dlm = self.delivery_mode();
        self.lo & (lo_rsvd | dst_rsvd) != 0
            || self.hi >> 20 != 0
            || self.svt() == 3
            || dlm == 3
            || dlm == 6
    }

    /// Source-ID verification of a request from `sid`.
    pub fn sid_ok(&self, sid: u16) -> bool {
        match self.svt() {
            0 => true,
            1 => {
                let ignore = match self.sq() {
                    0 => 0,
                    1 => 0b100,
                    2 => 0b110,
                    _ => 0b111,
                };
                sid & !ignore == self.sid() & !ignore
            }
            2 => {
                let (start, end) = ((self.sid() >> 8) as u8, self.sid() as u8);
                let bus = (sid >> 8) as u8;
                (start..=end).contains(&bus)
            }
            _ => false,
        }
    }

    /// The compatibility-format message this entry delivers (KVM's x2APIC API form:
    /// destination bits 31:8 in the upper address).
    pub fn to_msi(&self, eime: bool) -> MsiMessage {
        let dest = self.destination(eime);
        let address = MSI_ADDRESS_BASE
            | (u64::from(dest & 0xff) << 12)
            | (u64::from(self.redirection_hint()) << 3)
            | (u64::from(self.dest_logical()) << 2)
            | (u64::from(dest & 0xffff_ff00) << 32);
        let mut data = u32::from(self.vector()) | (u32::from(self.delivery_mode()) << 8);
        if self.level() {
            data |= (1 << 15) | (1 << 14);
        }
        MsiMessage { address, data }
    }

    /// Checks the entry for a request from `sid` at `index`; the message on success.
    pub fn check(&self, sid: u16, index: u16, eime: bool) -> Result<MsiMessage, IrFault> {
        let fault = |reason| IrFault {
            sid,
            index,
            reason,
            fpd: self.fpd(),
        };
        if !self.present() {
            return Err(fault(IrFaultReason::NotPresent));
        }
        if self.reserved(eime) {
            return Err(fault(IrFaultReason::EntryReserved));
        }
        if !self.sid_ok(sid) {
            return Err(fault(IrFaultReason::SourceId));
        }
        Ok(self.to_msi(eime))
    }
}

/// The table: base, entries and the extended (x2APIC) mode, from IRTA.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Table {
    /// Guest-physical base.
    pub base: u64,
    /// Entries (2^(S+1)).
    pub entries: u32,
    /// EIME: 32-bit x2APIC destinations.
    pub eime: bool,
}

impl Table {
    /// The table an IRTA value describes.
    pub fn from_irta(irta: u64) -> Self {
        Self {
            base: irta & !0xfff & ((1 << super::walk::HAW) - 1),
            entries: 2u32 << (irta & 0xf),
            eime: irta & (1 << 11) != 0,
        }
    }

    /// The address of entry `index`.
    pub fn entry_address(&self, index: u32) -> u64 {
        self.base + u64::from(index) * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn irte(lo: u64, hi: u64) -> Irte {
        Irte { lo, hi }
    }

    #[test]
    fn requests_decode_as_linux_writes_them() {
        // Linux's fill_msi_msg: handle 0x1234, SHV, sub-handle in data.
        let a = 0xfee0_0000 | (0x1234 << 5) | (1 << 4) | (1 << 3);
        assert_eq!(
            decode(&MsiMessage {
                address: a,
                data: 2
            }),
            Request::Remappable { index: 0x1236 }
        );
        // Handle bit 15 in address bit 2.
        let a = 0xfee0_0000 | (1 << 4) | (1 << 2);
        assert_eq!(
            decode(&MsiMessage {
                address: a,
                data: 0
            }),
            Request::Remappable { index: 0x8000 }
        );
        assert_eq!(
            decode(&MsiMessage {
                address: 0xfee0_1000,
                data: 0x41
            }),
            Request::Compat
        );
        let a = 0xfee0_0000 | (1 << 4) | (1 << 32);
        assert!(matches!(
            decode(&MsiMessage {
                address: a,
                data: 0
            }),
            Request::Reserved { .. }
        ));
    }

    #[test]
    fn entries_translate_and_check() {
        // x2APIC destination 300, vector 0x41, fixed, edge, SID 00:03.0 verified.
        let e = irte(1 | (0x41 << 16) | (300u64 << 32), 0x18 | (1 << 18));
        let m = e.check(0x18, 5, true).expect("valid");
        assert_eq!((m.vector(), m.destination()), (0x41, 300));
        assert_eq!(
            e.check(0x20, 5, true).map_err(|f| f.reason),
            Err(IrFaultReason::SourceId)
        );
        // SQ = 3 ignores the function.
        let e3 = irte(e.lo, e.hi | (3 << 16));
        assert!(e3.check(0x1f, 5, true).is_ok());
        // Bus range 0..=0 (SVT = 2).
        let r = irte(e.lo, 2 << 18);
        assert!(r.check(0x00ff, 1, true).is_ok());
        assert!(r.check(0x0100, 1, true).is_err());
        // xAPIC mode: destination in bits 47:40; bits 63:48 reserved.
        let x = irte(1 | (0x30 << 16) | (5u64 << 40), 0);
        assert_eq!(x.check(0, 0, false).map(|m| m.destination()), Ok(5));
        assert_eq!(
            e.check(0x18, 5, false).map_err(|f| f.reason),
            Err(IrFaultReason::EntryReserved)
        );
        // Not present; FPD carried.
        let np = irte(2, 0);
        assert_eq!(
            np.check(0, 7, true),
            Err(IrFault {
                sid: 0,
                index: 7,
                reason: IrFaultReason::NotPresent,
                fpd: true
            })
        );
        // Posted format and reserved delivery modes.
        for lo in [1 | (1 << 15), 1 | (3 << 5), 1 | (6 << 5), 1 | (1 << 24)] {
            assert_eq!(
                irte(lo, 0).check(0, 0, true).map_err(|f| f.reason),
                Err(IrFaultReason::EntryReserved),
                "{lo:#x}"
            );
        }
        // Level trigger.
        let l = irte(1 | 0x10 | (0x50 << 16), 0);
        assert!(l.check(0, 0, true).expect("ok").level_triggered());
    }

    #[test]
    fn irta_decodes() {
        let t = Table::from_irta(0x12_3000 | (1 << 11) | 0xf);
        assert_eq!((t.base, t.entries, t.eime), (0x12_3000, 65536, true));
        assert_eq!(t.entry_address(2), 0x12_3020);
    }
}
