//! How long a queued waiter has waited, to tell when a lock that lets running lockers barge
//! past its queue should turn *starving* and hand over strictly (`CoMutex`, `CoRwLock`).

/// How long a queued waiter has waited. Under loom, where there is no clock, a waiter has
/// waited long once it lost the lock to a barger: the models then reach the starving mode.
pub(super) struct Patience {
    #[cfg(not(aiocoro_loom))]
    since: u64,
    #[cfg(aiocoro_loom)]
    losses: u32,
}

impl Patience {
    /// Starts counting now.
    pub(super) fn start() -> Patience {
        Patience {
            #[cfg(not(aiocoro_loom))]
            since: crate::aio::clock_ns(),
            #[cfg(aiocoro_loom)]
            losses: 0,
        }
    }

    /// Notes that a barger took the lock before us.
    pub(super) fn lost(&mut self) {
        #[cfg(aiocoro_loom)]
        {
            self.losses += 1;
        }
    }

    /// Whether we have waited [`STARVATION_NS`](super::comutex::STARVATION_NS) or more (under
    /// loom: lost once).
    pub(super) fn exhausted(&self) -> bool {
        #[cfg(not(aiocoro_loom))]
        return crate::aio::clock_ns().saturating_sub(self.since) >= super::comutex::STARVATION_NS;
        #[cfg(aiocoro_loom)]
        return self.losses > 0;
    }
}
