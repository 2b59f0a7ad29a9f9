//! Per-vCPU CPUID, derived from what KVM supports (`KVM_GET_SUPPORTED_CPUID`): APIC IDs,
//! the hypervisor bit, and consistent topology leaves (1, 4, 0xB, 0x1F, 0x8000_0008,
//! 0x8000_001E) for one socket of `nr_vcpus` single-threaded cores. Intel SDM vol. 2A
//! "CPUID"; AMD APM vol. 3 appendix E.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// Leaf 1 ECX: hypervisor present.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: multi-threading (logical processor count valid).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 0xB/0x1F level types.
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to number `n` things (0 for 1).
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

fn topology_entry(e: &mut kvm_cpuid_entry2, apic_id: u32, nr_vcpus: u32) {
    let core_bits = id_bits(nr_vcpus);
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = (LEVEL_SMT << 8) | e.index;
        }
        1 => {
            e.eax = core_bits;
            e.ebx = nr_vcpus;
            e.ecx = (LEVEL_CORE << 8) | e.index;
        }
        _ => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = e.index;
        }
    }
    e.edx = apic_id;
}

/// Adjusts `cpuid` (KVM's supported set) for vCPU `vcpu_id` of `nr_vcpus`. The APIC ID
/// of vCPU n is n.
pub fn configure(cpuid: &mut CpuId, vcpu_id: u32, nr_vcpus: u32) {
    let apic_id = vcpu_id;
    let nr = nr_vcpus.max(1);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0x1 => {
                // Leaf 1 holds the low 8 bits of the APIC ID (leaf 0xB has all 32).
                e.ebx = (e.ebx & 0x0000_ffff) | ((apic_id & 0xff) << 24) | (nr.min(255) << 16);
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                if nr > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            // Deterministic cache parameters (valid subleaves have a cache type):
            // cores per package − 1 in EAX 31:26, one thread per cache (EAX 25:14 = 0).
            0x4 if e.eax & 0x1f != 0 => {
                let cores = nr.min(64) - 1;
                e.eax = (e.eax & 0x3fff) | (cores << 26);
            }
            0xb | 0x1f => topology_entry(e, apic_id, nr),
            0x8000_0008 => {
                // AMD: ECX 7:0 NC (cores − 1), 15:12 ApicIdCoreIdSize.
                e.ecx = (e.ecx & !0xf0ff) | (id_bits(nr) << 12) | (nr - 1).min(255);
            }
            0x8000_001e => {
                e.eax = apic_id;
                // Compute unit ID = core, one thread per unit.
                e.ebx = (e.ebx & !0xffff) | (apic_id & 0xff);
                e.ecx &= !0xff;
            }
            _ => {}
        }
    }
}

/// A CPUID feature `--cpu` can add or remove: (name, leaf, subleaf, register, bit).
/// Registers: 0 EAX, 1 EBX, 2 ECX, 3 EDX.
pub const FEATURES: &[(&str, u32, u32, u8, u8)] = &[
    ("vmx", 1, 0, 2, 5),
    ("pcid", 1, 0, 2, 17),
    ("x2apic", 1, 0, 2, 21),
    ("tsc-deadline", 1, 0, 2, 24),
    ("xsave", 1, 0, 2, 26),
    ("invpcid", 7, 0, 1, 10),
    ("umip", 7, 0, 2, 2),
    ("pku", 7, 0, 2, 3),
    ("la57", 7, 0, 2, 16),
    ("svm", 0x8000_0001, 0, 2, 2),
    ("rdtscp", 0x8000_0001, 0, 3, 27),
];

/// Features to add to and remove from KVM's supported CPUID (`--cpu host,+f,-f`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    /// Features to set.
    pub add: Vec<&'static str>,
    /// Features to clear.
    pub remove: Vec<&'static str>,
    /// The vendor string leaf 0 reports instead of the host's (`vendor=GenuineIntel`):
    /// KVM emulates some MSRs after the guest's vendor (SYSENTER on SVM).
    pub vendor: Option<[u8; 12]>,
}

impl std::str::FromStr for CpuFeatures {
    type Err = String;

    /// `host[,+name|-name]...` (a bare `name` means `+name`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        match parts.next() {
            Some("host") => {}
            Some(m) => {
                return Err(format!(
                    "'{m}' is not a CPU model faultvisor offers: it passes the host's CPUID through (use host[,+FEATURE][,-FEATURE])"
                ))
            }
            None => return Err("empty CPU description".into()),
        }
        let mut f = Self::default();
        for p in parts {
            if let Some(v) = p.strip_prefix("vendor=") {
                let b: [u8; 12] = v
                    .as_bytes()
                    .try_into()
                    .ok()
                    .filter(|b: &[u8; 12]| b.iter().all(|c| c.is_ascii_graphic()))
                    .ok_or_else(|| {
                        format!("vendor={v}: a CPU vendor string is 12 printable ASCII characters (GenuineIntel, AuthenticAMD)")
                    })?;
                f.vendor = Some(b);
                continue;
            }
            let (add, name) = match p.strip_prefix('-') {
                Some(n) => (false, n),
                None => (true, p.strip_prefix('+').unwrap_or(p)),
            };
            let Some(&(known, ..)) = FEATURES.iter().find(|x| x.0 == name) else {
                let names: Vec<&str> = FEATURES.iter().map(|x| x.0).collect();
                return Err(format!(
                    "unknown CPU feature '{name}' (known: {})",
                    names.join(", ")
                ));
            };
            if add {
                f.add.push(known);
            } else {
                f.remove.push(known);
            }
        }
        Ok(f)
    }
}

fn feature_bit<'a>(cpuid: &'a mut CpuId, name: &str) -> Option<(&'a mut u32, u32)> {
    let &(_, leaf, sub, reg, bit) = FEATURES.iter().find(|x| x.0 == name)?;
    let e = cpuid
        .as_mut_slice()
        .iter_mut()
        .find(|e| e.function == leaf && e.index == sub)?;
    let r = match reg {
        0 => &mut e.eax,
        1 => &mut e.ebx,
        2 => &mut e.ecx,
        _ => &mut e.edx,
    };
    Some((r, 1 << bit))
}

/// Whether `cpuid` has feature `name`.
pub fn has_feature(cpuid: &CpuId, name: &str) -> bool {
    let mut c = cpuid.clone();
    feature_bit(&mut c, name).is_some_and(|(r, m)| *r & m != 0)
}

impl CpuFeatures {
    /// Applies the additions and removals to `cpuid`; returns the additions whose leaf
    /// the CPUID lacks (nothing to set them in).
    pub fn apply(&self, cpuid: &mut CpuId) -> Vec<&'static str> {
        let mut missing = Vec::new();
        for name in &self.add {
            match feature_bit(cpuid, name) {
                Some((r, m)) => *r |= m,
                None => missing.push(*name),
            }
        }
        for name in &self.remove {
            if let Some((r, m)) = feature_bit(cpuid, name) {
                *r &= !m;
            }
        }
        if let Some(v) = self.vendor {
            let word = |i: usize| u32::from_le_bytes([v[i], v[i + 1], v[i + 2], v[i + 3]]);
            for e in cpuid.as_mut_slice() {
                // Leaf 0 (and AMD's 0x8000_0000, where it carries one): EBX, EDX, ECX.
                if e.function == 0 || (e.function == 0x8000_0000 && e.ebx != 0) {
                    e.ebx = word(0);
                    e.edx = word(4);
                    e.ecx = word(8);
                }
            }
        }
        missing
    }
}

/// The APIC ID a vCPU's CPUID reports (leaf 1 EBX 31:24), for checks.
pub fn apic_id_of(cpuid: &CpuId) -> Option<u32> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == 1)
        .map(|e| e.ebx >> 24)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let leaves = [
            (0x1, 0, 0x0008_0800, 0, 0),
            (0xb, 0, 0, 0, 0),
            (0xb, 1, 0, 0, 0),
            (0xb, 2, 0, 0, 0),
            (0x8000_0008, 0, 0, 0, 0x0000_7003),
            (0x8000_001e, 0, 0, 0x0100, 0),
        ];
        let entries: Vec<kvm_cpuid_entry2> = leaves
            .iter()
            .map(|(f, i, ebx, ecx, _)| kvm_cpuid_entry2 {
                function: *f,
                index: *i,
                ebx: *ebx,
                ecx: *ecx,
                ..Default::default()
            })
            .collect();
        CpuId::from_entries(&entries).expect("cpuid")
    }

    #[test]
    fn vendor_string_replaces_leaf_0() {
        let f: CpuFeatures = "host,vendor=GenuineIntel".parse().expect("parse");
        let mut c = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 0,
            eax: 0xd,
            ..Default::default()
        }])
        .expect("cpuid");
        assert!(f.apply(&mut c).is_empty());
        let e = c.as_slice()[0];
        let mut s = Vec::new();
        for r in [e.ebx, e.edx, e.ecx] {
            s.extend_from_slice(&r.to_le_bytes());
        }
        assert_eq!(&s, b"GenuineIntel");
        assert_eq!(e.eax, 0xd);
        for bad in [
            "host,vendor=Intel",
            "host,vendor=Genuine Intel",
            "host,vendor=",
        ] {
            assert!(bad.parse::<CpuFeatures>().is_err(), "{bad}");
        }
    }

    #[test]
    fn per_vcpu_apic_ids_and_topology() {
        for (id, n) in [(0u32, 1u32), (1, 2), (5, 8), (2, 3)] {
            let mut c = sample();
            configure(&mut c, id, n);
            assert_eq!(apic_id_of(&c), Some(id));
            let s = c.as_slice();
            let l1 = s.iter().find(|e| e.function == 1).expect("leaf1");
            assert_eq!((l1.ebx >> 16) & 0xff, n);
            assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
            let b1 = s
                .iter()
                .find(|e| e.function == 0xb && e.index == 1)
                .expect("0xb/1");
            assert_eq!(b1.ebx, n);
            assert_eq!(b1.edx, id);
            assert!(1u32 << b1.eax >= n);
            assert_eq!((b1.ecx >> 8) & 0xff, LEVEL_CORE);
            let b2 = s
                .iter()
                .find(|e| e.function == 0xb && e.index == 2)
                .expect("0xb/2");
            assert_eq!(b2.ebx, 0);
            let amd = s.iter().find(|e| e.function == 0x8000_0008).expect("amd");
            assert_eq!(amd.ecx & 0xff, n - 1);
        }
    }

    #[test]
    fn features_parse_and_apply() {
        let f: CpuFeatures = "host,+tsc-deadline,-x2apic,pcid".parse().expect("parse");
        assert_eq!(f.add, vec!["tsc-deadline", "pcid"]);
        assert_eq!(f.remove, vec!["x2apic"]);
        let mut c = sample();
        assert_eq!(f.apply(&mut c), Vec::<&str>::new());
        assert!(has_feature(&c, "tsc-deadline") && !has_feature(&c, "x2apic"));
        let g: CpuFeatures = "host,+invpcid".parse().expect("parse");
        assert_eq!(g.apply(&mut c), vec!["invpcid"], "no leaf 7 in the sample");
        for (bad, msg) in [
            ("qemu64", "not a CPU model"),
            ("host,+avx9", "unknown CPU feature 'avx9'"),
        ] {
            let e = bad.parse::<CpuFeatures>().expect_err(bad);
            assert!(e.contains(msg), "{e}");
        }
    }

    #[test]
    fn id_bits_values() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(id_bits), [0, 1, 2, 2, 3, 3, 4]);
    }
}
