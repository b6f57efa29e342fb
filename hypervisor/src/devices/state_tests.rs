//! Every device's state as a value: a device saved in the middle of its work and restored into a
//! freshly made one behaves from then on exactly as the original, and bad state is refused.

use super::acpi_pm::AcpiPm;
use super::board::Board;
use super::fw_cfg::FwCfg;
use super::i8042::I8042;
use super::pci::PciHost;
use super::pit8254::Pit;
use super::port80::Port80;
use super::rtc::Rtc;
use super::testing::Bench;
use super::uart16550::Uart16550;
use super::Device;
use crate::state::{Reader, StateError, Writer};
use alloc::boxed::Box;
use alloc::vec::Vec;

/// 10 MHz, Bochs' TSC in the tests.
const TSC_HZ: u64 = 10_000_000;

#[derive(Clone, Copy)]
enum Op {
    Out(u16, u8, u32),
    In(u16, u8),
    /// Time passes to this TSC value, and the device catches up if it is due.
    At(u64),
}

/// Runs `ops` on `dev`, returning what its reads gave and its deadlines after each step.
fn run(dev: &mut dyn Device, bench: &mut Bench, now: &mut u64, ops: &[Op]) -> Vec<u64> {
    let mut seen = Vec::new();
    for op in ops {
        match *op {
            Op::Out(port, size, v) => dev.io_write(port, size, v, &mut bench.cx(*now)),
            Op::In(port, size) => {
                seen.push(u64::from(dev.io_read(port, size, &mut bench.cx(*now))))
            }
            Op::At(t) => {
                *now = t;
                if dev.next_deadline().is_some_and(|d| d <= t) {
                    dev.advance(&mut bench.cx(t));
                }
            }
        }
        seen.push(dev.next_deadline().unwrap_or(u64::MAX));
    }
    seen
}

fn save(dev: &dyn Device) -> Vec<u8> {
    let mut w = Writer::new();
    dev.save(&mut w);
    w.into_bytes()
}

/// Drives `original` through `before`, moves its state into `fresh`, then checks that both
/// answer `after` alike and end in the same state.
fn moves(mut original: Box<dyn Device>, mut fresh: Box<dyn Device>, before: &[Op], after: &[Op]) {
    let name = original.name();
    let (mut bench, mut now) = (Bench::default(), 0);
    run(original.as_mut(), &mut bench, &mut now, before);
    let state = save(original.as_ref());
    assert_ne!(
        state,
        save(fresh.as_ref()),
        "{name}: the script left no trace"
    );
    let mut r = Reader::new(&state);
    fresh.restore(&mut r).expect("its own state is accepted");
    assert_eq!(r.remaining(), 0, "{name}");
    assert_eq!(
        save(fresh.as_ref()),
        state,
        "{name}: restored state differs"
    );
    let (mut bench2, mut now2) = (Bench::default(), now);
    let a = run(original.as_mut(), &mut bench, &mut now, after);
    let b = run(fresh.as_mut(), &mut bench2, &mut now2, after);
    assert_eq!(a, b, "{name}: the restored device answers differently");
    assert_eq!(save(original.as_ref()), save(fresh.as_ref()), "{name}");
}

#[test]
fn pit_counters_and_its_timer_continue() {
    use Op::*;
    let before = [
        Out(0x43, 1, 0x34), // channel 0, lobyte/hibyte, mode 2
        Out(0x40, 1, 0xe8),
        Out(0x40, 1, 0x03), // 1000
        Out(0x43, 1, 0xb0), // channel 2, mode 0
        Out(0x61, 1, 0x01), // gate 2 high
        Out(0x42, 1, 0x10),
        At(123_456),
        Out(0x43, 1, 0x00), // latch channel 0
        In(0x40, 1),        // half of the latched count
    ];
    let after = [
        In(0x40, 1), // the other half
        At(500_000),
        In(0x40, 1),
        In(0x40, 1),
        In(0x61, 1),
        Out(0x42, 1, 0x27), // channel 2's high byte starts it
        At(2_000_000),
        In(0x42, 1),
        In(0x42, 1),
    ];
    moves(
        Box::new(Pit::new(TSC_HZ)),
        Box::new(Pit::new(TSC_HZ)),
        &before,
        &after,
    );
}

#[test]
fn uart_registers_and_received_bytes_continue() {
    use Op::*;
    let mut uart = Uart16550::com1();
    let mut bench = Bench::default();
    uart.io_write(0x3fa, 1, 0x01, &mut bench.cx(5)); // FIFOs on: 16 bytes of room
    for b in *b"hi!" {
        assert!(uart.push_input(b, &mut bench.cx(10)));
    }
    let before = [
        Out(0x3fb, 1, 0x83), // DLAB
        Out(0x3f8, 1, 0x01),
        Out(0x3fb, 1, 0x03),
        Out(0x3f9, 1, 0x03), // receive and THRE interrupts
        Out(0x3ff, 1, 0x5a), // scratch
        In(0x3f8, 1),        // 'h'
    ];
    let after = [
        In(0x3fa, 1),
        In(0x3fd, 1),
        In(0x3f8, 1),
        In(0x3f8, 1),
        In(0x3fd, 1),
        In(0x3ff, 1),
        Out(0x3f8, 1, u32::from(b'x')),
        In(0x3fa, 1),
    ];
    moves(Box::new(uart), Box::new(Uart16550::com1()), &before, &after);
}

#[test]
fn rtc_time_and_registers_continue() {
    use Op::*;
    let before = [
        Out(0x70, 1, 0x0b),
        Out(0x71, 1, 0x46), // binary, 24h, periodic interrupt
        Out(0x70, 1, 0x0a),
        Out(0x71, 1, 0x26), // 1024 Hz
        At(25_000_000),
        Out(0x70, 1, 0x00),
    ];
    let after = [
        In(0x71, 1),
        At(37_000_000),
        Out(0x70, 1, 0x0c),
        In(0x71, 1),
        Out(0x70, 1, 0x00),
        In(0x71, 1),
    ];
    moves(
        Box::new(Rtc::new(TSC_HZ)),
        Box::new(Rtc::new(TSC_HZ)),
        &before,
        &after,
    );
}

#[test]
fn acpi_pm_timer_and_registers_continue() {
    use Op::*;
    let board = Board::pc(64 << 20, 1);
    let pm = |b: &Board| Box::new(AcpiPm::new(b.pm, b.sci_irq, TSC_HZ));
    let (event, timer) = (board.pm.event, board.pm.timer);
    let before = [Out(event + 2, 2, 0x0001), At(48_000_000)];
    let after = [In(timer, 4), In(event, 2), At(60_000_000), In(timer, 4)];
    moves(pm(&board), pm(&board), &before, &after);
}

#[test]
fn i8042_output_and_command_state_continue() {
    use Op::*;
    let before = [
        Out(0x64, 1, 0xaa), // self-test: 0x55 queued
        Out(0x64, 1, 0x60), // the next data byte is the command byte
    ];
    let after = [
        In(0x64, 1),
        In(0x60, 1),
        Out(0x60, 1, 0x47),
        Out(0x64, 1, 0x20),
        In(0x60, 1),
    ];
    moves(
        Box::new(I8042::new()),
        Box::new(I8042::new()),
        &before,
        &after,
    );
}

#[test]
fn fw_cfg_selection_and_offset_continue() {
    use Op::*;
    let board = Board::pc(64 << 20, 1);
    let before = [Out(0x510, 2, 0x0000), In(0x511, 1), In(0x511, 1)];
    let after = [In(0x511, 1), In(0x511, 1), In(0x511, 1)];
    moves(
        Box::new(FwCfg::new(&board)),
        Box::new(FwCfg::new(&board)),
        &before,
        &after,
    );
}

#[test]
fn pci_address_and_config_continue() {
    use Op::*;
    let before = [Out(0xcf8, 4, 0x8000_0004), Out(0xcfc, 2, 0x0007)];
    let after = [In(0xcf8, 4), In(0xcfc, 4), In(0xcf9, 1)];
    moves(
        Box::new(PciHost::new()),
        Box::new(PciHost::new()),
        &before,
        &after,
    );
}

#[test]
fn port80_keeps_its_last_code() {
    use Op::*;
    moves(
        Box::new(Port80::default()),
        Box::new(Port80::default()),
        &[Out(0x80, 1, 0x42)],
        &[In(0x80, 1)],
    );
}

#[test]
fn another_devices_state_is_refused() {
    let pit = save(&Pit::new(TSC_HZ));
    let mut uart = Uart16550::com1();
    let before = save(&uart);
    let e = uart
        .restore(&mut Reader::new(&pit))
        .expect_err("a PIT's state");
    assert_eq!(
        e,
        StateError::WrongSection {
            expected: *b"UART",
            found: *b"PIT0"
        }
    );
    assert_eq!(save(&uart), before);
}

#[test]
fn state_the_device_cannot_hold_is_refused_and_the_device_unchanged() {
    let mut pit = Pit::new(TSC_HZ);
    let good = save(&pit);
    // The section header (4 + 2 + 4), the clock (16), then channel 0's mode byte.
    let mode = 10 + 16;
    let mut bad = good.clone();
    bad[mode] = 6;
    assert_eq!(
        pit.restore(&mut Reader::new(&bad)),
        Err(StateError::Invalid("a PIT mode above 5"))
    );
    let mut other_clock = good.clone();
    other_clock[10] ^= 1;
    assert_eq!(
        pit.restore(&mut Reader::new(&other_clock)),
        Err(StateError::Invalid(
            "the PIT's clock differs from this machine's"
        ))
    );
    assert_eq!(save(&pit), good);

    let mut uart = Uart16550::com1();
    let mut w = Writer::new();
    uart.save(&mut w);
    let mut bytes = w.into_bytes();
    // Header, base (2), irq (1), then the receive FIFO: its count (0) and bytes. 17 bytes
    // there, one more than the FIFO holds.
    bytes[13..17].copy_from_slice(&17u32.to_le_bytes());
    bytes.splice(17..17, [b'x'; 17]);
    let len = (bytes.len() - 10) as u32;
    bytes[6..10].copy_from_slice(&len.to_le_bytes());
    assert_eq!(
        uart.restore(&mut Reader::new(&bytes)),
        Err(StateError::Invalid("a UART receive FIFO beyond 16 bytes"))
    );

    let mut rtc = Rtc::new(TSC_HZ);
    let mut bytes = save(&rtc);
    bytes[10 + 16] = 0x80; // the CMOS index
    assert_eq!(
        rtc.restore(&mut Reader::new(&bytes)),
        Err(StateError::Invalid("a CMOS index above 0x7f"))
    );
}

#[test]
fn the_pic_pair_keeps_its_programming_and_pending_interrupts() {
    use super::pic8259::PicPair;
    let mut pic = PicPair::new();
    // ICW1-4 on both chips (vectors 0x20 and 0x28), unmask IRQ0, 1 and the cascade.
    for (port, v) in [(0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01)] {
        pic.write(port, v);
    }
    for (port, v) in [(0xa0, 0x11), (0xa1, 0x28), (0xa1, 0x02), (0xa1, 0x01)] {
        pic.write(port, v);
    }
    pic.write(0x21, 0xf8);
    pic.set_irq(0, true);
    pic.set_irq(1, true);
    assert_eq!(pic.acknowledge(), 0x20);
    let mut w = Writer::new();
    pic.save(&mut w);
    let mut copy = PicPair::new();
    copy.restore(&mut Reader::new(w.bytes())).expect("restores");
    for p in [&mut pic, &mut copy] {
        // IRQ1 waits behind IRQ0 in service until the EOI.
        assert_eq!(p.pending_vector(), None);
        p.write(0x20, 0x20);
        assert_eq!(p.pending_vector(), Some(0x21));
        assert_eq!((p.vector_bases(), p.masks()), ((0x20, 0x28), (0xf8, 0x00)));
    }
}

#[test]
fn the_ioapic_keeps_its_routes() {
    use super::ioapic::IoApic;
    use super::lapic::{ApicMessage, MessageSink};
    struct Nowhere;
    impl MessageSink for Nowhere {
        fn deliver(&mut self, _: ApicMessage) -> super::Latch {
            super::Latch::Masked
        }
    }
    let mut io = IoApic::new();
    io.mmio_write(0x00, 4, 0x10 + 2 * 4, &mut Nowhere);
    io.mmio_write(0x10, 4, 0x0000_a041, &mut Nowhere); // pin 4: vector 0x41, level, unmasked
    let mut w = Writer::new();
    io.save(&mut w);
    let mut copy = IoApic::new();
    copy.restore(&mut Reader::new(w.bytes())).expect("restores");
    assert_eq!(copy.entry(4), io.entry(4));
    assert_eq!(copy.mmio_read(0x10, 4), io.mmio_read(0x10, 4));
    let mut bad = w.into_bytes();
    let asserted = bad.len() - 4;
    bad[asserted..].copy_from_slice(&(1u32 << 24).to_le_bytes());
    assert_eq!(
        IoApic::new().restore(&mut Reader::new(&bad)),
        Err(StateError::Invalid("an IOAPIC pin beyond its 24"))
    );
}
