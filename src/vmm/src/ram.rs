//! Guest RAM: anonymous mappings aligned to 2 MiB in the host address space and
//! advised for transparent huge pages (`MADV_HUGEPAGE`).
//!
//! KVM maps a guest page with a huge page only where the guest-physical and the host
//! virtual address agree modulo the huge page size and the host backs it with one.
//! `mmap` of anonymous memory gives 4 KiB alignment (before Linux 6.7), so without this
//! every guest page is mapped with 4 KiB in KVM's page tables — an EPT/NPT fault per
//! 4 KiB on first touch and more TLB misses after. Each range is reserved 2 MiB larger,
//! trimmed to an aligned start, and handed to vm-memory as a raw mapping. vm-memory
//! does not unmap raw mappings: guest RAM lives as long as the process (a faultvisor
//! process runs one VM).

use std::io;

use vm_memory::{GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// The alignment of guest RAM in the host address space.
pub const HUGE_PAGE: usize = 2 << 20;

/// Maps `size` bytes aligned to [`HUGE_PAGE`], advised for huge pages.
fn map_aligned(size: usize) -> io::Result<MmapRegion> {
    let len = size
        .checked_add(HUGE_PAGE)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "guest RAM too large"))?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: a fresh anonymous private mapping at an address the kernel picks; no
    // existing memory is affected.
    let raw = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, -1, 0) };
    if raw == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    let head = aligned - start;
    let tail = len - head - size;
    // SAFETY: both ranges lie inside the mapping made above and outside the part that
    // is kept; nothing refers to them.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((aligned + size) as *mut libc::c_void, tail);
        }
        // Advice only: without THP the mapping still works, with 4 KiB pages.
        libc::madvise(aligned as *mut libc::c_void, size, libc::MADV_HUGEPAGE);
    }
    // SAFETY: `aligned..aligned + size` is a private anonymous read/write mapping this
    // function made and never unmaps; vm-memory takes it over as a raw region for the
    // life of the process.
    unsafe { MmapRegion::build_raw(aligned as *mut u8, size, prot, flags) }
        .map_err(|e| io::Error::other(e.to_string()))
}

/// Guest RAM for `ranges` (guest-physical start, size), every range 2 MiB-aligned in
/// the host address space.
pub fn guest_ram(ranges: &[(GuestAddress, usize)]) -> io::Result<GuestMemoryMmap> {
    let mut regions = Vec::with_capacity(ranges.len());
    for &(gpa, size) in ranges {
        let region = map_aligned(size)?;
        log::debug!(
            "guest RAM {:#x}+{size:#x} at host {:#x}",
            gpa.0,
            region.as_ptr() as usize
        );
        regions.push(
            GuestRegionMmap::new(region, gpa)
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "guest RAM range"))?,
        );
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| io::Error::other(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};

    #[test]
    fn guest_ram_is_2m_aligned_in_the_host() {
        let ranges = [
            (GuestAddress(0), 0xc000_0000usize >> 8),
            (GuestAddress(1 << 32), 3 << 20),
        ];
        let mem = guest_ram(&ranges).expect("guest RAM");
        assert_eq!(mem.num_regions(), 2);
        for r in mem.iter() {
            let host = r.as_ptr() as usize;
            assert_eq!(
                host % HUGE_PAGE,
                0,
                "region at {:#x} maps to {host:#x}",
                r.start_addr().0
            );
        }
        // Usable at both ends of each range.
        mem.write_obj(0x55u8, GuestAddress((0xc000_0000u64 >> 8) - 1))
            .expect("end of the first range");
        mem.write_obj(0xaau8, GuestAddress((1 << 32) + (3 << 20) - 1))
            .expect("end of the second range");
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress((1 << 32) + (3 << 20) - 1))
                .expect("read"),
            0xaa
        );
    }
}
