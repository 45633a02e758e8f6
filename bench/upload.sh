#!/usr/bin/env bash
# Benchmark: `curl -T` into DVCR against the single-stream SHA-256 ceiling of this machine,
# with peak RSS, both ways the project serves uploads:
#
#   1. openssl dgst -sha256 IMAGE          (the ceiling: every stored byte is hashed)
#   2. curl -T IMAGE <signed URL of dvcr serve>
#                                          (the upload routes inside `dvcr serve`: the body
#                                           goes through the pipeline into the registry in
#                                           the same process)
#   3. curl -T IMAGE <signed URL of dvcr-uploader>
#                                          (the per-image uploader pod, pushing to `dvcr serve`
#                                           over loopback HTTP)
#
# Each is answered when the image is stored in DVCR.
# The image is a qcow2 of SIZE_GIB GiB of incompressible data (generated once, cached under
# bench/work). Goals (issue 6): throughput at least 60% of (1); the uploader's peak RSS flat
# (it does not grow with the upload). Received bytes go straight through the pipeline; the
# uploader's scratch directory (--spool-dir, used only for compressed uploads) is on SPOOL
# (default: the work directory's disk). Report on stdout:
#
#   bench/upload.sh | tee bench/results-upload.md
#   SIZE_GIB=1 RUNS=1 bench/upload.sh                 # quick run
#
# Environment: DVCR_BIN_DIR (directory with dvcr and dvcr-uploader; default: cargo build
# --release), SIZE_GIB (default 8), RUNS (default 3), WORK, SPOOL.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/memory.sh
source "$SCRIPT_DIR/memory.sh"
SIZE_GIB=${SIZE_GIB:-8}
RUNS=${RUNS:-3}
WORK=${WORK:-$ROOT/bench/work}
log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    printf '\nFATAL: %s\n' "$*" >&2
    exit 1
}
for tool in qemu-img openssl curl python3 /usr/bin/time; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (bash .ci/install-tools)"
done
[[ $SIZE_GIB =~ ^[1-9][0-9]*$ ]] || die "SIZE_GIB must be a whole number of GiB"
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"

if [[ -z ${DVCR_BIN_DIR:-} ]]; then
    log "building dvcr and dvcr-uploader (cargo build --release -p dvcr)"
    (cd "$ROOT" && cargo build --release -p dvcr >&2)
    DVCR_BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SCRATCH=$(mktemp -d "$WORK/upload-run.XXXXXX")
SPOOL=${SPOOL:-$SCRATCH/spool}
TMPFS=$(mktemp -d /dev/shm/dvcr-upload-bench.XXXXXX)
SERVE_PID="" UP_PID=""
cleanup() {
    restore_memory
    [[ -n $UP_PID ]] && kill "$UP_PID" 2>/dev/null
    [[ -n $SERVE_PID ]] && kill "$SERVE_PID" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf -- "$SCRATCH" "$TMPFS"
}
trap cleanup EXIT
for b in dvcr dvcr-uploader; do
    [[ -x $DVCR_BIN_DIR/$b ]] || die "$DVCR_BIN_DIR/$b not found"
    cp -- "$DVCR_BIN_DIR/$b" "$SCRATCH/$b" # a parallel build must not swap it mid-run
done
mkdir -p "$SPOOL"
LOAD_START=$(cut -d " " -f 1-3 /proc/loadavg)

IMAGE=$WORK/upload-${SIZE_GIB}g.qcow2
if [[ ! -f $IMAGE ]]; then
    log "generating $IMAGE ($SIZE_GIB GiB of AES-CTR noise as qcow2)"
    raw=$SCRATCH/noise.raw
    # (process substitution: openssl ending on SIGPIPE must not fail the pipeline)
    head -c $((SIZE_GIB * 1024 * 1024 * 1024)) \
        < <(openssl enc -aes-128-ctr -nosalt -pass pass:dvcr-upload-bench -in /dev/zero 2>/dev/null) >"$raw"
    qemu-img convert -f raw -O qcow2 "$raw" "$IMAGE.tmp"
    rm -f -- "$raw"
    mv -- "$IMAGE.tmp" "$IMAGE"
fi
IMAGE_BYTES=$(stat -c %s "$IMAGE")

# A fresh registry for every upload: an 8 GiB blob per run would otherwise pile up on tmpfs
# (this machine's RAM) and evict the image from the page cache. Sets REGISTRY and
# SERVE_PEAK (the largest VmHWM of the registries so far).
SERVE_PEAK=0
stop_registry() {
    if [[ -n $SERVE_PID ]]; then
        local hwm
        hwm=$(awk '/VmHWM/ { print int(($2 + 1023) / 1024) }' "/proc/$SERVE_PID/status")
        ((hwm > SERVE_PEAK)) && SERVE_PEAK=$hwm
        kill "$SERVE_PID" 2>/dev/null
        wait "$SERVE_PID" 2>/dev/null || true
        SERVE_PID=""
    fi
    rm -rf -- "$TMPFS/root"
}
start_registry() {
    stop_registry
    rm -f -- "$SCRATCH/serve.out"
    "$SCRATCH/dvcr" serve --listen 127.0.0.1:0 --root "$TMPFS/root" >"$SCRATCH/serve.out" 2>"$SCRATCH/serve.log" &
    SERVE_PID=$!
    for _ in $(seq 100); do grep -q "listening on" "$SCRATCH/serve.out" 2>/dev/null && break; sleep 0.1; done
    REGISTRY=$(sed -n 's/^listening on //p' "$SCRATCH/serve.out")
    [[ -n $REGISTRY ]] || die "dvcr serve did not start: $(cat "$SCRATCH/serve.log")"
}
head -c 32 /dev/urandom | base64 >"$SCRATCH/key"

log "backing free memory (bench/memory.sh)"
back_memory "$TMPFS"
cat "$IMAGE" >/dev/null # the client reads from the page cache
median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
SHA_TIMES="" UP_TIMES="" SERVE_TIMES="" PEAK=0 SAMPLED=""
for run in $(seq "$RUNS"); do
    log "run $run/$RUNS: sha256 ceiling"
    /usr/bin/time -f '%e' -o "$SCRATCH/t" openssl dgst -sha256 "$IMAGE" >/dev/null
    SHA_TIMES+="$(cat "$SCRATCH/t") "

    log "run $run/$RUNS: curl -T into dvcr serve (its own upload routes)"
    start_registry
    URL=$("$SCRATCH/dvcr" upload-url --server "http://$REGISTRY" --dest "bench/served:run$run" --ttl 1h |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["external"])')
    code=$(/usr/bin/time -f '%e' -o "$SCRATCH/t" curl -s -o "$SCRATCH/answer" -w '%{http_code}' -T "$IMAGE" "$URL")
    [[ $code == 200 ]] || die "upload into dvcr serve answered $code: $(cat "$SCRATCH/answer")"
    SERVE_TIMES+="$(cat "$SCRATCH/t") "

    log "run $run/$RUNS: curl -T into dvcr-uploader -> DVCR"
    start_registry
    "$SCRATCH/dvcr-uploader" serve --listen 127.0.0.1:0 --key-file "$SCRATCH/key" \
        --registry "$REGISTRY" --insecure --spool-dir "$SPOOL" \
        --termination-log "$SCRATCH/report.json" >"$SCRATCH/up.out" 2>"$SCRATCH/up.log" &
    UP_PID=$!
    for _ in $(seq 100); do grep -q "listening on" "$SCRATCH/up.out" 2>/dev/null && break; sleep 0.1; done
    ADDR=$(sed -n 's/^listening on //p' "$SCRATCH/up.out")
    [[ -n $ADDR ]] || die "dvcr-uploader did not start: $(cat "$SCRATCH/up.log")"
    URL=$("$SCRATCH/dvcr-uploader" url --key-file "$SCRATCH/key" --dest "bench/upload:run$run" --ttl 1h \
        --external-base "http://$ADDR" | python3 -c 'import json,sys; print(json.load(sys.stdin)["external"])')
    # Sample the uploader's RSS while it works.
    (while kill -0 "$UP_PID" 2>/dev/null; do
        awk '/VmRSS/ { print $2 }' "/proc/$UP_PID/status" 2>/dev/null
        sleep 0.5
    done) >"$SCRATCH/rss" &
    sampler=$!
    code=$(/usr/bin/time -f '%e' -o "$SCRATCH/t" curl -s -o "$SCRATCH/answer" -w '%{http_code}' -T "$IMAGE" "$URL")
    [[ $code == 200 ]] || die "upload answered $code: $(cat "$SCRATCH/answer")"
    UP_TIMES+="$(cat "$SCRATCH/t") "
    hwm=$(awk '/VmHWM/ { print int(($2 + 1023) / 1024) }' "/proc/$UP_PID/status")
    ((hwm > PEAK)) && PEAK=$hwm
    kill "$UP_PID" 2>/dev/null
    wait "$UP_PID" 2>/dev/null || true
    UP_PID=""
    wait "$sampler" 2>/dev/null || true
    SAMPLED+="$(sort -n "$SCRATCH/rss" | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%d-%d", lo / 1024, hi / 1024 }') "
    rm -rf -- "${SPOOL:?}"/*
done

SHA=$(tr ' ' '\n' <<<"$SHA_TIMES" | grep -v '^$' | median)
UP=$(tr ' ' '\n' <<<"$UP_TIMES" | grep -v '^$' | median)
SERVED=$(tr ' ' '\n' <<<"$SERVE_TIMES" | grep -v '^$' | median)
stop_registry # (the last one's peak counts too)
mbps() { awk -v b="$IMAGE_BYTES" -v s="$1" 'BEGIN { printf "%.0f", b / s / 1048576 }'; }
SHARE=$(awk -v c="$SHA" -v u="$UP" 'BEGIN { printf "%.0f", c / u * 100 }')
SERVED_SHARE=$(awk -v c="$SHA" -v u="$SERVED" 'BEGIN { printf "%.0f", c / u * 100 }')
cat <<EOF
# dvcr-uploader benchmark

- Command: \`SIZE_GIB=$SIZE_GIB RUNS=$RUNS bench/upload.sh\`
- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); dvcr $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)
- Machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM; load average $LOAD_START at the start, $(cut -d " " -f 1-3 /proc/loadavg) at the end
- Memory: $MEMORY_NOTE (see bench/memory.sh)
- Image: qcow2 of $SIZE_GIB GiB of incompressible data, $((IMAGE_BYTES / 1048576)) MiB; curl, dvcr serve (root on tmpfs) and dvcr-uploader on loopback; uploader scratch directory on $(df --output=fstype "$SPOOL" | tail -1) (unused: the image is not compressed)
- Times: median wall seconds of $RUNS run(s), from the first byte sent to the answer (image stored)

| measurement | seconds | MiB/s | share of the ceiling | peak RSS MiB | RSS sampled MiB |
|---|---:|---:|---:|---:|---:|
| openssl dgst -sha256 (ceiling) | $SHA | $(mbps "$SHA") | 100% | | |
| curl -T -> dvcr serve (upload routes inside the registry) | $SERVED | $(mbps "$SERVED") | **${SERVED_SHARE}%** | $SERVE_PEAK (whole registry) | |
| curl -T -> dvcr-uploader -> DVCR over loopback | $UP | $(mbps "$UP") | ${SHARE}% | $PEAK (uploader) | ${SAMPLED% } |

Goal: at least 60% of the ceiling. Every byte goes from the request body through the importer
pipeline (checked, its format found) to the registry, which hashes it once, to verify it and
to name the layer. Inside \`dvcr serve\` the pipeline hands the body's chunks to the
registry's routes in the same process; \`dvcr-uploader\` (a pod per image) sends them over
HTTP, which costs a send and a receive copy per byte on the same two cores as curl and the
registry.
EOF
