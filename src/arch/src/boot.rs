//! The Linux x86 boot protocol (Documentation/arch/x86/boot.rst): loads an ELF `vmlinux`
//! or a bzImage with `linux-loader`, places the initrd and the command line, and writes
//! the zero page (boot_params) with the e820 map and the ACPI RSDP address. Both formats
//! are entered at their 64-bit entry point with `%rsi` pointing to the zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{self, MemoryLayout};
use crate::mapload::{LoadMode, LoadStats, MappingReader};

/// `boot_flag` magic.
const BOOT_FLAG: u16 = 0xaa55;
/// "HdrS".
const HDR_MAGIC: u32 = 0x5372_6448;
/// Loader type "undefined" (0xff), as other VMMs use.
const LOADER_TYPE: u8 = 0xff;
/// Default kernel alignment for an ELF vmlinux (16 MiB).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// Highest initrd address when the kernel does not say (2 GiB − 1).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
/// Offset of the 64-bit entry point in a bzImage's protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// Largest e820 table the zero page holds.
const E820_MAX: usize = 128;

/// Errors of loading a guest kernel.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Reading the file failed.
    #[error("cannot read {what}: {source}")]
    Io {
        /// Which file.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
    /// Neither an ELF vmlinux nor a bzImage.
    #[error("not a kernel image: expected an x86_64 ELF vmlinux or a bzImage ({0})")]
    NotAKernel(String),
    /// The kernel did not fit or was malformed.
    #[error("cannot load the kernel: {0}")]
    Load(linux_loader::loader::Error),
    /// The initrd does not fit below the kernel's limit.
    #[error(
        "the initrd ({size} bytes) does not fit in guest memory below {limit:#x} after the kernel"
    )]
    InitrdTooBig {
        /// Initrd size.
        size: u64,
        /// Highest usable address.
        limit: u64,
    },
    /// Bad command line.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Guest memory write failed.
    #[error("cannot write boot data to guest memory: {0}")]
    Memory(String),
    /// A Multiboot kernel could not be loaded.
    #[error("cannot load the Multiboot kernel: {0}")]
    Multiboot(String),
}

/// The kernel format detected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// Uncompressed ELF `vmlinux` (no decompressor runs).
    Elf,
    /// A bzImage (the decompressor runs in the guest).
    BzImage,
    /// A Multiboot v1 kernel (kvm-unit-tests' `.flat` files): see [`crate::multiboot`].
    Multiboot,
}

/// What loading the kernel produced.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Detected format.
    pub format: KernelFormat,
    /// 64-bit entry point.
    pub entry: u64,
    /// First byte after the loaded image.
    pub end: u64,
    header: Option<setup_header>,
}

/// Detects the format of `file` by its magic.
pub fn detect_format(file: &mut File) -> Result<KernelFormat, BootError> {
    let mut magic = [0u8; 4];
    let mut hdr = [0u8; 4];
    let io = |source| BootError::Io {
        what: "the kernel image",
        source,
    };
    // A Multiboot header in the first 8 KiB decides first (such kernels are ELF files
    // too, often 32-bit ones linux-loader does not take).
    let mut head = Vec::with_capacity(8192);
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.by_ref()
        .take(8192)
        .read_to_end(&mut head)
        .map_err(io)?;
    if crate::multiboot::find_header(&head).is_some() {
        return Ok(KernelFormat::Multiboot);
    }
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    file.read_exact(&mut magic)
        .map_err(|_| BootError::NotAKernel("file is shorter than 4 bytes".into()))?;
    if magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    // bzImage: "HdrS" at 0x202.
    if file.seek(SeekFrom::Start(0x202)).is_ok()
        && file.read_exact(&mut hdr).is_ok()
        && u32::from_le_bytes(hdr) == HDR_MAGIC
    {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::NotAKernel(
        "no ELF magic and no bzImage 'HdrS' header".into(),
    ))
}

/// Loads the kernel into guest memory (`mode`: see [`crate::mapload`]); says how much
/// was mapped and how much copied.
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    file: &mut File,
    mode: LoadMode,
) -> Result<(LoadedKernel, LoadStats), BootError> {
    let format = detect_format(file)?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let mut reader = MappingReader::new(file, mode).map_err(|source| BootError::Io {
        what: "the kernel image",
        source,
    })?;
    let kernel = match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut reader, himem).map_err(BootError::Load)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut reader, himem).map_err(BootError::Load)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                header: r.setup_header,
            })
        }
        KernelFormat::Multiboot => Err(BootError::NotAKernel(
            "a Multiboot kernel is loaded with load_multiboot".into(),
        )),
    }?;
    Ok((kernel, reader.stats()))
}

/// Largest Multiboot kernel or module file read.
pub const MULTIBOOT_FILE_MAX: u64 = 1 << 30;

/// Loads a Multiboot kernel with `initrd` as its one module. The guest's command line
/// is `kernel_name`, a space and `cmdline` (as QEMU passes it: `argv[0]` is the
/// program's name); the module's is the initrd's name.
pub fn load_multiboot(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &mut File,
    kernel_name: &str,
    cmdline: &str,
    initrd: Option<(&str, &mut File)>,
) -> Result<crate::regs::BootEntry, BootError> {
    let read = |f: &mut File, what: &'static str| -> Result<Vec<u8>, BootError> {
        let io = |source| BootError::Io { what, source };
        f.seek(SeekFrom::Start(0)).map_err(io)?;
        let mut v = Vec::new();
        f.take(MULTIBOOT_FILE_MAX + 1)
            .read_to_end(&mut v)
            .map_err(io)?;
        if v.len() as u64 > MULTIBOOT_FILE_MAX {
            return Err(BootError::Multiboot(format!(
                "{what} is larger than {} MiB",
                MULTIBOOT_FILE_MAX >> 20
            )));
        }
        Ok(v)
    };
    let image = read(kernel, "the kernel image")?;
    let header = crate::multiboot::find_header(&image)
        .ok_or_else(|| BootError::NotAKernel("no Multiboot header".into()))?;
    let module = match initrd {
        Some((name, f)) => Some((name, read(f, "the initrd")?)),
        None => None,
    };
    let line = if cmdline.is_empty() {
        kernel_name.to_string()
    } else {
        format!("{kernel_name} {cmdline}")
    };
    let l = crate::multiboot::load(
        mem,
        layout,
        &header,
        &crate::multiboot::Boot {
            image: &image,
            cmdline: &line,
            module: module.as_ref().map(|(n, b)| (*n, b.as_slice())),
        },
    )
    .map_err(|e| BootError::Multiboot(e.to_string()))?;
    Ok(crate::regs::BootEntry::Multiboot {
        entry: l.entry,
        info: l.info,
    })
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest address.
    pub address: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Chooses the initrd address: the highest page-aligned spot in low RAM under the
/// kernel's limit, above the kernel.
pub fn place_initrd(
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    size: u64,
) -> Result<InitrdPlacement, BootError> {
    let addr_max = kernel
        .header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|m| *m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let limit = layout.low_ram_end().min(addr_max.saturating_add(1));
    let err = BootError::InitrdTooBig { size, limit };
    let start = limit.checked_sub(size).ok_or(err)? & !0xfff;
    if start < kernel.end.max(layout::HIMEM_START) {
        return Err(BootError::InitrdTooBig { size, limit });
    }
    Ok(InitrdPlacement {
        address: start,
        size,
    })
}

/// Loads the initrd file into guest memory (`mode`: see [`crate::mapload`]).
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    file: &mut File,
    mode: LoadMode,
) -> Result<(InitrdPlacement, LoadStats), BootError> {
    let io = |source| BootError::Io {
        what: "the initrd",
        source,
    };
    let size = file.seek(SeekFrom::End(0)).map_err(io)?;
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let p = place_initrd(layout, kernel, size)?;
    let len = usize::try_from(size).map_err(|_| BootError::InitrdTooBig {
        size,
        limit: p.address,
    })?;
    let mut reader = MappingReader::new(file, mode).map_err(io)?;
    mem.read_exact_volatile_from(GuestAddress(p.address), &mut reader, len)
        .map_err(|e| BootError::Memory(e.to_string()))?;
    Ok((p, reader.stats()))
}

/// Validates `cmdline` and writes it at [`layout::CMDLINE_START`].
pub fn load_command_line(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, BootError> {
    let mut c =
        Cmdline::new(layout::CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    c.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &c)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    Ok(cmdline.len() as u32 + 1)
}

/// Builds and writes the zero page.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<InitrdPlacement>,
    rsdp: u64,
) -> Result<(), BootError> {
    let mut params = boot_params::default();
    if let Some(h) = kernel.header {
        params.hdr = h;
    } else {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.type_of_loader = LOADER_TYPE;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDR_MAGIC;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_size;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = i.address as u32;
        params.hdr.ramdisk_size = i.size as u32;
        params.ext_ramdisk_image = (i.address >> 32) as u32;
        params.ext_ramdisk_size = (i.size >> 32) as u32;
    }
    params.acpi_rsdp_addr = rsdp;
    let e820 = layout.e820();
    if e820.len() > E820_MAX {
        return Err(BootError::Memory("too many e820 entries".into()));
    }
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::Memory(e.to_string()))
}

/// Writes a 16-byte real-mode stub at the reset vector that writes `value` to the
/// reset port and halts, so a guest that reboots "through the BIOS" (Linux does on a
/// hardware-reduced ACPI platform without EFI unless `reboot=` says otherwise) resets
/// the platform the way firmware would.
pub fn write_reset_vector_stub(
    mem: &GuestMemoryMmap,
    port: u16,
    value: u8,
) -> Result<(), BootError> {
    let [plo, phi] = port.to_le_bytes();
    let stub: [u8; 16] = [
        0xb0, value, // mov al, value
        0xba, plo, phi,  // mov dx, port
        0xee, // out dx, al
        0xfa, // cli
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
        0x90, 0x90, 0x90, 0x90, 0x90, 0x90,
    ];
    mem.write_slice(&stub, GuestAddress(layout::RESET_VECTOR))
        .map_err(|e| BootError::Memory(e.to_string()))
}

/// Reads back the zero page (tests and diagnostics).
pub fn read_boot_params(mem: &GuestMemoryMmap) -> Option<boot_params> {
    mem.read_obj(GuestAddress(layout::ZERO_PAGE_START)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(size: u64) -> (MemoryLayout, GuestMemoryMmap) {
        let l = MemoryLayout::new(size);
        let regions: Vec<_> = l
            .ram
            .iter()
            .map(|(a, s)| (GuestAddress(*a), *s as usize))
            .collect();
        (l, GuestMemoryMmap::from_ranges(&regions).expect("mem"))
    }

    fn tmpfile(data: &[u8]) -> File {
        let mut f = tempfile();
        f.write_all(data).expect("write");
        f.seek(SeekFrom::Start(0)).expect("seek");
        f
    }

    fn tempfile() -> File {
        let dir = std::env::temp_dir();
        let path = dir.join(format!(
            "fv-boot-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("tmp");
        let _ = std::fs::remove_file(&path);
        f
    }

    #[test]
    fn garbage_is_not_a_kernel() {
        let (_, m) = mem(64 << 20);
        for data in [
            &b""[..],
            b"abc",
            b"hello world, not a kernel",
            &[0u8; 4096][..],
        ] {
            let mut f = tmpfile(data);
            let e = load_kernel(&m, &mut f, LoadMode::Map).expect_err("must fail");
            assert!(e.to_string().starts_with("not a kernel image"), "{e}");
        }
    }

    #[test]
    fn truncated_elf_is_an_error_not_a_panic() {
        let (_, m) = mem(64 << 20);
        let mut data = b"\x7fELF\x02\x01\x01".to_vec();
        data.resize(100, 0xff);
        let mut f = tmpfile(&data);
        assert!(matches!(
            load_kernel(&m, &mut f, LoadMode::Map),
            Err(BootError::Load(_))
        ));
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let (l, _) = mem(512 << 20);
        let k = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x300_0000,
            header: None,
        };
        let p = place_initrd(&l, &k, 10_000).expect("fits");
        assert_eq!(p.address % 4096, 0);
        assert!(p.address + p.size <= 512 << 20);
        assert!(p.address >= k.end);
        assert!(matches!(
            place_initrd(&l, &k, 600 << 20),
            Err(BootError::InitrdTooBig { .. })
        ));
    }

    #[test]
    fn zero_page_has_e820_cmdline_and_rsdp() {
        let (l, m) = mem(256 << 20);
        let k = LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            header: None,
        };
        let n = load_command_line(&m, "console=ttyS0 quiet").expect("cmdline");
        let i = InitrdPlacement {
            address: 0x800_0000,
            size: 0x1000,
        };
        write_boot_params(&m, &l, &k, n, Some(i), 0xe0000).expect("zero page");
        let p = read_boot_params(&m).expect("read");
        assert_eq!({ p.hdr.boot_flag }, BOOT_FLAG);
        assert_eq!({ p.hdr.header }, HDR_MAGIC);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x800_0000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(usize::from(p.e820_entries), l.e820().len());
        let mut s = vec![0u8; 20];
        m.read_slice(&mut s, GuestAddress(layout::CMDLINE_START))
            .expect("read");
        assert_eq!(&s[..19], b"console=ttyS0 quiet");
        assert_eq!(s[19], 0);
    }

    #[test]
    fn reset_stub_targets_the_reset_port() {
        let (_, m) = mem(64 << 20);
        write_reset_vector_stub(&m, 0x602, 1).expect("stub");
        let mut s = [0u8; 16];
        m.read_slice(&mut s, GuestAddress(layout::RESET_VECTOR))
            .expect("read");
        assert_eq!(&s[..6], &[0xb0, 1, 0xba, 0x02, 0x06, 0xee]);
    }

    #[test]
    fn bad_cmdline_rejected() {
        let (_, m) = mem(64 << 20);
        assert!(load_command_line(&m, "a\u{7}b").is_err());
        let long = "x".repeat(layout::CMDLINE_MAX_SIZE + 1);
        assert!(load_command_line(&m, &long).is_err());
    }
}
