//! Scratch measurement (not committed).
#[path = "../benches/support/sync_workloads.rs"]
#[allow(dead_code)]
mod workloads;
fn main() {
    let which = std::env::args().nth(1).unwrap();
    let n: u64 = std::env::args().nth(2).unwrap().parse().unwrap();
    match which.as_str() {
        "handoff" => workloads::comutex_handoff_same_thread(n),
        "enter_next" => workloads::coqueue_enter_next_wait(n),
        "uncontended" => workloads::comutex_uncontended(n),
        "read" => workloads::corwlock_read(n),
        _ => panic!(),
    }
}
