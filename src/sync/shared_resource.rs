//! `SharedResource` (QEMU's `util/qemu-co-shared-resource.c`): a counted resource that
//! coroutines wait for: the canonical [`CoQueue`] protected by a [`ThreadMutex`].

use std::fmt;

use super::{CoQueue, ThreadMutex};
use crate::coroutine::Co;

/// A pool of `total` interchangeable units (buffer space, request slots, ...) that coroutines
/// allocate and give back (QEMU's `SharedResource`).
///
/// [`SharedResource::allocate`] suspends the coroutine until enough units are free;
/// [`SharedResource::release`] gives units back from any thread or coroutine and wakes every
/// waiter to re-check (QEMU's `qemu_co_queue_restart_all`). The count lives in a
/// [`ThreadMutex`] so that plain threads can release too, and the waiters in a [`CoQueue`]
/// under that mutex: the mutex is held only for a few instructions, never across the wait.
///
/// ```
/// use aiocoro::aio::AioContext;
/// use aiocoro::sync::SharedResource;
/// use std::{rc::Rc, time::Duration};
///
/// let ctx = AioContext::new()?;
/// let buffers = Rc::new(SharedResource::new(4));
/// let mut tasks = Vec::new();
/// for request in 1..=3 {
///     let buffers = buffers.clone();
///     tasks.push(ctx.spawn(move |co| {
///         let units = request + 1; // 2, 3, 4: they cannot all fit at once
///         buffers.allocate(co, units);
///         co.sleep(Duration::from_micros(10)); // use them
///         buffers.release(units);
///     }));
/// }
/// ctx.wait_while(|| tasks.iter().any(|task| !task.is_finished()));
/// assert_eq!(buffers.available(), 4);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct SharedResource {
    total: u64,
    /// The free units.
    available: ThreadMutex<u64>,
    /// Coroutines waiting for units; protected by `available`'s mutex.
    waiters: CoQueue,
}

impl SharedResource {
    /// A resource of `total` units, all free (QEMU's `qemu_co_shared_resource_init`).
    pub fn new(total: u64) -> SharedResource {
        SharedResource { total, available: ThreadMutex::new(total), waiters: CoQueue::new() }
    }

    /// Waits until `n` units are free and takes them (QEMU's `co_get_from_shres`).
    ///
    /// Waiters are not served in order: each release wakes them all, and whoever fits takes
    /// its units, so a small request may pass a large one.
    ///
    /// # Panics
    ///
    /// If `n` exceeds [`SharedResource::total`] (the request could never be met), or the
    /// coroutine has to wait and its thread has no [`AioContext`](crate::aio::AioContext).
    pub fn allocate(&self, co: &Co, n: u64) {
        self.check_request("allocate", n);
        let mut available = self.available.lock(co);
        while *available < n {
            self.waiters.wait(co, &mut available);
        }
        *available -= n;
    }

    /// Takes `n` units if they are free now (QEMU's `co_try_get_from_shres`); returns whether it
    /// did. Works outside a coroutine too.
    ///
    /// # Panics
    ///
    /// If `n` exceeds [`SharedResource::total`].
    pub fn try_allocate(&self, n: u64) -> bool {
        self.check_request("try_allocate", n);
        let mut available = self.available.lock_blocking();
        let fits = *available >= n;
        if fits {
            *available -= n;
        }
        fits
    }

    /// Like [`SharedResource::allocate`], but returns a [`Permit`] that releases the units when
    /// dropped.
    ///
    /// # Panics
    ///
    /// As [`SharedResource::allocate`].
    pub fn allocate_permit(&self, co: &Co, n: u64) -> Permit<'_> {
        self.allocate(co, n);
        Permit { resource: self, units: n }
    }

    /// Like [`SharedResource::try_allocate`], but returns a [`Permit`] that releases the units
    /// when dropped.
    ///
    /// # Panics
    ///
    /// As [`SharedResource::try_allocate`].
    pub fn try_allocate_permit(&self, n: u64) -> Option<Permit<'_>> {
        self.try_allocate(n).then(|| Permit { resource: self, units: n })
    }

    /// Gives back `n` units and wakes every waiter to re-check (QEMU's `co_put_to_shres`). May
    /// be called from any thread or coroutine.
    ///
    /// # Panics
    ///
    /// If more units come back than are allocated.
    pub fn release(&self, n: u64) {
        let mut available = self.available.lock_blocking();
        let after = available.checked_add(n).filter(|&after| after <= self.total);
        let Some(after) = after else {
            let allocated = self.total - *available;
            drop(available);
            panic!(
                "aiocoro: SharedResource::release gave back {n} unit(s), but only {allocated} of \
                 its {} are allocated; release only units that were allocated",
                self.total
            );
        };
        *available = after;
        if n > 0 {
            self.waiters.restart_all(&mut available);
        }
    }

    /// How many units are free now (they may be gone by the time the caller looks).
    pub fn available(&self) -> u64 {
        *self.available.lock_blocking()
    }

    /// How many units the resource has.
    pub fn total(&self) -> u64 {
        self.total
    }

    fn check_request(&self, what: &str, n: u64) {
        assert!(
            n <= self.total,
            "aiocoro: SharedResource::{what} asked for {n} unit(s) of a resource that has only {} \
             in total; the request could never be met",
            self.total
        );
    }
}

impl fmt::Debug for SharedResource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedResource")
            .field("total", &self.total)
            .field("available", &self.available())
            .finish()
    }
}

/// Units allocated from a [`SharedResource`], given back when dropped. It may be moved to and
/// dropped on another thread.
#[must_use = "the units are released as soon as the permit is dropped"]
pub struct Permit<'a> {
    resource: &'a SharedResource,
    units: u64,
}

impl Permit<'_> {
    /// How many units the permit holds.
    pub fn units(&self) -> u64 {
        self.units
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.resource.release(self.units);
    }
}

impl fmt::Debug for Permit<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit").field("units", &self.units).finish()
    }
}
