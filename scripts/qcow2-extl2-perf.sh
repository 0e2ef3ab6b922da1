#!/usr/bin/env bash
# Allocating 4 KiB writes into fresh qcow2 images over a backing file: aiocoro-block's `bench`
# against `qemu-img bench`, alternating, on images with extended L2 entries (subclusters:
# a write allocates and writes only the 2 KiB subclusters it covers) and, for comparison,
# on standard ones (each new cluster copies 60 KiB from the backing file). Prints a
# Markdown table of the medians with the ratio.
#
# Usage: scripts/qcow2-extl2-perf.sh [DIR] [ROUNDS] [COUNT]   (DIR holds a 1 GiB backing file;
# default /tmp, 3 rounds, 200000 requests)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${1:-/tmp}
rounds=${2:-3}
count=${3:-200000}
base="$dir/aiocoro-extl2-base.raw"
command -v qemu-img >/dev/null || { echo "qcow2-extl2-perf: qemu-img is missing" >&2; exit 1; }
cargo build --release -q -p aiocoro-block --example bench
ours=${CARGO_TARGET_DIR:-target}/release/examples/bench
if [ ! -f "$base" ]; then
    dd if=/dev/urandom of="$base" bs=1M count=1024 status=none
fi

seconds() { "$@" | sed -n 's/^Run completed in \([0-9.]*\) seconds\./\1/p'; }
median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
args=(-c "$count" -w -f qcow2 -t none -i io_uring -d 64 -s 4096)

printf '| image | requests | aiocoro-block | qemu-img bench | ratio |\n|---|---:|---:|---:|---:|\n'
for options in extended_l2=on extended_l2=off; do
    ours_s=() qemu_s=()
    for _ in $(seq "$rounds"); do
        for tool in ours qemu; do
            image="$dir/aiocoro-extl2-$tool.qcow2"
            rm -f "$image"
            qemu-img create -q -f qcow2 -o "$options" -b "$base" -F raw "$image" 1G
            if [ "$tool" = ours ]; then
                ours_s+=("$(seconds "$ours" "${args[@]}" "$image")")
            else
                qemu_s+=("$(seconds qemu-img bench "${args[@]}" "$image")")
            fi
            rm -f "$image"
        done
    done
    o=$(printf '%s\n' "${ours_s[@]}" | median)
    q=$(printf '%s\n' "${qemu_s[@]}" | median)
    echo "rounds ($options): ours ${ours_s[*]} / qemu-img ${qemu_s[*]}" >&2
    awk -v n="$options, over a raw backing file, 4 KiB writes, depth 64" -v c="$count" -v o="$o" -v q="$q" 'BEGIN {
        printf "| %s | %d | %.3f s (%.0f IOPS) | %.3f s (%.0f IOPS) | %.2fx |\n",
            n, c, o, c / o, q, c / q, q / o }'
done
