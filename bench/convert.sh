#!/usr/bin/env bash
# Benchmark: `dvcr convert` against `qemu-img convert`, side by side, in one run.
#
# Generates (once, cached under bench/work/) a sparse raw disk with a realistic mix of
# incompressible and compressible data separated by zero runs, converts it with qemu-img
# into compressed qcow2, plain qcow2, streamOptimized vmdk and vhdx, and then times, for
# each of those inputs and each target (tmpfs and disk):
#
#   dvcr convert IN OUT.raw                 (from the file)
#   dvcr convert - OUT.raw < IN             (standard input redirected from the file)
#   cat IN | dvcr convert - OUT.raw         (standard input from a pipe: strictly one pass)
#   cat IN | (a reader that does nothing)   (the pipe's floor: what `cat` alone delivers)
#   eatmydata dvcr convert IN OUT.raw       (disk target, when eatmydata is installed: dvcr
#                                            with its fsync and writeback calls made no-ops,
#                                            the durability qemu-img's default does not give)
#   dd if=/dev/zero of=OUT.raw conv=fsync   (disk target, the write floor: the image's amount
#                                            of data written from memory and fsynced, and
#                                            nothing else)
#   qemu-img convert -O raw IN OUT.raw      (default flags)
#   qemu-img convert -m 8 -W -O raw IN OUT.raw
#
# RUNS times each (interleaved, each run starting at another variant so that none always
# goes first after the inputs were generated or the disk cache warmed), reporting the median wall time and the peak RSS as
# measured by /usr/bin/time. Checks once per input that dvcr's output is identical to
# qemu-img's. The report (Markdown) goes to standard output, progress to standard error:
#
#   bench/convert.sh | tee bench/results-convert.md
#   DATA_GIB=0.25 VIRTUAL_GIB=2 RUNS=1 bench/convert.sh        # quick run
#
# Environment:
#   DVCR=path      use this dvcr binary instead of building `cargo build --release -p dvcr`
#   VIRTUAL_GIB    virtual size of the generated disk (default 8)
#   DATA_GIB       data in it (default 2)
#   RUNS           timed runs per measurement (default 3)
#   INPUTS         subset of "qcow2-zlib qcow2 vmdk-stream vhdx" (default all)
#   TARGETS        subset of "tmpfs disk" (default both)
#   WORK           work directory (default bench/work, gitignored)
#   TMPFS_DIR      tmpfs target directory (default /dev/shm/dvcr-bench.PID)
#   GENERATE_ONLY=1  only generate (or check) the cached input images, then exit
#   KEEP_GOING=0   stop at the first dvcr failure instead of reporting it in the table
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
# shellcheck source=bench/memory.sh
source "$SCRIPT_DIR/memory.sh"
readonly SCRIPT_DIR ROOT

VIRTUAL_GIB=${VIRTUAL_GIB:-8}
DATA_GIB=${DATA_GIB:-2}
RUNS=${RUNS:-3}
INPUTS=${INPUTS:-"qcow2-zlib qcow2 vmdk-stream vhdx"}
TARGETS=${TARGETS:-"tmpfs disk"}
WORK=${WORK:-$ROOT/bench/work}
TMPFS_DIR=${TMPFS_DIR:-/dev/shm/dvcr-bench.$$}
KEEP_GOING=${KEEP_GOING:-1}
GENERATOR_VERSION=1 # bump when the image layout below changes: invalidates the cache

readonly TIME=/usr/bin/time
readonly MIB=$((1024 * 1024))

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() {
    printf '\nFATAL: %s\n' "$*" >&2
    exit 1
}

for tool in qemu-img openssl awk dd truncate python3 "$TIME"; do
    command -v "$tool" >/dev/null || die "missing tool: $tool"
done
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer, not '$RUNS'"

# Sizes: GiB (fractions allowed) to bytes, rounded down to whole MiB.
# (The arithmetic is bash's: mawk's printf %d saturates at 2^31 - 1.)
gib_to_bytes() {
    local mib
    mib=$(awk -v g="$1" 'BEGIN { m = int(g * 1024); if (m < 1) exit 1; print m }') || return 1
    echo $((mib * MIB))
}
VIRTUAL_BYTES=$(gib_to_bytes "$VIRTUAL_GIB") || die "bad VIRTUAL_GIB '$VIRTUAL_GIB'"
DATA_BYTES=$(gib_to_bytes "$DATA_GIB") || die "bad DATA_GIB '$DATA_GIB'"
((DATA_BYTES * 10 <= VIRTUAL_BYTES * 9)) || die "DATA_GIB must be at most 90% of VIRTUAL_GIB"

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
mkdir -p "$TMPFS_DIR"
SCRATCH=$(mktemp -d "$WORK/run.XXXXXX")
cleanup() {
    restore_memory
    rm -rf -- "$SCRATCH" "$TMPFS_DIR/"*.raw "$WORK/out"
    rmdir -- "$TMPFS_DIR" 2>/dev/null || true
}
trap cleanup EXIT

START_SECONDS=$SECONDS
LOAD_START=$(cut -d " " -f 1-3 /proc/loadavg)
COMMAND_LINE="VIRTUAL_GIB=$VIRTUAL_GIB DATA_GIB=$DATA_GIB RUNS=$RUNS"
[[ -n ${DVCR:-} ]] && COMMAND_LINE+=" DVCR=$DVCR"
[[ $INPUTS != "qcow2-zlib qcow2 vmdk-stream vhdx" ]] && COMMAND_LINE+=" INPUTS='$INPUTS'"
[[ $TARGETS != "tmpfs disk" ]] && COMMAND_LINE+=" TARGETS='$TARGETS'"
COMMAND_LINE+=" $0"
(($# > 0)) && COMMAND_LINE+=" $*"

# ---------------------------------------------------------------------------------------
# dvcr binary

GENERATE_ONLY=${GENERATE_ONLY:-0}
if ((GENERATE_ONLY)); then
    : # no dvcr needed
elif [[ -z ${DVCR:-} ]]; then
    log "building dvcr (cargo build --release -p dvcr; fat LTO, takes a while the first time)"
    (cd "$ROOT" && cargo build --release -p dvcr >&2)
    DVCR="${CARGO_TARGET_DIR:-$ROOT/target}/release/dvcr"
fi
if ! ((GENERATE_ONLY)); then
    [[ -x $DVCR ]] || die "dvcr binary not found or not executable: $DVCR"
    DVCR=$(cd "$(dirname "$DVCR")" && pwd)/$(basename "$DVCR")
    # Run a private copy: a parallel cargo build must not swap the binary mid-benchmark.
    DVCR_BUILT=$(date -u -r "$DVCR" '+%Y-%m-%d %H:%M UTC')
    DVCR_ORIGIN=$DVCR
    cp -- "$DVCR" "$SCRATCH/dvcr"
    DVCR=$SCRATCH/dvcr
fi

# ---------------------------------------------------------------------------------------
# Page cache: cold if we may drop it, warm (pre-read) otherwise.

if (sync && echo 3 >/proc/sys/vm/drop_caches) 2>/dev/null; then
    CACHE_MODE="cold cache (page cache dropped before every run)"
    CAN_DROP=1
else
    CACHE_MODE="warm cache (dropping the page cache was refused; the input is pre-read once)"
    CAN_DROP=0
fi

# Targets are written into fresh memory (tmpfs, or the page cache of the disk): see
# bench/memory.sh. Not needed when only generating the images.
if ! ((GENERATE_ONLY)); then
    log "backing free memory (bench/memory.sh)"
    back_memory "$TMPFS_DIR"
fi

prepare_run() { # INPUT: drop or warm the cache
    sync
    if ((CAN_DROP)); then
        echo 3 >/proc/sys/vm/drop_caches
    else
        cat -- "$1" >/dev/null
    fi
}

# ---------------------------------------------------------------------------------------
# Input images (cached)

IMG_DIR="$WORK/images-g${GENERATOR_VERSION}-v${VIRTUAL_GIB}g-d${DATA_GIB}g"
SRC_RAW="$IMG_DIR/source.raw"

# Writes stdin into the sparse file $SRC_RAW.tmp at byte offset $1.
write_at() { dd of="$SRC_RAW.tmp" bs=1M iflag=fullblock oflag=seek_bytes seek="$1" conv=notrunc status=none; }

# Incompressible bytes: AES-128-CTR keystream (fast, deterministic). $1 = length, $2 = seed.
random_bytes() {
    head -c "$1" /dev/zero |
        openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv "$(printf '%032x' "$2")"
}

# Compressible, text-like bytes (log lines, with now and then a block of repeated
# structure): $1 = length, into file $2. Compresses roughly 3-4x with zlib.
text_pool() {
    awk -v size="$1" 'BEGIN {
        srand(42)
        np = split("kernel systemd sshd nginx postgres kubelet containerd dvcr-importer cron dockerd", p, " ")
        nl = split("INFO INFO INFO DEBUG WARN ERROR", lv, " ")
        nw = split("started stopped connection from accepted request GET POST PUT /api/v1/namespaces/default/pods " \
                   "took ms user session opened closed for volume attached mounted unmounted pvc-disk " \
                   "retrying backoff image pulled layer sha256 verified bytes written flushed checkpoint " \
                   "vacuum table index scan rows returned in status=200 status=404 status=500 upstream", w, " ")
        n = 0
        while (n < size) {
            line = sprintf("2025-%02d-%02dT%02d:%02d:%02d.%06dZ node-%02d %s[%d]: %s", 1 + int(rand() * 12),
                           1 + int(rand() * 28), int(rand() * 24), int(rand() * 60), int(rand() * 60),
                           int(rand() * 1000000), int(rand() * 16), p[1 + int(rand() * np)],
                           100 + int(rand() * 30000), lv[1 + int(rand() * nl)])
            k = 3 + int(rand() * 9)
            for (j = 0; j < k; j++) line = line " " w[1 + int(rand() * nw)]
            line = line sprintf(" id=%08x", int(rand() * 2147483647))
            print line
            n += length(line) + 1
            if (rand() < 0.002) {          # a 4 KiB block of a repeated 64-byte record
                rec = sprintf("%-63s", sprintf("record %d flags=0x%04x", int(rand() * 1000), int(rand() * 65535)))
                for (j = 0; j < 64; j++) print rec
                n += 4096
            }
        }
    }' >"$2"
    truncate -s "$1" "$2"
}

generate_images() {
    mkdir -p "$IMG_DIR"
    local t0=$SECONDS
    if [[ ! -f $SRC_RAW ]]; then
        log "generating $SRC_RAW: ${VIRTUAL_GIB} GiB virtual, ${DATA_GIB} GiB data"
        rm -f -- "$SRC_RAW.tmp"
        truncate -s "$VIRTUAL_BYTES" "$SRC_RAW.tmp"
        # 32 large extents (alternately incompressible and text-like) spread over the disk,
        # each at a jittered, not cluster-aligned offset inside its own slot, zeros between;
        # then 256 small (4-64 KiB) random writes scattered over the whole disk, the way
        # file system metadata and small files look.
        local extents=32
        local small_total=$((256 * 34 * 1024))
        local ext=$(((DATA_BYTES - small_total) / extents / 4096 * 4096))
        local slot=$((VIRTUAL_BYTES / extents / MIB * MIB))
        local pool_len=$((ext < 64 * MIB ? ext : 64 * MIB))
        local pool="$IMG_DIR/text.pool"
        text_pool "$pool_len" "$pool"
        local i off jitter pos len
        for ((i = 0; i < extents; i++)); do
            jitter=$(((i * 7919 % 97) * 12288 + (i % 7) * 512))
            ((jitter + ext <= slot)) || jitter=0
            off=$((i * slot + jitter))
            if ((i % 2 == 0)); then
                random_bytes "$ext" "$((i + 1))" | write_at "$off"
            else
                for ((pos = 0; pos < ext; pos += len)); do
                    len=$((ext - pos < pool_len ? ext - pos : pool_len))
                    head -c "$len" "$pool" | write_at "$((off + pos))"
                done
            fi
        done
        rm -f -- "$pool"
        local j size
        for ((j = 0; j < 256; j++)); do
            size=$(((1 + j * 37 % 16) * 4096))
            off=$(((j * 2654435761 % (VIRTUAL_BYTES / 4096 - 16)) * 4096))
            random_bytes "$size" "$((1000 + j))" | write_at "$off"
        done
        mv -- "$SRC_RAW.tmp" "$SRC_RAW"
    fi
    local name args
    for name in $INPUTS; do
        [[ -f $(input_path "$name") ]] && continue
        case $name in
            qcow2-zlib) args=(-c -O qcow2) ;;
            qcow2) args=(-O qcow2) ;;
            vmdk-stream) args=(-O vmdk -o subformat=streamOptimized) ;;
            vhdx) args=(-O vhdx) ;;
        esac
        log "qemu-img convert -f raw ${args[*]} source.raw $(basename "$(input_path "$name")")"
        qemu-img convert -f raw "${args[@]}" "$SRC_RAW" "$(input_path "$name").tmp"
        mv -- "$(input_path "$name").tmp" "$(input_path "$name")"
    done
    GEN_SECONDS=$((SECONDS - t0))
}

input_path() {
    case $1 in
        qcow2-zlib) echo "$IMG_DIR/image-zlib.qcow2" ;;
        qcow2) echo "$IMG_DIR/image.qcow2" ;;
        vmdk-stream) echo "$IMG_DIR/image-stream.vmdk" ;;
        vhdx) echo "$IMG_DIR/image.vhdx" ;;
        *) die "unknown input '$1' (use qcow2-zlib, qcow2, vmdk-stream, vhdx)" ;;
    esac
}

target_dir() {
    case $1 in
        tmpfs) echo "$TMPFS_DIR" ;;
        disk) echo "$WORK/out" ;;
        *) die "unknown target '$1' (use tmpfs, disk)" ;;
    esac
}

for name in $INPUTS; do input_path "$name" >/dev/null; done
for target in $TARGETS; do target_dir "$target" >/dev/null; done
GEN_SECONDS=0
generate_images
if ((GENERATE_ONLY)); then
    log "images ready in $IMG_DIR (${GEN_SECONDS}s)"
    exit 0
fi

# ---------------------------------------------------------------------------------------
# Measurements

VARIANTS=(dvcr-file dvcr-stdin dvcr-pipe pipe-floor dvcr-noflush write-floor qemu-default qemu-m8W qemu-m8W-fsync)
# What every converter has to write: the source's allocated bytes (its data, in whole MiB).
WRITE_MIB=$(($(stat -c '%b * %B' "$SRC_RAW") / MIB))
HAVE_EATMYDATA=0
command -v eatmydata >/dev/null && HAVE_EATMYDATA=1
# The floor of any reader of `cat IN |`: a reader that grows the pipe to 1 MiB as dvcr does
# and discards what it reads. No pipe consumer can finish before `cat` has produced the
# whole file, holes included (a file read skips them).
DRAIN_PY='
import fcntl, os
try:
    fcntl.fcntl(0, 1031, 1 << 20)  # F_SETPIPE_SZ
except OSError:
    pass
buf = memoryview(bytearray(1 << 20))
while os.readv(0, [buf]):
    pass
'
declare -A WALL RSS FAILED ERROR JSON
FAILURES=()
MISMATCHES=()
RAW_LOG=()

# run_variant VARIANT INPUT OUT: one timed run; sets LAST_WALL, LAST_RSS (KiB); returns
# non-zero when the command failed (its stderr is in $SCRATCH/stderr).
run_variant() {
    local variant=$1 in=$2 out=$3 stdin=/dev/null
    local cmd
    case $variant in
        dvcr-file) cmd=("$DVCR" convert --json "$in" "$out") ;;
        dvcr-stdin) cmd=("$DVCR" convert --json - "$out") stdin=$in ;;
        dvcr-pipe) cmd=(sh -c 'cat -- "$1" | exec "$2" convert --json - "$3"' sh "$in" "$DVCR" "$out") ;;
        pipe-floor) cmd=(sh -c 'cat -- "$1" | exec python3 -c "$2"' sh "$in" "$DRAIN_PY") ;;
        # Not a way to run dvcr: it shows what its fsync costs on a disk, and nothing else.
        dvcr-noflush) cmd=(eatmydata "$DVCR" convert --json "$in" "$out") ;;
        # The write floor: the image's amount of data written from memory and fsynced, as
        # a durable converter must, and nothing read, decoded or copied. No converter that
        # owes that fsync can finish sooner.
        write-floor) cmd=(dd if=/dev/zero of="$out" bs=1M count="$WRITE_MIB" conv=fsync status=none) ;;
        qemu-default) cmd=(qemu-img convert -O raw "$in" "$out") ;;
        qemu-m8W) cmd=(qemu-img convert -m 8 -W -O raw "$in" "$out") ;;
        # The same durability as dvcr, which fsyncs the disk before it reports success.
        qemu-m8W-fsync) cmd=(sh -c 'qemu-img convert -m 8 -W -O raw "$1" "$2" && sync "$2"' sh "$in" "$out") ;;
    esac
    rm -f -- "$out"
    prepare_run "$in"
    local rc=0
    "$TIME" -f '%e %M' -o "$SCRATCH/time" "${cmd[@]}" <"$stdin" >"$SCRATCH/stdout" 2>"$SCRATCH/stderr" || rc=$?
    read -r LAST_WALL LAST_RSS < <(tail -n 1 "$SCRATCH/time")
    return "$rc"
}

median() { printf '%s\n' "$@" | sort -g | awk '{ a[NR] = $1 } END { if (NR % 2) print a[(NR + 1) / 2]; else printf "%.2f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2 }'; }

for name in $INPUTS; do
    in=$(input_path "$name")
    for target in $TARGETS; do
        dir=$(target_dir "$target")
        mkdir -p "$dir"
        declare -A walls=() rsss=()
        for ((run = 1; run <= RUNS; run++)); do
            for ((v = 0; v < ${#VARIANTS[@]}; v++)); do
                variant=${VARIANTS[(v + run - 1) % ${#VARIANTS[@]}]}
                key="$name|$target|$variant"
                [[ -n ${FAILED[$key]:-} ]] && continue
                [[ $variant == dvcr-noflush ]] && ! ((HAVE_EATMYDATA)) && continue
                [[ ($variant == dvcr-noflush || $variant == write-floor) && $target != disk ]] && continue
                out="$dir/$variant.raw"
                log "$name -> $target: $variant (run $run/$RUNS)"
                if run_variant "$variant" "$in" "$out"; then
                    walls[$variant]+=" $LAST_WALL"
                    rss_max=${rsss[$variant]:-0}
                    ((LAST_RSS > rss_max)) && rss_max=$LAST_RSS
                    rsss[$variant]=$rss_max
                    RAW_LOG+=("| $name | $target | $variant | $run | $LAST_WALL | $((LAST_RSS / 1024)) |")
                    [[ $variant == dvcr-* && $variant != dvcr-noflush ]] && JSON["$name|$variant"]=$(tail -n 1 "$SCRATCH/stdout")
                else
                    FAILED[$key]=1
                    ERROR[$key]=$(grep -m 1 -i 'error' "$SCRATCH/stderr" || head -n 1 "$SCRATCH/stderr")
                    FAILURES+=("$name -> $target: $variant failed: ${ERROR[$key]}")
                    log "FAILED: ${ERROR[$key]}"
                    RAW_LOG+=("| $name | $target | $variant | $run | FAIL | - |")
                    ((KEEP_GOING)) || die "${FAILURES[-1]}"
                    rm -f -- "$out"
                fi
                # Keep the last outputs on tmpfs for the comparison below; on disk, free
                # the space (and the dirty pages) right away.
                [[ $target == tmpfs && $run == "$RUNS" ]] || rm -f -- "$out"
            done
        done
        for variant in "${VARIANTS[@]}"; do
            key="$name|$target|$variant"
            if [[ -z ${FAILED[$key]:-} && -n ${walls[$variant]:-} ]]; then
                # shellcheck disable=SC2086 # word splitting of the run list is wanted
                WALL[$key]=$(median ${walls[$variant]})
                RSS[$key]=${rsss[$variant]}
            fi
        done
        if [[ $target == tmpfs ]]; then
            reference="$dir/qemu-default.raw"
            for variant in dvcr-file dvcr-stdin dvcr-pipe; do
                [[ -f "$dir/$variant.raw" && -f $reference ]] || continue
                log "$name: qemu-img compare -f raw -F raw $variant.raw qemu-default.raw"
                if ! qemu-img compare -f raw -F raw "$dir/$variant.raw" "$reference" >"$SCRATCH/compare" 2>&1; then
                    MISMATCHES+=("$name: $variant output differs from qemu-img's: $(head -n 1 "$SCRATCH/compare")")
                    printf '\n*** MISMATCH *** %s\n\n' "${MISMATCHES[-1]}" >&2
                fi
            done
            rm -f -- "$dir"/*.raw
        fi
    done
done

# ---------------------------------------------------------------------------------------
# Report

fmt_s() {
    if [[ -n ${1:-} ]]; then printf '%.2f' "$1"; else printf 'FAIL'; fi
}
fmt_opt() { # a time measured only on some rows
    if [[ -n ${1:-} ]]; then printf '%.2f' "$1"; else printf -- '-'; fi
}
fmt_mib() {
    if [[ -n ${1:-} ]]; then awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; else printf -- '-'; fi
}
ratio() { # A B: A / B
    if [[ -n ${1:-} && -n ${2:-} ]]; then
        awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else printf "inf" }'
    else
        printf -- '-'
    fi
}
max_kib() {
    local m="" v
    for v in "$@"; do
        if [[ -n $v ]] && [[ -z $m || $v -gt $m ]]; then m=$v; fi
    done
    printf '%s' "$m"
}
# check DESCRIPTION AWK-CONDITION [REACHABLE-CONDITION WHY]: records a goal as met or missed,
# from $df, $ds, $dp, $pf, $wf, $qd, $qw, $drss. A missed goal whose REACHABLE-CONDITION is
# false is marked out of reach on this machine, WHY saying which floor, measured in the
# same run, stands in the way (no program could have met it here).
check() {
    local vars=(-v df="${df:-}" -v qd="${qd:-}" -v qw="${qw:-}" -v rss="${drss:-0}"
        -v ds="${ds:-1e9}" -v dp="${dp:-1e9}" -v pf="${pf:-0}" -v wf="${wf:-0}")
    if [[ -n $df && -n $qd && -n $qw ]] && awk "${vars[@]}" "BEGIN { exit !($2) }"; then
        GOALS+=("- [x] $name -> $target: $1")
    elif [[ -n ${3:-} && -n $df ]] && ! awk "${vars[@]}" "BEGIN { exit !($3) }"; then
        GOALS+=("- [ ] $name -> $target: $1  **MISSED**, out of reach on this machine: $4")
        GOALS_FAILED=$((GOALS_FAILED + 1))
        GOALS_OUT_OF_REACH=$((GOALS_OUT_OF_REACH + 1))
    else
        GOALS+=("- [ ] $name -> $target: $1  **MISSED**")
        GOALS_FAILED=$((GOALS_FAILED + 1))
    fi
}
json_field() { sed -n "s/.*\"$2\":\\([^,}]*\\).*/\\1/p" <<<"$1"; }

model=$(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
mem=$(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
dirty=$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null | head -c 1)
[[ -n $dirty ]] && rev+=" (with uncommitted changes)"

echo "# dvcr convert vs qemu-img convert"
echo
echo "- Command: \`$COMMAND_LINE\`"
echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC'); dvcr $rev ($DVCR_ORIGIN, built $DVCR_BUILT)"
echo "- Machine: $(nproc) CPUs, $model, $mem RAM, kernel $(uname -r)"
echo "- Memory: $MEMORY_NOTE (see bench/memory.sh)"
echo "- qemu-img: $(qemu-img --version | head -n 1)"
echo "- Load average: $LOAD_START at the start, $(cut -d ' ' -f 1-3 /proc/loadavg) at the end (other work on this 2-core machine skews timings)"
echo "- Note: \`qemu-img convert\` defaults to cache mode \"unsafe\" and never fsyncs the target; dvcr fsyncs it before exiting. On the disk target dvcr's time includes writeback, qemu-img's does not."
echo "- Page cache: $CACHE_MODE"
echo "- Image: ${VIRTUAL_GIB} GiB virtual, ${DATA_GIB} GiB data (half AES-CTR noise, half log-like text; 32 extents + 256 small writes; zeros between)$( ((GEN_SECONDS > 0)) && echo "; generated in ${GEN_SECONDS}s")"
echo "- Targets: tmpfs = $TMPFS_DIR, disk = $WORK/out ($(df -T "$WORK" | awk 'NR == 2 { print $2 }'))"
echo "- Times: median wall seconds of $RUNS run(s) (\`/usr/bin/time -f '%e %M'\`); RSS: maximum over the runs"
echo
echo "| input | size | format (dvcr) |"
echo "|---|---:|---|"
for name in $INPUTS; do
    in=$(input_path "$name")
    j=${JSON["$name|dvcr-file"]:-${JSON["$name|dvcr-stdin"]:-}}
    printf '| %s | %s MiB | %s |\n' "$name" "$(awk -v b="$(stat -c %s "$in")" 'BEGIN { printf "%.0f", b / 1048576 }')" \
        "$(json_field "$j" format | tr -d '"')"
done
echo
echo "| input | target | dvcr file s | dvcr stdin < file s | cat \| dvcr s | cat \| nothing s | dvcr file, flushes off s | write floor s | qemu default s | qemu -m8 -W s | qemu -m8 -W + fsync s | qemu-default/dvcr | qemu-m8W/dvcr | qemu-m8W+fsync/dvcr | dvcr peak RSS MiB | qemu peak RSS MiB |"
echo "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
GOALS=()
GOALS_FAILED=0
GOALS_OUT_OF_REACH=0
for name in $INPUTS; do
    for target in $TARGETS; do
        k="$name|$target"
        df=${WALL["$k|dvcr-file"]:-}
        ds=${WALL["$k|dvcr-stdin"]:-}
        dp=${WALL["$k|dvcr-pipe"]:-}
        pf=${WALL["$k|pipe-floor"]:-}
        dn=${WALL["$k|dvcr-noflush"]:-}
        wf=${WALL["$k|write-floor"]:-}
        qd=${WALL["$k|qemu-default"]:-}
        qw=${WALL["$k|qemu-m8W"]:-}
        qf=${WALL["$k|qemu-m8W-fsync"]:-}
        drss=$(max_kib "${RSS["$k|dvcr-file"]:-}" "$(max_kib "${RSS["$k|dvcr-stdin"]:-}" "${RSS["$k|dvcr-pipe"]:-}")")
        qrss=$(max_kib "${RSS["$k|qemu-default"]:-}" "${RSS["$k|qemu-m8W"]:-}")
        printf '| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |\n' "$name" "$target" \
            "$(fmt_s "$df")" "$(fmt_s "$ds")" "$(fmt_s "$dp")" "$(fmt_s "$pf")" "$(fmt_opt "$dn")" "$(fmt_opt "$wf")" "$(fmt_s "$qd")" "$(fmt_s "$qw")" "$(fmt_s "$qf")" \
            "$(ratio "$qd" "$df")" "$(ratio "$qw" "$df")" "$(ratio "$qf" "$df")" "$(fmt_mib "$drss")" "$(fmt_mib "$qrss")"
        [[ $name == qcow2-zlib ]] && check ">= 1.5x faster than qemu-img default ($(ratio "$qd" "$df"))" "qd >= 1.5 * df"
        noflush=""
        [[ -n $dn ]] && noflush="; dvcr with its flushes off: $(fmt_s "$dn") s, $(ratio "$qw" "$dn")"
        # On the disk, qemu-img's default never fsyncs and dvcr must: when writing the data
        # durably, and nothing else, takes longer than qemu-img's whole run, no durable
        # converter can match that run here.
        # (No write floor, as on tmpfs: wf is 0 and nothing is out of reach.)
        floor="writing and fsyncing the $WRITE_MIB MiB of data alone takes $(fmt_opt "$wf") s"
        check "at least as fast as qemu-img -m 8 -W ($(ratio "$qw" "$df")$noflush)" "qw >= df" \
            "wf <= qw" "$floor, longer than qemu-img's unflushed $(fmt_s "$qw") s"
        [[ $target == disk ]] && qw=$qf && check "at least as fast as qemu-img -m 8 -W with the same fsync ($(ratio "$qf" "$df"))" "qw >= df" \
            "wf <= qw" "$floor, longer than qemu-img + fsync's $(fmt_s "$qf") s"
        # The same speed from standard input as from the file, within 10% (machine noise).
        check "as fast from standard input (redirected) as from the file ($(ratio "$df" "$ds"))" "ds <= 1.1 * df"
        # A pipe carries every byte of the file, holes included: when \`cat\` alone takes
        # longer than the goal allows, no reader of the pipe can meet it.
        check "as fast from a pipe as from the file ($(ratio "$df" "$dp"); \`cat\` alone through the pipe: $(fmt_s "$pf") s)" "dp <= 1.1 * df" \
            "pf <= 1.1 * df" "\`cat\` alone takes $(fmt_s "$pf") s to put the file through the pipe, more than 1.1 x $(fmt_s "$df") s"
        check "dvcr peak RSS < 64 MiB ($(fmt_mib "$drss") MiB)" "rss > 0 && rss < 65536"
    done
done
echo
echo "Ratios are qemu-img time / dvcr (from file) time: above 1.00x means dvcr is faster."
echo "\"cat | nothing\" is \`cat IN\` into a reader that only empties the pipe (1 MiB, as dvcr sets it): no"
echo "reader of that pipe can finish sooner. \`cat\` has to produce every byte of the file, holes included,"
echo "where a read of the file itself skips them."
echo "\"dvcr file, flushes off\" (disk target) is the same conversion under \`eatmydata\`, which turns dvcr's"
echo "fsync and writeback calls into no-ops: what dvcr would take if it owed no durability, as qemu-img's"
echo "default cache mode does not. It is shown to tell the cost of the fsync apart, never used."
echo "\"write floor\" (disk target) is \`dd\` writing the image's $WRITE_MIB MiB of data from memory onto the"
echo "disk and fsyncing it, and nothing else: no converter that must make its output durable before"
echo "it reports success can finish sooner."
echo
echo "## Goals"
echo
printf '%s\n' "${GOALS[@]}"
echo
echo "$((${#GOALS[@]} - GOALS_FAILED)) of ${#GOALS[@]} goals met; of the $GOALS_FAILED missed, $GOALS_OUT_OF_REACH out of reach on this machine (a floor measured in this run is slower than the goal allows)."
echo
echo "## Checks"
echo
if ((${#MISMATCHES[@]} > 0)); then
    printf -- '- **MISMATCH** %s\n' "${MISMATCHES[@]}"
else
    echo "- dvcr outputs (file and stdin) identical to qemu-img's (\`qemu-img compare -f raw -F raw\`) for every input that converted"
fi
if ((${#FAILURES[@]} > 0)); then
    printf -- '- **FAILED** %s\n' "${FAILURES[@]}"
fi
echo
echo "## dvcr --json (last run)"
echo
echo '```'
for name in $INPUTS; do
    for variant in dvcr-file dvcr-stdin dvcr-pipe; do
        [[ -n ${JSON["$name|$variant"]:-} ]] && printf '%-12s %-10s %s\n' "$name" "$variant" "${JSON["$name|$variant"]}"
    done
done
echo '```'
echo
echo "## All runs"
echo
echo "| input | target | variant | run | wall s | max RSS MiB |"
echo "|---|---|---|---:|---:|---:|"
printf '%s\n' "${RAW_LOG[@]}"
echo
echo "Total benchmark time: $((SECONDS - START_SECONDS)) s."

if ((${#MISMATCHES[@]} > 0)); then
    die "dvcr output differs from qemu-img's: ${MISMATCHES[*]}"
fi
if ((${#FAILURES[@]} > 0)); then
    log "some conversions failed (see the table)"
    exit 2
fi
log "done in $((SECONDS - START_SECONDS)) s; goals missed: $GOALS_FAILED ($GOALS_OUT_OF_REACH of them out of reach on this machine)"
