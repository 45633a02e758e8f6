#!/usr/bin/env bash
# Benchmark: `dvcr import` from a loopback nginx, side by side with its yardsticks, in one run.
#
#   1. The single-stream SHA-256 ceiling of this machine: `openssl dgst -sha256` over the
#      image from the page cache (every byte pushed to DVCR must be hashed once).
#   2. HTTP -> DVCR: `dvcr import --from http://nginx/image.qcow2 --to docker://dvcr/...`
#      into a `dvcr serve` on loopback (its root on tmpfs). Goal: at least 60% of (1).
#   3. HTTP -> PVC: `dvcr import --from URL --to TARGET/disk.img` (one pass, fsynced) against
#      the scratch pipeline other importers use: `curl -o scratch/image.qcow2 URL` and then
#      the command CDI's importer runs, `qemu-img convert -t writeback -p -O raw
#      scratch/image.qcow2 TARGET/q.raw` (cache mode writeback: flushed to the disk before it
#      exits, as durable as dvcr's fsync). Goal: at least 2x faster with zero scratch bytes.
#      Shown beside it: the same pipeline with qemu-img's default cache mode ("unsafe": never
#      flushed, so on a disk target it finishes while the data is still only in memory).
#   4. Peak RSS of every dvcr run (/usr/bin/time). Goal: under 64 MiB for an 8 GiB image.
#
# The image is the uncompressed qcow2 of bench/convert.sh (8 GiB virtual, 2 GiB of mixed
# data; generated once and cached under bench/work). The source file is kept in the page
# cache (a loopback source stands in for a fast network). Times are medians of RUNS runs,
# interleaved. The report (Markdown) goes to stdout, progress to stderr:
#
#   bench/import.sh | tee bench/results-import.md
#   VIRTUAL_GIB=2 DATA_GIB=0.25 RUNS=1 bench/import.sh      # quick run
#
# Environment: DVCR (binary; default: cargo build --release), VIRTUAL_GIB, DATA_GIB, RUNS
# (default 3), TARGETS (subset of "tmpfs disk"), WORK (default bench/work).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/memory.sh
source "$SCRIPT_DIR/memory.sh"
VIRTUAL_GIB=${VIRTUAL_GIB:-8}
DATA_GIB=${DATA_GIB:-2}
RUNS=${RUNS:-3}
TARGETS=${TARGETS:-"tmpfs disk"}
WORK=${WORK:-$ROOT/bench/work}
readonly TIME=/usr/bin/time

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    printf '\nFATAL: %s\n' "$*" >&2
    exit 1
}
for tool in qemu-img openssl curl nginx awk "$TIME"; do
    command -v "$tool" >/dev/null || die "missing tool: $tool (bash .ci/install-tools)"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"

# The input image, generated (or found in the cache) by bench/convert.sh.
log "preparing the image (bench/convert.sh GENERATE_ONLY=1)"
VIRTUAL_GIB=$VIRTUAL_GIB DATA_GIB=$DATA_GIB WORK=$WORK GENERATE_ONLY=1 INPUTS=qcow2 \
    "$SCRIPT_DIR/convert.sh" >/dev/null
IMG_DIR=$(ls -d "$WORK"/images-g*-v"${VIRTUAL_GIB}"g-d"${DATA_GIB}"g | tail -1)
IMAGE=$IMG_DIR/image.qcow2
[[ -f $IMAGE ]] || die "no image at $IMAGE"
IMAGE_BYTES=$(stat -c %s "$IMAGE")

if [[ -z ${DVCR:-} ]]; then
    log "building dvcr (cargo build --release -p dvcr)"
    (cd "$ROOT" && cargo build --release -p dvcr >&2)
    DVCR="${CARGO_TARGET_DIR:-$ROOT/target}/release/dvcr"
fi
[[ -x $DVCR ]] || die "dvcr binary not found: $DVCR"
SCRATCH=$(mktemp -d "$WORK/import-run.XXXXXX")
TMPFS=$(mktemp -d /dev/shm/dvcr-import-bench.XXXXXX)
NGINX_PID="" DVCR_PID="" REG_CPU=""
cleanup() {
    restore_memory
    [[ -n $NGINX_PID ]] && kill "$NGINX_PID" 2>/dev/null
    [[ -n $DVCR_PID ]] && kill "$DVCR_PID" 2>/dev/null
    wait 2>/dev/null || true
    rm -rf -- "$SCRATCH" "$TMPFS"
}
trap cleanup EXIT
cp -- "$DVCR" "$SCRATCH/dvcr" # a parallel cargo build must not swap the binary mid-run
DVCR_BIN=$SCRATCH/dvcr
LOAD_START=$(cut -d " " -f 1-3 /proc/loadavg)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# nginx on loopback serving the image directory.
NGINX_PORT=$(free_port)
mkdir -p "$SCRATCH/nginx"
cat >"$SCRATCH/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $SCRATCH/nginx/nginx.pid;
error_log $SCRATCH/nginx/error.log;
events { worker_connections 64; }
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    client_body_temp_path $SCRATCH/nginx/body;
    proxy_temp_path $SCRATCH/nginx/proxy;
    fastcgi_temp_path $SCRATCH/nginx/fastcgi;
    uwsgi_temp_path $SCRATCH/nginx/uwsgi;
    scgi_temp_path $SCRATCH/nginx/scgi;
    server {
        listen 127.0.0.1:$NGINX_PORT;
        root $IMG_DIR;
    }
}
EOF
nginx -p "$SCRATCH/nginx" -c "$SCRATCH/nginx/nginx.conf" &
NGINX_PID=$!
URL=http://127.0.0.1:$NGINX_PORT/image.qcow2
for _ in $(seq 50); do curl -sfI "$URL" >/dev/null && break; sleep 0.1; done
curl -sfI "$URL" >/dev/null || die "nginx did not come up"

# dvcr serve on loopback, storage on tmpfs.
"$DVCR_BIN" serve --listen 127.0.0.1:0 --root "$TMPFS/dvcr-root" >"$SCRATCH/serve.out" 2>"$SCRATCH/serve.log" &
DVCR_PID=$!
for _ in $(seq 100); do grep -q "listening on" "$SCRATCH/serve.out" 2>/dev/null && break; sleep 0.1; done
REGISTRY=$(sed -n 's/^listening on //p' "$SCRATCH/serve.out")
[[ -n $REGISTRY ]] || die "dvcr serve did not start: $(cat "$SCRATCH/serve.log")"

log "backing free memory (bench/memory.sh)"
back_memory "$TMPFS"
cat "$IMAGE" >/dev/null # keep the source in the page cache

median() { sort -n | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.3f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
declare -A WALL RSS JSON CPU
record() { # KEY WALL RSS_KIB
    WALL[$1]+="$2 "
    local r=$((($3 + 1023) / 1024))
    [[ -z ${RSS[$1]:-} || ${RSS[$1]} -lt $r ]] && RSS[$1]=$r
    return 0
}
timed() { # KEY CMD... : runs under /usr/bin/time, records wall and RSS
    local key=$1
    shift
    "$TIME" -f '%e %M %U %S' -o "$SCRATCH/time" "$@" >"$SCRATCH/out" 2>"$SCRATCH/err" ||
        die "$key failed: $(tail -5 "$SCRATCH/err")"
    read -r wall rss user sys <"$SCRATCH/time"
    record "$key" "$wall" "$rss"
    CPU[$key]+="$(awk -v u="$user" -v s="$sys" 'BEGIN { print u + s }') "
}

target_dir() { if [[ $1 == tmpfs ]]; then echo "$TMPFS"; else echo "$SCRATCH"; fi; }

for run in $(seq "$RUNS"); do
    log "run $run/$RUNS: sha256 ceiling"
    timed sha256 openssl dgst -sha256 "$IMAGE"
    log "run $run/$RUNS: HTTP -> DVCR"
    reg_cpu0=$(awk '{ print $14 + $15 }' "/proc/$DVCR_PID/stat")
    timed dvcr-to-dvcr "$DVCR_BIN" import --from "$URL" --to "docker://$REGISTRY/bench/image:run$run" --dest-insecure --json
    JSON[dvcr]=$(cat "$SCRATCH/out")
    REG_CPU+="$(awk -v a="$reg_cpu0" '{ printf "%.2f", ($14 + $15 - a) / 100 }' "/proc/$DVCR_PID/stat") "
    for target in $TARGETS; do
        dir=$(target_dir "$target")
        log "run $run/$RUNS: HTTP -> PVC ($target): dvcr"
        sync
        timed "pvc-dvcr-$target" "$DVCR_BIN" import --from "$URL" --to "$dir/disk.img" --json
        JSON[pvc-$target]=$(cat "$SCRATCH/out")
        rm -f -- "$dir/disk.img"
        log "run $run/$RUNS: HTTP -> PVC ($target): curl + qemu-img convert"
        sync
        timed "pvc-scratch-$target" sh -c 'curl -sf -o "$1/image.qcow2" "$2" && qemu-img convert -O raw "$1/image.qcow2" "$3/q.raw"' \
            sh "$SCRATCH" "$URL" "$dir"
        rm -f -- "$dir/q.raw" "$SCRATCH/image.qcow2"
        log "run $run/$RUNS: HTTP -> PVC ($target): curl + qemu-img convert -t writeback -p (CDI's command)"
        sync
        timed "pvc-scratch-sync-$target" sh -c 'curl -sf -o "$1/image.qcow2" "$2" && qemu-img convert -t writeback -p -O raw "$1/image.qcow2" "$3/q.raw" >/dev/null' \
            sh "$SCRATCH" "$URL" "$dir"
        rm -f -- "$dir/q.raw" "$SCRATCH/image.qcow2"
    done
done

med() { tr ' ' '\n' <<<"${WALL[$1]}" | grep -v '^$' | median; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }
mbps() { awk -v bytes="$IMAGE_BYTES" -v s="$1" 'BEGIN { printf "%.0f", bytes / s / 1048576 }'; }

runs() { tr -s ' ' <<<"${WALL[$1]}" | sed 's/ $//'; }
shares() {
    paste -d ' ' <(tr ' ' '\n' <<<"${WALL[sha256]}" | grep -v '^$') \
        <(tr ' ' '\n' <<<"${WALL[dvcr-to-dvcr]}" | grep -v '^$') |
        awk '{ printf "%s%.0f%%", (NR > 1 ? " " : ""), $1 / $2 * 100 }'
}
medcpu() { tr ' ' '\n' <<<"${CPU[$1]}" | grep -v '^$' | median; }
SHA=$(med sha256)
IMPORT_CPU=$(medcpu dvcr-to-dvcr)
SERVE_CPU=$(tr ' ' '\n' <<<"$REG_CPU" | grep -v '^$' | median)
DVCR_S=$(med dvcr-to-dvcr)
SHARE=$(awk -v c="$SHA" -v d="$DVCR_S" 'BEGIN { printf "%.0f", c / d * 100 }')
cat <<EOF
# dvcr import benchmark

- Command: \`VIRTUAL_GIB=$VIRTUAL_GIB DATA_GIB=$DATA_GIB RUNS=$RUNS bench/import.sh\`
- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); dvcr $(cd "$ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)
- Machine: $(nproc) CPUs, $(awk '/MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo) RAM; load average $LOAD_START at the start, $(cut -d " " -f 1-3 /proc/loadavg) at the end
- Memory: $MEMORY_NOTE (see bench/memory.sh)
- Image: uncompressed qcow2, $((IMAGE_BYTES / 1048576)) MiB file, ${VIRTUAL_GIB} GiB virtual, served by nginx on loopback (page cache warm); DVCR root on tmpfs
- Times: median wall seconds of $RUNS run(s); RSS: maximum over the runs

## HTTP -> DVCR against the SHA-256 ceiling

| measurement | seconds | MiB/s | peak RSS MiB |
|---|---:|---:|---:|
| openssl dgst -sha256 (ceiling) | $SHA | $(mbps "$SHA") | ${RSS[sha256]} |
| dvcr import HTTP -> DVCR | $DVCR_S | $(mbps "$DVCR_S") | ${RSS[dvcr-to-dvcr]} |

dvcr reaches **${SHARE}%** of the single-stream SHA-256 ceiling (goal: at least 60%).
Every run, in order (seconds): the ceiling $(runs sha256), dvcr $(runs dvcr-to-dvcr); the
share per run (each run's ceiling over its import): $(shares).

CPU seconds per run (median): the importer ${IMPORT_CPU} s, the registry (\`dvcr serve\`)
${SERVE_CPU} s, for $((IMAGE_BYTES / 1048576)) MiB. The registry hashes every byte once, to
verify it, and names the layer for the importer (\`Dvcr-Upload-Digest\`), which therefore does
not hash it again; importer, registry and nginx share the machine's $(nproc) cores here (in a
cluster they run on different nodes). The importer alone processes
**$(awk -v b="$IMAGE_BYTES" -v c="$IMPORT_CPU" 'BEGIN { printf "%.0f", b / c / 1048576 }') MiB per CPU-second**
($(awk -v b="$IMAGE_BYTES" -v c="$IMPORT_CPU" -v s="$SHA" 'BEGIN { printf "%.0f", (b / c) / (b / s) * 100 }')% of the ceiling).

## HTTP -> PVC against download-then-convert

| target | dvcr import s | curl + CDI's qemu-img convert -t writeback s | speedup | curl + qemu-img convert, default cache (no flush) s | speedup vs no flush | dvcr scratch bytes | dvcr peak RSS MiB |
|---|---:|---:|---:|---:|---:|---:|---:|
EOF
for target in $TARGETS; do
    d=$(med "pvc-dvcr-$target")
    q=$(med "pvc-scratch-$target")
    qs=$(med "pvc-scratch-sync-$target")
    scratch=$(sed -n 's/.*"scratch-bytes":\([0-9]*\).*/\1/p' <<<"${JSON[pvc-$target]}")
    echo "| $target | $d | $qs | **$(ratio "$qs" "$d")x** | $q | $(ratio "$q" "$d")x | ${scratch:-?} | ${RSS[pvc-dvcr-$target]} |"
done
cat <<EOF

The scratch pipeline downloads the whole file first (${IMAGE_BYTES} bytes of scratch space),
then converts it with the command CDI's importer runs (\`qemu-img convert -t writeback -p -O
raw\`: the target is flushed before qemu-img exits). \`dvcr import\` writes in one pass and
fsyncs before it reports success, so both end with the disk durable: that is the comparison
the goal (at least 2x faster, zero scratch bytes) is judged on. The last columns show the
pipeline with qemu-img's default cache mode, which never flushes: on the disk target it stops
the clock while the data is still in the page cache, a state no importer may report as a
ready disk.

## dvcr --json (last run)

\`\`\`
to DVCR: ${JSON[dvcr]}
EOF
for target in $TARGETS; do echo "to PVC ($target): ${JSON[pvc-$target]}"; done
echo '```'
