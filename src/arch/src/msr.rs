//! MSRs set on every vCPU at boot. The VMM sets them one at a time and only logs the
//! ones a host refuses: QEMU 7.2 aborts on some hosts when `IA32_ARCH_CAPABILITIES`
//! (0x10a) cannot be set; faultvisor carries on.

/// IA32_TSC.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS / ESP / EIP.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// STAR / LSTAR / CSTAR / SFMASK.
pub const MSR_STAR: u32 = 0xc000_0081;
/// KERNEL_GS_BASE.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRR default type: MTRRs enabled, write-back.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

/// (index, value) pairs to set at boot, in order.
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_CS + 1, 0),
        (MSR_IA32_SYSENTER_CS + 2, 0),
        (MSR_STAR, 0),
        (MSR_STAR + 1, 0),
        (MSR_STAR + 2, 0),
        (MSR_STAR + 3, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_is_unique() {
        let v = boot_msrs();
        let mut idx: Vec<u32> = v.iter().map(|m| m.0).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx.len(), v.len());
    }
}
