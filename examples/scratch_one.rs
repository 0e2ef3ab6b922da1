//! Scratch measurement (not committed).
#[path = "../benches/support/coroutine_workloads.rs"]
#[allow(dead_code)]
mod workloads;
fn main() {
    let which = std::env::args().nth(1).unwrap();
    let n: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    match which.as_str() {
        "yield" => workloads::yield_round_trips(n),
        "raw_yield" => workloads::raw_corosensei_yield(n),
        "lifecycle" => workloads::lifecycle(n),
        "raw_lifecycle" => workloads::raw_corosensei_lifecycle(n),
        _ => panic!(),
    }
}
