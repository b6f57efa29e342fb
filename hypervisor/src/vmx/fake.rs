//! A VMCS in memory, for tests of code that takes a [`VmcsAccess`]: it stores fields in a map and
//! logs every write, so a test can both preset what the "hardware" reports (exit reason,
//! qualification, ...) and check what the code under test wrote.
//!
//! Compiled in every build (it is small) so the tests of any module can use it.

use super::fields::{FieldValue, FieldWidth, VmcsAccess, VmcsField};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeVmcs {
    /// Current field values by encoding; fields never written read as 0.
    pub fields: BTreeMap<u32, u64>,
    /// Every `write_raw`, in order: (encoding, value after truncation to the field's width).
    pub writes: Vec<(u32, u64)>,
}

impl FakeVmcs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets any field, read-only ones included, the way the processor would on a VM exit. Not
    /// logged in `writes`.
    pub fn set<F: VmcsField>(&mut self, field: F, value: F::Value) {
        let e = field.encoding();
        self.fields
            .insert(e, value.into_raw() & FieldWidth::of(e).mask());
    }

    /// Builder form of [`set`](Self::set).
    pub fn with<F: VmcsField>(mut self, field: F, value: F::Value) -> Self {
        self.set(field, value);
        self
    }

    /// The last value written to `field` through [`VmcsAccess`], if any.
    pub fn written<F: VmcsField>(&self, field: F) -> Option<F::Value> {
        let e = field.encoding();
        self.writes
            .iter()
            .rev()
            .find(|(enc, _)| *enc == e)
            .map(|&(_, v)| F::Value::from_raw(v))
    }

    /// Forgets the write log (the field values stay).
    pub fn clear_log(&mut self) {
        self.writes.clear();
    }

    /// The VM-entry checks a processor makes on this VMCS's guest state and event injection
    /// (SDM 27.2.1.3, 27.3.1), with Bochs' capabilities: `Err` says which rule the state breaks,
    /// where the real CPU would fail the entry with exit reason 33 or VM-instruction error 7.
    pub fn check_entry(&self) -> Result<(), alloc::string::String> {
        super::guest_state::check_guest_state(self)
    }
}

impl VmcsAccess for FakeVmcs {
    fn read_raw(&self, encoding: u32) -> u64 {
        self.fields.get(&encoding).copied().unwrap_or(0)
    }

    fn write_raw(&mut self, encoding: u32, value: u64) {
        let value = value & FieldWidth::of(encoding).mask();
        self.fields.insert(encoding, value);
        self.writes.push((encoding, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmx::{Control32, GuestNat, ReadOnly32, Vmcs};

    #[test]
    fn presets_are_not_logged_and_writes_are() {
        let mut vmcs = FakeVmcs::new().with(ReadOnly32::ExitReason, 10);
        assert_eq!(vmcs.read(ReadOnly32::ExitReason), 10);
        assert!(vmcs.writes.is_empty());
        vmcs.write(GuestNat::Rip, 0x1000);
        vmcs.write(GuestNat::Rip, 0x1002);
        vmcs.write(Control32::ExceptionBitmap, 1 << 14);
        assert_eq!(vmcs.written(GuestNat::Rip), Some(0x1002));
        assert_eq!(vmcs.written(GuestNat::Rsp), None);
        assert_eq!(vmcs.writes.len(), 3);
        vmcs.clear_log();
        assert!(vmcs.writes.is_empty());
        assert_eq!(vmcs.read(GuestNat::Rip), 0x1002);
        assert_eq!(vmcs.read(GuestNat::Rsp), 0);
    }

    #[test]
    fn usable_as_a_trait_object() {
        let mut fake = FakeVmcs::new();
        let dynamic: &mut dyn VmcsAccess = &mut fake;
        dynamic.write(GuestNat::Cr3, 0x5000);
        assert_eq!(dynamic.read(GuestNat::Cr3), 0x5000);
    }
}
