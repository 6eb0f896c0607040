//! Conversions between the neutral register types and kvm-bindings structures.

use kvm_bindings::{kvm_cpuid_entry2, kvm_dtable, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::IoEventAddress as KvmIoEventAddress;

use crate::{
    CpuIdEntry, DescriptorTable, IoEventAddress, Segment, SpecialRegisters, StandardRegisters,
};

pub(super) fn ioevent_addr(addr: IoEventAddress) -> KvmIoEventAddress {
    match addr {
        IoEventAddress::Pio(a) => KvmIoEventAddress::Pio(a),
        IoEventAddress::Mmio(a) => KvmIoEventAddress::Mmio(a),
    }
}

pub(super) fn irq_route_to_kvm(route: &crate::IrqRoute) -> kvm_bindings::kvm_irq_routing_entry {
    use kvm_bindings::{
        kvm_irq_routing_entry, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
        KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
    };
    let mut e = kvm_irq_routing_entry::default();
    match *route {
        crate::IrqRoute::Irqchip { gsi, chip, pin } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_IRQCHIP;
            e.u.irqchip.irqchip = match chip {
                crate::IrqChip::PicMaster => KVM_IRQCHIP_PIC_MASTER,
                crate::IrqChip::PicSlave => KVM_IRQCHIP_PIC_SLAVE,
                crate::IrqChip::Ioapic => KVM_IRQCHIP_IOAPIC,
            };
            e.u.irqchip.pin = pin;
        }
        crate::IrqRoute::Msi { gsi, address, data } => {
            e.gsi = gsi;
            e.type_ = KVM_IRQ_ROUTING_MSI;
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
        }
    }
    e
}

pub(super) fn cpuid_from_kvm(e: &kvm_cpuid_entry2) -> CpuIdEntry {
    CpuIdEntry {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
    }
}

pub(super) fn cpuid_to_kvm(e: &CpuIdEntry) -> kvm_cpuid_entry2 {
    kvm_cpuid_entry2 {
        function: e.function,
        index: e.index,
        flags: e.flags,
        eax: e.eax,
        ebx: e.ebx,
        ecx: e.ecx,
        edx: e.edx,
        ..Default::default()
    }
}

macro_rules! copy_fields {
    ($src:expr, $dst:expr, $($f:ident),*) => { $( $dst.$f = $src.$f; )* };
}

pub(super) fn regs_from_kvm(r: &kvm_regs) -> StandardRegisters {
    let mut s = StandardRegisters::default();
    copy_fields!(
        r, s, rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip,
        rflags
    );
    s
}

pub(super) fn regs_to_kvm(s: &StandardRegisters) -> kvm_regs {
    let mut r = kvm_regs::default();
    copy_fields!(
        s, r, rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp, r8, r9, r10, r11, r12, r13, r14, r15, rip,
        rflags
    );
    r
}

fn segment_from_kvm(k: &kvm_segment) -> Segment {
    Segment {
        base: k.base,
        limit: k.limit,
        selector: k.selector,
        type_: k.type_,
        present: k.present != 0,
        dpl: k.dpl,
        db: k.db != 0,
        s: k.s != 0,
        l: k.l != 0,
        g: k.g != 0,
        avl: k.avl != 0,
        unusable: k.unusable != 0,
    }
}

fn segment_to_kvm(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: u8::from(s.present),
        dpl: s.dpl,
        db: u8::from(s.db),
        s: u8::from(s.s),
        l: u8::from(s.l),
        g: u8::from(s.g),
        avl: u8::from(s.avl),
        unusable: u8::from(s.unusable),
        padding: 0,
    }
}

fn dtable_from_kvm(d: &kvm_dtable) -> DescriptorTable {
    DescriptorTable {
        base: d.base,
        limit: d.limit,
    }
}

fn dtable_to_kvm(d: &DescriptorTable) -> kvm_dtable {
    kvm_dtable {
        base: d.base,
        limit: d.limit,
        padding: [0; 3],
    }
}

pub(super) fn sregs_from_kvm(k: &kvm_sregs) -> SpecialRegisters {
    SpecialRegisters {
        cs: segment_from_kvm(&k.cs),
        ds: segment_from_kvm(&k.ds),
        es: segment_from_kvm(&k.es),
        fs: segment_from_kvm(&k.fs),
        gs: segment_from_kvm(&k.gs),
        ss: segment_from_kvm(&k.ss),
        tr: segment_from_kvm(&k.tr),
        ldt: segment_from_kvm(&k.ldt),
        gdt: dtable_from_kvm(&k.gdt),
        idt: dtable_from_kvm(&k.idt),
        cr0: k.cr0,
        cr2: k.cr2,
        cr3: k.cr3,
        cr4: k.cr4,
        cr8: k.cr8,
        efer: k.efer,
        apic_base: k.apic_base,
    }
}

pub(super) fn sregs_into_kvm(s: &SpecialRegisters, k: &mut kvm_sregs) {
    k.cs = segment_to_kvm(&s.cs);
    k.ds = segment_to_kvm(&s.ds);
    k.es = segment_to_kvm(&s.es);
    k.fs = segment_to_kvm(&s.fs);
    k.gs = segment_to_kvm(&s.gs);
    k.ss = segment_to_kvm(&s.ss);
    k.tr = segment_to_kvm(&s.tr);
    k.ldt = segment_to_kvm(&s.ldt);
    k.gdt = dtable_to_kvm(&s.gdt);
    k.idt = dtable_to_kvm(&s.idt);
    k.cr0 = s.cr0;
    k.cr2 = s.cr2;
    k.cr3 = s.cr3;
    k.cr4 = s.cr4;
    k.cr8 = s.cr8;
    k.efer = s.efer;
    k.apic_base = s.apic_base;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sregs_round_trip() {
        let mut s = SpecialRegisters::default();
        s.cs = Segment {
            base: 1,
            limit: 0xffff_ffff,
            selector: 0x10,
            type_: 0xb,
            present: true,
            dpl: 0,
            db: false,
            s: true,
            l: true,
            g: true,
            avl: false,
            unusable: false,
        };
        s.cr0 = 0x8000_0011;
        s.gdt = DescriptorTable {
            base: 0x500,
            limit: 0x1f,
        };
        let mut k = kvm_sregs::default();
        sregs_into_kvm(&s, &mut k);
        assert_eq!(sregs_from_kvm(&k), s);
    }

    #[test]
    fn regs_round_trip() {
        let r = StandardRegisters {
            rip: 0x1000,
            rbx: 0x6000,
            rflags: 2,
            r15: 7,
            ..Default::default()
        };
        assert_eq!(regs_from_kvm(&regs_to_kvm(&r)), r);
    }
}

#[cfg(test)]
mod route_tests {
    use kvm_bindings::{KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI};

    use super::*;
    use crate::{legacy_irq_routes, IrqChip, IrqRoute};

    #[test]
    fn legacy_routes_match_a_pc() {
        let routes = legacy_irq_routes(24);
        assert_eq!(routes.len(), 24 + 16);
        assert!(routes.contains(&IrqRoute::Irqchip {
            gsi: 9,
            chip: IrqChip::PicSlave,
            pin: 1
        }));
        assert!(routes.contains(&IrqRoute::Irqchip {
            gsi: 20,
            chip: IrqChip::Ioapic,
            pin: 20
        }));
        let e = irq_route_to_kvm(&IrqRoute::Irqchip {
            gsi: 9,
            chip: IrqChip::PicSlave,
            pin: 1,
        });
        assert_eq!(e.type_, KVM_IRQ_ROUTING_IRQCHIP);
        // SAFETY: the entry was built as an irqchip route.
        let (chip, pin) = unsafe { (e.u.irqchip.irqchip, e.u.irqchip.pin) };
        assert_eq!((e.gsi, chip, pin), (9, KVM_IRQCHIP_PIC_SLAVE, 1));
    }

    #[test]
    fn msi_route() {
        let e = irq_route_to_kvm(&IrqRoute::Msi {
            gsi: 30,
            address: 0x1_fee0_1000,
            data: 0x41,
        });
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        // SAFETY: the entry was built as an MSI route.
        let msi = unsafe { e.u.msi };
        assert_eq!(
            (msi.address_lo, msi.address_hi, msi.data),
            (0xfee0_1000, 1, 0x41)
        );
    }
}
