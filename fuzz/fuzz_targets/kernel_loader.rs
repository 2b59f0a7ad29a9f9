//! The kernel loaders (ELF vmlinux and bzImage, through linux-loader) on arbitrary
//! images, into 32 MiB of guest RAM, copied or (an odd first byte) mapped from the
//! file. Checked: no panic; a loaded kernel's entry point and end lie in guest RAM.
//! Mapped loads go to fresh guest RAM each time: the next input truncates the file,
//! and pages still mapped from it would become unreadable.
#![no_main]

use std::io::Write;
use std::os::fd::FromRawFd;
use std::sync::{Mutex, OnceLock};

use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

const MEM: usize = 32 << 20;

fn state() -> &'static Mutex<(GuestMemoryMmap, std::fs::File)> {
    static S: OnceLock<Mutex<(GuestMemoryMmap, std::fs::File)>> = OnceLock::new();
    S.get_or_init(|| {
        let mem = faultvisor_fuzz::memory(MEM);
        // SAFETY: memfd_create with a valid NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"fuzz-kernel".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh descriptor owned by nothing else.
        let file = unsafe { std::fs::File::from_raw_fd(fd) };
        Mutex::new((mem, file))
    })
}

fuzz_target!(|data: &[u8]| {
    let mut g = state().lock().unwrap_or_else(|p| p.into_inner());
    let (mem, file) = &mut *g;
    if file.set_len(0).is_err() || file.write_all(data).is_err() {
        return;
    }
    let map = data.first().is_some_and(|b| b & 1 == 1);
    let fresh;
    let (mem, mode) = if map {
        fresh = faultvisor_fuzz::memory(MEM);
        (&fresh, arch::mapload::LoadMode::Map)
    } else {
        (&*mem, arch::mapload::LoadMode::Copy)
    };
    if let Ok((k, _)) = arch::boot::load_kernel(mem, file, mode) {
        assert!(mem.address_in_range(GuestAddress(k.entry)) || k.entry >= MEM as u64);
        assert!(k.end <= MEM as u64 || k.end >= k.entry);
    }
});
