//! Task switches (exit reason 9): a far JMP or CALL to a TSS or task gate, an IRET with
//! EFLAGS.NT = 1, or an interrupt or exception whose IDT entry is a task gate. VMX does not let a
//! guest switch tasks (SDM 26.4.2: none of the old or new TSS, their descriptors, NT or TR is
//! modified when the switch causes a VM exit), so Keel carries out what the processor would:
//! the task-switch procedure of SDM Vol. 3A 8.3 for 32-bit TSSs (8.2.1, Figure 8-2).
//!
//! The exit qualification (SDM 28.2.1, Table 28-2) gives the new TSS selector (bits 15:0) and the
//! source (bits 31:30: 0 CALL, 1 IRET, 2 JMP, 3 task gate in the IDT). For a task gate the
//! IDT-vectoring information says which event was being delivered; its delivery ends with this
//! switch (the error code, if any, pushed on the new task's stack), so it is not delivered again.
//!
//! Before the commit point (the new TSS descriptor's checks) an exception is raised in the old
//! task with RIP on the instruction, and combines with an event being delivered as the processor
//! would (#DF, triple fault). After it, faults on the new task's segments are raised in the new
//! task (SDM 8.3, step 12's note; Table 8-2). A 16-bit TSS (type 1 or 3, the 80286 format) is not
//! emulated: Keel stops the guest with that reason rather than fake a #TS the CPU would not raise;
//! so does a switch to a virtual-8086 task (EFLAGS.VM = 1 in the new TSS). Not checked either:
//! the privilege rules between the new CS's DPL and RPL (a kernel's task gates name DPL 0 code).

use super::{Action, Exception, ExitContext};
use crate::gmem::{self, PagingMode};
use crate::guest::{GuestRam, StopReason};
use crate::vcpu::segment as write_segment;
use crate::vmx::exit::vector;
use crate::vmx::{
    ControlNat, Guest32, Guest64, GuestNat, InterruptionInfo, InterruptionType, ReadOnly32,
    ReadOnlyNat, Segment, Vmcs,
};
use alloc::format;

/// Where the task switch came from (Table 28-2, exit qualification bits 31:30).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Call,
    Iret,
    Jmp,
    TaskGate,
}

impl Source {
    pub const fn from_qualification(q: u64) -> Self {
        match (q >> 30) & 3 {
            0 => Self::Call,
            1 => Self::Iret,
            2 => Self::Jmp,
            _ => Self::TaskGate,
        }
    }

    /// CALL and task gates nest: the new task links back to the old one and keeps it busy.
    const fn nests(self) -> bool {
        matches!(self, Self::Call | Self::TaskGate)
    }
}

/// Offsets in a 32-bit TSS (SDM Vol. 3A Figure 8-2).
pub mod tss {
    pub const LINK: u64 = 0x00;
    pub const CR3: u64 = 0x1c;
    pub const EIP: u64 = 0x20;
    pub const EFLAGS: u64 = 0x24;
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI, 4 bytes each.
    pub const GPRS: u64 = 0x28;
    /// ES, CS, SS, DS, FS, GS, 4 bytes each (the selector in the low 16 bits).
    pub const SEGMENTS: u64 = 0x48;
    pub const LDT: u64 = 0x60;
    /// The smallest limit of a 32-bit TSS (SDM 8.2.1).
    pub const MIN_LIMIT: u32 = 0x67;
}

/// Descriptor types (SDM Vol. 3A Table 3-2, system segments).
const TYPE_TSS16_AVAILABLE: u64 = 0x1;
const TYPE_LDT: u64 = 0x2;
const TYPE_TSS16_BUSY: u64 = 0x3;
const TYPE_TSS32_AVAILABLE: u64 = 0x9;
const TYPE_TSS32_BUSY: u64 = 0xb;
/// The busy bit inside the type field (bit 41 of the descriptor).
const BUSY: u64 = 1 << 41;
const ACCESSED: u64 = 1 << 40;

const EFLAGS_NT: u64 = 1 << 14;
const EFLAGS_VM: u64 = 1 << 17;
const EFLAGS_FIXED: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LMA: u64 = 1 << 10;
/// DR7 L0-L3 and LE: the local breakpoint enables a task switch clears (SDM 17.2.4).
const DR7_LOCAL: u64 = 0b1_0101_0101;
/// Interruptibility state: blocking by STI, by MOV SS, by NMI (SDM 25.4.2, Table 25-3).
const BLOCKING_STI_MOVSS: u32 = 0b11;
const BLOCKING_NMI: u32 = 1 << 3;
const AR_UNUSABLE: u32 = 1 << 16;

/// Why the switch cannot go on.
enum Fault {
    Raise(Exception),
    PageFault(gmem::PageFault),
    Stop(StopReason),
}

type Step<T> = Result<T, Fault>;

fn raise(vector: u8, code: u32) -> Fault {
    Fault::Raise(Exception {
        vector,
        error_code: Some(code),
    })
}

/// A segment descriptor as read from the GDT or LDT (SDM Vol. 3A 3.4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Descriptor {
    raw: u64,
    /// Linear address of the descriptor, for the accessed and busy bits.
    at: u64,
}

impl Descriptor {
    fn base(self) -> u64 {
        ((self.raw >> 16) & 0xff_ffff) | (((self.raw >> 56) & 0xff) << 24)
    }
    /// The limit in bytes (scaled by G).
    fn limit(self) -> u32 {
        let raw = ((self.raw & 0xffff) | ((self.raw >> 32) & 0xf_0000)) as u32;
        if self.raw & (1 << 55) != 0 {
            (raw << 12) | 0xfff
        } else {
            raw
        }
    }
    fn kind(self) -> u64 {
        (self.raw >> 40) & 0xf
    }
    fn system(self) -> bool {
        self.raw & (1 << 44) == 0
    }
    fn dpl(self) -> u16 {
        ((self.raw >> 45) & 3) as u16
    }
    fn present(self) -> bool {
        self.raw & (1 << 47) != 0
    }
    /// The VMCS access-rights format: descriptor bits 40-55 with 8-11 cleared (SDM 25.4.1).
    fn access_rights(self) -> u32 {
        ((self.raw >> 40) as u32) & 0xf0ff
    }
}

/// The guest's linear address space at the exit, as its MMU translates it.
struct Linear<'a> {
    ram: &'a mut GuestRam,
    mode: PagingMode,
}

impl Linear<'_> {
    /// The CPU's accesses to TSSs and descriptor tables are implicit supervisor-mode accesses
    /// (SDM 4.6.1): CPL does not matter, SMAP applies whatever RFLAGS.AC says.
    fn gpa(&self, la: u64, write: bool) -> Step<u64> {
        let kind = gmem::AccessKind {
            write,
            user: false,
            ac: false,
        };
        match gmem::check(self.ram, &self.mode, la & 0xffff_ffff, kind) {
            Ok(walk) => Ok(walk.gpa),
            Err(gmem::Fault::Page(pf)) => Err(Fault::PageFault(pf)),
            Err(gmem::Fault::TableOutsideRam(gpa)) => {
                Err(Fault::Stop(StopReason::Killed(format!(
                    "the guest's page walk touched guest-physical {gpa:#x} (page tables outside \
                 RAM) during a task switch"
                ))))
            }
        }
    }

    fn read(&self, la: u64, out: &mut [u8]) -> Step<()> {
        for (i, b) in out.iter_mut().enumerate() {
            let gpa = self.gpa(la + i as u64, false)?;
            let mut one = [0xff];
            let _ = self.ram.read(gpa, &mut one);
            *b = one[0];
        }
        Ok(())
    }

    fn write(&mut self, la: u64, data: &[u8]) -> Step<()> {
        for (i, b) in data.iter().enumerate() {
            let gpa = self.gpa(la + i as u64, true)?;
            // A byte outside RAM is dropped, as the bus drops it.
            let _ = self.ram.write(gpa, core::slice::from_ref(b));
        }
        Ok(())
    }

    fn write_u32(&mut self, la: u64, v: u32) -> Step<()> {
        self.write(la, &v.to_le_bytes())
    }

    fn read_u64(&self, la: u64) -> Step<u64> {
        let mut b = [0u8; 8];
        self.read(la, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn write_u64(&mut self, la: u64, v: u64) -> Step<()> {
        self.write(la, &v.to_le_bytes())
    }
}

/// The descriptor table a selector points into.
#[derive(Debug, Clone, Copy)]
struct Tables {
    gdt: (u64, u32),
    ldt: Option<(u64, u32)>,
}

impl Tables {
    /// The descriptor `selector` names, or `None` when it lies past its table's limit (or in an
    /// LDT when there is none).
    fn lookup(&self, mem: &Linear, selector: u16) -> Step<Option<Descriptor>> {
        let (base, limit) = if selector & 4 != 0 {
            match self.ldt {
                Some(t) => t,
                None => return Ok(None),
            }
        } else {
            self.gdt
        };
        let offset = u32::from(selector & !7);
        if offset + 7 > limit {
            return Ok(None);
        }
        let at = base + u64::from(offset);
        Ok(Some(Descriptor {
            raw: mem.read_u64(at)?,
            at,
        }))
    }
}

/// Handles a task-switch exit.
pub fn handle<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Action {
    match switch(cx) {
        Ok(()) => Action::Resume,
        Err(Fault::Raise(e)) => Action::Inject(e),
        Err(Fault::PageFault(pf)) => {
            cx.host.set_guest_cr2(pf.address);
            Action::Inject(Exception {
                vector: vector::PF,
                error_code: Some(pf.error_code),
            })
        }
        Err(Fault::Stop(reason)) => Action::Stop(reason),
    }
}

/// The task-switch procedure (SDM Vol. 3A 8.3, steps 1-13).
fn switch<V: Vmcs + ?Sized>(cx: &mut ExitContext<'_, V>) -> Step<()> {
    let vmcs = &mut *cx.vmcs;
    let qualification = vmcs.read(ReadOnlyNat::ExitQualification);
    let source = Source::from_qualification(qualification);
    let selector = qualification as u16;
    let idt = InterruptionInfo(vmcs.read(ReadOnly32::IdtVectoringInfo));
    let gate_event = (source == Source::TaskGate && idt.valid()).then_some(idt);
    // The EXT bit of the error codes raised on the way (SDM 6.13): set while delivering an
    // event from outside the program (interrupt, NMI, hardware exception).
    let ext = match gate_event.map(|e| e.kind()) {
        Some(InterruptionType::External | InterruptionType::Nmi)
        | Some(InterruptionType::HardwareException) => 1,
        _ => 0,
    };
    let maxphyaddr = super::cpuid::guest_maxphyaddr(&*cx.host);
    let mode = PagingMode::of(&*vmcs, maxphyaddr);
    if mode.efer & EFER_LMA != 0 {
        // SDM 8.7: IA-32e mode has no hardware task switching; the CPU raises #GP itself, so
        // this exit cannot happen for a correct CPU.
        return Err(Fault::Stop(StopReason::Killed(format!(
            "task switch exit in IA-32e mode (qualification {qualification:#x})"
        ))));
    }
    let mut mem = Linear {
        ram: &mut cx.vm.ram,
        mode,
    };
    let ldtr_ar = vmcs.read(Segment::Ldtr.access_rights());
    let mut tables = Tables {
        gdt: (vmcs.read(GuestNat::GdtrBase), vmcs.read(Guest32::GdtrLimit)),
        ldt: (ldtr_ar & AR_UNUSABLE == 0).then(|| {
            (
                vmcs.read(Segment::Ldtr.base()),
                vmcs.read(Segment::Ldtr.limit()),
            )
        }),
    };

    // Steps 2-4: the new TSS descriptor, in the GDT, a present 32-bit TSS with a limit of at
    // least 0x67, busy exactly when IRET returns to it (Table 8-2 for the error codes).
    let sel_code = u32::from(selector & 0xfffc) | ext;
    if selector & 4 != 0 {
        return Err(raise(vector::GP, sel_code));
    }
    let new_desc = tables
        .lookup(&mem, selector)?
        .ok_or(raise(vector::GP, sel_code))?;
    match new_desc.kind() {
        _ if !new_desc.system() => return Err(raise(vector::GP, sel_code)),
        TYPE_TSS32_AVAILABLE | TYPE_TSS32_BUSY => {}
        TYPE_TSS16_AVAILABLE | TYPE_TSS16_BUSY => {
            return Err(Fault::Stop(StopReason::Killed(format!(
                "task switch to the 16-bit TSS {selector:#x}: Keel emulates 32-bit TSSs only"
            ))))
        }
        _ => return Err(raise(vector::GP, sel_code)),
    }
    if !new_desc.present() {
        return Err(raise(vector::NP, sel_code));
    }
    if new_desc.limit() < tss::MIN_LIMIT {
        return Err(raise(vector::TS, sel_code));
    }
    let busy = new_desc.kind() == TYPE_TSS32_BUSY;
    match source {
        Source::Iret if !busy => return Err(raise(vector::TS, sel_code)),
        Source::Call | Source::Jmp | Source::TaskGate if busy => {
            return Err(raise(vector::GP, sel_code))
        }
        _ => {}
    }
    let old_sel = vmcs.read(Segment::Tr.selector());
    let old_base = vmcs.read(Segment::Tr.base());
    if vmcs.read(Segment::Tr.access_rights()) & 0xf != TYPE_TSS32_BUSY as u32 {
        return Err(Fault::Stop(StopReason::Killed(format!(
            "task switch from the 16-bit TSS {old_sel:#x}: Keel emulates 32-bit TSSs only"
        ))));
    }
    let new_base = new_desc.base();
    // Read the whole new TSS before writing anything: a fault here changes nothing.
    let mut image = [0u8; tss::MIN_LIMIT as usize + 1];
    mem.read(new_base, &mut image)?;
    let field = |off: u64| {
        let o = off as usize;
        u32::from_le_bytes([image[o], image[o + 1], image[o + 2], image[o + 3]])
    };
    if u64::from(field(tss::EFLAGS)) & EFLAGS_VM != 0 {
        return Err(Fault::Stop(StopReason::Killed(format!(
            "task switch to the virtual-8086 task {selector:#x}: not emulated"
        ))));
    }

    // Steps 5-8: the old task. JMP and IRET clear its busy bit; IRET clears NT in the saved
    // EFLAGS. EIP is where it resumes: past a CALL/JMP/IRET or INT n, on a faulting instruction.
    let rip = vmcs.read(GuestNat::Rip);
    let len = u64::from(vmcs.read(ReadOnly32::ExitInstructionLength));
    let resume = match gate_event.map(|e| e.kind()) {
        Some(k) if k.needs_instruction_length() => rip + len,
        Some(_) => rip,
        None => rip + len,
    };
    let mut eflags = vmcs.read(GuestNat::Rflags);
    if source == Source::Iret {
        eflags &= !EFLAGS_NT;
    }
    if matches!(source, Source::Jmp | Source::Iret) && old_sel & !7 != 0 {
        if let Some(old) = tables.lookup(&mem, old_sel)? {
            mem.write_u64(old.at, old.raw & !BUSY)?;
        }
    }
    let regs = cx.vcpu.regs;
    let gprs = [
        regs.rax,
        regs.rcx,
        regs.rdx,
        regs.rbx,
        vmcs.read(GuestNat::Rsp),
        regs.rbp,
        regs.rsi,
        regs.rdi,
    ];
    mem.write_u32(old_base + tss::EIP, resume as u32)?;
    mem.write_u32(old_base + tss::EFLAGS, eflags as u32)?;
    for (i, v) in gprs.iter().enumerate() {
        mem.write_u32(old_base + tss::GPRS + 4 * i as u64, *v as u32)?;
    }
    for (i, seg) in SEGMENT_ORDER.iter().enumerate() {
        let sel = vmcs.read(seg.selector());
        mem.write_u32(old_base + tss::SEGMENTS + 4 * i as u64, u32::from(sel))?;
    }

    // Steps 9-11: link and busy bit of the new task, NT, TR, CR0.TS. This is the commit point.
    let mut new_eflags = u64::from(field(tss::EFLAGS)) | EFLAGS_FIXED;
    if source.nests() {
        mem.write_u32(new_base + tss::LINK, u32::from(old_sel))?;
        new_eflags |= EFLAGS_NT;
    }
    if source != Source::Iret {
        mem.write_u64(new_desc.at, new_desc.raw | BUSY)?;
    }
    let tr = Descriptor {
        raw: new_desc.raw | BUSY,
        ..new_desc
    };
    write_segment(
        vmcs,
        Segment::Tr,
        selector,
        tr.base(),
        tr.limit(),
        tr.access_rights(),
    );
    let cr0 = mode.cr0 | CR0_TS;
    vmcs.write(GuestNat::Cr0, cr0);
    if vmcs.read(ControlNat::Cr0GuestHostMask) & CR0_TS != 0 {
        // Keel owns TS: the guest reads it from the read shadow.
        let shadow = vmcs.read(ControlNat::Cr0ReadShadow);
        vmcs.write(ControlNat::Cr0ReadShadow, shadow | CR0_TS);
    }
    if let Some(e) = gate_event {
        // Delivered by this switch (SDM 6.12.2): not to be injected again.
        cx.vcpu.events.delivered();
        if e.kind() == InterruptionType::Nmi {
            let s = vmcs.read(Guest32::InterruptibilityState);
            vmcs.write(Guest32::InterruptibilityState, s | BLOCKING_NMI);
        }
    }

    // Step 12: the new task's state. CR3 (and the PDPTEs under PAE paging, which VM entry takes
    // from the VMCS with EPT, SDM 27.3.2.4), EFLAGS, EIP, the registers, LDTR, the segments.
    let cr3 = u64::from(field(tss::CR3));
    vmcs.write(GuestNat::Cr3, cr3);
    mem.mode.cr3 = cr3;
    mem.mode.cr0 = cr0;
    if cr0 & CR0_PG != 0 && mode.cr4 & CR4_PAE != 0 {
        let pdptes = [
            Guest64::Pdpte0,
            Guest64::Pdpte1,
            Guest64::Pdpte2,
            Guest64::Pdpte3,
        ];
        for (i, f) in pdptes.into_iter().enumerate() {
            let gpa = (cr3 & 0xffff_ffe0) + 8 * i as u64;
            let v = mem.ram.read_u64(gpa).unwrap_or(0);
            vmcs.write(f, v);
        }
    }
    vmcs.write(GuestNat::Rflags, new_eflags);
    vmcs.write(GuestNat::Rip, u64::from(field(tss::EIP)));
    let g = |i: u64| u64::from(field(tss::GPRS + 4 * i));
    let r = &mut cx.vcpu.regs;
    (r.rax, r.rcx, r.rdx, r.rbx, r.rbp, r.rsi, r.rdi) = (g(0), g(1), g(2), g(3), g(5), g(6), g(7));
    vmcs.write(GuestNat::Rsp, g(4));
    let s = vmcs.read(Guest32::InterruptibilityState);
    vmcs.write(Guest32::InterruptibilityState, s & !BLOCKING_STI_MOVSS);
    let dr7 = vmcs.read(GuestNat::Dr7);
    vmcs.write(GuestNat::Dr7, dr7 & !DR7_LOCAL);

    // From here on a fault belongs to the new task (SDM 8.3, step 12 note): its selectors are
    // loaded; a descriptor that fails its checks raises the exception after the switch.
    let mut late = None;
    let ldt_sel = field(tss::LDT) as u16;
    tables.ldt = None;
    if ldt_sel & !3 == 0 {
        write_segment(vmcs, Segment::Ldtr, ldt_sel, 0, 0, AR_UNUSABLE);
    } else {
        let code = u32::from(ldt_sel & 0xfffc) | ext;
        match tables.lookup(&mem, ldt_sel & !4)? {
            Some(d) if ldt_sel & 4 == 0 && d.system() && d.kind() == TYPE_LDT && d.present() => {
                write_segment(
                    vmcs,
                    Segment::Ldtr,
                    ldt_sel,
                    d.base(),
                    d.limit(),
                    d.access_rights(),
                );
                tables.ldt = Some((d.base(), d.limit()));
            }
            _ => {
                write_segment(vmcs, Segment::Ldtr, ldt_sel, 0, 0, AR_UNUSABLE);
                late = Some(raise(vector::TS, code));
            }
        }
    }
    let cpl = field(tss::SEGMENTS + 4) as u16 & 3;
    for (i, seg) in SEGMENT_ORDER.iter().enumerate() {
        let sel = field(tss::SEGMENTS + 4 * i as u64) as u16;
        match load_segment(&mut mem, &tables, *seg, sel, cpl, ext)? {
            Ok(d) => {
                let (base, limit, ar) = match d {
                    Some(d) => (d.base(), d.limit(), d.access_rights()),
                    None => (0, 0, AR_UNUSABLE),
                };
                write_segment(vmcs, *seg, sel, base, limit, ar);
            }
            Err(f) => {
                // The selector is loaded; the hidden part stays what it was, which keeps the
                // guest state enterable for the exception's delivery in the new task.
                vmcs.write(seg.selector(), sel);
                late.get_or_insert(f);
            }
        }
    }

    // Step 13 (SDM 6.12.2): an exception delivered through the gate pushes its error code on
    // the new task's stack.
    if gate_event.is_some_and(|e| e.has_error_code()) {
        let code = vmcs.read(ReadOnly32::IdtVectoringErrorCode);
        let esp = (vmcs.read(GuestNat::Rsp) as u32).wrapping_sub(4);
        let ss_base = vmcs.read(Segment::Ss.base());
        mem.write_u32(ss_base + u64::from(esp), code)?;
        vmcs.write(GuestNat::Rsp, u64::from(esp));
    }
    match late {
        Some(Fault::Raise(e)) => cx.vcpu.events.exception(e),
        Some(other) => return Err(other),
        None => {}
    }
    Ok(())
}

/// The order of the segment selectors in the TSS (Figure 8-2).
const SEGMENT_ORDER: [Segment; 6] = [
    Segment::Es,
    Segment::Cs,
    Segment::Ss,
    Segment::Ds,
    Segment::Fs,
    Segment::Gs,
];

/// Loads one segment of the new task with the checks of SDM Vol. 3A Table 8-2 (error code: the
/// selector). `Ok(None)`: a null data selector (unusable). The descriptor's accessed bit is set
/// in memory, as the processor does on a load.
fn load_segment(
    mem: &mut Linear,
    tables: &Tables,
    seg: Segment,
    sel: u16,
    cpl: u16,
    ext: u32,
) -> Step<Result<Option<Descriptor>, Fault>> {
    let code = u32::from(sel & 0xfffc) | ext;
    let ts = || Ok(Err(raise(vector::TS, code)));
    if sel & !3 == 0 {
        return match seg {
            Segment::Cs | Segment::Ss => ts(),
            _ => Ok(Ok(None)),
        };
    }
    let Some(d) = tables.lookup(mem, sel)? else {
        return ts();
    };
    let kind = d.kind();
    let code_seg = kind & 0x8 != 0;
    let ok_type = !d.system()
        && match seg {
            Segment::Cs => code_seg,
            Segment::Ss => !code_seg && kind & 0x2 != 0 && d.dpl() == cpl && sel & 3 == cpl,
            _ => !code_seg || kind & 0x2 != 0,
        };
    if !ok_type {
        return ts();
    }
    if !d.present() {
        let v = if seg == Segment::Ss {
            vector::SS
        } else {
            vector::NP
        };
        return Ok(Err(raise(v, code)));
    }
    if d.raw & ACCESSED == 0 {
        mem.write_u64(d.at, d.raw | ACCESSED)?;
    }
    Ok(Ok(Some(Descriptor {
        raw: d.raw | ACCESSED,
        ..d
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exits::testing::TestBed;
    use crate::vmx::{Control32, ExitReason, VmcsAccess, VmcsField};

    const GDT: u64 = 0x1000;
    const OLD: u16 = 0x18;
    const NEW: u16 = 0x20;
    const OLD_BASE: u64 = 0x2000;
    const NEW_BASE: u64 = 0x3000;

    fn tss_descriptor(base: u64, limit: u64, kind: u64, present: bool) -> u64 {
        (limit & 0xffff)
            | ((base & 0xff_ffff) << 16)
            | (kind << 40)
            | ((present as u64) << 47)
            | (((limit >> 16) & 0xf) << 48)
            | ((base >> 24) << 56)
    }

    fn put32(t: &mut TestBed, gpa: u64, v: u32) {
        t.vm.ram.bytes()[gpa as usize..][..4].copy_from_slice(&v.to_le_bytes());
    }
    fn put64(t: &mut TestBed, gpa: u64, v: u64) {
        t.vm.ram.bytes()[gpa as usize..][..8].copy_from_slice(&v.to_le_bytes());
    }
    fn get32(t: &TestBed, gpa: u64) -> u32 {
        t.vm.ram.read_u32(gpa).unwrap()
    }
    fn get64(t: &TestBed, gpa: u64) -> u64 {
        t.vm.ram.read_u64(gpa).unwrap()
    }
    fn type_of(t: &TestBed, sel: u16) -> u64 {
        (get64(t, GDT + u64::from(sel)) >> 40) & 0xf
    }

    /// A 32-bit guest running task OLD (TSS at 0x2000, busy) with a GDT at 0x1000: null, flat
    /// code 0x08 and data 0x10, OLD's TSS 0x18 and NEW's 0x20 (`new_desc`). NEW's TSS at 0x3000
    /// starts at EIP 0x100800, ESP 0x9000, EAX 0xb0, flat selectors, CR3 0x5000, no LDT.
    fn bed(new_desc: u64) -> TestBed {
        let mut t = TestBed::new();
        for (i, d) in [
            0,
            0x00cf_9a00_0000_ffff,
            0x00cf_9200_0000_ffff,
            tss_descriptor(OLD_BASE, 0x67, TYPE_TSS32_BUSY, true),
            new_desc,
        ]
        .into_iter()
        .enumerate()
        {
            put64(&mut t, GDT + 8 * i as u64, d);
        }
        let v = &mut t.vmcs;
        v.write(GuestNat::GdtrBase, GDT);
        v.write(Guest32::GdtrLimit, 0x27);
        write_segment(v, Segment::Tr, OLD, OLD_BASE, 0x67, 0x8b);
        write_segment(v, Segment::Ldtr, 0, 0, 0, AR_UNUSABLE);
        write_segment(v, Segment::Cs, 0x08, 0, 0xffff_ffff, 0xc09b);
        for s in [
            Segment::Ss,
            Segment::Ds,
            Segment::Es,
            Segment::Fs,
            Segment::Gs,
        ] {
            write_segment(v, s, 0x10, 0, 0xffff_ffff, 0xc093);
        }
        v.write(GuestNat::Cr0, 0x31);
        v.write(GuestNat::Rip, 0x10_0500);
        v.write(GuestNat::Rsp, 0x7000);
        v.write(GuestNat::Rflags, 0x202);
        v.write(GuestNat::Dr7, 0x455);
        t.vcpu.regs.rax = 0xaaaa;
        t.vcpu.regs.rdi = 0xd1d1;
        let n = NEW_BASE;
        put32(&mut t, n + tss::CR3, 0x5000);
        put32(&mut t, n + tss::EIP, 0x10_0800);
        put32(&mut t, n + tss::EFLAGS, 0x2);
        put32(&mut t, n + tss::GPRS, 0xb0);
        put32(&mut t, n + tss::GPRS + 16, 0x9000);
        for (i, sel) in [0x10, 0x08, 0x10, 0x10, 0x10, 0x10].into_iter().enumerate() {
            put32(&mut t, n + tss::SEGMENTS + 4 * i as u64, sel);
        }
        t
    }

    fn good() -> TestBed {
        bed(tss_descriptor(NEW_BASE, 0x67, TYPE_TSS32_AVAILABLE, true))
    }

    fn switch_exit(t: &mut TestBed, selector: u16, source: u64, len: u32) -> Action {
        t.set_qualification(u64::from(selector) | (source << 30));
        t.set_instruction_length(len);
        t.run(ExitReason::TaskSwitch)
    }

    fn injected(t: &TestBed) -> (u32, u32) {
        (
            t.vmcs.read(Control32::EntryInterruptionInfo),
            t.vmcs.read(Control32::EntryExceptionErrorCode),
        )
    }

    /// The new task's state as the TSS gives it, the old task's saved, TR and CR0.TS switched.
    fn assert_in_new_task(t: &TestBed) {
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x10_0800);
        assert_eq!(t.vcpu.regs.rax, 0xb0);
        assert_eq!(t.vcpu.regs.rdi, 0);
        assert_eq!(t.vmcs.read(GuestNat::Cr3), 0x5000);
        assert_eq!(t.vmcs.read(GuestNat::Cr0), 0x39, "CR0.TS set");
        assert_eq!(t.vmcs.read(GuestNat::Dr7), 0x400, "L0-L3 and LE cleared");
        assert_eq!(
            (
                t.vmcs.read(Segment::Tr.selector()),
                t.vmcs.read(Segment::Tr.base()),
                t.vmcs.read(Segment::Tr.limit()),
                t.vmcs.read(Segment::Tr.access_rights()),
            ),
            (NEW, NEW_BASE, 0x67, 0x8b)
        );
        assert_eq!(t.vmcs.read(Segment::Cs.access_rights()), 0xc09b);
        assert_eq!(t.vmcs.read(Segment::Ss.access_rights()), 0xc093);
        assert_eq!(t.vmcs.read(Segment::Ldtr.access_rights()), AR_UNUSABLE);
        // Loading CS and the data segments set their accessed bits in the GDT.
        assert_eq!(get64(t, GDT + 8), 0x00cf_9b00_0000_ffff);
        assert_eq!(get64(t, GDT + 16), 0x00cf_9300_0000_ffff);
        // The old task's dynamic fields.
        assert_eq!(get32(t, OLD_BASE + tss::GPRS), 0xaaaa);
        assert_eq!(get32(t, OLD_BASE + tss::GPRS + 16), 0x7000);
        assert_eq!(get32(t, OLD_BASE + tss::GPRS + 28), 0xd1d1);
        assert_eq!(get32(t, OLD_BASE + tss::SEGMENTS + 4), 0x08);
        assert_eq!(get32(t, OLD_BASE + tss::SEGMENTS + 8), 0x10);
        assert_eq!(type_of(t, NEW), TYPE_TSS32_BUSY);
    }

    /// The common case: #DF in a 32-bit kernel goes through a task gate. The fault's EIP is
    /// saved, the new task is linked to the old (NT, back link, both busy) and gets the error
    /// code 0 on its stack; the #DF is not delivered again.
    #[test]
    fn double_fault_through_a_task_gate() {
        let mut t = good();
        let df = InterruptionInfo::hardware_exception(vector::DF, true);
        t.vmcs
            .write_raw(ReadOnly32::IdtVectoringInfo.encoding(), u64::from(df.raw()));
        t.vmcs
            .write_raw(ReadOnly32::IdtVectoringErrorCode.encoding(), 0);
        assert_eq!(switch_exit(&mut t, NEW, 3, 0), Action::Resume);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t).0 >> 31, 0, "the #DF is not injected again");
        assert_in_new_task(&t);
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x4002, "NT");
        assert_eq!(get32(&t, NEW_BASE + tss::LINK), u32::from(OLD));
        assert_eq!(type_of(&t, OLD), TYPE_TSS32_BUSY, "the old task stays busy");
        assert_eq!(
            get32(&t, OLD_BASE + tss::EIP),
            0x10_0500,
            "the faulting EIP"
        );
        assert_eq!(get32(&t, OLD_BASE + tss::EFLAGS), 0x202);
        assert_eq!(t.vmcs.read(GuestNat::Rsp), 0x8ffc);
        assert_eq!(get32(&t, 0x8ffc), 0, "#DF's error code on the new stack");
    }

    /// JMP: the old task is left (busy bit cleared, no link, no NT), EIP saved past the JMP.
    #[test]
    fn jmp_to_a_tss() {
        let mut t = good();
        put32(&mut t, NEW_BASE + tss::LINK, 0x1234);
        assert_eq!(switch_exit(&mut t, NEW, 2, 7), Action::Resume);
        assert_eq!(t.enter(), Ok(()));
        assert_in_new_task(&t);
        assert_eq!(t.vmcs.read(GuestNat::Rsp), 0x9000);
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x2);
        assert_eq!(get32(&t, NEW_BASE + tss::LINK), 0x1234);
        assert_eq!(type_of(&t, OLD), TYPE_TSS32_AVAILABLE);
        assert_eq!(get32(&t, OLD_BASE + tss::EIP), 0x10_0507);
    }

    /// CALL nests (link, NT, both busy); the IRET in the called task (NT = 1) returns through the
    /// link: the called task is saved with NT clear and left not busy, the caller resumes past
    /// its CALL with its own EFLAGS.
    #[test]
    fn call_then_iret_back() {
        let mut t = good();
        assert_eq!(switch_exit(&mut t, NEW, 0, 7), Action::Resume);
        assert_in_new_task(&t);
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x4002);
        assert_eq!(get32(&t, NEW_BASE + tss::LINK), u32::from(OLD));
        assert_eq!(type_of(&t, OLD), TYPE_TSS32_BUSY);

        t.vmcs.write(GuestNat::Rip, 0x10_0810);
        t.vcpu.regs.rax = 0xc0;
        assert_eq!(switch_exit(&mut t, OLD, 1, 1), Action::Resume);
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(get32(&t, NEW_BASE + tss::EIP), 0x10_0811);
        assert_eq!(
            get32(&t, NEW_BASE + tss::EFLAGS),
            0x2,
            "NT cleared in the saved image"
        );
        assert_eq!(get32(&t, NEW_BASE + tss::GPRS), 0xc0);
        assert_eq!(type_of(&t, NEW), TYPE_TSS32_AVAILABLE);
        assert_eq!(type_of(&t, OLD), TYPE_TSS32_BUSY);
        assert_eq!(t.vmcs.read(Segment::Tr.selector()), OLD);
        assert_eq!(t.vmcs.read(Segment::Tr.base()), OLD_BASE);
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x10_0507);
        assert_eq!(t.vmcs.read(GuestNat::Rflags), 0x202);
        assert_eq!((t.vcpu.regs.rax, t.vcpu.regs.rdi), (0xaaaa, 0xd1d1));
        assert_eq!(t.vmcs.read(GuestNat::Rsp), 0x7000);
    }

    /// A failed check before the commit point raises its exception in the old task and changes
    /// nothing: RIP on the instruction, TR, the TSSs and the GDT as they were.
    fn assert_refused(desc: u64, source: u64, sel: u16, want: (u32, u32)) {
        let mut t = bed(desc);
        let before = t.vm.ram.slice(0, 0x4000).unwrap().to_vec();
        assert_eq!(
            switch_exit(&mut t, sel, source, 7),
            Action::Inject(Exception {
                vector: (want.0 & 0xff) as u8,
                error_code: Some(want.1)
            })
        );
        assert_eq!(t.enter(), Ok(()));
        assert_eq!(injected(&t), want);
        assert_eq!(t.vmcs.read(GuestNat::Rip), 0x10_0500);
        assert_eq!(t.vmcs.read(Segment::Tr.selector()), OLD);
        assert!(t.vm.ram.slice(0, 0x4000).unwrap() == before);
    }

    #[test]
    fn not_present_tss_is_np() {
        let desc = tss_descriptor(NEW_BASE, 0x67, TYPE_TSS32_AVAILABLE, false);
        assert_refused(desc, 2, NEW, (0x8000_0b0b, 0x20));
    }

    #[test]
    fn too_small_limit_is_ts() {
        let desc = tss_descriptor(NEW_BASE, 0x66, TYPE_TSS32_AVAILABLE, true);
        assert_refused(desc, 0, NEW, (0x8000_0b0a, 0x20));
    }

    /// Busy-bit rules: JMP/CALL to a busy TSS is #GP(sel); IRET to a TSS not busy is #TS(sel).
    #[test]
    fn busy_bit_rules() {
        let busy = tss_descriptor(NEW_BASE, 0x67, TYPE_TSS32_BUSY, true);
        assert_refused(busy, 2, NEW, (0x8000_0b0d, 0x20));
        assert_refused(busy, 0, NEW, (0x8000_0b0d, 0x20));
        let free = tss_descriptor(NEW_BASE, 0x67, TYPE_TSS32_AVAILABLE, true);
        assert_refused(free, 1, NEW, (0x8000_0b0a, 0x20));
        // A selector past the GDT's limit: #GP(sel).
        assert_refused(free, 2, 0x28, (0x8000_0b0d, 0x28));
    }

    /// A broken TSS behind the #DF task gate: #TS on top of #DF shuts the guest down, as the
    /// processor does (SDM Table 6-5).
    #[test]
    fn a_bad_double_fault_tss_is_a_triple_fault() {
        let mut t = bed(tss_descriptor(NEW_BASE, 0x20, TYPE_TSS32_AVAILABLE, true));
        let df = InterruptionInfo::hardware_exception(vector::DF, true);
        t.vmcs
            .write_raw(ReadOnly32::IdtVectoringInfo.encoding(), u64::from(df.raw()));
        switch_exit(&mut t, NEW, 3, 0);
        assert_eq!(t.enter(), Err(StopReason::TripleFault));
    }

    #[test]
    fn virtual_8086_task_stops_the_guest() {
        let mut t = good();
        put32(&mut t, NEW_BASE + tss::EFLAGS, 0x2_0002);
        match switch_exit(&mut t, NEW, 2, 7) {
            Action::Stop(StopReason::Killed(why)) => assert_eq!(
                why,
                "task switch to the virtual-8086 task 0x20: not emulated"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sixteen_bit_tss_stops_the_guest() {
        let mut t = bed(tss_descriptor(NEW_BASE, 0x2b, TYPE_TSS16_AVAILABLE, true));
        match switch_exit(&mut t, NEW, 2, 7) {
            Action::Stop(StopReason::Killed(why)) => assert_eq!(
                why,
                "task switch to the 16-bit TSS 0x20: Keel emulates 32-bit TSSs only"
            ),
            other => panic!("{other:?}"),
        }
    }
}
