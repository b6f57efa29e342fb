//! `attack=vmx`: every VMX instruction (and GETSEC) must raise #UD. Keel hides VMX (CPUID, CR4.VMXE)
//! and answers each of their VM exits with #UD, as a CPU without VMX would (SDM Vol. 3C 25.1.3
//! makes them all exit in VMX non-root operation).
//!
//! Prints `hostile64: vmx ud=13/13 ok`.

use super::{Tally, UD};
use hostile64::fault;

pub fn run(_cmdline: &[u8], _ram: u64) -> ! {
    let mut t = Tally::new("vmx", "ud");
    // A memory operand for the instructions that take one: a would-be VMXON region / VMCS
    // pointer, or an INVEPT/INVVPID descriptor.
    let mut region = [0u64; 2];
    let p = region.as_mut_ptr();
    let ud = Some(UD);
    t.expect(
        format_args!("vmxon"),
        fault!("vmxon [{p}]", p = in(reg) p),
        ud,
    );
    t.expect(format_args!("vmxoff"), fault!("vmxoff"), ud);
    t.expect(
        format_args!("vmclear"),
        fault!("vmclear [{p}]", p = in(reg) p),
        ud,
    );
    t.expect(
        format_args!("vmptrld"),
        fault!("vmptrld [{p}]", p = in(reg) p),
        ud,
    );
    t.expect(
        format_args!("vmptrst"),
        fault!("vmptrst [{p}]", p = in(reg) p),
        ud,
    );
    // VMCS field 0x4400: the VM-instruction error; 0x681e: guest RIP.
    t.expect(
        format_args!("vmread"),
        fault!("vmread {v}, {f}", v = out(reg) _, f = in(reg) 0x4400u64),
        ud,
    );
    t.expect(
        format_args!("vmwrite"),
        fault!("vmwrite {f}, {v}", f = in(reg) 0x681eu64, v = in(reg) 0u64),
        ud,
    );
    t.expect(format_args!("vmlaunch"), fault!("vmlaunch"), ud);
    t.expect(format_args!("vmresume"), fault!("vmresume"), ud);
    t.expect(
        format_args!("invept"),
        fault!("invept {t}, [{p}]", t = in(reg) 2u64, p = in(reg) p),
        ud,
    );
    t.expect(
        format_args!("invvpid"),
        fault!("invvpid {t}, [{p}]", t = in(reg) 2u64, p = in(reg) p),
        ud,
    );
    // VMFUNC leaf 0 (EPTP switching), GETSEC leaf 0 (CAPABILITIES; SMX is hidden too).
    t.expect(
        format_args!("vmfunc"),
        fault!("vmfunc", in("eax") 0u32, in("ecx") 0u32),
        ud,
    );
    t.expect(
        format_args!("getsec"),
        fault!("getsec", inout("eax") 0u32 => _),
        ud,
    );
    core::hint::black_box(&mut region);
    t.finish()
}
