//! APIC virtualization, the VMX side (SDM Vol. 3C chapter 30, "APIC Virtualization and Virtual
//! Interrupts"; chapter 29 in editions before 2023): which controls Keel turns on, the two pages
//! each guest gets for them, and the TPR threshold.
//!
//! What Keel uses, when the CPU offers it and the guest's manifest does not say `apicv = off`:
//! - **"use TPR shadow"** (SDM 30.1.1, 30.3): the guest's TPR lives at offset 80H of its own
//!   *virtual-APIC page* (VTPR). MOV to/from CR8 read and write VTPR without a VM exit, so the
//!   "CR8-load/store exiting" controls are turned off.
//! - **"virtualize APIC accesses"** (SDM 30.4): the guest-physical xAPIC page (0xFEE00000) is
//!   mapped in the guest's EPT to its own *APIC-access page*. A 32-bit read or a write at offset
//!   80H is turned into an access to VTPR (SDM 30.4.2, 30.4.3.1: with "APIC-register
//!   virtualization" and "virtual-interrupt delivery" both 0, only the TPR is virtualized); every
//!   other access to the page is an APIC-access VM exit, which Keel emulates through the local APIC
//!   model as it does an EPT violation there (`exits::apicv`).
//! - the **TPR threshold** (SDM 30.1.2): after the guest lowers VTPR (by CR8 or MMIO) below bits 3:0
//!   of the threshold, the CPU exits ("TPR below threshold", trap-like). Keel sets the threshold to
//!   the priority class of the highest interrupt the guest's TPR holds back, so that interrupt is
//!   delivered as soon as the TPR lets it through.
//!
//! - **"APIC-register virtualization"** (SDM 30.4.2, 30.4.3.2), with virtual-interrupt delivery:
//!   reads of the xAPIC page's registers (ID, version, TPR, EOI, LDR, DFR, SVR, ISR, TMR, IRR,
//!   ESR, ICR, LVT, initial count, divide configuration) come from the virtual-APIC page without
//!   an exit; writes to the registers with side effects land there and exit after the write
//!   ("APIC write", trap-like), except the ICR's high half, which only lands there. Keel writes
//!   the model's registers to the page whenever they change ([`VirtualApic::mirror`]), and
//!   takes the ICR's high half back.
//! - **"virtualize x2APIC mode"** (SDM 30.5), while the guest's APIC is in x2APIC mode, in place
//!   of "virtualize APIC accesses" (SDM 27.2.1.1: never both): the MSR bitmap lets RDMSR of the
//!   registers the page holds through (all readable ones but the timer's current count, with
//!   APIC-register virtualization; the TPR alone without it) and WRMSR of the TPR, and with
//!   virtual-interrupt delivery of EOI and SELF IPI, which the CPU virtualizes (TPR, EOI and
//!   self-IPI virtualization, SDM 30.1.2-30.1.5). Every other x2APIC MSR still exits to the
//!   model. Switched in [`VirtualApic::before_entry`] when the model's mode changes (the guest
//!   wrote IA32_APIC_BASE), and back.
//!
//! One truth: the local APIC model (`devices::lapic`) keeps the TPR it computes PPR and
//! deliverability with; while the CPU owns it, the model is refreshed from VTPR after every exit
//! ([`VirtualApic::vtpr`]) and VTPR from the model before an entry that follows a device access
//! ([`VirtualApic::set_vtpr`]; an x2APIC TPR write or an APIC reset changes it in the model).
//!
//! Several vCPUs: each has its own virtual-APIC page (its local APIC's registers, SDM 30.1.1),
//! and its own MSR bitmap where the x2APIC part is opened (one vCPU may be in x2APIC mode while
//! another is not). The APIC-access page is one per guest: the CPU recognizes an access to it by
//! the host-physical address the guest's EPT translates to (SDM 30.4), and the EPT is shared by
//! every vCPU, so every VMCS of the guest names the same page.
//!
//! Isolation: the pages belong to one guest. The virtual-APIC pages are in no EPT; the
//! APIC-access page is mapped only in its own guest's EPT, at the xAPIC page, and holds nothing
//! but all ones (written when the guest is set up): accesses the CPU does not virtualize exit, an
//! implementation that lets one through (SDM 30.4.6.2) reaches only this guest's page, and so
//! does every access of a vCPU whose APIC is not in xAPIC mode (the control off), which then
//! reads the empty bus the model gives outside xAPIC mode.

use super::controls::{
    adjust_controls, can_set, ControlError, PinBasedControls, PrimaryControls, SecondaryControls,
};
use super::VmxCaps;
use crate::devices::lapic::{x2apic_readable, ApicMode, X2APIC_MSRS, X2APIC_TIMER_CURRENT};
use crate::vmx::{Control32, Control64, Guest16, Vmcs};

/// Offset of the TPR on the virtual-APIC page (VTPR, SDM 30.1.1).
pub const VTPR: usize = 0x80;
/// Offset of the PPR on the virtual-APIC page (VPPR, SDM 30.1.1).
pub const VPPR: usize = 0xa0;
/// Offsets of the ISR and IRR on the virtual-APIC page (VISR, VIRR: eight 32-bit words 16 bytes
/// apart, as on the xAPIC page; SDM 30.1.1).
pub const VISR: usize = 0x100;
pub const VIRR: usize = 0x200;

/// Which APIC virtualization features a guest runs with.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApicvFeatures {
    /// "use TPR shadow": CR8 without exits, a virtual-APIC page.
    pub tpr_shadow: bool,
    /// "virtualize APIC accesses": MMIO TPR without exits, an APIC-access page.
    pub virtualize_apic_accesses: bool,
    /// "virtual-interrupt delivery": the CPU owns IRR, ISR and PPR on the virtual-APIC page,
    /// delivers the interrupts Keel posts there and virtualizes EOI (SDM 30.1.3, 30.2).
    pub virtual_interrupt_delivery: bool,
    /// "APIC-register virtualization": register reads from the virtual-APIC page, writes with
    /// an APIC-write exit after them (SDM 30.4.2, 30.4.3).
    pub register_virtualization: bool,
    /// "virtualize x2APIC mode" while the guest's APIC is in x2APIC mode (SDM 30.5).
    pub virtualize_x2apic: bool,
}

impl ApicvFeatures {
    /// What Keel uses on a CPU with `caps` when the guest wants APIC virtualization (`wanted`):
    /// the TPR shadow if the primary controls allow it, and "virtualize APIC accesses" on top if
    /// the secondary controls allow it too (SDM 27.2.1.1 lets "virtualize APIC accesses" be 1
    /// without the TPR shadow, but then no access is virtualized, SDM 30.4.2: every one exits,
    /// which gains nothing over the EPT violation).
    pub fn select(caps: &VmxCaps, wanted: bool) -> Self {
        let tpr_shadow = wanted && can_set(caps, PrimaryControls::USE_TPR_SHADOW);
        let virtualize_apic_accesses = tpr_shadow
            && can_set(caps, PrimaryControls::ACTIVATE_SECONDARY_CONTROLS)
            && can_set(caps, SecondaryControls::VIRTUALIZE_APIC_ACCESSES);
        // SDM 27.2.1.1: "virtual-interrupt delivery" needs the TPR shadow and "external-interrupt
        // exiting" (which Keel always sets, `vcpu::compute_controls`). Keel asks for it only on
        // top of "virtualize APIC accesses": then the guest's EOI and ICR writes to the xAPIC
        // page reach the virtual-APIC page (SDM 30.4.3.1).
        let virtual_interrupt_delivery = virtualize_apic_accesses
            && can_set(caps, SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY)
            && can_set(caps, PinBasedControls::EXTERNAL_INTERRUPT_EXITING);
        // SDM 27.2.1.1: both need the TPR shadow. Keel asks for register virtualization only
        // with virtual-interrupt delivery, which keeps the ISR, the IRR and the PPR on the page
        // current while the guest runs (SDM 30.1.3, 30.2); Keel keeps the rest.
        let register_virtualization = virtual_interrupt_delivery
            && can_set(caps, SecondaryControls::APIC_REGISTER_VIRTUALIZATION);
        let virtualize_x2apic =
            tpr_shadow && can_set(caps, SecondaryControls::VIRTUALIZE_X2APIC_MODE);
        Self {
            tpr_shadow,
            virtualize_apic_accesses,
            virtual_interrupt_delivery,
            register_virtualization,
            virtualize_x2apic,
        }
    }

    /// Every feature (what Bochs offers), for tests.
    #[cfg(test)]
    pub const ALL: Self = Self {
        tpr_shadow: true,
        virtualize_apic_accesses: true,
        virtual_interrupt_delivery: true,
        register_virtualization: true,
        virtualize_x2apic: true,
    };

    pub fn any(&self) -> bool {
        self.tpr_shadow
    }

    /// The primary and secondary control words `primary`/`secondary` (as `compute_controls`
    /// made them) changed for these features: with the TPR shadow, CR8 accesses stop exiting.
    pub fn apply(
        &self,
        caps: &VmxCaps,
        primary: u32,
        secondary: u32,
    ) -> Result<(u32, u32), ControlError> {
        if !self.tpr_shadow {
            return Ok((primary, secondary));
        }
        let primary = PrimaryControls::from_bits_retain(primary);
        let without_cr8 =
            primary - (PrimaryControls::CR8_LOAD_EXITING | PrimaryControls::CR8_STORE_EXITING);
        let primary = adjust_controls(
            caps,
            without_cr8 | PrimaryControls::USE_TPR_SHADOW,
            PrimaryControls::empty(),
        )?;
        let secondary = SecondaryControls::from_bits_retain(secondary);
        let mut wanted = secondary;
        if self.virtualize_apic_accesses {
            wanted |= SecondaryControls::VIRTUALIZE_APIC_ACCESSES;
        }
        if self.virtual_interrupt_delivery {
            wanted |= SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY;
        }
        if self.register_virtualization {
            wanted |= SecondaryControls::APIC_REGISTER_VIRTUALIZATION;
        }
        // "virtualize x2APIC mode" is not on at boot: the APIC starts in xAPIC mode
        // (`VirtualApic::before_entry` switches it).
        let secondary = if wanted != secondary {
            adjust_controls(caps, wanted, SecondaryControls::empty())?
        } else {
            secondary
        };
        Ok((primary.bits(), secondary.bits()))
    }

    /// A short description for Keel's log: the first part what the xAPIC mode has, the second
    /// what the x2APIC mode has.
    pub fn describe(&self) -> (&'static str, &'static str) {
        let xapic = match (
            self.tpr_shadow,
            self.virtualize_apic_accesses,
            self.virtual_interrupt_delivery,
            self.register_virtualization,
        ) {
            (false, ..) => "off (every TPR access exits)",
            (true, false, ..) => "TPR shadow (CR8 without exits; MMIO TPR exits)",
            (true, true, false, _) => {
                "TPR shadow + virtualized APIC accesses (CR8 and MMIO TPR without exits)"
            }
            (true, true, true, false) => {
                "TPR shadow + virtualized APIC accesses + virtual-interrupt delivery (CR8, MMIO \
                 TPR, EOI and self-IPI without exits)"
            }
            (true, true, true, true) => {
                "TPR shadow + virtualized APIC accesses + virtual-interrupt delivery + register \
                 virtualization (CR8, EOI, self-IPI and register reads without exits)"
            }
        };
        let x2apic = match (
            self.virtualize_x2apic,
            self.virtual_interrupt_delivery,
            self.register_virtualization,
        ) {
            (false, ..) => "x2APIC MSRs exit",
            (true, false, _) => "x2APIC TPR without exits",
            (true, true, false) => "x2APIC TPR, EOI and SELF IPI without exits",
            (true, true, true) => "x2APIC TPR, EOI, SELF IPI and register reads without exits",
        };
        (xapic, x2apic)
    }
}

/// A vCPU's virtual-APIC page, the address of its guest's APIC-access page and its MSR bitmap:
/// the memory the CPU reads and writes for APIC virtualization (the owner of the frames keeps
/// them alive; this is the view of them).
pub struct VirtualApic {
    vapic: &'static mut [u8; 4096],
    vapic_pa: u64,
    access_pa: u64,
    features: ApicvFeatures,
    /// The vCPU's MSR bitmap, whose x2APIC part this view opens and closes (None: the x2APIC
    /// mode is not virtualized).
    msr_bitmap: Option<&'static mut [u8; 4096]>,
    /// Whether "virtualize APIC accesses" is on in the VMCS now (only while the guest's APIC is in
    /// xAPIC mode).
    accesses_virtualized: bool,
    /// Whether "virtualize x2APIC mode" is on in the VMCS now, and the MSR bitmap open for it
    /// (only while the guest's APIC is in x2APIC mode).
    x2apic_virtualized: bool,
    /// The TPR threshold in the VMCS now (written only when it changes: a VMWRITE is dear).
    threshold: u32,
    /// The EOI-exit bitmap in the VMCS now (virtual-interrupt delivery; written when it changes).
    eoi_exit: [u64; 4],
    /// Whether VIRR and VISR were empty at the last [`VirtualApic::post`] (RVI = SVI = 0).
    idle: bool,
    /// Whether the guest ran since the model last took VTPR (`exits::apicv`): the exits that do
    /// not reach the platform leave the taking to the next look at the platform.
    pub vtpr_unread: bool,
}

impl core::fmt::Debug for VirtualApic {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("VirtualApic")
            .field("vapic_pa", &self.vapic_pa)
            .field("access_pa", &self.access_pa)
            .field("features", &self.features)
            .field("vtpr", &self.vtpr())
            .finish()
    }
}

impl VirtualApic {
    /// # Safety
    /// `vapic` must be a page-aligned 4 KiB frame at host-physical `vapic_pa`, owned by this
    /// vCPU alone for as long as the view lives; `access_pa` the guest's APIC-access page (all
    /// ones, mapped only in its EPT), which the view does not touch.
    pub unsafe fn new(
        vapic: &'static mut [u8; 4096],
        vapic_pa: u64,
        access_pa: u64,
        features: ApicvFeatures,
    ) -> Self {
        Self {
            vapic,
            vapic_pa,
            access_pa,
            features,
            msr_bitmap: None,
            accesses_virtualized: features.virtualize_apic_accesses,
            x2apic_virtualized: false,
            threshold: 0,
            eoi_exit: [0; 4],
            idle: true,
            vtpr_unread: false,
        }
    }

    pub fn features(&self) -> ApicvFeatures {
        self.features
    }

    /// Gives this view the guest's MSR bitmap, for "virtualize x2APIC mode": its x2APIC part
    /// is opened while the guest's APIC is in x2APIC mode ([`VirtualApic::before_entry`]).
    ///
    /// # Safety
    /// `bitmap` must be the MSR bitmap of this vCPU's VMCS alone (the part it opens is this
    /// vCPU's APIC), owned by its guest for as long as the view lives.
    pub unsafe fn set_msr_bitmap(&mut self, bitmap: &'static mut [u8; 4096]) {
        set_x2apic_msrs(bitmap, self.features, self.x2apic_virtualized);
        self.msr_bitmap = Some(bitmap);
    }

    /// Whether "virtualize APIC accesses" is on now (the guest's APIC in xAPIC mode).
    pub fn accesses_virtualized(&self) -> bool {
        self.accesses_virtualized
    }

    /// Whether "virtualize x2APIC mode" is on now (the guest's APIC in x2APIC mode).
    pub fn x2apic_virtualized(&self) -> bool {
        self.x2apic_virtualized
    }

    /// Writes the model's registers that APIC-register virtualization reads from the page
    /// (`Lapic::page_image`: (offset, value)).
    pub fn mirror(&mut self, image: &[(usize, u32)]) {
        for &(offset, value) in image {
            self.set_word(offset, value);
        }
    }

    /// Writes VPPR (SDM 30.1.1: offset A0H), which an x2APIC RDMSR of the PPR reads with
    /// register virtualization. The CPU keeps it current while the guest runs (PPR
    /// virtualization at TPR virtualization, EOI virtualization and delivery, SDM 30.1.3); Keel
    /// writes the model's after an exit, which computes it the same way from the same TPR and
    /// ISR.
    pub fn set_vppr(&mut self, ppr: u8) {
        self.set_word(VPPR, u32::from(ppr));
    }

    /// Host-physical address of the APIC-access page (mapped at the guest's xAPIC page).
    pub fn access_pa(&self) -> u64 {
        self.access_pa
    }

    /// VTPR as the guest left it (SDM 30.1.1: byte 80H; CR8 writes clear bits 3:0, SDM 30.3).
    pub fn vtpr(&self) -> u8 {
        self.vapic[VTPR]
    }

    /// Writes VTPR (bits 31:8 of the 32-bit field are 0, as a virtualized write leaves them).
    pub fn set_vtpr(&mut self, tpr: u8) {
        self.vapic[VTPR..VTPR + 4].copy_from_slice(&u32::from(tpr).to_le_bytes());
    }

    /// Power-on: the virtual-APIC page zero (the TPR is 0), accesses virtualized again (the APIC
    /// starts in xAPIC mode).
    pub fn reset(&mut self) {
        self.vapic.fill(0);
        self.accesses_virtualized = self.features.virtualize_apic_accesses;
        self.x2apic_virtualized = false;
        if let Some(b) = &mut self.msr_bitmap {
            set_x2apic_msrs(b, self.features, false);
        }
        self.threshold = 0;
        self.eoi_exit = [0; 4];
        self.idle = true;
        // The pages hold nothing the model lacks: nothing to take from them.
        self.vtpr_unread = false;
    }

    /// The VMCS fields of APIC virtualization, at guest boot: the two page addresses and a TPR
    /// threshold of 0 (SDM 25.6.8; 27.2.1.1 checks the addresses are page aligned).
    pub fn write_fields<V: Vmcs + ?Sized>(&self, vmcs: &mut V) {
        if !self.features.tpr_shadow {
            return;
        }
        vmcs.write(Control64::VirtualApicAddr, self.vapic_pa);
        vmcs.write(Control32::TprThreshold, self.threshold);
        if self.features.virtualize_apic_accesses {
            vmcs.write(Control64::ApicAccessAddr, self.access_pa);
        }
        if self.features.virtual_interrupt_delivery {
            // SDM 25.4.2, 25.6.8: RVI and SVI 0 (nothing requested or in service), no EOI exits.
            vmcs.write(Guest16::InterruptStatus, 0);
            for (field, bits) in EOI_EXIT_BITMAPS.iter().zip(self.eoi_exit) {
                vmcs.write(*field, bits);
            }
        }
    }

    /// The CPU's IRR and ISR as the guest left them (VIRR, VISR), with virtual-interrupt
    /// delivery: it moves a vector from VIRR to VISR when it delivers it and clears VISR bits at
    /// EOIs, without exits (SDM 30.2.2, 30.1.4).
    pub fn vectors(&self) -> ([u32; 8], [u32; 8]) {
        let mut irr = [0; 8];
        let mut isr = [0; 8];
        for i in 0..8 {
            irr[i] = self.word(VIRR + i * 16);
            isr[i] = self.word(VISR + i * 16);
        }
        (irr, isr)
    }

    /// [`VirtualApic::vectors`] after the guest ran and changed them: the next
    /// [`VirtualApic::post`] writes the page even if the model has nothing (after an INIT of the
    /// vCPU while it ran, what the CPU left there is stale).
    pub fn take_vectors(&mut self) -> ([u32; 8], [u32; 8]) {
        self.idle = false;
        self.vectors()
    }

    /// VIRR and VISR were found empty after a post that was not (RVI = SVI = 0, as
    /// [`VirtualApic::unchanged`] reasons) and the model holds no vector either: the page is as
    /// a post of nothing leaves it.
    #[inline]
    pub fn posted_empty(&mut self) {
        self.idle = true;
    }

    /// Whether the last [`VirtualApic::post`] left VIRR and VISR empty, and nothing was taken
    /// from the page since.
    #[inline]
    pub fn idle(&self) -> bool {
        self.idle
    }

    /// Whether VIRR and VISR are as the last [`VirtualApic::post`] left them (see
    /// [`VirtualApic::idle`]), known without reading them: both were empty and the guest
    /// interrupt status reads RVI = SVI = 0. The CPU keeps RVI the highest VIRR vector and SVI
    /// the highest VISR vector through every change it makes (self-IPI virtualization,
    /// delivery, EOI virtualization: SDM 30.1.4, 30.1.5, 30.2.2), so both 0 means both are
    /// still empty (vectors 0-15 are never set).
    #[inline]
    pub fn unchanged<V: Vmcs + ?Sized>(&self, vmcs: &V) -> bool {
        self.idle && vmcs.read(Guest16::InterruptStatus) == 0
    }

    fn word(&self, offset: usize) -> u32 {
        let mut b = [0; 4];
        b.copy_from_slice(&self.vapic[offset..offset + 4]);
        u32::from_le_bytes(b)
    }

    fn set_word(&mut self, offset: usize, value: u32) {
        if self.word(offset) != value {
            self.vapic[offset..offset + 4].copy_from_slice(&value.to_le_bytes());
        }
    }

    /// Writes a 32-bit register of the virtual-APIC page, as a guest write the CPU virtualizes
    /// does (for tests of the exits that follow one).
    #[cfg(test)]
    pub fn write_register(&mut self, offset: usize, value: u32) {
        self.set_word(offset & 0xff0, value);
    }

    /// A 32-bit register the guest wrote to the virtual-APIC page (the value of an APIC-write
    /// exit, SDM 30.4.3.3), at `offset` rounded down to its register.
    pub fn register(&self, offset: usize) -> u32 {
        self.word(offset & 0xff0)
    }

    /// The 64 bits a WRMSR of an x2APIC register wrote to the virtual-APIC page (SDM 30.5: at
    /// `offset`, the register's, and the 4 bytes after it).
    pub fn register64(&self, offset: usize) -> u64 {
        let offset = offset & 0xff0;
        u64::from(self.word(offset + 4)) << 32 | u64::from(self.word(offset))
    }

    /// Before an entry, with virtual-interrupt delivery: the model's pending (`irr`) and
    /// in-service (`isr`) vectors go to VIRR and VISR, RVI and SVI in the guest interrupt status
    /// are their highest vectors (SDM 30.1.1: RVI is bits 7:0, SVI bits 15:8), and the EOI-exit
    /// bitmap holds the level-triggered vectors (`tmr`), whose EOI must reach the IOAPIC. VM
    /// entry then evaluates the pending virtual interrupt and delivers it when the guest can take
    /// it (SDM 27.3.2.5, 30.2.1): no interrupt window, no injection. A globally disabled APIC
    /// (`enabled` false) requests nothing. `summaries` says which words of IRR and ISR are
    /// non-zero (bit i for word i, [`summary`]; the model keeps them): the highest vectors come
    /// from them without a scan, and a page known empty gets only those words. Returns the RVI
    /// written (0: nothing requested).
    pub fn post<V: Vmcs + ?Sized>(
        &mut self,
        vmcs: &mut V,
        (irr, isr): (&[u32; 8], &[u32; 8]),
        summaries: (u8, u8),
        tmr: &[u32; 8],
        enabled: bool,
    ) -> u8 {
        debug_assert_eq!(summaries, (summary(irr), summary(isr)));
        let (irr_words, isr_words) = summaries;
        if self.idle && irr_words == 0 && isr_words == 0 {
            // Empty on the page and in the model, RVI = SVI = 0 (the exit found them so,
            // `unchanged`), and no vector accepted since to change the TMR: nothing to write.
            return 0;
        }
        if self.idle {
            // VIRR and VISR are all zero on the page (what the early return rests on too): only
            // the model's non-zero words are written.
            let mut m = irr_words;
            while m != 0 {
                let i = m.trailing_zeros() as usize;
                self.set_word(VIRR + i * 16, irr[i]);
                m &= m - 1;
            }
            let mut m = isr_words;
            while m != 0 {
                let i = m.trailing_zeros() as usize;
                self.set_word(VISR + i * 16, isr[i]);
                m &= m - 1;
            }
        } else {
            for i in 0..8 {
                self.set_word(VIRR + i * 16, irr[i]);
                self.set_word(VISR + i * 16, isr[i]);
            }
        }
        self.idle = irr_words == 0 && isr_words == 0;
        let rvi = if enabled {
            top(irr, irr_words).unwrap_or(0)
        } else {
            0
        };
        let svi = top(isr, isr_words).unwrap_or(0);
        vmcs.write(
            Guest16::InterruptStatus,
            u16::from(svi) << 8 | u16::from(rvi),
        );
        let bitmap = eoi_exit_bitmap(tmr);
        for (i, bits) in bitmap.into_iter().enumerate() {
            if bits != self.eoi_exit[i] {
                self.eoi_exit[i] = bits;
                vmcs.write(EOI_EXIT_BITMAPS[i], bits);
            }
        }
        rvi
    }

    /// [`VirtualApic::post`] of a model whose IRR holds `vector` alone and whose ISR is empty,
    /// onto a page that [`VirtualApic::unchanged`] found as the last post left it with nothing
    /// (VIRR and VISR empty, RVI = SVI = 0) and an unchanged TMR: the one VIRR word and
    /// RVI = `vector` (SVI stays 0; the EOI-exit bitmaps, from the same TMR, stay). The APIC is
    /// enabled (the caller's `Lapic::timer_alone_vector` says so), so RVI requests the vector
    /// (SDM 30.1.2), as `post` makes it.
    #[inline]
    pub fn post_one<V: Vmcs + ?Sized>(&mut self, vmcs: &mut V, vector: u8) {
        debug_assert!(self.idle && vector >= 16);
        self.set_word(VIRR + usize::from(vector >> 5) * 16, 1 << (vector & 31));
        self.idle = false;
        vmcs.write(Guest16::InterruptStatus, u16::from(vector));
    }

    /// Before an entry that follows a device access: VTPR from the model's `tpr`, the TPR
    /// threshold for the interrupt the TPR holds back (`highest_irr`: the highest vector pending
    /// in the model's IRR, asked only when the TPR could hold one back), and the controls for the
    /// APIC's `mode`: "virtualize APIC accesses" only in xAPIC mode (in x2APIC mode or disabled,
    /// the MMIO page is no APIC register at all), "virtualize x2APIC mode" and the open MSR
    /// bitmap only in x2APIC mode.
    #[inline]
    pub fn before_entry<V: Vmcs + ?Sized>(
        &mut self,
        vmcs: &mut V,
        tpr: u8,
        highest_irr: impl FnOnce() -> Option<u8>,
        mode: ApicMode,
    ) {
        if !self.features.tpr_shadow {
            return;
        }
        if self.vtpr() != tpr {
            self.set_vtpr(tpr);
        }
        // TPR class 0 holds nothing back (vectors 0-15 are never delivered): no IRR scan. With
        // virtual-interrupt delivery a lowered VTPR lets the interrupt through without an exit
        // (SDM 30.1.2: TPR virtualization evaluates pending virtual interrupts instead).
        let threshold = if tpr >> 4 == 0 || self.features.virtual_interrupt_delivery {
            0
        } else {
            tpr_threshold(tpr, highest_irr())
        };
        if threshold != self.threshold {
            self.threshold = threshold;
            vmcs.write(Control32::TprThreshold, threshold);
        }
        let accesses = self.features.virtualize_apic_accesses && mode == ApicMode::XApic;
        let x2apic = self.features.virtualize_x2apic
            && self.msr_bitmap.is_some()
            && mode == ApicMode::X2Apic;
        if (accesses, x2apic) != (self.accesses_virtualized, self.x2apic_virtualized) {
            // One VMWRITE for both: the two are never on together (SDM 27.2.1.1).
            let (vaa, vx2) = (
                SecondaryControls::VIRTUALIZE_APIC_ACCESSES.bits(),
                SecondaryControls::VIRTUALIZE_X2APIC_MODE.bits(),
            );
            let mut secondary = vmcs.read(Control32::SecondaryProcBasedControls) & !(vaa | vx2);
            if accesses {
                secondary |= vaa;
            }
            if x2apic {
                secondary |= vx2;
            }
            // The APIC-access page stays mapped; with the control off a guest access reaches
            // its memory, all ones, as the empty bus the model gives outside xAPIC mode.
            vmcs.write(Control32::SecondaryProcBasedControls, secondary);
            if x2apic != self.x2apic_virtualized {
                // Never open without the control: RDMSR and WRMSR would reach the CPU's own APIC
                // (SDM 30.5: without "virtualize x2APIC mode" they operate normally).
                if let Some(b) = &mut self.msr_bitmap {
                    set_x2apic_msrs(b, self.features, x2apic);
                }
            }
            self.accesses_virtualized = accesses;
            self.x2apic_virtualized = x2apic;
        }
    }
}

/// The x2APIC part of an MSR bitmap (SDM 25.6.9: a set bit exits; MSRs 0-1FFFH have their read
/// bits at bytes 0-1023 and their write bits at 2048-3071), `open` for "virtualize x2APIC mode"
/// with `f`, or closed: every RDMSR and WRMSR of 800H-8FFH exits to the model.
///
/// Open (SDM 30.5): RDMSR of the TPR; with APIC-register virtualization every register the page
/// holds (those x2APIC mode reads, `lapic::x2apic_readable`, but the timer's current count,
/// which is computed at the read); the others, and the write-only EOI and SELF IPI, still exit,
/// so the model gives their #GP. WRMSR of the TPR, and with virtual-interrupt delivery of EOI
/// and SELF IPI, which the CPU virtualizes (and checks their reserved bits itself); every other
/// write exits to the model.
pub fn set_x2apic_msrs(bitmap: &mut [u8; 4096], f: ApicvFeatures, open: bool) {
    for msr in X2APIC_MSRS {
        let read = open
            && (msr == X2APIC_TPR
                || (f.register_virtualization
                    && x2apic_readable(msr)
                    && msr != X2APIC_TIMER_CURRENT));
        let write = open
            && (msr == X2APIC_TPR
                || (f.virtual_interrupt_delivery && (msr == X2APIC_EOI || msr == X2APIC_SELF_IPI)));
        for (base, passes) in [(0, read), (2048, write)] {
            let (byte, bit) = (base + (msr / 8) as usize, 1 << (msr % 8));
            if passes {
                bitmap[byte] &= !bit;
            } else {
                bitmap[byte] |= bit;
            }
        }
    }
}

/// The x2APIC MSRs the CPU virtualizes writes of (SDM 30.5).
const X2APIC_TPR: u32 = 0x808;
const X2APIC_EOI: u32 = 0x80b;
const X2APIC_SELF_IPI: u32 = 0x83f;

/// The four 64-bit EOI-exit bitmap fields, vectors 0-63 first (SDM 25.6.8).
const EOI_EXIT_BITMAPS: [Control64; 4] = [
    Control64::EoiExitBitmap0,
    Control64::EoiExitBitmap1,
    Control64::EoiExitBitmap2,
    Control64::EoiExitBitmap3,
];

/// Which words of a 256-bit register are non-zero: bit i for word i (what the local APIC model
/// keeps next to its IRR and ISR, and [`VirtualApic::post`] takes).
pub fn summary(words: &[u32; 8]) -> u8 {
    words
        .iter()
        .enumerate()
        .fold(0, |m, (i, &w)| m | u8::from(w != 0) << i)
}

/// The highest vector set in `words`, whose non-zero words are the bits of `summary`: two
/// leading-zero counts, no scan.
fn top(words: &[u32; 8], summary: u8) -> Option<u8> {
    if summary == 0 {
        return None;
    }
    let i = 7 - summary.leading_zeros() as u8;
    Some(i * 32 + (31 - words[usize::from(i)].leading_zeros() as u8))
}

/// The EOI-exit bitmap (SDM 30.1.4: an EOI of a vector whose bit is set exits after EOI
/// virtualization) from the model's TMR: exactly the vectors whose EOI the emulated APIC would
/// pass to the IOAPIC (`Lapic::eoi`), that is those the IOAPIC delivered level triggered. A vector
/// accepted edge triggered clears its TMR bit, and its EOI stays in the CPU.
pub fn eoi_exit_bitmap(tmr: &[u32; 8]) -> [u64; 4] {
    let mut bits = [0; 4];
    for (i, b) in bits.iter_mut().enumerate() {
        *b = u64::from(tmr[2 * i]) | u64::from(tmr[2 * i + 1]) << 32;
    }
    bits
}

/// The TPR threshold (SDM 30.1.2): the CPU exits once VTPR[7:4] drops below its bits 3:0. The
/// threshold is the priority class of the highest pending vector when the TPR is what holds it
/// back (class <= TPR class), so the exit comes exactly when the TPR lets it through; otherwise 0
/// (nothing pending, or the vector is deliverable now, or an in-service vector holds it back and
/// its EOI exits anyway). Never above VTPR[7:4]: SDM 27.2.1.1 refuses that at entry without
/// "virtualize APIC accesses", and SDM 27.7.7 exits right after the entry with it.
pub fn tpr_threshold(tpr: u8, highest_irr: Option<u8>) -> u32 {
    match highest_irr {
        Some(v) => u32::from((v >> 4).min(tpr >> 4)),
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::lapic::highest;
    use crate::vmx::FakeVmcs;
    use alloc::boxed::Box;

    fn page() -> &'static mut [u8; 4096] {
        Box::leak(Box::new([0u8; 4096]))
    }

    fn vapic(f: ApicvFeatures) -> VirtualApic {
        // SAFETY: a leaked page that belongs to this test alone.
        unsafe { VirtualApic::new(page(), 0x5000, 0x6000, f) }
    }

    const ALL: ApicvFeatures = ApicvFeatures::ALL;

    /// The TPR alone virtualized (a CPU without virtual-interrupt delivery).
    const TPR_ONLY: ApicvFeatures = ApicvFeatures {
        virtual_interrupt_delivery: false,
        register_virtualization: false,
        virtualize_x2apic: false,
        ..ALL
    };

    /// `post` against the exit protocol, over 5,000 random rounds: the guest runs (the CPU may
    /// set vectors in VIRR, move one to VISR, clear one from VISR, keeping RVI and SVI: SDM
    /// 30.1.4, 30.2.2, 30.1.5), the exit takes the vectors unless `unchanged` says they are as
    /// posted, the model changes, and `post` gives it back. After every post VIRR and VISR on
    /// the page are the model's, word for word, and RVI and SVI its highest vectors, whichever
    /// words it wrote or skipped.
    #[test]
    fn every_post_leaves_the_page_as_the_model_has_it() {
        let mut a = vapic(ALL);
        let mut vmcs = FakeVmcs::new();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut irr, mut isr) = ([0u32; 8], [0u32; 8]);
        let vector = |r: u64| 16 + (r % 240) as usize;
        for round in 0..5_000 {
            // The guest runs: at times the CPU changes VIRR and VISR on the page.
            let (mut pirr, mut pisr) = a.vectors();
            match next() % 4 {
                0 => {
                    let v = vector(next());
                    pirr[v / 32] |= 1 << (v % 32);
                }
                1 => {
                    if let Some(v) = highest(&pirr) {
                        let v = usize::from(v);
                        pirr[v / 32] &= !(1 << (v % 32));
                        pisr[v / 32] |= 1 << (v % 32);
                    }
                }
                2 => {
                    if let Some(v) = highest(&pisr) {
                        let v = usize::from(v);
                        pisr[v / 32] &= !(1 << (v % 32));
                    }
                }
                _ => {}
            }
            for i in 0..8 {
                a.set_word(VIRR + i * 16, pirr[i]);
                a.set_word(VISR + i * 16, pisr[i]);
            }
            let status = u16::from(highest(&pisr).unwrap_or(0)) << 8
                | u16::from(highest(&pirr).unwrap_or(0));
            vmcs.set(Guest16::InterruptStatus, status);
            // The exit: the model takes what changed.
            if !a.unchanged(&vmcs) {
                (irr, isr) = a.take_vectors();
            }
            // The model moves on: an interrupt accepted, one taken away, or nothing.
            match next() % 3 {
                0 => {
                    let v = vector(next());
                    irr[v / 32] |= 1 << (v % 32);
                }
                1 => {
                    irr = [0; 8];
                    if next() % 2 == 0 {
                        isr = [0; 8];
                    }
                }
                _ => {}
            }
            a.post(
                &mut vmcs,
                (&irr, &isr),
                (summary(&irr), summary(&isr)),
                &[0; 8],
                true,
            );
            assert_eq!(a.vectors(), (irr, isr), "round {round}");
            let want =
                u16::from(highest(&isr).unwrap_or(0)) << 8 | u16::from(highest(&irr).unwrap_or(0));
            assert_eq!(vmcs.read(Guest16::InterruptStatus), want, "round {round}");
        }
    }

    #[test]
    fn bochs_offers_tpr_shadow_and_apic_access_virtualization() {
        let caps = VmxCaps::bochs_skylake_x();
        assert_eq!(ApicvFeatures::select(&caps, true), ALL);
        assert_eq!(
            ApicvFeatures::select(&caps, false),
            ApicvFeatures::default()
        );
    }

    #[test]
    fn a_cpu_without_them_falls_back_to_exits() {
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.procbased2 &= !(u64::from(SecondaryControls::VIRTUALIZE_APIC_ACCESSES.bits()) << 32);
        let f = ApicvFeatures::select(&caps, true);
        assert!(f.tpr_shadow && !f.virtualize_apic_accesses && !f.virtual_interrupt_delivery);
        let bit = u64::from(PrimaryControls::USE_TPR_SHADOW.bits()) << 32;
        caps.procbased &= !bit;
        caps.true_procbased &= !bit;
        assert_eq!(ApicvFeatures::select(&caps, true), ApicvFeatures::default());
    }

    #[test]
    fn tpr_shadow_turns_cr8_exits_off() {
        let caps = VmxCaps::bochs_skylake_x();
        let c = crate::vcpu::compute_controls(&caps).unwrap();
        let cr8 = PrimaryControls::CR8_LOAD_EXITING | PrimaryControls::CR8_STORE_EXITING;
        assert!(PrimaryControls::from_bits_retain(c.primary).contains(cr8));
        let (p, s) = ALL.apply(&caps, c.primary, c.secondary).unwrap();
        let p = PrimaryControls::from_bits_retain(p);
        assert!(p.contains(PrimaryControls::USE_TPR_SHADOW) && !p.intersects(cr8));
        // Everything else Keel relies on stays.
        assert!(p.contains(PrimaryControls::HLT_EXITING | PrimaryControls::USE_IO_BITMAPS));
        let s = SecondaryControls::from_bits_retain(s);
        assert!(s.contains(
            SecondaryControls::VIRTUALIZE_APIC_ACCESSES
                | SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY
                | SecondaryControls::ENABLE_EPT
        ));
        // Without it, the TPR alone.
        let (_, s) = TPR_ONLY.apply(&caps, c.primary, c.secondary).unwrap();
        let s = SecondaryControls::from_bits_retain(s);
        assert!(!s.contains(SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY));
        // Off: the controls are Keel's usual ones.
        assert_eq!(
            ApicvFeatures::default().apply(&caps, c.primary, c.secondary),
            Ok((c.primary, c.secondary))
        );
    }

    #[test]
    fn fields_at_boot() {
        let mut v = FakeVmcs::new();
        vapic(ALL).write_fields(&mut v);
        assert_eq!(v.read(Control64::VirtualApicAddr), 0x5000);
        assert_eq!(v.read(Control64::ApicAccessAddr), 0x6000);
        assert_eq!(v.read(Control32::TprThreshold), 0);
    }

    #[test]
    fn vtpr_is_byte_80h_of_the_virtual_apic_page() {
        let mut a = vapic(ALL);
        a.set_vtpr(0x9c);
        assert_eq!(a.vapic[0x80..0x84], [0x9c, 0, 0, 0]);
        assert_eq!(a.vtpr(), 0x9c);
        a.reset();
        assert_eq!(a.vtpr(), 0);
    }

    /// SDM 30.1.2: an interrupt the TPR holds back must come the moment the TPR drops below it.
    #[test]
    fn threshold_is_the_class_the_tpr_holds_back() {
        assert_eq!(tpr_threshold(0x00, None), 0);
        // Vector 0x51 pending, TPR 0x80: exit when TPR[7:4] < 5.
        assert_eq!(tpr_threshold(0x80, Some(0x51)), 5);
        // Same class as the TPR: still held back (PPR[7:4] >= class), exit below it.
        assert_eq!(tpr_threshold(0x5f, Some(0x51)), 5);
        // Above the TPR: deliverable now (or held by the ISR), the threshold must not exceed
        // VTPR[7:4].
        assert_eq!(tpr_threshold(0x30, Some(0x51)), 3);
    }

    #[test]
    fn before_entry_keeps_vtpr_and_threshold_and_follows_the_apic_mode() {
        let caps = VmxCaps::bochs_skylake_x();
        let c = crate::vcpu::compute_controls(&caps).unwrap();
        let (_, s) = TPR_ONLY.apply(&caps, c.primary, c.secondary).unwrap();
        let mut v = FakeVmcs::new();
        v.write(Control32::SecondaryProcBasedControls, s);
        let mut a = vapic(TPR_ONLY);
        a.before_entry(&mut v, 0x70, || Some(0x41), ApicMode::XApic);
        assert_eq!((a.vtpr(), v.read(Control32::TprThreshold)), (0x70, 4));
        let vaa = SecondaryControls::VIRTUALIZE_APIC_ACCESSES.bits();
        assert_ne!(v.read(Control32::SecondaryProcBasedControls) & vaa, 0);
        // x2APIC mode: the MMIO page is no longer the APIC's (the APIC-access page, all ones).
        a.before_entry(&mut v, 0x70, || None, ApicMode::X2Apic);
        assert_eq!(v.read(Control32::SecondaryProcBasedControls) & vaa, 0);
        assert_eq!(v.read(Control32::TprThreshold), 0);
        // Back to xAPIC mode (through a disable and re-enable).
        a.before_entry(&mut v, 0, || None, ApicMode::XApic);
        assert_ne!(v.read(Control32::SecondaryProcBasedControls) & vaa, 0);
        // Without the features nothing is written.
        let mut v = FakeVmcs::new();
        vapic(ApicvFeatures::default()).before_entry(&mut v, 0x70, || Some(0x41), ApicMode::XApic);
        assert_eq!(v.read(Control32::TprThreshold), 0);
        assert_eq!(v.read(Control64::VirtualApicAddr), 0);
    }

    /// Whether MSR `msr`'s read (or write) bit in `b` lets it through.
    fn passes(b: &[u8; 4096], msr: u32, write: bool) -> bool {
        let byte = if write { 2048 } else { 0 } + (msr / 8) as usize;
        b[byte] & (1 << (msr % 8)) == 0
    }

    fn bitmap_page() -> &'static mut [u8; 4096] {
        Box::leak(Box::new([0xffu8; 4096]))
    }

    /// SDM 30.5: with register virtualization every register the page holds is read without an
    /// exit, but the timer's current count (computed at the read), the write-only EOI and SELF
    /// IPI and the MSRs that name no register, whose #GP the model gives. Writes pass for the
    /// TPR, EOI and SELF IPI only; everything else reaches the model.
    #[test]
    fn the_x2apic_msrs_opened_are_those_the_cpu_virtualizes() {
        let mut b = [0xffu8; 4096];
        set_x2apic_msrs(&mut b, ALL, true);
        for msr in [
            0x802, 0x803, 0x808, 0x80a, 0x80d, 0x80f, 0x810, 0x827, 0x828, 0x830,
        ] {
            assert!(passes(&b, msr, false), "RDMSR {msr:#x}");
        }
        for msr in [0x832, 0x837, 0x838, 0x83e] {
            assert!(passes(&b, msr, false), "RDMSR {msr:#x}");
        }
        for msr in [
            0x800, 0x809, 0x80b, 0x80c, 0x80e, 0x82f, 0x831, 0x839, 0x83f, 0x8ff,
        ] {
            assert!(!passes(&b, msr, false), "RDMSR {msr:#x} exits");
        }
        for msr in X2APIC_MSRS {
            let virtualized = matches!(msr, 0x808 | 0x80b | 0x83f);
            assert_eq!(passes(&b, msr, true), virtualized, "WRMSR {msr:#x}");
        }
        // Nothing outside the range changed.
        assert!(b[..0x100]
            .iter()
            .chain(&b[0x120..2048 + 0x100])
            .all(|&x| x == 0xff));
        assert!(b[2048 + 0x120..].iter().all(|&x| x == 0xff));
        // Without register virtualization and virtual-interrupt delivery: the TPR alone.
        let tpr_only = ApicvFeatures {
            virtualize_x2apic: true,
            ..TPR_ONLY
        };
        let mut t = [0xffu8; 4096];
        set_x2apic_msrs(&mut t, tpr_only, true);
        for msr in X2APIC_MSRS {
            assert_eq!(passes(&t, msr, false), msr == 0x808, "RDMSR {msr:#x}");
            assert_eq!(passes(&t, msr, true), msr == 0x808, "WRMSR {msr:#x}");
        }
        // Closed again: every access exits.
        set_x2apic_msrs(&mut b, ALL, false);
        assert!(b.iter().all(|&x| x == 0xff));
    }

    /// SDM 27.2.1.1: "virtualize x2APIC mode" and "virtualize APIC accesses" are never on
    /// together; the MSR bitmap is open exactly while the first is on (x2APIC mode), and
    /// closed in xAPIC mode and while the APIC is disabled.
    #[test]
    fn the_controls_and_the_bitmap_follow_the_apic_mode() {
        let caps = VmxCaps::bochs_skylake_x();
        let c = crate::vcpu::compute_controls(&caps).unwrap();
        let (_, s) = ALL.apply(&caps, c.primary, c.secondary).unwrap();
        let s2 = SecondaryControls::from_bits_retain(s);
        assert!(s2.contains(SecondaryControls::APIC_REGISTER_VIRTUALIZATION));
        assert!(!s2.contains(SecondaryControls::VIRTUALIZE_X2APIC_MODE));
        let mut v = FakeVmcs::new();
        v.write(Control32::SecondaryProcBasedControls, s);
        let mut a = vapic(ALL);
        // SAFETY: a leaked page that belongs to this test alone.
        unsafe { a.set_msr_bitmap(bitmap_page()) };
        let controls = |v: &FakeVmcs| {
            let s =
                SecondaryControls::from_bits_retain(v.read(Control32::SecondaryProcBasedControls));
            (
                s.contains(SecondaryControls::VIRTUALIZE_APIC_ACCESSES),
                s.contains(SecondaryControls::VIRTUALIZE_X2APIC_MODE),
            )
        };
        let open = |a: &VirtualApic| passes(a.msr_bitmap.as_ref().unwrap(), 0x80b, true);
        a.before_entry(&mut v, 0, || None, ApicMode::XApic);
        assert_eq!(controls(&v), (true, false));
        assert!(!open(&a));
        a.before_entry(&mut v, 0, || None, ApicMode::X2Apic);
        assert_eq!(controls(&v), (false, true));
        assert!(open(&a) && a.x2apic_virtualized());
        a.before_entry(&mut v, 0, || None, ApicMode::Disabled);
        assert_eq!(controls(&v), (false, false));
        assert!(!open(&a));
        a.before_entry(&mut v, 0, || None, ApicMode::XApic);
        assert_eq!(controls(&v), (true, false));
        // A reset (the guest reboots, or is restored) closes the bitmap with the control.
        a.before_entry(&mut v, 0, || None, ApicMode::X2Apic);
        a.reset();
        assert!(!open(&a) && !a.x2apic_virtualized());
        // Everything else in the secondary controls stays.
        assert_eq!(
            v.read(Control32::SecondaryProcBasedControls)
                & !(SecondaryControls::VIRTUALIZE_APIC_ACCESSES.bits()
                    | SecondaryControls::VIRTUALIZE_X2APIC_MODE.bits()),
            s & !SecondaryControls::VIRTUALIZE_APIC_ACCESSES.bits()
        );
        // Without the bitmap (or the feature) the x2APIC mode is not virtualized.
        let mut b = vapic(ALL);
        b.before_entry(&mut v, 0, || None, ApicMode::X2Apic);
        assert!(!b.x2apic_virtualized());
    }

    #[test]
    fn bochs_offers_register_and_x2apic_virtualization() {
        let f = ApicvFeatures::select(&VmxCaps::bochs_skylake_x(), true);
        assert!(f.register_virtualization && f.virtualize_x2apic);
        let mut caps = VmxCaps::bochs_skylake_x();
        caps.procbased2 &= !(u64::from(SecondaryControls::VIRTUAL_INTERRUPT_DELIVERY.bits()) << 32);
        let f = ApicvFeatures::select(&caps, true);
        assert!(
            !f.register_virtualization,
            "only with virtual-interrupt delivery"
        );
        assert!(f.virtualize_x2apic);
    }
}
