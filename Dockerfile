# The dvcr image: `dvcr` (registry and tools), `dvcr-importer` (the import Job) and
# `dvcr-uploader` (the upload Pod) in one small runtime image that runs as uid 107.
#
#   docker build -t dvcr:dev .
#   docker run --rm -p 5000:5000 -v dvcr-data:/var/lib/dvcr dvcr:dev
#
# See deploy/README.md for the Kubernetes manifests that run it.

ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

# --- builder -------------------------------------------------------------------------------
FROM ${RUST_IMAGE} AS builder
WORKDIR /src

# Dependencies first: this layer is rebuilt only when a Cargo.toml or Cargo.lock changes.
# Every workspace member gets an empty stand-in source so cargo can build the whole
# dependency graph without our code.
COPY Cargo.toml Cargo.lock ./
COPY formats/Cargo.toml formats/Cargo.toml
COPY importer/Cargo.toml importer/Cargo.toml
COPY uploader/Cargo.toml uploader/Cargo.toml
COPY dvcr/Cargo.toml dvcr/Cargo.toml
COPY tests/Cargo.toml tests/Cargo.toml
RUN set -eux; \
    for crate in formats importer uploader tests; do \
        mkdir -p "$crate/src"; : > "$crate/src/lib.rs"; \
    done; \
    mkdir -p dvcr/src/bin; \
    for bin in dvcr/src/main.rs dvcr/src/bin/dvcr-importer.rs dvcr/src/bin/dvcr-uploader.rs; do \
        echo 'fn main() {}' > "$bin"; \
    done; \
    cargo build --release --locked -p dvcr --bins; \
    rm -rf formats/src importer/src uploader/src dvcr/src tests/src

# Our code. COPY keeps the build context's file times, which can be older than the
# stand-ins built above: touch every source so cargo rebuilds our crates. The binaries lose
# their debug info (155 MB -> 31 MB for the three) and keep their symbols for backtraces.
COPY formats formats
COPY importer importer
COPY uploader uploader
COPY dvcr dvcr
COPY tests tests
RUN set -eux; \
    find formats importer uploader dvcr tests -type f -exec touch {} +; \
    cargo build --release --locked -p dvcr --bins; \
    mkdir -p /out; \
    objcopy --strip-debug target/release/dvcr /out/dvcr; \
    objcopy --strip-debug target/release/dvcr-importer /out/dvcr-importer; \
    objcopy --strip-debug target/release/dvcr-uploader /out/dvcr-uploader

# --- runtime -------------------------------------------------------------------------------
FROM ${RUNTIME_IMAGE}

ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="dvcr" \
      org.opencontainers.image.description="DVCR: a registry for virtual machine disk images, with its importer and uploader" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://example.invalid/dvcr" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"

# ca-certificates: the importer fetches HTTPS sources and registries. Nothing else is
# needed: the disk formats are decoded natively (no qemu-img at run time), and the
# binaries link only glibc and libgcc_s, which the base image has.
RUN set -eux; \
    apt-get update; \
    apt-get install -y --no-install-recommends ca-certificates; \
    apt-get clean; rm -rf /var/lib/apt/lists/*; \
    groupadd --system --gid 107 dvcr; \
    useradd --system --uid 107 --gid 107 --home-dir /var/lib/dvcr --no-create-home \
        --shell /usr/sbin/nologin dvcr; \
    install -d -o 107 -g 107 -m 0750 /var/lib/dvcr

COPY --from=builder /out/dvcr /out/dvcr-importer /out/dvcr-uploader /usr/local/bin/

# 107:107 is also the owner of the disk file inside every artifact (importer/src/artifact.rs):
# the uid KubeVirt runs QEMU as.
USER 107:107
WORKDIR /var/lib/dvcr
EXPOSE 5000
ENTRYPOINT ["dvcr"]
CMD ["serve", "--root", "/var/lib/dvcr", "--listen", "0.0.0.0:5000"]
