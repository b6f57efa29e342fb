//! Reading what the machine's firmware describes. Firmware tables are untrusted input: every
//! parser here checks signatures, checksums and lengths, and refuses a bad table with an error
//! instead of panicking or reading past it.
//!
//! (ACPI tables that Keel *writes* for its guests are another matter and live elsewhere.)

pub mod madt;
