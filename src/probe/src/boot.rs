//! Entry points, page tables, the GDT and the AP trampoline.
//!
//! Two ways in, one way on:
//! - faultvisor loads the ELF and enters `entry64` in long mode with `rsi` pointing at
//!   the Linux zero page (boot protocol 64-bit entry);
//! - QEMU's `-kernel` finds the PVH note and enters `pvh_entry32` in 32-bit protected
//!   mode, paging off, with `ebx` pointing at an `hvm_start_info`.
//!
//! Both build the same identity map of the first 4 GiB (2 MiB pages), load the probe's
//! GDT and call [`crate::probe_main`] on the first CPU stack. Application processors
//! start in real mode at the trampoline (copied to [`TRAMPOLINE_ADDR`]), switch to
//! protected mode with the same GDT and join the 32-bit path into long mode.

use core::arch::global_asm;

/// Where the BSP copies the AP trampoline (SIPI vector `TRAMPOLINE_ADDR >> 12`).
pub const TRAMPOLINE_ADDR: u64 = 0x3000;

/// How the probe was entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootKind {
    /// Linux boot protocol, 64-bit entry (faultvisor): info is the zero page.
    Linux,
    /// PVH (QEMU): info is an `hvm_start_info`.
    Pvh,
}

impl BootKind {
    /// Decodes the value the entry code passes.
    pub fn from_raw(v: u64) -> Self {
        if v == 2 {
            Self::Pvh
        } else {
            Self::Linux
        }
    }
}

extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
}

/// The AP trampoline's bytes (position independent within its page).
pub fn trampoline() -> &'static [u8] {
    // SAFETY: both symbols are labels in the same section of this image, start before
    // end; the bytes between them are immutable code.
    unsafe {
        let start = core::ptr::addr_of!(ap_tramp_start);
        let end = core::ptr::addr_of!(ap_tramp_end);
        core::slice::from_raw_parts(start, end as usize - start as usize)
    }
}

global_asm!(
    r#"
    .section .note.pvh, "a"
    .p2align 2
    .long 4                     /* namesz: "Xen\0" */
    .long 8                     /* descsz */
    .long 18                    /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .p2align 2
    .quad pvh_entry32

    .section .data
    .p2align 12
    .globl boot_pml4
boot_pml4:
    .quad boot_pdpt + 3
    .fill 511, 8, 0
boot_pdpt:
    .quad boot_pd + 0x0003
    .quad boot_pd + 0x1003
    .quad boot_pd + 0x2003
    .quad boot_pd + 0x3003
    .fill 508, 8, 0

    .p2align 4
    .globl boot_gdt
boot_gdt:
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x08: 64-bit code */
    .quad 0x00cf92000000ffff    /* 0x10: data */
    .quad 0x00cf9a000000ffff    /* 0x18: 32-bit code (AP trampoline) */
boot_gdt_end:
boot_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .quad boot_gdt

    .globl ap_stack_top
ap_stack_top:
    .quad 0

    .section .bss
    .p2align 12
boot_pd:
    .skip 4 * 4096
    .globl cpu_stacks
cpu_stacks:
    .skip {stack_size} * {max_cpus}
stacks_top0 = cpu_stacks + {stack_size}

    .macro load_data_segments
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    .endm

    .section .text.boot, "ax"
    .code64
    .globl entry64
entry64:
    cli
    cld
    movq $stacks_top0, %rsp
    movq %rsi, %r12             /* zero page */
    movl $1, %r13d
    call fill_pd64
    movq $boot_pml4, %rax
    movq %rax, %cr3
    jmp long_common

fill_pd64:
    movq $boot_pd, %rdi
    movq $0x83, %rax            /* present, writable, 2 MiB */
    movl $2048, %ecx
1:  movq %rax, (%rdi)
    addq $0x200000, %rax
    addq $8, %rdi
    decl %ecx
    jnz 1b
    ret

long_common:
    lgdt boot_gdtr
    load_data_segments
    pushq $0x08
    leaq 2f(%rip), %rax
    pushq %rax
    lretq
2:  movq $stacks_top0, %rsp
    movq %r13, %rdi
    movq %r12, %rsi
    call probe_main
3:  cli
    hlt
    jmp 3b

    .code32
    .globl pvh_entry32
pvh_entry32:
    cli
    cld
    movl $stacks_top0, %esp
    movl %ebx, %esi
    movl $boot_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
1:  movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    decl %ecx
    jnz 1b
    call enter_long_mode32
    .code64
    movl %esi, %r12d
    movl $2, %r13d
    jmp long_common

    /* 32-bit: PAE, CR3, EFER.LME, paging; far jump into 64-bit code right after the
       call site (returns in long mode by jumping to the return address). */
    .code32
enter_long_mode32:
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $boot_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    popl %eax                   /* return address: continue there in 64-bit mode */
    lgdt boot_gdtr
    pushl $0x08
    pushl %eax
    lret

    /* Application processors: real mode at TRAMPOLINE_ADDR, CS = TRAMPOLINE_ADDR >> 4. */
    .code16
    .globl ap_tramp_start
ap_tramp_start:
    cli
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_tramp_gdtr - ap_tramp_start)
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x18, $ap_entry32
    .p2align 2
ap_tramp_gdtr:
    .word boot_gdt_end - boot_gdt - 1
    .long boot_gdt
    .globl ap_tramp_end
ap_tramp_end:

    .code32
ap_entry32:
    movw $0x10, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movl ap_stack_top, %esp
    call enter_long_mode32
    .code64
    load_data_segments
    movq ap_stack_top(%rip), %rsp
    call ap_main
4:  cli
    hlt
    jmp 4b
"#,
    stack_size = const crate::smp::STACK_SIZE,
    max_cpus = const crate::smp::MAX_CPUS,
    options(att_syntax)
);
