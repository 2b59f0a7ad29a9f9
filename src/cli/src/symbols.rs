//! Symbol tables for `faultvisor idt --symbols FILE`: an ELF file's `.symtab` (the probe
//! guest, a vmlinux) or a text file in System.map / `/proc/kallsyms` format.

use std::path::Path;

/// Address-sorted symbols.
#[derive(Debug, Default)]
pub struct Symbols(Vec<(u64, String)>);

// Offsets come from the file: every sum is checked (a file can name any offset).
fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(o..o.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(o..o.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], o: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(o..o.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A NUL-terminated name at `o` (at most 4 KiB long, so that a file of names without
/// terminators costs linear time, not quadratic).
fn cstr(b: &[u8], o: usize) -> Option<String> {
    let s = b.get(o..)?;
    let s = &s[..s.len().min(4096)];
    let end = s.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&s[..end]).ok().map(str::to_string)
}

impl Symbols {
    /// Reads `path`: ELF64 little-endian with a symbol table, or System.map text.
    pub fn load(path: &Path) -> Result<Self, String> {
        let data =
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&data).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Parses the bytes of a symbol file (ELF64 with a symbol table, or System.map).
    pub fn parse(data: &[u8]) -> Result<Self, String> {
        let mut syms = if data.starts_with(b"\x7fELF") {
            Self::elf(data).ok_or_else(|| "not a 64-bit ELF with a symbol table".to_string())?
        } else {
            Self::system_map(data)
        };
        if syms.is_empty() {
            return Err("no symbols found".into());
        }
        syms.sort();
        syms.dedup_by(|a, b| a.0 == b.0);
        Ok(Self(syms))
    }

    fn elf(b: &[u8]) -> Option<Vec<(u64, String)>> {
        if b.get(4) != Some(&2) || b.get(5) != Some(&1) {
            return None;
        }
        let shoff = u64_at(b, 0x28)? as usize;
        let shentsize = usize::from(u16_at(b, 0x3a)?);
        let shnum = usize::from(u16_at(b, 0x3c)?);
        if shentsize < 64 {
            return None;
        }
        let sh = |i: usize| -> Option<(u32, usize, usize, u32)> {
            let o = shoff.checked_add(i.checked_mul(shentsize)?)?;
            Some((
                u32_at(b, o.checked_add(4)?)?,
                u64_at(b, o.checked_add(24)?)? as usize,
                u64_at(b, o.checked_add(32)?)? as usize,
                u32_at(b, o.checked_add(40)?)?,
            ))
        };
        let mut out = Vec::new();
        for i in 0..shnum.min(4096) {
            let Some((ty, off, size, link)) = sh(i) else {
                continue;
            };
            if ty != 2 {
                continue; // SHT_SYMTAB
            }
            let (_, stroff, _, _) = sh(link as usize)?;
            for k in 0..size / 24 {
                let e = off.checked_add(k * 24)?;
                let (Some(name), Some(info), Some(value)) = (
                    u32_at(b, e),
                    e.checked_add(4).and_then(|i| b.get(i)),
                    e.checked_add(8).and_then(|i| u64_at(b, i)),
                ) else {
                    break;
                };
                let kind = info & 0xf;
                if value == 0 || !(kind == 0 || kind == 1 || kind == 2) {
                    continue; // NOTYPE, OBJECT and FUNC symbols with an address
                }
                if let Some(n) = cstr(b, stroff.checked_add(name as usize)?) {
                    if !n.is_empty() && !n.starts_with('$') && !n.starts_with(".L") {
                        out.push((value, n));
                    }
                }
            }
        }
        Some(out)
    }

    fn system_map(b: &[u8]) -> Vec<(u64, String)> {
        String::from_utf8_lossy(b)
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace();
                let addr = u64::from_str_radix(w.next()?, 16).ok()?;
                let _ty = w.next()?;
                let name = w.next()?;
                (addr != 0).then(|| (addr, name.to_string()))
            })
            .collect()
    }

    /// `name+0xoff` for `addr` (the closest symbol at or below it, within 1 MiB).
    pub fn resolve(&self, addr: u64) -> Option<String> {
        let i = self.0.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
        let (a, n) = &self.0[i];
        let off = addr - a;
        if off > 1 << 20 {
            return None;
        }
        Some(if off == 0 {
            n.clone()
        } else {
            format!("{n}+{off:#x}")
        })
    }

    /// Number of symbols.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_map_and_resolution() {
        let dir = std::env::temp_dir().join(format!("fv-syms-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("System.map");
        std::fs::write(&p, "ffffffff81000000 T _text\nffffffff81001000 T start_kernel\nbad line\n0000000000000000 A zero\n").expect("w");
        let s = Symbols::load(&p).expect("load");
        assert_eq!(s.len(), 2);
        assert_eq!(
            s.resolve(0xffff_ffff_8100_1010).as_deref(),
            Some("start_kernel+0x10")
        );
        assert_eq!(s.resolve(0xffff_ffff_8100_0000).as_deref(), Some("_text"));
        assert_eq!(s.resolve(0x1000), None);
        let junk = dir.join("junk.elf");
        std::fs::write(&junk, b"\x7fELF\x02\x01garbage").expect("w");
        assert!(Symbols::load(&junk).is_err());
        std::fs::write(&junk, b"").expect("w");
        assert!(Symbols::load(&junk).is_err());
    }

    #[test]
    fn the_embedded_probe_has_its_isr_stubs() {
        let dir = std::env::temp_dir().join(format!("fv-syms2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("probe.elf");
        std::fs::write(&p, crate::demo::PROBE_ELF).expect("w");
        let s = Symbols::load(&p).expect("load");
        let base =
            s.0.iter()
                .find(|(_, n)| n == "isr_stubs")
                .map(|(a, _)| *a)
                .expect("isr_stubs");
        assert_eq!(s.resolve(base + 0x500).as_deref(), Some("isr_stubs+0x500"));
    }
}
