#!/usr/bin/env bash
# Runs aiocoro-block's `bench` example and `qemu-img bench` side by side (and fio for the raw
# file) on the same image, alternating, and prints a Markdown table of the medians with the
# ratio; docs/performance.md quotes its output.
#
# The qcow2 rows write a fresh image per tool and round, then read it back.
#
# Usage: scripts/block-perf.sh [DIR] [ROUNDS]   (DIR holds the 1 GiB test file; default /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp}
rounds=${2:-3}
image="$dir/aiocoro-block-perf.raw"
for tool in qemu-img fio; do
    command -v "$tool" >/dev/null || { echo "block-perf: $tool is missing" >&2; exit 1; }
done
cargo build --release -q -p aiocoro-block --example bench
# Where cargo put it: CARGO_TARGET_DIR when set (else target/ would hold a stale build, or none).
ours=${CARGO_TARGET_DIR:-target}/release/examples/bench
if [ ! -f "$image" ]; then
    # Real data, not a sparse file: reads of holes would not reach the device.
    dd if=/dev/urandom of="$image" bs=1M count=1024 status=none
fi

# Seconds of one run, from the "Run completed in X seconds." line both tools print.
seconds() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
# fio's read IOPS for COUNT 4 KiB requests at depth 64.
fio_iops() {
    fio --name=peer --filename="$image" --ioengine=io_uring --direct=1 --iodepth=64 --bs=4k \
        --rw=read --io_size=$(($1 * 4))k --output-format=terse --terse-version=3 |
        awk -F';' '{ print $8 }'
}

printf '| workload | requests | aiocoro-block | qemu-img bench | ratio | fio |\n'
printf '|---|---:|---:|---:|---:|---:|\n'
row() { # name count fio(yes/no) bench-arguments...
    local name=$1 count=$2 with_fio=$3
    shift 3
    local ours_s=() qemu_s=() fio_v=()
    for _ in $(seq "$rounds"); do
        ours_s+=("$(seconds "$ours" -c "$count" "$@")")
        qemu_s+=("$(seconds qemu-img bench -c "$count" "$@")")
        if [ "$with_fio" = yes ]; then fio_v+=("$(fio_iops "$count")"); fi
    done
    local o q f=-
    o=$(printf '%s\n' "${ours_s[@]}" | median)
    q=$(printf '%s\n' "${qemu_s[@]}" | median)
    if [ "$with_fio" = yes ]; then
        f=$(printf '%s\n' "${fio_v[@]}" | median)
        f=$(awk -v f="$f" -v o="$o" -v c="$count" 'BEGIN { printf "%.0f IOPS (ours %.2fx)", f, c / o / f }')
    fi
    print_row "$name" "$count" "$o" "$q" "$f"
}
print_row() { # name count ours-seconds qemu-seconds fio-column
    awk -v n="$1" -v c="$2" -v o="$3" -v q="$4" -v f="$5" 'BEGIN {
        printf "| %s | %d | %.3f s (%.0f IOPS) | %.3f s (%.0f IOPS) | %.2fx | %s |\n",
            n, c, o, c / o, q, c / q, q / o, f }'
}
row "null-co, 4 KiB reads, depth 64" 1000000 no -d 64 --image-opts driver=null-co,size=1G
# Through the page cache: both tools should find the file there, not only the second.
cat "$image" >/dev/null
row "raw file, writeback, 4 KiB reads, depth 64" 200000 no -d 64 -f raw -t writeback -i io_uring "$image"
row "raw file, O_DIRECT io_uring, 4 KiB reads, depth 64" 200000 yes -d 64 -f raw -t none -i io_uring "$image"

# qcow2: each round writes a fresh image per tool (sequential 4 KiB allocating writes), then
# reads back what that tool wrote.
qcow2_rows() {
    local count=200000 args=(-f qcow2 -t none -i io_uring -d 64)
    local ours_img="$dir/aiocoro-block-perf-ours.qcow2" qemu_img="$dir/aiocoro-block-perf-qemu.qcow2"
    local ow=() qw=() orr=() qr=()
    for _ in $(seq "$rounds"); do
        rm -f "$ours_img" "$qemu_img"
        qemu-img create -q -f qcow2 "$ours_img" 1G
        qemu-img create -q -f qcow2 "$qemu_img" 1G
        ow+=("$(seconds "$ours" -c "$count" -w "${args[@]}" "$ours_img")")
        qw+=("$(seconds qemu-img bench -c "$count" -w "${args[@]}" "$qemu_img")")
        orr+=("$(seconds "$ours" -c "$count" "${args[@]}" "$ours_img")")
        qr+=("$(seconds qemu-img bench -c "$count" "${args[@]}" "$qemu_img")")
    done
    rm -f "$ours_img" "$qemu_img"
    qcow2_row "qcow2, O_DIRECT io_uring, 4 KiB allocating writes, depth 64" "${ow[*]}" "${qw[*]}"
    qcow2_row "qcow2, O_DIRECT io_uring, 4 KiB reads of that data, depth 64" "${orr[*]}" "${qr[*]}"
}
qcow2_row() { # name "ours seconds..." "qemu seconds..."
    # shellcheck disable=SC2086 # the lists split on purpose
    print_row "$1" 200000 "$(printf '%s\n' $2 | median)" "$(printf '%s\n' $3 | median)" -
}
qcow2_rows
