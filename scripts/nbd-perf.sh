#!/usr/bin/env bash
# Serves one qcow2 image with aiocoro-nbd, qemu-nbd and qemu-storage-daemon in turn and drives
# each with fio's nbd engine (4 KiB random reads and writes, iodepth 32, 1 and 4 jobs), next to
# fio io_uring on the image file itself; prints a Markdown table (docs/performance.md and
# docs/nbd.md quote it). Every configuration is measured once per round, alternating, so that
# the load of the shared machine falls on all of them alike; the table gives the median.
#
# The image: 4 GiB qcow2 with 2 GiB of data (the first half written once, then reused).
# randread runs first; then one untimed randwrite pass allocates the rest of the image, so that
# every server's randwrite rows see the same (fully allocated) image.
#
# Usage: scripts/nbd-perf.sh
#   NBD_PERF_DIR      where the image and sockets live (default /var/tmp/aiocoro-nbd-perf;
#                     O_DIRECT needs a real file system, not tmpfs)
#   NBD_PERF_ROUNDS   rounds (default 3)
#   NBD_PERF_RUNTIME  seconds per fio run (default 10)
#   NBD_PERF_IOTHREADS  aiocoro-nbd --iothreads (default: its own, one per core)
set -euo pipefail
cd "$(dirname "$0")/.."
dir=${NBD_PERF_DIR:-/var/tmp/aiocoro-nbd-perf}
rounds=${NBD_PERF_ROUNDS:-3}
runtime=${NBD_PERF_RUNTIME:-10}
for tool in qemu-img qemu-io qemu-nbd qemu-storage-daemon fio python3; do
    command -v "$tool" >/dev/null || { echo "nbd-perf: $tool is missing" >&2; exit 1; }
done
fio --enghelp 2>/dev/null | grep -qw nbd || { echo "nbd-perf: fio lacks the nbd engine" >&2; exit 1; }
cargo build --release -q -p aiocoro-nbd
ours=${CARGO_TARGET_DIR:-target}/release/aiocoro-nbd
mkdir -p "$dir"
image=$dir/disk.qcow2
socket=$dir/nbd.sock
if [ ! -f "$image" ]; then
    qemu-img create -q -f qcow2 "$image" 4G
    for i in $(seq 0 7); do # 2 GiB of data in the first half, 256 MiB at a time
        qemu-io -f qcow2 -c "write -q -P $((i + 1)) $((i * 256))M 256M" "$image" >/dev/null
    done
fi

server_pid=
stop_server() {
    if [ -n "$server_pid" ]; then
        kill "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
        server_pid=
    fi
    rm -f "$socket"
}
trap stop_server EXIT

# Starts server NAME on $socket and waits until it accepts connections.
start_server() {
    case $1 in
    ours)
        "$ours" -f qcow2 --cache=none --aio=io_uring -e 4 -t -k "$socket" \
            ${NBD_PERF_IOTHREADS:+--iothreads "$NBD_PERF_IOTHREADS"} "$image" &
        ;;
    qemu-nbd)
        qemu-nbd -f qcow2 --cache=none --aio=io_uring -e 4 -t -k "$socket" "$image" &
        ;;
    qsd)
        qemu-storage-daemon \
            --blockdev driver=file,node-name=file,filename="$image",cache.direct=on,aio=io_uring \
            --blockdev driver=qcow2,node-name=disk,file=file \
            --object iothread,id=io0 \
            --nbd-server addr.type=unix,addr.path="$socket" \
            --export type=nbd,id=exp,node-name=disk,name=,writable=on,iothread=io0 &
        ;;
    esac
    server_pid=$!
    for _ in $(seq 200); do
        [ -S "$socket" ] && qemu-img info "nbd+unix:///?socket=$socket" >/dev/null 2>&1 && return
        sleep 0.05
    done
    echo "nbd-perf: $1 did not start" >&2
    exit 1
}

# IOPS of one fio run: TARGET (a server name or "device"), RW, JOBS.
measure() {
    local target=$1 rw=$2 jobs=$3 engine
    if [ "$target" = device ]; then
        engine=(--ioengine=io_uring --direct=1 --filename="$image" --readonly)
    else
        start_server "$target"
        engine=(--ioengine=nbd --uri="nbd+unix:///?socket=$socket")
    fi
    fio --name=nbd-perf "${engine[@]}" --rw="$rw" --bs=4k --iodepth=32 --numjobs="$jobs" \
        --time_based --runtime="$runtime" --group_reporting --output-format=json \
        --output="$dir/fio.json" >/dev/null
    python3 -c 'import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
print(round(job["read"]["iops"] + job["write"]["iops"]))' "$dir/fio.json"
    stop_server
}

median() { sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }

declare -A results
configs=("randread 1" "randread 4" "randwrite 1" "randwrite 4")
for config in "${configs[@]}"; do
    read -r rw jobs <<<"$config"
    targets=(ours qemu-nbd qsd)
    [ "$rw" = randread ] && targets+=(device)
    if [ "$rw" = randwrite ] && [ -z "${warmed:-}" ]; then
        measure ours randwrite 4 >/dev/null # allocates the unwritten half for every server
        warmed=1
    fi
    for round in $(seq "$rounds"); do
        for target in "${targets[@]}"; do
            iops=$(measure "$target" "$rw" "$jobs")
            results[$rw $jobs $target]+="$iops "
            echo "round $round: $rw $jobs jobs $target $iops IOPS (load $(cut -d' ' -f1-3 /proc/loadavg))" >&2
        done
    done
done

echo "fio --ioengine=nbd, 4 KiB, iodepth 32, ${runtime} s per run, median of $rounds alternating rounds;"
echo "$(nproc) cores, load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo '| workload | jobs | aiocoro-nbd | qemu-nbd -e 4 | qemu-storage-daemon | fio io_uring on the file | ours / best peer | per round | ours / file |'
echo '|---|---:|---:|---:|---:|---:|---:|---|---:|'
for config in "${configs[@]}"; do
    read -r rw jobs <<<"$config"
    row=()
    for target in ours qemu-nbd qsd device; do
        values=${results[$rw $jobs $target]:-}
        if [ -n "$values" ]; then row+=("$(printf '%s\n' $values | median)"); else row+=(-); fi
    done
    # Ours against the better peer of the same round: the ratio least touched by the load.
    per_round=$(paste -d' ' <(printf '%s\n' ${results[$rw $jobs ours]}) \
        <(printf '%s\n' ${results[$rw $jobs qemu-nbd]}) <(printf '%s\n' ${results[$rw $jobs qsd]}) |
        awk '{ best = $2 > $3 ? $2 : $3; printf "%s%.2f", (NR > 1 ? " " : ""), $1 / best }')
    awk -v rw="$rw" -v j="$jobs" -v o="${row[0]}" -v q="${row[1]}" -v s="${row[2]}" -v d="${row[3]}" \
        -v r="$per_round" 'BEGIN {
        best = q > s ? q : s
        file = d == "-" ? "-" : sprintf("%.2fx", o / d)
        printf "| %s | %d | %d | %d | %d | %s | %.2fx | %s | %s |\n", rw, j, o, q, s, d, o / best, r, file }'
done
echo
echo "raw samples (IOPS per round):"
for config in "${configs[@]}"; do
    read -r rw jobs <<<"$config"
    for target in ours qemu-nbd qsd device; do
        if [ -n "${results[$rw $jobs $target]:-}" ]; then
            echo "  $rw $jobs $target: ${results[$rw $jobs $target]}"
        fi
    done
done
