# shellcheck shell=bash disable=SC2034 # MEMORY_NOTE is read by the scripts that source this
# Sourced by the benchmarks that write gigabytes into tmpfs (a registry root, a target).
#
# A virtual machine with virtio-balloon free page reporting hands its free memory back to
# the host; the first write into such a page then waits for the host to fault it in again.
# Measured on the 2-core VM these benchmarks ran on: writing 10 GiB into a tmpfs file took
# 0.5-0.65 s per GiB into memory the guest had used before, and 2.6-2.8 s per GiB into memory
# it had handed back. A benchmark whose "disk" is RAM would charge that hypervisor cost to
# whatever writes the bytes (the registry, the importer, qemu-img alike) and the figures
# would depend on how long the machine had been idle. So, as root, `back_memory` turns the
# reporting off for the run (page_reporting_order above the largest buddy order, so no free
# block qualifies), drops the page cache and touches the free memory once;
# `restore_memory` puts the setting back. Without root both do nothing and MEMORY_NOTE
# says so. BACK_MEMORY=0 skips it on purpose (to see the other figures).

REPORTING_PARAM=/sys/module/page_reporting/parameters/page_reporting_order
REPORTING_SAVED=""
MEMORY_NOTE="as the machine hands it (free page reporting left as it is)"

# back_memory DIR_ON_TMPFS: stop free page reporting and touch all free memory but 2 GiB
# once, through a file in DIR_ON_TMPFS (removed again).
back_memory() {
    local dir=$1 free_mib touch_mib started
    if [[ ${BACK_MEMORY:-1} != 1 ]]; then
        MEMORY_NOTE="as the machine hands it (BACK_MEMORY=0)"
        return 0
    fi
    if [[ ! -e $REPORTING_PARAM ]]; then
        MEMORY_NOTE="no free page reporting on this machine: memory used as it is"
        return 0
    fi
    if [[ ! -w $REPORTING_PARAM ]]; then
        MEMORY_NOTE="free page reporting on and not changeable without root: tmpfs writes may pay host page faults"
        return 0
    fi
    REPORTING_SAVED=$(cat "$REPORTING_PARAM")
    echo 11 >"$REPORTING_PARAM" # above MAX_PAGE_ORDER (10): no free block is ever reported
    # Free the page cache first (the benchmark reads its inputs in again), so that the touch
    # reaches nearly all of the memory the run may take.
    sync
    echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true
    free_mib=$(awk '/^MemFree:/ { print int($2 / 1024) }' /proc/meminfo)
    touch_mib=$((free_mib - 2048))
    started=$SECONDS
    if ((touch_mib > 0)); then
        head -c "${touch_mib}M" /dev/zero >"$dir/.touch-memory" || true
        rm -f -- "$dir/.touch-memory"
    fi
    MEMORY_NOTE="free page reporting off during the run (page_reporting_order $REPORTING_SAVED -> 11, restored after) and $((touch_mib > 0 ? touch_mib : 0)) MiB of free memory touched once before the runs ($((SECONDS - started)) s)"
}

restore_memory() {
    if [[ -n $REPORTING_SAVED ]]; then
        echo "$REPORTING_SAVED" >"$REPORTING_PARAM" 2>/dev/null || true
        REPORTING_SAVED=""
    fi
}
