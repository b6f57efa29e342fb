//! XMM0-XMM15 as guest state that Keel must keep per guest. The guests are built soft-float, so
//! compiled code never touches these registers: between [`load`] and [`store`] they hold only
//! what the guest put there, unless someone else changed them.

use core::arch::asm;

/// The sixteen registers, low quadword first.
pub type Registers = [[u64; 2]; 16];

/// CR0.EM = 0, CR0.MP = 1, CR4.OSFXSR = CR4.OSXMMEXCPT = 1 (SDM Vol. 3A 13.1.3): SSE on.
pub fn enable() {
    // SAFETY: only changes how SSE instructions behave; the guest owns its control registers.
    unsafe {
        asm!(
            "mov {t}, cr0", "and {t}, ~4", "or {t}, 2", "mov cr0, {t}",
            "mov {t}, cr4", "or {t}, 0x600", "mov cr4, {t}",
            t = out(reg) _, options(nostack)
        );
    }
}

pub fn load(values: &Registers) {
    // SAFETY: reads the 256 bytes of `values`; writes only XMM registers.
    unsafe {
        asm!(
            "movdqu xmm0, [{p}]", "movdqu xmm1, [{p} + 16]", "movdqu xmm2, [{p} + 32]",
            "movdqu xmm3, [{p} + 48]", "movdqu xmm4, [{p} + 64]", "movdqu xmm5, [{p} + 80]",
            "movdqu xmm6, [{p} + 96]", "movdqu xmm7, [{p} + 112]", "movdqu xmm8, [{p} + 128]",
            "movdqu xmm9, [{p} + 144]", "movdqu xmm10, [{p} + 160]", "movdqu xmm11, [{p} + 176]",
            "movdqu xmm12, [{p} + 192]", "movdqu xmm13, [{p} + 208]", "movdqu xmm14, [{p} + 224]",
            "movdqu xmm15, [{p} + 240]",
            p = in(reg) values.as_ptr(), options(nostack, readonly)
        );
    }
}

pub fn store() -> Registers {
    let mut values = [[0u64; 2]; 16];
    // SAFETY: writes the 256 bytes of `values`.
    unsafe {
        asm!(
            "movdqu [{p}], xmm0", "movdqu [{p} + 16], xmm1", "movdqu [{p} + 32], xmm2",
            "movdqu [{p} + 48], xmm3", "movdqu [{p} + 64], xmm4", "movdqu [{p} + 80], xmm5",
            "movdqu [{p} + 96], xmm6", "movdqu [{p} + 112], xmm7", "movdqu [{p} + 128], xmm8",
            "movdqu [{p} + 144], xmm9", "movdqu [{p} + 160], xmm10", "movdqu [{p} + 176], xmm11",
            "movdqu [{p} + 192], xmm12", "movdqu [{p} + 208], xmm13", "movdqu [{p} + 224], xmm14",
            "movdqu [{p} + 240], xmm15",
            p = in(reg) values.as_mut_ptr(), options(nostack)
        );
    }
    values
}

/// The first register that does not hold `expected`, with its value as one 128-bit number.
pub fn first_difference(expected: &Registers) -> Option<(usize, u128)> {
    store()
        .iter()
        .zip(expected)
        .enumerate()
        .find_map(|(n, (got, want))| {
            (got != want).then(|| (n, u128::from(got[1]) << 64 | u128::from(got[0])))
        })
}
