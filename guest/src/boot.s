/*
 * Nimbus test guest: everything that runs at CPL0.
 *
 * On PVM hosts CPL0 code is emulated instruction by instruction (about 1 us
 * each) and the emulator refuses SSE/AVX/XSAVE, so this file is kept small,
 * uses integer instructions only, and hands over to CPL3 Rust code as soon as
 * the machine is set up. Paths through here:
 *
 *   pvh_start32      PVH entry (32-bit protected mode, paging off, %ebx =
 *                    hvm_start_info) -> long mode -> bsp_entry64 -> CPL3
 *                    user_start_bsp -> rust_main
 *   ap_trampoline    copied below 1 MiB by the BSP; an AP starts there in
 *                    real mode after INIT/SIPI -> ap_entry32 -> ap_entry64 ->
 *                    CPL3 user_start_ap -> rust_ap_main
 *   isr_stubs        all 256 IDT vectors -> isr_common: an #UD at
 *                    svc_park_insn is the "park this CPU" request from CPL3,
 *                    at svc_cpuid_insn / svc_wrmsr_insn a CPUID / WRMSR
 *                    request (done at CPL0, then back to CPL3),
 *                    everything else is recorded in fault_info and reported
 *                    by rust_fault at CPL3; except vector 2 (NMI), whose stub
 *                    only counts it in nmi_count
 *
 * Written in AT&T syntax for LLVM's integrated assembler (global_asm!).
 */

.set KCODE64,        0x08
.set KDATA,          0x10
.set UDATA,          0x18
.set UCODE64,        0x20
.set KCODE32,        0x28
.set TSS_SEL0,       0x30
.set MAX_CPUS,       64
.set TSS_SIZE,       104
.set IOMAP_SIZE,     8192
.set KSTACK_SIZE,    8192
.set DFSTACK_SIZE,   4096
.set BSP_USTACK_SIZE, 262144
.set AP_USTACK_SIZE, 16384
.set FAULT_STACK_SIZE, 65536
/* Page table entry flags: present, writable, user, (page size) */
.set PTE_TABLE,      0x07
.set PTE_LARGE,      0x87
/* cache disable + write-through for the 3..4 GiB MMIO hole */
.set PTE_UNCACHED,   0x18
/* Device interrupt vectors counted by isr_common (arch::IRQ_VECTOR_BASE/IRQ_VECTORS) */
.set IRQ_BASE,       0x40
.set IRQ_COUNT,      64
/* RFLAGS for CPL3: IOPL=3, IF=1, reserved bit 1 */
.set USER_RFLAGS,    0x3202

/*
 * Switch from 32-bit protected mode (flat segments, paging off) to long mode
 * and far-jump to \target. Also sets up CR0/CR4 for user-mode SSE: MP=1,
 * EM=0, TS=0, OSFXSR=1, OSXMMEXCPT=1, and clears CD/NW (set after INIT).
 */
.macro ENTER_LONG_MODE target
    movl %cr4, %eax
    orl $(0x20 | 0x200 | 0x400), %eax   /* PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx              /* IA32_EFER */
    rdmsr
    orl $0x100, %eax                    /* LME */
    wrmsr
    movl %cr0, %eax
    andl $0x9ffffff3, %eax              /* clear CD, NW, TS, EM */
    orl $0x80000003, %eax               /* PG | MP | PE */
    movl %eax, %cr0
    ljmp $KCODE64, $\target
.endm

/* ------------------------------------------------------------------------ */
/* PVH ELF note: XEN_ELFNOTE_PHYS32_ENTRY (18), owner "Xen", 32-bit entry.   */
/* ------------------------------------------------------------------------ */
.section .note.pvh, "a", @note
.balign 4
    .long 4                 /* namesz: "Xen\0" */
    .long 4                 /* descsz: 32-bit physical address */
    .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
    .asciz "Xen"
    .long pvh_start32

/* ------------------------------------------------------------------------ */
/* 32-bit entry                                                             */
/* ------------------------------------------------------------------------ */
.section .text.boot, "ax", @progbits
.code32
.global pvh_start32
pvh_start32:
    cli
    cld
    movl %ebx, %esi                     /* hvm_start_info, kept in %esi */

    /* 1 GiB pages beyond the first 8 GiB only if the CPU has them. */
    movl $0x80000000, %eax
    cpuid
    cmpl $0x80000001, %eax
    jb 1f
    movl $0x80000001, %eax
    cpuid
    btl $26, %edx
    jc 2f
1:  movl $(pdpt + 64), %edi             /* clear PDPT entries 8..511 */
    movl $(504 * 2), %ecx
    xorl %eax, %eax
    rep stosl
    movl $0, mapped_limit
    movl $2, mapped_limit + 4           /* 8 GiB */
2:
    lgdt gdtr
    ljmp $KCODE32, $3f
3:  movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    ENTER_LONG_MODE bsp_entry64

/* ------------------------------------------------------------------------ */
/* AP path: real-mode trampoline (copied to a page below 1 MiB), then 32/64 */
/* ------------------------------------------------------------------------ */
.code16
.global ap_trampoline_start
.global ap_trampoline_end
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_trampoline_gdtr - ap_trampoline_start
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $KCODE32, $ap_entry32
.balign 8
ap_trampoline_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:

.code32
ap_entry32:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    ENTER_LONG_MODE ap_entry64

.code64
ap_entry64:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    movl $1, %eax
    lock xaddl %eax, ap_next_index(%rip) /* %eax = this AP's CPU index */
    cmpl $MAX_CPUS, %eax
    jae park
    movl %eax, %ebx
    leaq kstacks(%rip), %rsp
    leal 1(%rbx), %ecx
    shll $13, %ecx                      /* * KSTACK_SIZE */
    addq %rcx, %rsp
    movl %ebx, %edi
    call install_tss
    lidt idtr(%rip)
    leaq ap_ustacks(%rip), %rax
    leal 1(%rbx), %ecx
    shll $14, %ecx                      /* * AP_USTACK_SIZE */
    addq %rcx, %rax
    movl %ebx, %edi                     /* argument for rust_ap_main */
    leaq user_start_ap(%rip), %rcx
    jmp enter_user

/* ------------------------------------------------------------------------ */
/* BSP, 64-bit                                                              */
/* ------------------------------------------------------------------------ */
bsp_entry64:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    xorl %eax, %eax
    movw %ax, %fs
    movw %ax, %gs
    leaq kstacks + KSTACK_SIZE(%rip), %rsp
    movl %esi, start_info_paddr(%rip)
    call build_idt
    lidt idtr(%rip)
    xorl %edi, %edi
    call install_tss
    /* Mask both 8259s: SeaBIOS leaves the PIT ticking on IRQ0. */
    movb $0xff, %al
    outb %al, $0xa1
    outb %al, $0x21
    leaq bsp_ustack + BSP_USTACK_SIZE(%rip), %rax
    leaq user_start_bsp(%rip), %rcx
    xorl %edi, %edi
    /* fall through */

/* iretq to CPL3 at %rcx with user stack %rax; %rdi is passed through. */
enter_user:
    movw $(UDATA | 3), %dx
    movw %dx, %ds
    movw %dx, %es
    pushq $(UDATA | 3)
    pushq %rax
    pushq $USER_RFLAGS
    pushq $(UCODE64 | 3)
    pushq %rcx
    iretq

/*
 * install_tss(%edi = cpu index): write GDT descriptor TSS_SEL0 + 16*index
 * for tss_array[index] and load it into TR. All TSSes share one I/O
 * permission bitmap (iomap) that allows every port: TSS i's I/O map base
 * points past the remaining TSSes to it, and its limit covers the bitmap
 * and the 0xff terminator byte.
 */
install_tss:
    movl %edi, %eax
    imull $TSS_SIZE, %eax
    leaq tss_array(%rip), %rsi
    addq %rax, %rsi                     /* %rsi = TSS base */
    movl $MAX_CPUS, %ecx
    subl %edi, %ecx
    imull $TSS_SIZE, %ecx
    addl $IOMAP_SIZE, %ecx              /* %ecx = limit (< 64 KiB) */
    movq %rcx, %rax
    movq %rsi, %rdx
    andl $0xffffff, %edx
    shlq $16, %rdx
    orq %rdx, %rax                      /* base 23:0 */
    movl $0x89, %edx                    /* present, 64-bit available TSS */
    shlq $40, %rdx
    orq %rdx, %rax
    movq %rsi, %rdx
    shrq $24, %rdx
    andl $0xff, %edx
    shlq $56, %rdx
    orq %rdx, %rax                      /* base 31:24 */
    leaq gdt_tss(%rip), %r8
    movl %edi, %edx
    shll $4, %edx
    addq %rdx, %r8
    movq %rax, (%r8)
    movq %rsi, %rax
    shrq $32, %rax
    movq %rax, 8(%r8)                   /* base 63:32 */
    movl %edi, %eax
    shll $4, %eax
    addl $TSS_SEL0, %eax
    ltr %ax
    ret

/* Fill all 256 IDT gates: interrupt gates to isr_stubs + 16 * vector. */
build_idt:
    leaq isr_stubs(%rip), %rax
    leaq idt(%rip), %rdi
    xorl %ecx, %ecx
1:  movq %rax, %rdx
    movw %dx, (%rdi)
    movw $KCODE64, 2(%rdi)
    movw $0x8e00, 4(%rdi)               /* present, DPL0, interrupt gate */
    shrq $16, %rdx
    movw %dx, 6(%rdi)
    shrq $16, %rdx
    movl %edx, 8(%rdi)
    movl $0, 12(%rdi)
    addq $16, %rax
    addq $16, %rdi
    incl %ecx
    cmpl $256, %ecx
    jne 1b
    leaq idt(%rip), %rdi
    movb $1, 8 * 16 + 4(%rdi)           /* #DF on IST1 */
    ret

/* ------------------------------------------------------------------------ */
/* Interrupt entry                                                          */
/* ------------------------------------------------------------------------ */
.balign 16
isr_stubs:
.set vec, 0
.rept 256
    .balign 16
    .if vec == 2
    /* NMI (the VMM's vm.nmi): count it and return. No EOI: NMIs are not
     * acknowledged at the local APIC. Two instructions, for PVM's sake. */
    lock incq nmi_count(%rip)
    iretq
    .else
    .if ((vec == 8) | (vec == 10) | (vec == 11) | (vec == 12) | (vec == 13) | (vec == 14) | (vec == 17) | (vec == 21) | (vec == 29) | (vec == 30)) == 0
    pushq $0                            /* no CPU error code: push a zero */
    .endif
    pushq $vec
    jmp isr_common
    .endif
    .set vec, vec + 1
.endr

/*
 * Stack: vector, error, rip, cs, rflags, rsp, ss.
 *
 * Vectors IRQ_BASE..IRQ_BASE+IRQ_COUNT-1 are device interrupts (the stage-2
 * MSI-X vectors): count them in irq_counts, EOI the local APIC, return.
 * Vector 0xff is the APIC spurious vector: count it, no EOI. Everything else
 * is a fault (or the park service call).
 */
isr_common:
    cmpq $IRQ_BASE, (%rsp)
    jb 2f
    cmpq $0xff, (%rsp)
    je 3f
    cmpq $(IRQ_BASE + IRQ_COUNT), (%rsp)
    jae 2f
    pushq %rax
    movq 8(%rsp), %rax
    lock incq irq_counts - IRQ_BASE * 8(, %rax, 8)
    movq lapic_eoi_addr(%rip), %rax
    movl $0, (%rax)
    popq %rax
    addq $16, %rsp
    iretq
3:  lock incq irq_counts + IRQ_COUNT * 8(%rip)
    addq $16, %rsp
    iretq
2:
    cmpq $6, (%rsp)                     /* #UD: a service call from CPL3? */
    jne 1f
    cmpq $svc_cpuid_insn, 16(%rsp)
    je svc_cpuid
    cmpq $svc_wrmsr_insn, 16(%rsp)
    je svc_wrmsr
    leaq svc_park_insn(%rip), %rax      /* park (clobbers %rax: never returns) */
    cmpq %rax, 16(%rsp)
    je park
1:
    movl $1, %eax
    xchgl %eax, fault_lock(%rip)
    testl %eax, %eax
    jnz fault_nested
    leaq fault_info(%rip), %rdi
    movq (%rsp), %rax
    movq %rax, 0(%rdi)                  /* vector */
    movq 8(%rsp), %rax
    movq %rax, 8(%rdi)                  /* error code */
    movq 16(%rsp), %rax
    movq %rax, 16(%rdi)                 /* rip */
    movq 24(%rsp), %rax
    movq %rax, 24(%rdi)                 /* cs */
    movq 32(%rsp), %rax
    movq %rax, 32(%rdi)                 /* rflags */
    movq 40(%rsp), %rax
    movq %rax, 40(%rdi)                 /* rsp */
    movq %cr2, %rax
    movq %rax, 48(%rdi)                 /* cr2 */
    xorl %eax, %eax
    strw %ax
    subl $TSS_SEL0, %eax
    shrl $4, %eax
    movq %rax, 56(%rdi)                 /* cpu index */
    leaq fault_stack + FAULT_STACK_SIZE(%rip), %rax
    leaq user_start_fault(%rip), %rcx
    jmp enter_user

/* A second fault while the first is being reported: say so and stop. */
fault_nested:
    leaq nested_msg(%rip), %rsi
    movl $(nested_msg_end - nested_msg), %ecx
1:  movw $0x3fd, %dx
2:  inb %dx, %al
    testb $0x20, %al
    jz 2b
    movw $0x3f8, %dx
    movb (%rsi), %al
    outb %al, %dx
    incq %rsi
    decl %ecx
    jnz 1b
    jmp park

/*
 * Service calls that return: CPUID and WRMSR executed here, at CPL0, with the
 * caller's registers (no register is touched before this point). On PVM hosts
 * CPUID at CPL3 may run natively and report the host's leaves, not the VMM's;
 * WRMSR needs CPL0. Then resume after the 2-byte ud2.
 */
svc_cpuid:
    cpuid
    jmp 1f
svc_wrmsr:
    wrmsr
1:  addq $2, 16(%rsp)                   /* rip past the ud2 */
    addq $16, %rsp                      /* vector, error code */
    iretq

/* Halt this CPU forever with interrupts off. */
park:
    cli
1:  hlt
    jmp 1b

/* ------------------------------------------------------------------------ */
/* CPL3 entry points                                                        */
/* ------------------------------------------------------------------------ */
user_start_bsp:
    /* Zero .bss (Rust statics, stacks). Nothing lives there yet. */
    leaq __bss_start(%rip), %rdi
    leaq __bss_end(%rip), %rcx
    subq %rdi, %rcx
    xorl %eax, %eax
    rep stosb
    movq start_info_paddr(%rip), %rdi
    call rust_main
    ud2

user_start_ap:
    call rust_ap_main
    ud2

user_start_fault:
    call rust_fault
    ud2

/*
 * The CPL3 -> CPL0 service call "park this CPU". PVM hosts turn `int n` at
 * CPL3 into #UD, so the request is made with an #UD at this known address;
 * isr_common recognises it and halts the CPU at CPL0.
 */
.global svc_park_insn
svc_park_insn:
    ud2

/*
 * Service calls that come back (called with `call`): isr_common runs CPUID
 * (%eax leaf, %ecx sub-leaf -> %eax..%edx) or WRMSR (%ecx, %edx:%eax) at CPL0
 * and resumes at the `ret`.
 */
.global svc_cpuid_insn
svc_cpuid_insn:
    ud2
    ret
.global svc_wrmsr_insn
svc_wrmsr_insn:
    ud2
    ret

/* ------------------------------------------------------------------------ */
/* Data used at CPL0 (initialised, so it does not depend on .bss zeroing)   */
/* ------------------------------------------------------------------------ */
.section .data.boot, "aw", @progbits
.balign 4096
.global pml4
pml4:
    .quad pdpt + PTE_TABLE
    .fill 511, 8, 0

/* PDPT: entries 0..7 -> 2 MiB page directories (first 8 GiB), entries
 * 8..511 -> 1 GiB pages (cleared at boot without pdpe1gb). */
.balign 4096
pdpt:
.set pdi, 0
.rept 8
    .quad pds + pdi * 4096 + PTE_TABLE
    .set pdi, pdi + 1
.endr
.set gib, 8
.rept 504
    .quad (gib << 30) + PTE_LARGE
    .set gib, gib + 1
.endr

.balign 4096
pds:
.set mib2, 0
.rept 4096
    .if (mib2 >= 1536) & (mib2 < 2048)
    .quad (mib2 << 21) + PTE_LARGE + PTE_UNCACHED
    .else
    .quad (mib2 << 21) + PTE_LARGE
    .endif
    .set mib2, mib2 + 1
.endr

.balign 16
.global gdt
gdt:
    .quad 0
    .quad 0x00af9a000000ffff            /* 0x08 kernel code, 64-bit */
    .quad 0x00cf92000000ffff            /* 0x10 kernel data */
    .quad 0x00cff2000000ffff            /* 0x18 user data (DPL3) */
    .quad 0x00affa000000ffff            /* 0x20 user code, 64-bit (DPL3) */
    .quad 0x00cf9a000000ffff            /* 0x28 kernel code, 32-bit */
gdt_tss:
    .fill MAX_CPUS * 2, 8, 0            /* 0x30 + 16 * i: TSS of CPU i */
gdt_end:

.balign 16
    .word 0, 0, 0
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt

.balign 16
    .word 0, 0, 0
idtr:
    .word 256 * 16 - 1
    .quad idt

.balign 8
.global start_info_paddr
start_info_paddr:
    .quad 0
.global mapped_limit
mapped_limit:
    .quad 512 << 30                     /* bytes identity-mapped from 0 */
ap_next_index:
    .long 1
fault_lock:
    .long 0
/* Interrupt counters: one per vector IRQ_BASE.., then the spurious vector. */
.global irq_counts
irq_counts:
    .fill IRQ_COUNT + 1, 8, 0
/* NMIs seen (vector 2's stub), read at CPL3 through arch::nmi_count. */
.global nmi_count
nmi_count:
    .quad 0
/* Local APIC EOI register written by the interrupt path (set from the MADT). */
.global lapic_eoi_addr
lapic_eoi_addr:
    .quad 0xfee000b0
.global fault_info
fault_info:
    .fill 8, 8, 0                       /* vector error rip cs rflags rsp cr2 cpu */

nested_msg:
    .ascii "\nFAULT nested (fault while reporting a fault)\n"
nested_msg_end:

.balign 4096
idt:
    .fill 256 * 16, 1, 0

/* TSSes back to back, then the shared I/O permission bitmap. */
.balign 16
tss_array:
.set tssi, 0
.rept MAX_CPUS
    .long 0
    .quad kstacks + (tssi + 1) * KSTACK_SIZE       /* rsp0 */
    .quad 0, 0                                      /* rsp1, rsp2 */
    .quad 0
    .quad dfstacks + (tssi + 1) * DFSTACK_SIZE     /* ist1 (#DF) */
    .fill 6, 8, 0                                   /* ist2..ist7 */
    .quad 0
    .word 0
    .word (MAX_CPUS - tssi) * TSS_SIZE              /* I/O map base */
    .set tssi, tssi + 1
.endr
iomap:
    .fill IOMAP_SIZE, 1, 0              /* every port allowed */
    .byte 0xff                          /* terminator */

/* ------------------------------------------------------------------------ */
/* Stacks (not initialised)                                                 */
/* ------------------------------------------------------------------------ */
.section .bss.boot, "aw", @nobits
.balign 4096
kstacks:
    .skip MAX_CPUS * KSTACK_SIZE
dfstacks:
    .skip MAX_CPUS * DFSTACK_SIZE
ap_ustacks:
    .skip MAX_CPUS * AP_USTACK_SIZE
bsp_ustack:
    .skip BSP_USTACK_SIZE
fault_stack:
    .skip FAULT_STACK_SIZE
