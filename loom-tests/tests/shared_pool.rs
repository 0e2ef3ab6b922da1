//! The shared stack pool under concurrent deposits and withdrawals: nothing is lost or
//! duplicated, the capacity holds, and the lock-free emptiness hint never hides items from a
//! thread that synchronised with the depositor.

#![cfg(aiocoro_loom)]

use aiocoro::loom_exports::SharedPool;
use loom::sync::Arc;
use loom::thread;

#[test]
fn concurrent_deposits_and_withdrawals_conserve_items() {
    loom::model(|| {
        let pool = Arc::new(SharedPool::new(3));

        let depositor = {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut batch = vec![1, 2];
                pool.deposit(&mut batch);
                assert!(pool.len() <= 3);
                batch
            })
        };
        let trader = {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut batch = vec![3, 4];
                pool.deposit(&mut batch);
                let mut taken = Vec::new();
                pool.withdraw(&mut taken, 3);
                assert!(pool.len() <= 3);
                (batch, taken)
            })
        };

        let refused_1 = depositor.join().unwrap();
        let (refused_2, taken) = trader.join().unwrap();
        let mut rest = Vec::new();
        let moved = pool.withdraw(&mut rest, 10);
        assert_eq!(moved, rest.len());
        assert_eq!(pool.len(), 0);

        let mut all = [refused_1, refused_2, taken, rest].concat();
        all.sort_unstable();
        assert_eq!(all, [1, 2, 3, 4], "every item is somewhere, exactly once");
    });
}

#[test]
fn a_deposit_is_visible_to_a_thread_that_joined_the_depositor() {
    loom::model(|| {
        let pool = Arc::new(SharedPool::new(8));
        let depositor = {
            let pool = pool.clone();
            thread::spawn(move || {
                let mut batch = vec![7];
                pool.deposit(&mut batch);
                assert!(batch.is_empty());
            })
        };
        let mut early = Vec::new();
        pool.withdraw(&mut early, 1);
        depositor.join().unwrap();
        let mut late = Vec::new();
        pool.withdraw(&mut late, 1);
        assert_eq!(early.len() + late.len(), 1, "the item is taken exactly once");
    });
}
