//! Multiboot v1 (the Multiboot Specification 0.6.96): what kvm-unit-tests' `x86/*.flat`
//! and other small test kernels are — an ELF (32- or 64-bit container) with a
//! Multiboot header in its first 8 KiB, entered in 32-bit protected mode with paging
//! off, `%eax` = `0x2BADB002` and `%ebx` pointing to the Multiboot information.
//!
//! The loader copies every `PT_LOAD` program header to its physical address and zeroes
//! the rest of its memory size (BSS), or, with header flag 16, the a.out-kludge range
//! the header names. After the image, page-aligned, as QEMU places them: the one
//! module (the initrd) and then the information structure with the memory sizes, the
//! command line (the kernel's path first, then the arguments: `argv[0]` is the program
//! name), the module list, the memory map (from the e820 map) and the loader's name.
//! Everything is checked to lie in RAM below the MMIO hole. linux-loader knows no
//! Multiboot, hence this module; ELF headers are parsed with goblin.

use goblin::elf::program_header::PT_LOAD;
use goblin::elf::Elf;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{E820Type, MemoryLayout, HIMEM_START};

/// Header magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// What the loader leaves in `%eax`.
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie in the first 8 KiB, 4-byte aligned.
const SEARCH: usize = 8192;
/// Header flags this loader honours: page-align modules (0), memory information (1),
/// a.out kludge (16). Bit 2 (a video mode) cannot be honoured: there is no display.
const FLAG_PAGE_ALIGN: u32 = 1 << 0;
const FLAG_MEMORY: u32 = 1 << 1;
const FLAG_VIDEO: u32 = 1 << 2;
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
/// Information flags: mem_lower/upper, cmdline, mods, mmap, boot_loader_name.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
/// Size of the information structure (through the VBE fields).
const INFO_SIZE: u64 = 88;
/// Longest command line accepted.
pub const CMDLINE_MAX: usize = 64 << 10;
const LOADER_NAME: &str = "faultvisor";

/// Errors of loading a Multiboot kernel.
#[derive(Debug, thiserror::Error)]
pub enum MultibootError {
    /// A header flag asks for something this loader cannot do.
    #[error("the Multiboot header asks for {0}, which faultvisor cannot provide")]
    Unsupported(&'static str),
    /// The ELF is malformed.
    #[error("malformed ELF in the Multiboot kernel: {0}")]
    Elf(String),
    /// A segment, the module or the information lies outside low RAM.
    #[error("{what} at {start:#x}..{end:#x} does not fit in guest RAM below {limit:#x}")]
    DoesNotFit {
        /// What did not fit.
        what: &'static str,
        /// Start address.
        start: u64,
        /// End address.
        end: u64,
        /// End of usable RAM.
        limit: u64,
    },
    /// The command line is too long.
    #[error("the command line is {0} bytes; at most {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    /// Writing guest memory failed.
    #[error("cannot write guest memory: {0}")]
    Memory(String),
}

/// A Multiboot header found in a kernel file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Offset of the header in the file.
    pub offset: usize,
    /// Its flags.
    pub flags: u32,
    /// a.out kludge fields: header_addr, load_addr, load_end_addr, bss_end_addr,
    /// entry_addr.
    pub aout: [u32; 5],
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}

/// The Multiboot header of `image`, if it has one (magic, flags and checksum summing to
/// zero, 4-byte aligned in the first 8 KiB).
pub fn find_header(image: &[u8]) -> Option<Header> {
    (0..image.len().min(SEARCH).saturating_sub(11))
        .step_by(4)
        .find_map(|o| {
            let (magic, flags, sum) = (
                u32_at(image, o)?,
                u32_at(image, o + 4)?,
                u32_at(image, o + 8)?,
            );
            if magic != HEADER_MAGIC || magic.wrapping_add(flags).wrapping_add(sum) != 0 {
                return None;
            }
            let mut aout = [0u32; 5];
            if flags & FLAG_AOUT_KLUDGE != 0 {
                for (i, a) in aout.iter_mut().enumerate() {
                    *a = u32_at(image, o + 12 + 4 * i)?;
                }
            }
            Some(Header {
                offset: o,
                flags,
                aout,
            })
        })
}

/// A loaded Multiboot kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// 32-bit entry point.
    pub entry: u32,
    /// Address of the Multiboot information (`%ebx`).
    pub info: u32,
    /// First byte after the image.
    pub image_end: u64,
    /// The module (initrd) as (start, end), if one was given.
    pub module: Option<(u64, u64)>,
}

/// What to load.
pub struct Boot<'a> {
    /// The kernel file's bytes.
    pub image: &'a [u8],
    /// The command line the guest sees (for kvm-unit-tests: program name, then args).
    pub cmdline: &'a str,
    /// The one module: its name (its command line) and bytes.
    pub module: Option<(&'a str, &'a [u8])>,
}

struct Writer<'a> {
    mem: &'a GuestMemoryMmap,
    limit: u64,
}

impl Writer<'_> {
    fn check(&self, what: &'static str, start: u64, len: u64) -> Result<(), MultibootError> {
        let end = start.saturating_add(len);
        // Page 0 to the EBDA is RAM, but the real-mode area holds nothing of ours that a
        // Multiboot kernel may overwrite; images must still not reach the hole.
        if end > self.limit {
            return Err(MultibootError::DoesNotFit {
                what,
                start,
                end,
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn bytes(&self, what: &'static str, at: u64, b: &[u8]) -> Result<(), MultibootError> {
        self.check(what, at, b.len() as u64)?;
        self.mem
            .write_slice(b, GuestAddress(at))
            .map_err(|e| MultibootError::Memory(e.to_string()))
    }

    fn zero(&self, what: &'static str, at: u64, len: u64) -> Result<(), MultibootError> {
        self.check(what, at, len)?;
        let zeros = [0u8; 4096];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(4096);
            self.bytes(what, at + done, &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
}

/// Loads `b` into `mem` and writes the Multiboot information.
pub fn load(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    header: &Header,
    b: &Boot<'_>,
) -> Result<Loaded, MultibootError> {
    if header.flags & FLAG_VIDEO != 0 {
        return Err(MultibootError::Unsupported("a video mode (header flag 2)"));
    }
    // Bits 15:3 other than the ones named are unknown requirements: refuse (spec §3.1.2).
    if header.flags & 0xfff8 != 0 {
        return Err(MultibootError::Unsupported(
            "unknown required features (flags 15:3)",
        ));
    }
    if b.cmdline.len() >= CMDLINE_MAX {
        return Err(MultibootError::CmdlineTooLong(b.cmdline.len()));
    }
    let w = Writer {
        mem,
        limit: layout.low_ram_end(),
    };
    let (entry, image_end) = if header.flags & FLAG_AOUT_KLUDGE != 0 {
        load_aout(&w, header, b.image)?
    } else {
        load_elf(&w, b.image)?
    };
    let mut at = image_end.next_multiple_of(4096);
    let module = match b.module {
        Some((_, bytes)) => {
            let start = at;
            w.bytes("the module (initrd)", start, bytes)?;
            at = (start + bytes.len() as u64).next_multiple_of(4096);
            Some((start, start + bytes.len() as u64))
        }
        None => None,
    };
    let _ = header.flags & (FLAG_PAGE_ALIGN | FLAG_MEMORY); // always honoured
                                                            // Strings, the module list, the memory map, then the information structure.
    let mut put = |what: &'static str, data: &[u8]| -> Result<u64, MultibootError> {
        let here = at;
        w.bytes(what, here, data)?;
        at = (here + data.len() as u64).next_multiple_of(8);
        Ok(here)
    };
    let cmdline = put("the command line", &nul(b.cmdline))?;
    let loader = put("the loader name", &nul(LOADER_NAME))?;
    let mods = match (module, b.module) {
        (Some((s, e)), Some((name, _))) => {
            let n = put("the module name", &nul(name))?;
            let mut m = Vec::with_capacity(16);
            for v in [s as u32, e as u32, n as u32, 0] {
                m.extend_from_slice(&v.to_le_bytes());
            }
            Some(put("the module list", &m)?)
        }
        _ => None,
    };
    let mut mmap = Vec::new();
    for (base, len, ty) in layout.e820() {
        mmap.extend_from_slice(&20u32.to_le_bytes());
        mmap.extend_from_slice(&base.to_le_bytes());
        mmap.extend_from_slice(&len.to_le_bytes());
        let t: u32 = match ty {
            E820Type::Ram => 1,
            E820Type::Reserved => 2,
        };
        mmap.extend_from_slice(&t.to_le_bytes());
    }
    let mmap_addr = put("the memory map", &mmap)?;
    let mut info = [0u32; (INFO_SIZE / 4) as usize];
    info[0] = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    info[1] = 640;
    info[2] = (layout.low_ram_end().saturating_sub(HIMEM_START) / 1024) as u32;
    info[4] = cmdline as u32;
    if let Some(m) = mods {
        info[0] |= INFO_MODS;
        info[5] = 1;
        info[6] = m as u32;
    }
    info[11] = mmap.len() as u32;
    info[12] = mmap_addr as u32;
    info[16] = loader as u32;
    let bytes: Vec<u8> = info.iter().flat_map(|v| v.to_le_bytes()).collect();
    let info_addr = put("the Multiboot information", &bytes)?;
    Ok(Loaded {
        entry,
        info: info_addr as u32,
        image_end,
        module,
    })
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn load_elf(w: &Writer<'_>, image: &[u8]) -> Result<(u32, u64), MultibootError> {
    let elf = Elf::parse(image).map_err(|e| MultibootError::Elf(e.to_string()))?;
    let mut end = 0u64;
    let mut any = false;
    for ph in elf.program_headers.iter().filter(|p| p.p_type == PT_LOAD) {
        let off = usize::try_from(ph.p_offset).map_err(|_| MultibootError::Elf("offset".into()))?;
        let filesz =
            usize::try_from(ph.p_filesz).map_err(|_| MultibootError::Elf("file size".into()))?;
        if ph.p_memsz < ph.p_filesz {
            return Err(MultibootError::Elf(format!(
                "segment at {:#x}: memory size below file size",
                ph.p_paddr
            )));
        }
        let data = off
            .checked_add(filesz)
            .and_then(|e| image.get(off..e))
            .ok_or_else(|| {
                MultibootError::Elf(format!("segment at {:#x} beyond the file", ph.p_paddr))
            })?;
        let seg_end = ph.p_paddr.checked_add(ph.p_memsz).ok_or_else(|| {
            MultibootError::Elf(format!("segment at {:#x} wraps around", ph.p_paddr))
        })?;
        w.bytes("a program segment", ph.p_paddr, data)?;
        w.zero(
            "a program segment's BSS",
            ph.p_paddr + ph.p_filesz,
            ph.p_memsz - ph.p_filesz,
        )?;
        end = end.max(seg_end);
        any = true;
    }
    if !any {
        return Err(MultibootError::Elf("no loadable segment".into()));
    }
    let entry = u32::try_from(elf.entry)
        .map_err(|_| MultibootError::Elf(format!("entry {:#x} above 4 GiB", elf.entry)))?;
    Ok((entry, end))
}

fn load_aout(w: &Writer<'_>, h: &Header, image: &[u8]) -> Result<(u32, u64), MultibootError> {
    let [header_addr, load_addr, load_end, bss_end, entry] = h.aout.map(u64::from);
    // The file offset of load_addr: the header's offset minus (header_addr - load_addr).
    let skip = header_addr
        .checked_sub(load_addr)
        .and_then(|d| (h.offset as u64).checked_sub(d))
        .ok_or_else(|| MultibootError::Elf("a.out kludge: load_addr after header_addr".into()))?;
    let beyond = || MultibootError::Elf("a.out kludge: range beyond the file".into());
    let len = if load_end == 0 {
        (image.len() as u64).checked_sub(skip).ok_or_else(beyond)?
    } else {
        load_end
            .checked_sub(load_addr)
            .ok_or_else(|| MultibootError::Elf("a.out kludge: load_end before load_addr".into()))?
    };
    let data = usize::try_from(skip)
        .ok()
        .zip(skip.checked_add(len).and_then(|e| usize::try_from(e).ok()))
        .and_then(|(a, e)| image.get(a..e))
        .ok_or_else(beyond)?;
    w.bytes("the image", load_addr, data)?;
    let mut end = load_addr + len;
    if bss_end > end {
        w.zero("the image's BSS", end, bss_end - end)?;
        end = bss_end;
    }
    Ok((entry as u32, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32) -> Vec<u8> {
        let mut v = vec![0u8; 64];
        v[16..20].copy_from_slice(&HEADER_MAGIC.to_le_bytes());
        v[20..24].copy_from_slice(&flags.to_le_bytes());
        v[24..28]
            .copy_from_slice(&(0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))).to_le_bytes());
        v
    }

    #[test]
    fn header_is_found_with_its_checksum_only() {
        let h = find_header(&header(0)).expect("header");
        assert_eq!((h.offset, h.flags), (16, 0));
        let mut bad = header(0);
        bad[24] ^= 1;
        assert!(find_header(&bad).is_none());
        assert!(find_header(&[0u8; 3]).is_none());
        // Not 4-byte aligned: not a header.
        let mut off = vec![0u8; 2];
        off.extend(header(0));
        assert!(find_header(&off).is_none());
    }

    #[test]
    fn aout_kludge_image_and_information() {
        // Header at file offset 16; header_addr 0x40_0010 → load_addr 0x40_0000 = file 0.
        let mut img = header(FLAG_AOUT_KLUDGE);
        for (i, v) in [0x40_0010u32, 0x40_0000, 0, 0x40_2000, 0x40_0020]
            .iter()
            .enumerate()
        {
            img[28 + 4 * i..32 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        img.extend_from_slice(&[0xcc; 64]);
        let h = find_header(&img).expect("header");
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let layout = MemoryLayout::new(64 << 20);
        let l = load(
            &mem,
            &layout,
            &h,
            &Boot {
                image: &img,
                cmdline: "x86/t.flat -x",
                module: Some(("env", b"A=1\n")),
            },
        )
        .expect("load");
        assert_eq!((l.entry, l.image_end), (0x40_0020, 0x40_2000));
        assert_eq!(l.module, Some((0x40_2000, 0x40_2004)));
        let info = u64::from(l.info);
        let rd = |a: u64| mem.read_obj::<u32>(GuestAddress(a)).expect("read");
        assert_eq!(
            rd(info) & (INFO_MODS | INFO_CMDLINE | INFO_MMAP),
            INFO_MODS | INFO_CMDLINE | INFO_MMAP
        );
        assert_eq!(
            rd(info + 8),
            (63 << 20) / 1024,
            "mem_upper in KiB above 1 MiB"
        );
        let mut s = [0u8; 13];
        mem.read_slice(&mut s, GuestAddress(u64::from(rd(info + 16))))
            .expect("cmdline");
        assert_eq!(&s, b"x86/t.flat -x");
        assert_eq!(
            (rd(info + 20), rd(u64::from(rd(info + 24)))),
            (1, 0x40_2000)
        );
        // BSS zeroed, image copied.
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x40_0050)).expect("r"),
            0xcc
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x40_1000)).expect("r"), 0);
    }

    #[test]
    fn refusals() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("mem");
        let layout = MemoryLayout::new(64 << 20);
        let boot = |img: &[u8]| {
            let h = find_header(img).expect("header");
            load(
                &mem,
                &layout,
                &h,
                &Boot {
                    image: img,
                    cmdline: "",
                    module: None,
                },
            )
        };
        assert!(matches!(
            boot(&header(FLAG_VIDEO)),
            Err(MultibootError::Unsupported(_))
        ));
        assert!(matches!(
            boot(&header(1 << 5)),
            Err(MultibootError::Unsupported(_))
        ));
        // Not an ELF, no kludge.
        assert!(matches!(boot(&header(0)), Err(MultibootError::Elf(_))));
        // A kludge image that would land beyond RAM.
        let mut img = header(FLAG_AOUT_KLUDGE);
        for (i, v) in [0x7000_0010u32, 0x7000_0000, 0, 0, 0x7000_0020]
            .iter()
            .enumerate()
        {
            img[28 + 4 * i..32 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        assert!(matches!(boot(&img), Err(MultibootError::DoesNotFit { .. })));
    }
}
