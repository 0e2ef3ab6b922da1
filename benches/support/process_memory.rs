//! What this process's memory looks like to the kernel, from `/proc/self`: the number of
//! mappings and the resident and page-table sizes. Used by `examples/coroutine_perf.rs` and the
//! stack tests.

use std::fs;

/// The number of memory mappings of this process (lines of `/proc/self/maps`), the figure that
/// `vm.max_map_count` caps.
pub(crate) fn mapping_count() -> usize {
    fs::read_to_string("/proc/self/maps").expect("cannot read /proc/self/maps").lines().count()
}

/// The value of `field` (`VmRSS`, `VmPTE`, ...) in `/proc/self/status`, in KiB.
fn status_kib(field: &str) -> u64 {
    let status = fs::read_to_string("/proc/self/status").expect("cannot read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|value| value.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("/proc/self/status has no {field} in kB"))
}

/// This process's resident memory, in KiB.
pub(crate) fn resident_kib() -> u64 {
    status_kib("VmRSS")
}

/// The memory this process's page tables take, in KiB (not part of the resident size).
pub(crate) fn page_table_kib() -> u64 {
    status_kib("VmPTE")
}
