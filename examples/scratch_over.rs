//! Scratch measurement (not committed).
#[path = "../benches/support/sync_workloads.rs"]
#[allow(dead_code)]
mod workloads;
use std::time::Instant;
fn main() {
    let n: usize = std::env::args().nth(1).map_or(5, |a| a.parse().unwrap());
    let mode = std::env::args().nth(2).unwrap_or_default();
    for _ in 0..n {
        let t = Instant::now();
        if mode != "std" {
            workloads::oversubscribed_queue(200_000);
        }
        let a = t.elapsed().as_secs_f64();
        let t = Instant::now();
        if mode != "ours" {
            workloads::oversubscribed_queue_std(200_000);
        }
        let b = t.elapsed().as_secs_f64();
        println!("ours {a:.3} s std {b:.3} s ratio {:.2}", a / b);
    }
}
