#!/usr/bin/env bash
# Benchmark: `dvcr serve` against the CNCF Distribution registry (Debian `docker-registry`),
# side by side on the same machine, one after the other in the same run.
#
# Generates once (cached under bench/work/) a containerDisk-style OCI image whose single
# uncompressed layer is a tar holding `disk/disk.img` of SIZE_MIB incompressible bytes
# (AES-CTR keystream), and CONC distinct blobs of CONC_MIB each. Then, RUNS times, for each
# registry (each on a fresh storage directory under WORK, on the same disk), times:
#
#   skopeo push       skopeo copy --preserve-digests oci:LAYOUT:bench docker://ADDR/vi/ns/img:bench
#   skopeo pull       skopeo copy --preserve-digests docker://ADDR/vi/ns/img:bench oci:PULL_DIR/oci:bench
#                     (--preserve-digests both ways: otherwise skopeo gzips the uncompressed
#                     layer on the fly and the benchmark measures gzip)
#   curl push         POST /v2/vi/ns/img/blobs/uploads/, then PUT <Location>?digest= -T layer
#   curl pull         GET /v2/vi/ns/img/blobs/<digest> -o /dev/null
#   concurrent push   CONC curl POST + PUT monolithic uploads at once, distinct blobs
#
# dropping the page cache before each phase when allowed. For each phase it records the
# wall time, the server's peak RSS (VmHWM, reset through /proc/PID/clear_refs at the start
# of the phase) and its RSS sampled every 0.5 s. The report (Markdown) goes to standard
# output, progress to standard error:
#
#   bench/registry.sh | tee bench/results-registry.md
#   SIZE_MIB=256 CONC_MIB=8 RUNS=1 bench/registry.sh          # quick run
#
# Environment:
#   DVCR=path      use this dvcr binary (default: target/release/dvcr, built or refreshed
#                  with `cargo build --release -p dvcr`)
#   SIZE_MIB       size of disk/disk.img in the image (default 2048)
#   RUNS           timed runs per measurement; the median is reported (default 3)
#   CONC           concurrent uploads (default 32)
#   CONC_MIB       size of each concurrent blob (default 64)
#   REGISTRIES     subset of "dvcr distribution" (default both)
#   WORK           work directory, also holds the registries' storage (default bench/work)
#   PULL_DIR       where skopeo pulls to (default a directory in /dev/shm)
#   PHASE_TIMEOUT  seconds after which one phase is abandoned (default 1200)
#
# Needs skopeo, curl, openssl, tar, sha256sum, awk and `docker-registry` (installed with
# apt-get when missing and running as root).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/memory.sh
source "$SCRIPT_DIR/memory.sh"
readonly SCRIPT_DIR ROOT

SIZE_MIB=${SIZE_MIB:-2048}
RUNS=${RUNS:-3}
CONC=${CONC:-32}
CONC_MIB=${CONC_MIB:-64}
REGISTRIES=${REGISTRIES:-"dvcr distribution"}
WORK=${WORK:-$ROOT/bench/work}
PULL_DIR=${PULL_DIR:-/dev/shm/dvcr-registry-bench.$$}
PHASE_TIMEOUT=${PHASE_TIMEOUT:-1200}
GENERATOR_VERSION=1 # bump when the generated data below changes: invalidates the cache

readonly MIB=$((1024 * 1024))
readonly REPO=vi/ns/img
readonly TAG=bench
readonly CONC_REPO=vi/ns/concurrent

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    printf '\nFATAL: %s\n' "$*" >&2
    exit 1
}

for n in SIZE_MIB RUNS CONC CONC_MIB PHASE_TIMEOUT; do
    [[ ${!n} =~ ^[1-9][0-9]*$ ]] || die "$n must be a positive integer, not '${!n}'"
done
for reg in $REGISTRIES; do
    [[ $reg == dvcr || $reg == distribution ]] || die "unknown registry '$reg' (use dvcr, distribution)"
done
if ! command -v docker-registry >/dev/null && [[ $REGISTRIES == *distribution* ]]; then
    if ((EUID == 0)) && command -v apt-get >/dev/null; then
        log "installing docker-registry (apt-get install -y docker-registry)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y docker-registry >&2 ||
            die "apt-get install docker-registry failed"
    else
        die "docker-registry missing: apt-get install docker-registry"
    fi
fi
for tool in skopeo curl openssl tar sha256sum awk timeout; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done

START_SECONDS=$SECONDS
LOAD_START=$(cut -d " " -f 1-3 /proc/loadavg)
COMMAND_LINE="SIZE_MIB=$SIZE_MIB RUNS=$RUNS CONC=$CONC CONC_MIB=$CONC_MIB"
[[ -n ${DVCR:-} ]] && COMMAND_LINE+=" DVCR=$DVCR"
[[ $REGISTRIES != "dvcr distribution" ]] && COMMAND_LINE+=" REGISTRIES='$REGISTRIES'"
COMMAND_LINE+=" $0"
(($# > 0)) && COMMAND_LINE+=" $*"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SCRATCH=$(mktemp -d "$WORK/registry-run.XXXXXX")
SERVER_PID=""
SAMPLER_PID=""
cleanup() {
    restore_memory
    [[ -n $SAMPLER_PID ]] && kill "$SAMPLER_PID" 2>/dev/null
    if [[ -n $SERVER_PID ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null
        wait "$SERVER_PID" 2>/dev/null
    fi
    rm -rf -- "$SCRATCH" "$PULL_DIR"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
# dvcr binary

if [[ -z ${DVCR:-} ]]; then
    log "cargo build --release -p dvcr (a no-op when target/release/dvcr is up to date)"
    (cd "$ROOT" && cargo build --release -p dvcr >&2)
    DVCR="${CARGO_TARGET_DIR:-$ROOT/target}/release/dvcr"
fi
[[ -x $DVCR ]] || die "dvcr binary not found or not executable: $DVCR"
DVCR=$(cd "$(dirname "$DVCR")" && pwd)/$(basename "$DVCR")
DVCR_BUILT=$(date -u -r "$DVCR" '+%Y-%m-%d %H:%M UTC')
DVCR_ORIGIN=$DVCR
# Run a private copy: a parallel cargo build must not swap the binary mid-benchmark.
cp -- "$DVCR" "$SCRATCH/dvcr"
DVCR=$SCRATCH/dvcr

# ---------------------------------------------------------------------------------------
# Page cache: cold if we may drop it; otherwise warm, and said so in the report.

if (sync && echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    CACHE_MODE="cold: synced and dropped before every phase"
    CAN_DROP=1
else
    CACHE_MODE="warm: dropping the page cache was refused (synced only; inputs likely cached)"
    CAN_DROP=0
fi
drop_caches() {
    sync
    if ((CAN_DROP)); then echo 3 >/proc/sys/vm/drop_caches; fi
}

# Blobs land in the page cache and pulls in tmpfs: fresh memory either way (bench/memory.sh).
mkdir -p "$PULL_DIR"
log "backing free memory (bench/memory.sh)"
back_memory "$PULL_DIR"

# ---------------------------------------------------------------------------------------
# Inputs (cached)

# Incompressible bytes: AES-128-CTR keystream (fast, deterministic). $1 = length, $2 = seed.
random_bytes() {
    head -c "$1" /dev/zero |
        openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv "$(printf '%032x' "$2")"
}
sha256_of() { sha256sum -- "$1" | cut -d ' ' -f 1; }

IMG_DIR="$WORK/registry-g${GENERATOR_VERSION}-${SIZE_MIB}m"
LAYOUT="$IMG_DIR/oci"
CONC_DIR="$WORK/registry-g${GENERATOR_VERSION}-conc-${CONC}x${CONC_MIB}m"

# An OCI image layout with one uncompressed layer (`disk/disk.img`, owned by 107:107 as
# KubeVirt containerDisks are), its config and manifest, tagged $TAG.
generate_image() {
    [[ -f $IMG_DIR/done ]] && return 0
    log "generating $LAYOUT: one layer, disk/disk.img of $SIZE_MIB MiB"
    rm -rf -- "$IMG_DIR"
    mkdir -p "$IMG_DIR/src/disk" "$LAYOUT/blobs/sha256"
    random_bytes "$((SIZE_MIB * MIB))" 1 >"$IMG_DIR/src/disk/disk.img"
    tar -C "$IMG_DIR/src" --owner=107 --group=107 --numeric-owner --mtime=@0 --format=gnu \
        -cf "$IMG_DIR/layer.tar" disk
    rm -rf -- "$IMG_DIR/src"
    local layer_digest layer_size config config_digest manifest manifest_digest
    layer_digest=$(sha256_of "$IMG_DIR/layer.tar")
    layer_size=$(stat -c %s "$IMG_DIR/layer.tar")
    mv -- "$IMG_DIR/layer.tar" "$LAYOUT/blobs/sha256/$layer_digest"
    config=$(printf '{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
        "$layer_digest")
    printf '%s' "$config" >"$LAYOUT/blobs/sha256/tmp"
    config_digest=$(sha256_of "$LAYOUT/blobs/sha256/tmp")
    mv -- "$LAYOUT/blobs/sha256/tmp" "$LAYOUT/blobs/sha256/$config_digest"
    manifest=$(printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%d},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%d}]}' \
        "$config_digest" "${#config}" "$layer_digest" "$layer_size")
    printf '%s' "$manifest" >"$LAYOUT/blobs/sha256/tmp"
    manifest_digest=$(sha256_of "$LAYOUT/blobs/sha256/tmp")
    mv -- "$LAYOUT/blobs/sha256/tmp" "$LAYOUT/blobs/sha256/$manifest_digest"
    printf '{"imageLayoutVersion":"1.0.0"}' >"$LAYOUT/oci-layout"
    printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%d,"annotations":{"org.opencontainers.image.ref.name":"%s"}}]}' \
        "$manifest_digest" "${#manifest}" "$TAG" >"$LAYOUT/index.json"
    echo "sha256:$layer_digest" >"$IMG_DIR/layer.digest"
    touch "$IMG_DIR/done"
}

generate_conc() {
    [[ -f $CONC_DIR/done ]] && return 0
    log "generating $CONC blobs of $CONC_MIB MiB in $CONC_DIR"
    rm -rf -- "$CONC_DIR"
    mkdir -p "$CONC_DIR"
    local i
    for ((i = 1; i <= CONC; i++)); do
        random_bytes "$((CONC_MIB * MIB))" "$((1000 + i))" >"$CONC_DIR/blob-$i"
        echo "sha256:$(sha256_of "$CONC_DIR/blob-$i")" >"$CONC_DIR/blob-$i.digest"
    done
    touch "$CONC_DIR/done"
}

GEN_T0=$SECONDS
generate_image
generate_conc
GEN_SECONDS=$((SECONDS - GEN_T0))
LAYER_DIGEST=$(<"$IMG_DIR/layer.digest")
LAYER_FILE="$LAYOUT/blobs/sha256/${LAYER_DIGEST#sha256:}"
LAYER_BYTES=$(stat -c %s "$LAYER_FILE")
CONC_BYTES=$((CONC * CONC_MIB * MIB))

# ---------------------------------------------------------------------------------------
# Servers: one fresh instance, on a fresh storage directory, per group of phases.

free_port() {
    local p i
    for ((i = 0; i < 100; i++)); do
        p=$((20000 + RANDOM % 40000))
        # A refused connection means nobody listens there.
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            echo "$p"
            return 0
        fi
    done
    return 1
}

# start_server REGISTRY: sets SERVER_PID, SERVER_ADDR, STORE.
start_server() {
    local reg=$1 i
    STORE="$SCRATCH/storage-$reg"
    rm -rf -- "$STORE"
    mkdir -p "$STORE/data"
    : >"$SCRATCH/server.out"
    case $reg in
        dvcr)
            "$DVCR" serve --listen 127.0.0.1:0 --root "$STORE/data" --log warn \
                >"$SCRATCH/server.out" 2>>"$SCRATCH/dvcr.stderr" &
            SERVER_PID=$!
            SERVER_ADDR=""
            for ((i = 0; i < 100; i++)); do
                SERVER_ADDR=$(sed -n 's/^listening on //p' "$SCRATCH/server.out")
                [[ -n $SERVER_ADDR ]] && break
                kill -0 "$SERVER_PID" 2>/dev/null || die "dvcr serve exited: $(tail -n 3 "$SCRATCH/dvcr.stderr")"
                sleep 0.1
            done
            [[ -n $SERVER_ADDR ]] || die "dvcr serve did not print 'listening on' within 10 s"
            ;;
        distribution)
            local port
            port=$(free_port) || die "no free port found"
            SERVER_ADDR=127.0.0.1:$port
            cat >"$STORE/config.yml" <<EOF
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $STORE/data
  delete:
    enabled: true
  maintenance:
    uploadpurging:
      enabled: false
http:
  addr: $SERVER_ADDR
  secret: dvcr-registry-benchmark
EOF
            # The environment overrides the file (REGISTRY_<SECTION>_<KEY>): pin what matters.
            REGISTRY_HTTP_ADDR=$SERVER_ADDR REGISTRY_STORAGE_FILESYSTEM_ROOTDIRECTORY=$STORE/data \
                REGISTRY_LOG_LEVEL=warn docker-registry serve "$STORE/config.yml" \
                >"$SCRATCH/server.out" 2>>"$SCRATCH/distribution.stderr" &
            SERVER_PID=$!
            ;;
    esac
    for ((i = 0; i < 100; i++)); do
        curl -fsS -o /dev/null "http://$SERVER_ADDR/v2/" 2>/dev/null && return 0
        kill -0 "$SERVER_PID" 2>/dev/null || die "$reg exited: $(tail -n 3 "$SCRATCH/$reg.stderr")"
        sleep 0.1
    done
    die "$reg did not answer GET /v2/ at $SERVER_ADDR within 10 s"
}

stop_server() {
    kill -TERM "$SERVER_PID" 2>/dev/null || true
    local i
    for ((i = 0; i < 100; i++)); do
        kill -0 "$SERVER_PID" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    rm -rf -- "$STORE"
}

# ---------------------------------------------------------------------------------------
# Client operations; each prints a one-line reason on failure.

skopeo_push() {
    timeout "$PHASE_TIMEOUT" skopeo copy --quiet --preserve-digests --dest-tls-verify=false \
        "oci:$LAYOUT:$TAG" "docker://$SERVER_ADDR/$REPO:$TAG" 2>"$SCRATCH/client.err" ||
        { tail -n 1 "$SCRATCH/client.err"; return 1; }
}

skopeo_pull() {
    timeout "$PHASE_TIMEOUT" skopeo copy --quiet --preserve-digests --src-tls-verify=false \
        "docker://$SERVER_ADDR/$REPO:$TAG" "oci:$PULL_DIR/oci:$TAG" 2>"$SCRATCH/client.err" ||
        { tail -n 1 "$SCRATCH/client.err"; return 1; }
    [[ -f $PULL_DIR/oci/blobs/sha256/${LAYER_DIGEST#sha256:} ]] || { echo "layer missing after pull"; return 1; }
}

# curl_push FILE DIGEST REPO: monolithic upload, POST then PUT ?digest= with the whole body.
curl_push() {
    local file=$1 digest=$2 repo=$3 base="http://$SERVER_ADDR" headers code loc
    headers=$(curl -sS -X POST -o /dev/null -D - "$base/v2/$repo/blobs/uploads/" 2>&1) ||
        { echo "POST failed: ${headers//$'\r'/}" | head -n 1; return 1; }
    code=$(awk 'NR == 1 { print $2 }' <<<"$headers")
    [[ $code == 2?? ]] || { echo "POST answered $code"; return 1; }
    loc=$(tr -d '\r' <<<"$headers" | awk 'tolower($1) == "location:" { print $2; exit }')
    [[ -n $loc ]] || { echo "POST answered $code without Location"; return 1; }
    [[ $loc == /* ]] && loc=$base$loc
    if [[ $loc == *\?* ]]; then loc+="&digest=$digest"; else loc+="?digest=$digest"; fi
    code=$(timeout "$PHASE_TIMEOUT" curl -sS -T "$file" -H 'Content-Type: application/octet-stream' \
        -o /dev/null -w '%{http_code}' "$loc" 2>&1) || { echo "PUT failed: $code" | head -n 1; return 1; }
    [[ $code == 2?? ]] || { echo "PUT answered $code"; return 1; }
}

curl_push_layer() { curl_push "$LAYER_FILE" "$LAYER_DIGEST" "$REPO"; }

curl_pull() {
    local out code size
    out=$(timeout "$PHASE_TIMEOUT" curl -sS -o /dev/null -w '%{http_code} %{size_download}' \
        "http://$SERVER_ADDR/v2/$REPO/blobs/$LAYER_DIGEST" 2>&1) || { echo "GET failed: $out" | head -n 1; return 1; }
    read -r code size <<<"$out"
    [[ $code == 200 ]] || { echo "GET answered $code"; return 1; }
    [[ $size == "$LAYER_BYTES" ]] || { echo "GET returned $size bytes, not $LAYER_BYTES"; return 1; }
}

# CONC uploads at once; sets CONC_ERRORS (uploads that failed or answered non-2xx).
concurrent_push() {
    local i pids=()
    for ((i = 1; i <= CONC; i++)); do
        curl_push "$CONC_DIR/blob-$i" "$(<"$CONC_DIR/blob-$i.digest")" "$CONC_REPO" >"$SCRATCH/conc.$i" 2>&1 &
        pids+=($!)
    done
    CONC_ERRORS=0
    for ((i = 1; i <= CONC; i++)); do
        wait "${pids[i - 1]}" || CONC_ERRORS=$((CONC_ERRORS + 1))
    done
    if ((CONC_ERRORS > 0)); then
        echo "$CONC_ERRORS of $CONC uploads failed, e.g. $(cat "$SCRATCH"/conc.* | grep -m 1 .)"
        return 1
    fi
}

# ---------------------------------------------------------------------------------------
# Measurements

PHASES=(skopeo-push skopeo-pull curl-push curl-pull concurrent-push)
declare -A PHASE_BYTES=([skopeo-push]=$LAYER_BYTES [skopeo-pull]=$LAYER_BYTES [curl-push]=$LAYER_BYTES
    [curl-pull]=$LAYER_BYTES [concurrent-push]=$CONC_BYTES)
declare -A PHASE_FN=([skopeo-push]=skopeo_push [skopeo-pull]=skopeo_pull [curl-push]=curl_push_layer
    [curl-pull]=curl_pull [concurrent-push]=concurrent_push)
declare -A WALLS SYNCS HWM RSS_MIN RSS_MAX ERRORS FAILED
FAILURES=()
RAW_LOG=()

sample_rss() { # PID FILE: VmRSS (KiB) every 0.5 s until the process is gone
    while awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" >>"$2" 2>/dev/null; do sleep 0.5; done
}
now() { echo "$EPOCHREALTIME"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# run_phase REGISTRY PHASE RUN
run_phase() {
    local reg=$1 phase=$2 run=$3 key="$1|$2" t0 t1 t2 rc=0 msg wall sync_s hwm rmin rmax errs=0
    log "run $run/$RUNS: $reg $phase"
    [[ $phase == skopeo-pull ]] && rm -rf -- "$PULL_DIR/oci"
    drop_caches
    echo 5 >"/proc/$SERVER_PID/clear_refs" 2>/dev/null || HWM_NOTE=" (clear_refs refused: peak since server start)"
    : >"$SCRATCH/rss"
    sample_rss "$SERVER_PID" "$SCRATCH/rss" &
    SAMPLER_PID=$!
    CONC_ERRORS=0
    t0=$(now)
    msg=$("${PHASE_FN[$phase]}") || rc=$?
    t1=$(now)
    sync
    t2=$(now)
    kill "$SAMPLER_PID" 2>/dev/null || true
    wait "$SAMPLER_PID" 2>/dev/null || true
    SAMPLER_PID=""
    # concurrent_push runs in a command substitution: count its errors from its files.
    if [[ $phase == concurrent-push ]]; then
        errs=$(cat "$SCRATCH"/conc.* | grep -c . || true)
        rm -f -- "$SCRATCH"/conc.*
    fi
    wall=$(elapsed "$t0" "$t1")
    sync_s=$(elapsed "$t1" "$t2")
    hwm=$(awk '/^VmHWM:/ { print $2 }' "/proc/$SERVER_PID/status" 2>/dev/null || echo 0)
    read -r rmin rmax < <(sort -n "$SCRATCH/rss" | awk 'NR == 1 { a = $1 } { b = $1 } END { print a + 0, b + 0 }')
    if ((rc == 0)); then
        WALLS[$key]+=" $wall"
        SYNCS[$key]+=" $sync_s"
        RAW_LOG+=("| $run | $reg | $phase | $wall | $sync_s | $((hwm / 1024)) | $((rmin / 1024))–$((rmax / 1024)) | $errs | ok |")
    else
        FAILED[$key]=1
        FAILURES+=("run $run: $reg $phase: $msg")
        log "FAILED: $msg"
        RAW_LOG+=("| $run | $reg | $phase | $wall | $sync_s | $((hwm / 1024)) | $((rmin / 1024))–$((rmax / 1024)) | $errs | FAIL: $msg |")
    fi
    ERRORS[$key]=$((${ERRORS[$key]:-0} + errs))
    ((hwm > ${HWM[$key]:-0})) && HWM[$key]=$hwm
    [[ -z ${RSS_MIN[$key]:-} ]] || ((rmin < RSS_MIN[$key])) && RSS_MIN[$key]=$rmin
    ((rmax > ${RSS_MAX[$key]:-0})) && RSS_MAX[$key]=$rmax
    return 0
}

HWM_NOTE=""
mkdir -p "$PULL_DIR"
read -ra REGS <<<"$REGISTRIES"
for ((run = 1; run <= RUNS; run++)); do
    # Alternate which registry goes first, so that neither always inherits the other's
    # leftovers (writeback, cache state, a busier neighbour).
    order=("${REGS[@]}")
    if ((run % 2 == 0 && ${#REGS[@]} == 2)); then order=("${REGS[1]}" "${REGS[0]}"); fi
    for group in "skopeo-push skopeo-pull" "curl-push curl-pull" "concurrent-push"; do
        for reg in "${order[@]}"; do
            start_server "$reg"
            for phase in $group; do run_phase "$reg" "$phase" "$run"; done
            stop_server
        done
    done
done
rm -rf -- "$PULL_DIR"

# ---------------------------------------------------------------------------------------
# Report

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }
declare -A WALL SYNC
for reg in "${REGS[@]}"; do
    for phase in "${PHASES[@]}"; do
        key="$reg|$phase"
        if [[ -z ${FAILED[$key]:-} && -n ${WALLS[$key]:-} ]]; then
            # shellcheck disable=SC2086 # word splitting of the run list is wanted
            WALL[$key]=$(median ${WALLS[$key]})
            # shellcheck disable=SC2086
            SYNC[$key]=$(median ${SYNCS[$key]})
        fi
    done
done

fmt_s() { if [[ -n ${1:-} ]]; then printf '%.2f' "$1"; else printf 'FAIL'; fi; }
mbps() { # BYTES SECONDS: 10^6 bytes per second
    if [[ -n ${2:-} ]]; then awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.0f", b / s / 1e6; else printf "inf" }'; else printf -- '-'; fi
}
ratio() { # A B: A / B
    if [[ -n ${1:-} && -n ${2:-} && $1 != - && $2 != - ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "inf" }'
    else
        printf -- '-'
    fi
}
mib() { if [[ -n ${1:-} ]]; then awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; else printf -- '-'; fi; }
rss_range() { if [[ -n ${1:-} ]]; then printf '%s–%s' "$(mib "$1")" "$(mib "$2")"; else printf -- '-'; fi; }
sum() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a + b }'; }

model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -c 1)
[[ -n $dirty ]] && rev+=" (with uncommitted changes)"
fs=$(df -T "$WORK" | awk 'NR == 2 { print $1 " (" $2 ")" }')

echo "# dvcr serve vs CNCF Distribution (docker-registry)"
echo
echo "- Command: \`$COMMAND_LINE\`"
echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); dvcr $rev ($DVCR_ORIGIN, built $DVCR_BUILT)"
echo "- Machine: $(nproc) CPUs, $model, $mem RAM, kernel $(uname -r)"
echo "- Memory: $MEMORY_NOTE (see bench/memory.sh)"
echo "- Versions: $(docker-registry --version 2>&1 | head -n 1); $(skopeo --version); $(curl --version | head -n 1 | cut -d ' ' -f 1-2)"
echo "- Load average: $LOAD_START at the start, $(cut -d ' ' -f 1-3 /proc/loadavg) at the end (other work on this machine skews timings)"
echo "- Storage: a fresh directory per registry and phase group under $WORK on $fs; skopeo pulls into $PULL_DIR (tmpfs)"
echo "- Page cache: $CACHE_MODE"
echo "- Image: one uncompressed layer (tar of disk/disk.img, $SIZE_MIB MiB of AES-CTR noise), $LAYER_BYTES bytes; concurrent: $CONC distinct blobs of $CONC_MIB MiB$( ((GEN_SECONDS > 0)) && echo "; generated in ${GEN_SECONDS}s")"
echo "- Times: median wall seconds of $RUNS run(s); MB/s = 10^6 bytes/s of blob data; ratio = dvcr MB/s / Distribution MB/s (above 1.00x: dvcr faster)"
echo "- Peak RSS: the server's VmHWM over the phase (reset with /proc/PID/clear_refs at its start)$HWM_NOTE; sampled: VmRSS every 0.5 s during the phase, min–max; both the maximum over the runs"
echo "- Durability: both registries fsync an upload's data before they answer its commit with 201 (dvcr: the blob, then the rename; Distribution's filesystem driver: the upload file, strace shows it). \"+sync\" adds the time of a \`sync\` right after the phase, a check that nothing was left to write."
echo
echo "| phase | dvcr s | Distribution s | dvcr MB/s | Distribution MB/s | dvcr/Distribution | dvcr s +sync | Distribution s +sync | ratio +sync | dvcr peak RSS MiB | Distribution peak RSS MiB | dvcr RSS sampled MiB | Distribution RSS sampled MiB | errors dvcr / Distribution |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
declare -A RATIO RATIO_SYNC
for phase in "${PHASES[@]}"; do
    d="dvcr|$phase" g="distribution|$phase" b=${PHASE_BYTES[$phase]}
    dw=${WALL[$d]:-} gw=${WALL[$g]:-}
    dws="" gws=""
    [[ -n $dw ]] && dws=$(sum "$dw" "${SYNC[$d]}")
    [[ -n $gw ]] && gws=$(sum "$gw" "${SYNC[$g]}")
    RATIO[$phase]=$(ratio "$(mbps "$b" "$dw")" "$(mbps "$b" "$gw")")
    RATIO_SYNC[$phase]=$(ratio "$(mbps "$b" "$dws")" "$(mbps "$b" "$gws")")
    printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s / %s |\n' "$phase" \
        "$(fmt_s "$dw")" "$(fmt_s "$gw")" "$(mbps "$b" "$dw")" "$(mbps "$b" "$gw")" "${RATIO[$phase]}" \
        "$(fmt_s "$dws")" "$(fmt_s "$gws")" "${RATIO_SYNC[$phase]}" \
        "$(mib "${HWM[$d]:-}")" "$(mib "${HWM[$g]:-}")" \
        "$(rss_range "${RSS_MIN[$d]:-}" "${RSS_MAX[$d]:-}")" "$(rss_range "${RSS_MIN[$g]:-}" "${RSS_MAX[$g]:-}")" \
        "${ERRORS[$d]:--}" "${ERRORS[$g]:--}"
done
echo
echo "## Goals"
echo
GOALS_MISSED=0
goal() { # MET(0/1) TEXT
    if (($1)); then
        echo "- [x] $2"
    else
        echo "- [ ] $2  **MISSED**"
        GOALS_MISSED=$((GOALS_MISSED + 1))
    fi
}
at_least() { [[ $1 != - ]] && awk -v r="${1%x}" -v m="$2" 'BEGIN { exit !(r >= m) }'; }
for phase in skopeo-push curl-push concurrent-push; do
    met=0
    at_least "${RATIO[$phase]}" 1.3 && met=1
    goal "$met" "$phase: >= 1.3x Distribution's throughput (${RATIO[$phase]}; with sync ${RATIO_SYNC[$phase]})"
done
for phase in skopeo-pull curl-pull; do
    met=0
    at_least "${RATIO[$phase]}" 1.0 && met=1
    goal "$met" "$phase: >= 1.0x Distribution's throughput (${RATIO[$phase]})"
done
d="dvcr|concurrent-push"
met=0
[[ -z ${FAILED[$d]:-} && ${ERRORS[$d]:-x} == 0 ]] && met=1
goal "$met" "zero errors in $CONC concurrent pushes, every run (dvcr: ${ERRORS[$d]:--} errors)"
# Flat: during the single-blob pushes and pulls, dvcr's RSS moves by less than 32 MiB and
# never reaches 128 MiB (the blob is $SIZE_MIB MiB).
met=1
flat_detail=""
for phase in skopeo-push curl-push skopeo-pull curl-pull; do
    d="dvcr|$phase"
    if [[ -z ${RSS_MAX[$d]:-} || -z ${HWM[$d]:-} ]] ||
        ((RSS_MAX[$d] - RSS_MIN[$d] >= 32 * 1024 || HWM[$d] >= 128 * 1024)); then
        met=0
    fi
    flat_detail+=" $phase $(rss_range "${RSS_MIN[$d]:-}" "${RSS_MAX[$d]:-}") (peak $(mib "${HWM[$d]:-}"));"
done
goal "$met" "dvcr peak RSS flat during the $SIZE_MIB MiB pushes and pulls (sampled range < 32 MiB, peak < 128 MiB; MiB:${flat_detail%;})"
echo
if ((${#FAILURES[@]} > 0)); then
    echo "## Failures"
    echo
    printf -- '- **FAILED** %s\n' "${FAILURES[@]}"
    echo
fi
echo "## Server diagnostics (stderr, log level warn)"
echo
for reg in "${REGS[@]}"; do
    f="$SCRATCH/$reg.stderr"
    n=$(grep -c . "$f" 2>/dev/null || true)
    line=""
    ((${n:-0} > 0)) && line="; first: \`$(head -n 1 "$f" | cut -c 1-200)\`"
    echo "- $reg: ${n:-0} line(s)$line"
done
echo
echo "## All runs"
echo
echo "| run | registry | phase | wall s | sync s after | peak RSS MiB | RSS sampled MiB | errors | result |"
echo "|---:|---|---|---:|---:|---:|---:|---:|---|"
printf '%s\n' "${RAW_LOG[@]}"
echo
echo "Total benchmark time: $((SECONDS - START_SECONDS)) s."

if ((${#FAILURES[@]} > 0)); then
    log "some phases failed (see the report)"
    exit 2
fi
log "done in $((SECONDS - START_SECONDS)) s; goals missed: $GOALS_MISSED"
