//! Legacy-mode VT-d translation structures and the second-level walk (VT-d spec ch. 9;
//! the behaviour matches QEMU's `vtd_iova_to_slpte`, see ../shared/docs/vtd-reference.md
//! §4): root entry → context entry → 3- or 4-level second-level tables with 2 MiB and
//! 1 GiB superpages, permissions cumulative over the levels, reserved bits checked after
//! permissions. Every table read goes through [`GuestMemoryBackend`] with bounds
//! checks: a pointer outside guest RAM is a fault, never a host access.

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// DMA-remapping fault reasons (legacy mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FaultReason {
    /// 0x1: the root entry's present bit is clear.
    RootNotPresent = 0x1,
    /// 0x2: the context entry's present bit is clear.
    ContextNotPresent = 0x2,
    /// 0x3: invalid context entry (address width or translation type).
    ContextInvalid = 0x3,
    /// 0x4: the address is beyond the domain's address width.
    BeyondMgaw = 0x4,
    /// 0x5: a write hit a PTE without W.
    WriteDenied = 0x5,
    /// 0x6: a read hit a PTE without R.
    ReadDenied = 0x6,
    /// 0x7: a next-level table pointer is outside memory.
    NextTableInvalid = 0x7,
    /// 0x8: the root table address is outside memory.
    RootTableInvalid = 0x8,
    /// 0x9: the context table pointer is outside memory.
    ContextTableInvalid = 0x9,
    /// 0xA: reserved bits set in a root entry.
    RootReserved = 0xa,
    /// 0xB: reserved bits set in a context entry.
    ContextReserved = 0xb,
    /// 0xC: reserved bits set in a paging entry.
    PteReserved = 0xc,
}

impl FaultReason {
    /// Whether FPD in the context entry suppresses recording of this fault.
    pub fn qualified(self) -> bool {
        matches!(self as u8, 0x2..=0x7 | 0xc)
    }

    /// The string Linux prints for this reason.
    pub fn linux_text(self) -> &'static str {
        match self {
            Self::RootNotPresent => "Present bit in root entry is clear",
            Self::ContextNotPresent => "Present bit in context entry is clear",
            Self::ContextInvalid => "Invalid context entry",
            Self::BeyondMgaw => "Access beyond MGAW",
            Self::WriteDenied => "PTE Write access is not set",
            Self::ReadDenied => "PTE Read access is not set",
            Self::NextTableInvalid => "Next page table ptr is invalid",
            Self::RootTableInvalid => "Root table address invalid",
            Self::ContextTableInvalid => "Context table ptr is invalid",
            Self::RootReserved => "non-zero reserved fields in RTP",
            Self::ContextReserved => "non-zero reserved fields in CTP",
            Self::PteReserved => "non-zero reserved fields in PTE",
        }
    }
}

/// Supported guest address widths (SAGAW): bit 1 = 39-bit (3 levels), bit 2 = 48-bit.
pub const SAGAW: u64 = 0x6;
/// Host address width: addresses in tables must fit in 48 bits.
pub const HAW: u32 = 48;
/// Maximum guest address width (MGAW + 1).
pub const MGAW_BITS: u32 = 48;

const PTE_R: u64 = 1 << 0;
const PTE_W: u64 = 1 << 1;
const PTE_PS: u64 = 1 << 7;
/// Address bits 51:48 (beyond HAW) and TM (62, reserved without device-TLB support) and
/// SNP (11, reserved without snoop control).
const PTE_RSVD_COMMON: u64 = (0xf << 48) | (1 << 62) | (1 << 11);
const ADDR_MASK: u64 = ((1 << HAW) - 1) & !0xfff;

/// What a context entry says about a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    /// Second-level page-table root.
    pub slptptr: u64,
    /// Paging levels (3 or 4).
    pub levels: u32,
    /// Domain ID.
    pub did: u16,
    /// Fault processing disabled.
    pub fpd: bool,
}

impl Context {
    /// Address width of the domain in bits.
    pub fn width(&self) -> u32 {
        (12 + 9 * self.levels).min(MGAW_BITS)
    }
}

/// A translation: the page that holds the IOVA, and what the walk allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Guest-physical base of the page (superpages included).
    pub gpa_base: u64,
    /// log2 of the page size: 12, 21 or 30.
    pub page_shift: u32,
    /// Readable through every level.
    pub read: bool,
    /// Writable through every level.
    pub write: bool,
}

impl Mapping {
    /// The guest-physical address of `iova` inside this page.
    pub fn gpa(&self, iova: u64) -> u64 {
        self.gpa_base | (iova & ((1 << self.page_shift) - 1))
    }
}

fn read_u64<M: GuestMemoryBackend>(mem: &M, addr: u64) -> Option<u64> {
    mem.read_obj::<u64>(GuestAddress(addr)).ok()
}

/// Reads and checks the context entry of requester `sid` under the root table `root`
/// (as latched by SRTP: the address, with RTADDR's translation-table-mode bits 11:10,
/// which must be legacy).
pub fn context_entry<M: GuestMemoryBackend>(
    mem: &M,
    root: u64,
    sid: u16,
) -> Result<Context, FaultReason> {
    if root & super::RTADDR_TTM != 0 {
        return Err(FaultReason::RootTableInvalid);
    }
    let bus = u64::from(sid >> 8);
    let devfn = u64::from(sid & 0xff);
    let re = root + bus * 16;
    let (rlo, rhi) = match (read_u64(mem, re), read_u64(mem, re + 8)) {
        (Some(l), Some(h)) => (l, h),
        _ => return Err(FaultReason::RootTableInvalid),
    };
    if rlo & 1 == 0 {
        return Err(FaultReason::RootNotPresent);
    }
    if rhi != 0 || rlo & 0xffe != 0 || rlo & !ADDR_MASK & !0xfff != 0 {
        return Err(FaultReason::RootReserved);
    }
    let ce = (rlo & ADDR_MASK) + devfn * 16;
    let (clo, chi) = match (read_u64(mem, ce), read_u64(mem, ce + 8)) {
        (Some(l), Some(h)) => (l, h),
        _ => return Err(FaultReason::ContextTableInvalid),
    };
    if clo & 1 == 0 {
        return Err(FaultReason::ContextNotPresent);
    }
    if clo & 0xff0 != 0 || clo & !ADDR_MASK & !0xfff != 0 || chi & 0xffff_ffff_ff00_0080 != 0 {
        return Err(FaultReason::ContextReserved);
    }
    let tt = (clo >> 2) & 3;
    let aw = (chi & 7) as u32;
    // Only multi-level translation: no device-TLB (ECAP.DT = 0), no pass-through
    // (ECAP.PT = 0); the width must be one SAGAW offers.
    if tt != 0 || aw == 0 || aw > 4 || SAGAW & (1 << aw) == 0 {
        return Err(FaultReason::ContextInvalid);
    }
    Ok(Context {
        slptptr: clo & ADDR_MASK,
        levels: aw + 2,
        did: ((chi >> 8) & 0xffff) as u16,
        fpd: clo & 2 != 0,
    })
}

/// Where a walk found its leaf: the table holding the leaf entry, its level and the
/// permissions the levels above granted. Every IOVA of the same [`LeafTable::region`]
/// has its leaf entry in the same table, so a walk for it may start there
/// ([`walk_from`]) and reads one entry instead of one per level.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeafTable {
    /// Guest-physical address of the table.
    pub table: u64,
    /// Its level (1: 4 KiB entries).
    pub level: u32,
    /// R granted by every level above.
    pub read: bool,
    /// W granted by every level above.
    pub write: bool,
}

impl LeafTable {
    /// The IOVA range (base, size) whose leaf entries this table holds, for `iova`.
    pub fn region(&self, iova: u64) -> (u64, u64) {
        let size = 1u64 << (12 + 9 * self.level).min(63);
        (iova & !(size - 1), size)
    }
}

/// Walks the second-level tables of `ctx` for `iova`, requiring write (or read)
/// permission at every level.
pub fn walk<M: GuestMemoryBackend>(
    mem: &M,
    ctx: &Context,
    iova: u64,
    write: bool,
) -> Result<Mapping, FaultReason> {
    walk_leaf(mem, ctx, iova, write).map(|(m, _)| m)
}

/// [`walk`], also returning where the leaf entry was found.
pub fn walk_leaf<M: GuestMemoryBackend>(
    mem: &M,
    ctx: &Context,
    iova: u64,
    write: bool,
) -> Result<(Mapping, LeafTable), FaultReason> {
    if ctx.width() < 64 && iova >> ctx.width() != 0 {
        return Err(FaultReason::BeyondMgaw);
    }
    let start = LeafTable {
        table: ctx.slptptr,
        level: ctx.levels,
        read: true,
        write: true,
    };
    walk_from(mem, ctx, start, iova, write)
}

/// Continues a walk of `ctx` for `iova` at table `from` (the top-level table for a
/// full walk, or a [`LeafTable`] an earlier walk of the same region returned): the
/// same checks and fault reasons as a walk from the top whose upper levels were those
/// already read. The caller keeps `iova` within the width of `ctx`.
pub fn walk_from<M: GuestMemoryBackend>(
    mem: &M,
    ctx: &Context,
    from: LeafTable,
    iova: u64,
    write: bool,
) -> Result<(Mapping, LeafTable), FaultReason> {
    let need = if write { PTE_W } else { PTE_R };
    let mut table = from.table;
    let (mut read_ok, mut write_ok) = (from.read, from.write);
    for level in (1..=from.level.min(ctx.levels)).rev() {
        let here = LeafTable {
            table,
            level,
            read: read_ok,
            write: write_ok,
        };
        let shift = 12 + 9 * (level - 1);
        let index = (iova >> shift) & 0x1ff;
        let Some(pte) = read_u64(mem, table + index * 8) else {
            return Err(if level == ctx.levels {
                FaultReason::ContextInvalid
            } else {
                FaultReason::NextTableInvalid
            });
        };
        if pte & need == 0 {
            return Err(if write {
                FaultReason::WriteDenied
            } else {
                FaultReason::ReadDenied
            });
        }
        read_ok &= pte & PTE_R != 0;
        write_ok &= pte & PTE_W != 0;
        let leaf = level == 1 || pte & PTE_PS != 0;
        let rsvd = match (level, leaf) {
            (1, _) => PTE_RSVD_COMMON,
            (2, true) => PTE_RSVD_COMMON | 0x1f_f000,
            (3, true) => PTE_RSVD_COMMON | 0x3fff_f000,
            // PS at level 4 is reserved; superpages only at levels 2 and 3.
            (_, true) => PTE_RSVD_COMMON | PTE_PS,
            _ => PTE_RSVD_COMMON,
        };
        if pte & rsvd != 0 {
            return Err(FaultReason::PteReserved);
        }
        if leaf {
            return Ok((
                Mapping {
                    gpa_base: pte & ADDR_MASK & !((1 << shift) - 1),
                    page_shift: shift,
                    read: read_ok,
                    write: write_ok,
                },
                here,
            ));
        }
        table = pte & ADDR_MASK;
    }
    Err(FaultReason::NextTableInvalid)
}
