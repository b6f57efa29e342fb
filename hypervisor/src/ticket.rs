//! The run loop's lock over several host CPUs (`hypervisor::SharedLoop`): a ticket lock, so the
//! CPUs get it in the order they asked and none waits behind the others for long, whose waiters
//! do a little work while they wait ([`TicketLock::lock_while`]): they read COM1 there, whose
//! 16-byte receive FIFO lasts 1.4 ms at 115200 baud, less than another CPU may hold the lock.
//! The work must never wait for the holder (`focus::KeyReader` lets the holder go first).

use core::cell::UnsafeCell;
use core::ops::{Deref, DerefMut};
use core::sync::atomic::{AtomicUsize, Ordering};

/// A ticket lock around a `T`.
pub struct TicketLock<T> {
    /// The next ticket handed out.
    next: AtomicUsize,
    /// The ticket whose holder has the lock.
    serving: AtomicUsize,
    data: UnsafeCell<T>,
}

// SAFETY: the data is reached only through a guard, and one guard exists at a time (the holder of
// the ticket being served), as with a mutex.
unsafe impl<T: Send> Sync for TicketLock<T> {}
// SAFETY: as for `Sync`.
unsafe impl<T: Send> Send for TicketLock<T> {}

/// The lock held; let go when dropped.
pub struct TicketGuard<'a, T> {
    lock: &'a TicketLock<T>,
}

impl<T> TicketLock<T> {
    pub const fn new(data: T) -> Self {
        Self {
            next: AtomicUsize::new(0),
            serving: AtomicUsize::new(0),
            data: UnsafeCell::new(data),
        }
    }

    /// Takes the lock in turn.
    pub fn lock(&self) -> TicketGuard<'_, T> {
        self.lock_while(|| {})
    }

    /// Takes the lock in turn, calling `wait` while the CPUs ahead have it (it must not take
    /// this lock).
    pub fn lock_while(&self, mut wait: impl FnMut()) -> TicketGuard<'_, T> {
        let ticket = self.next.fetch_add(1, Ordering::Relaxed);
        // Acquire: what the previous holder wrote is seen once its release is.
        while self.serving.load(Ordering::Acquire) != ticket {
            wait();
            core::hint::spin_loop();
        }
        TicketGuard { lock: self }
    }
}

impl<T> Deref for TicketGuard<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: this guard's holder alone has the lock.
        unsafe { &*self.lock.data.get() }
    }
}

impl<T> DerefMut for TicketGuard<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as for `deref`.
        unsafe { &mut *self.lock.data.get() }
    }
}

impl<T> Drop for TicketGuard<'_, T> {
    fn drop(&mut self) {
        // Release: the next holder sees everything written under the lock.
        self.lock.serving.fetch_add(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    #[test]
    fn holders_exclude_each_other_and_waiters_work_meanwhile() {
        // Four threads add to a counter 10,000 times each, non-atomically under the lock; one
        // of them is kept waiting once while another holds it, and counts its waits.
        let lock = Arc::new(TicketLock::new((0u64, 0u64)));
        let held = Arc::new(AtomicBool::new(false));
        let g = lock.lock();
        let waiter = {
            let (lock, held) = (Arc::clone(&lock), Arc::clone(&held));
            std::thread::spawn(move || {
                let mut waits = 0u64;
                let mut g = lock.lock_while(|| waits += 1);
                assert!(
                    held.load(Ordering::SeqCst),
                    "it had the lock while another held it"
                );
                g.1 = waits;
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(20));
        held.store(true, Ordering::SeqCst);
        drop(g);
        waiter.join().unwrap();
        assert!(lock.lock().1 > 0, "the waiter did no work while it waited");
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let lock = Arc::clone(&lock);
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        let mut g = lock.lock();
                        let v = g.0;
                        std::hint::black_box(&v);
                        g.0 = v + 1;
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(lock.lock().0, 40_000);
    }

    #[test]
    fn the_lock_goes_in_the_order_asked() {
        // Ticket 0 holds; tickets 1 and 2 are taken in that order by two threads, which record
        // the order they got the lock in.
        let lock = Arc::new(TicketLock::new(std::vec::Vec::new()));
        let g = lock.lock();
        let mut threads = std::vec::Vec::new();
        for n in 1..=2u32 {
            let lock2 = Arc::clone(&lock);
            threads.push(std::thread::spawn(move || lock2.lock().push(n)));
            // The thread has its ticket once `next` moved.
            while lock.next.load(Ordering::SeqCst) != n as usize + 1 {
                std::thread::yield_now();
            }
        }
        drop(g);
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(*lock.lock(), [1, 2]);
    }
}
