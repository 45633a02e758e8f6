#!/usr/bin/env bash
# Benchmark: DVCR on S3-compatible object storage (`s3s-fs` on WORK's disk, restarted empty
# for every run), against the S3 server itself (`s3-raw`: curl's signed PUT and GET of the
# same bytes, one object, no registry: the storage's own single-stream speed), and DVCR and
# the CNCF Distribution registry (Debian `docker-registry`) on the filesystem of the same
# disk, interleaved in the same run.
# Distribution's own `s3` driver cannot run against s3s-fs: it lists multipart uploads
# (ListMultipartUploads), which s3s-fs answers with 501 Not Implemented; DVCR keeps the
# multipart upload id in its session state and never lists them. REGISTRIES may add
# `distribution-s3` for an S3 server that has it.
#
# Phases, each RUNS times (median reported):
#   push     one blob of SIZE_MIB incompressible bytes: POST, then PUT <Location>?digest= -T
#   chunked  the same blob in CHUNK_MIB ranged PATCHes (Content-Range), then PUT ?digest=
#   pull     GET the blob to /dev/null
#   conc     CONC monolithic pushes of distinct CONC_MIB blobs at once
# and the registry's peak RSS over the whole run (/usr/bin/time -v around the server).
#
#   bench/s3.sh | tee bench/results-s3.md
#   SIZE_MIB=256 RUNS=1 CONC=4 bench/s3.sh          # quick run
#
# Environment: DVCR (binary; default target/release/dvcr, built), SIZE_MIB (1024),
# CHUNK_MIB (16), RUNS (3), CONC (8), CONC_MIB (64), WORK (bench/work), S3S_FS (s3s-fs).
# Needs curl, openssl, sha256sum, /usr/bin/time, docker-registry and s3s-fs
# (cargo install --locked s3s-fs --version 0.14.1 --features binary).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE_MIB=${SIZE_MIB:-1024}
CHUNK_MIB=${CHUNK_MIB:-16}
RUNS=${RUNS:-3}
CONC=${CONC:-8}
CONC_MIB=${CONC_MIB:-64}
WORK=${WORK:-$ROOT/bench/work}
S3S_FS=${S3S_FS:-s3s-fs}
readonly AK=bench-access SK=bench-secret-key-0123456789 REPO=vi/ns/img

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { printf 'FATAL: %s\n' "$*" >&2; exit 1; }
for t in curl openssl sha256sum docker-registry "$S3S_FS" /usr/bin/time split bc python3; do
    command -v "$t" >/dev/null || die "missing tool: $t"
done

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
SCRATCH=$(mktemp -d "$WORK/s3-run.XXXXXX")
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf -- "$SCRATCH"
}
trap cleanup EXIT

if [[ -z ${DVCR:-} ]]; then
    (cd "$ROOT" && cargo build --release -p dvcr >&2)
    DVCR=$ROOT/target/release/dvcr
fi
cp -- "$DVCR" "$SCRATCH/dvcr"
DVCR=$SCRATCH/dvcr

random_bytes() {
    head -c "$1" /dev/zero |
        openssl enc -aes-128-ctr -K 0123456789abcdef0123456789abcdef -iv "$(printf '%032x' "$2")"
}
BLOB=$SCRATCH/blob
random_bytes $((SIZE_MIB << 20)) 1 >"$BLOB"
BLOB_DIGEST=sha256:$(sha256sum "$BLOB" | cut -d' ' -f1)
mkdir -p "$SCRATCH/chunks" "$SCRATCH/conc"
split -b $((CHUNK_MIB << 20)) -d -a 5 "$BLOB" "$SCRATCH/chunks/c"
for i in $(seq 1 "$CONC"); do random_bytes $((CONC_MIB << 20)) $((100 + i)) >"$SCRATCH/conc/$i"; done

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

start_s3() {
    rm -rf "$SCRATCH/s3"
    mkdir -p "$SCRATCH/s3/bucket"
    S3_PORT=$(free_port)
    "$S3S_FS" --host 127.0.0.1 --port "$S3_PORT" --access-key "$AK" --secret-key "$SK" \
        "$SCRATCH/s3" >/dev/null 2>&1 &
    S3_PID=$!
    PIDS+=("$S3_PID")
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$S3_PORT/" && return; sleep 0.1; done
    die "s3s-fs did not start"
}

start_registry() { # $1 = dvcr-s3|s3-raw|dvcr-fs|distribution-fs|distribution-s3
    REG_PORT=$(free_port)
    REG_TIME=$SCRATCH/time-$1
    CURRENT=$1
    rm -rf "$SCRATCH/fs-root"
    if [[ $1 == s3-raw ]]; then
        # No registry: curl talks to the S3 server itself (the storage's own speed).
        REG_PID=""
        return
    fi
    if [[ $1 == dvcr-fs ]]; then
        /usr/bin/time -v -o "$REG_TIME" "$DVCR" serve --listen "127.0.0.1:$REG_PORT" \
            --root "$SCRATCH/fs-root" --no-uploads >/dev/null 2>"$SCRATCH/reg.log" &
    elif [[ $1 == distribution-fs ]]; then
        printf 'version: 0.1\nlog: {level: error}\nstorage:\n  filesystem: {rootdirectory: %s}\n  delete: {enabled: true}\n  maintenance: {uploadpurging: {enabled: false}}\nhttp: {addr: "127.0.0.1:%s"}\n' \
            "$SCRATCH/fs-root" "$REG_PORT" >"$SCRATCH/dist.yml"
        /usr/bin/time -v -o "$REG_TIME" docker-registry serve "$SCRATCH/dist.yml" >/dev/null 2>"$SCRATCH/reg.log" &
    elif [[ $1 == dvcr-s3 ]]; then
        AWS_ACCESS_KEY_ID=$AK AWS_SECRET_ACCESS_KEY=$SK /usr/bin/time -v -o "$REG_TIME" \
            "$DVCR" serve --listen "127.0.0.1:$REG_PORT" --root "$SCRATCH/dvcr-root" --no-uploads \
            --s3-bucket bucket --s3-endpoint "http://127.0.0.1:$S3_PORT" >/dev/null 2>"$SCRATCH/reg.log" &
    else
        cat >"$SCRATCH/dist.yml" <<EOF
version: 0.1
log: {level: error}
storage:
  s3:
    accesskey: $AK
    secretkey: $SK
    region: us-east-1
    regionendpoint: http://127.0.0.1:$S3_PORT
    bucket: bucket
    secure: false
    v4auth: true
    chunksize: $((CHUNK_MIB << 20))
  delete: {enabled: true}
  maintenance: {uploadpurging: {enabled: false}}
http: {addr: "127.0.0.1:$REG_PORT"}
EOF
        # aws-sdk-go v1 cannot combine AWS_CA_BUNDLE with its own transport (plain HTTP here).
        env -u AWS_CA_BUNDLE /usr/bin/time -v -o "$REG_TIME" docker-registry serve "$SCRATCH/dist.yml" >/dev/null 2>"$SCRATCH/reg.log" &
    fi
    REG_PID=$!
    PIDS+=("$REG_PID")
    for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$REG_PORT/v2/" && return; sleep 0.1; done
    cat "$SCRATCH/reg.log" >&2
    die "$1 did not start"
}

stop_registry() {
    # /usr/bin/time's child is the registry: TERM it, then wait for time to write its report.
    if [[ -n $REG_PID ]]; then
        pkill -TERM -P "$REG_PID" 2>/dev/null || true
        wait "$REG_PID" 2>/dev/null || true
    fi
    kill -TERM "$S3_PID" 2>/dev/null || true
    wait "$S3_PID" 2>/dev/null || true
}

base() { echo "http://127.0.0.1:$REG_PORT"; }
location() { # POST; prints the absolute upload URL
    local loc
    loc=$(curl -sS -f -X POST -D - -o /dev/null "$(base)/v2/$1/blobs/uploads/" | tr -d '\r' |
        awk 'tolower($1)=="location:"{print $2}')
    [[ $loc == http* ]] || loc="$(base)$loc"
    echo "$loc"
}
with_digest() { if [[ $1 == *\?* ]]; then echo "$1&digest=$2"; else echo "$1?digest=$2"; fi; }

# Signed requests straight to the S3 server (s3-raw).
s3_curl() { curl -sS -f --aws-sigv4 "aws:amz:us-east-1:s3" --user "$AK:$SK" -H "x-amz-content-sha256: UNSIGNED-PAYLOAD" "$@"; }
s3_url() { echo "http://127.0.0.1:$S3_PORT/bucket/$1"; }

phase_push() {
    if [[ $CURRENT == s3-raw ]]; then s3_curl -T "$BLOB" "$(s3_url raw)" -o /dev/null; return; fi
    local loc
    loc=$(location "$REPO")
    curl -sS -f -X PUT -H 'Content-Type: application/octet-stream' -T "$BLOB" \
        "$(with_digest "$loc" "$BLOB_DIGEST")" -o /dev/null
}
phase_chunked() {
    [[ $CURRENT == s3-raw ]] && return 0 # not an S3 operation
    local loc start=0 f len
    loc=$(location "$REPO-chunked")
    for f in "$SCRATCH"/chunks/c*; do
        len=$(stat -c %s "$f")
        loc=$(curl -sS -f -X PATCH -H 'Content-Type: application/octet-stream' \
            -H "Content-Range: $start-$((start + len - 1))" --data-binary @"$f" -D - -o /dev/null "$loc" |
            tr -d '\r' | awk 'tolower($1)=="location:"{print $2}')
        [[ $loc == http* ]] || loc="$(base)$loc"
        start=$((start + len))
    done
    curl -sS -f -X PUT "$(with_digest "$loc" "$BLOB_DIGEST")" -o /dev/null
}
phase_pull() {
    if [[ $CURRENT == s3-raw ]]; then s3_curl "$(s3_url raw)" -o /dev/null; return; fi
    curl -sS -f -L "$(base)/v2/$REPO/blobs/$BLOB_DIGEST" -o /dev/null
}
phase_conc() {
    local i pids=() fail=0
    for i in $(seq 1 "$CONC"); do
        (
            if [[ $CURRENT == s3-raw ]]; then
                s3_curl -T "$SCRATCH/conc/$i" "$(s3_url "raw-$i")" -o /dev/null
                exit
            fi
            d=sha256:$(sha256sum "$SCRATCH/conc/$i" | cut -d' ' -f1)
            loc=$(location "$REPO-c$i")
            curl -sS -f -X PUT -T "$SCRATCH/conc/$i" "$(with_digest "$loc" "$d")" -o /dev/null
        ) &
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || fail=1; done
    return $fail
}

median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

REGISTRIES=${REGISTRIES:-"dvcr-s3 s3-raw dvcr-fs distribution-fs"}
declare -A T RSS
for reg in $REGISTRIES; do
    for phase in push chunked pull conc; do : >"$SCRATCH/t-$reg-$phase"; done
    : >"$SCRATCH/rss-$reg"
done
# Runs interleave the registries, so that a change of load hits them alike.
for run in $(seq 1 "$RUNS"); do
    for reg in $REGISTRIES; do
        log "$reg run $run/$RUNS"
        start_s3
        start_registry "$reg"
        for phase in push chunked pull conc; do
            t0=$(date +%s.%N)
            "phase_$phase" || die "$reg $phase failed (log: $(tail -3 "$SCRATCH/reg.log"))"
            t1=$(date +%s.%N)
            echo "$t1 - $t0" | bc -l >>"$SCRATCH/t-$reg-$phase"
        done
        stop_registry
        [[ $reg == s3-raw ]] && continue
        awk -F: '/Maximum resident set size/ {print $2/1024}' "$REG_TIME" >>"$SCRATCH/rss-$reg"
    done
done
for reg in $REGISTRIES; do
    for phase in push chunked pull conc; do T[$reg-$phase]=$(median <"$SCRATCH/t-$reg-$phase"); done
    RSS[$reg]=$(median <"$SCRATCH/rss-$reg")
    [[ $reg == s3-raw ]] && T[$reg-chunked]=""
    [[ $reg == s3-raw ]] && RSS[$reg]=
done

mb() { echo "scale=0; $1 / $2" | bc -l; }
echo "# DVCR on S3 (s3s-fs) against DVCR and Distribution on the filesystem"
echo
echo "Command: \`SIZE_MIB=$SIZE_MIB CHUNK_MIB=$CHUNK_MIB RUNS=$RUNS CONC=$CONC CONC_MIB=$CONC_MIB bench/s3.sh\`; $(nproc) CPUs; load at start $(cut -d' ' -f1-3 /proc/loadavg); medians of $RUNS runs; ratio = the other registry's time over the first's."
echo
first=${REGISTRIES%% *}
header="| phase | MiB |"
sep="|---|---:|"
for reg in $REGISTRIES; do header+=" $reg s | $reg MiB/s |"; sep+="---:|---:|"; done
for reg in $REGISTRIES; do [[ $reg == "$first" ]] || { header+=" $first vs $reg |"; sep+="---:|"; }; done
echo "$header"
echo "$sep"
for phase in push chunked pull conc; do
    mib=$SIZE_MIB
    [[ $phase == conc ]] && mib=$((CONC * CONC_MIB))
    row="| $phase | $mib |"
    for reg in $REGISTRIES; do
        if [[ -z ${T[$reg-$phase]} ]]; then row+=" - | - |"; continue; fi
        row+=" $(printf '%.2f' "${T[$reg-$phase]}") | $(mb "$mib" "${T[$reg-$phase]}") |"
    done
    for reg in $REGISTRIES; do
        [[ $reg == "$first" ]] && continue
        if [[ -z ${T[$reg-$phase]} ]]; then row+=" - |"; continue; fi
        row+=" $(printf '%.2fx' "$(echo "${T[$reg-$phase]} / ${T[$first-$phase]}" | bc -l)") |"
    done
    echo "$row"
done
echo
printf 'Peak RSS of the server over a run (/usr/bin/time -v, median):'
for reg in $REGISTRIES; do [[ -n ${RSS[$reg]} ]] && printf ' %s %.1f MiB;' "$reg" "${RSS[$reg]}"; done
echo
