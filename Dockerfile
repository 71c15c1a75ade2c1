# Nexus images, from the repository root:
#
#   docker build -t ghcr.io/nexus-graph/nexus:TAG .                                   # `nexus` (the last stage, the default)
#   docker build --target panel-runtime -t ghcr.io/nexus-graph/panel-runtime:TAG .   # where user code runs
#   docker build --target panel-host -t nexus-panel-host:dev .                        # docker-compose's panel manager
#
# `nexus` holds one static binary and nothing else: every role, the sidecar,
# the watchdog and `seed-volume` (NEXUS_KUBE_IMAGE). `panel-runtime` is the
# image user code runs in (NEXUS_KUBE_PANEL_IMAGE). `panel-host` exists for
# the local driver only: see deploy/docker-compose.yml.
#
# Plain Dockerfile syntax (no BuildKit-only `RUN --mount`), so that Debian's
# docker-compose 1.29, which builds with the classic builder, can build it.
# The classic builder also builds every stage before the target; BuildKit
# builds only those the target needs.

# ---------------------------------------------------------------------------
# build: a static x86_64/aarch64 musl binary.
#
# Why Alpine and not rust:1-bookworm with musl-tools: rdkafka builds
# librdkafka from source with its own `configure`, which requires a C++
# compiler (`mkl_require cxx`) and whose `make libs` also builds the C++
# library. Debian's musl-tools ships a musl C wrapper (musl-gcc) only, so
# on bookworm the C++ half would be compiled against glibc beside a musl C
# half. On Alpine the whole toolchain (gcc, g++, libc) is musl, and the
# result links statically; the check below refuses a binary that is not.
# Every other native dependency is C built by the `cc` crate (ring, zlib)
# or pure Rust (rustls, flate2's default backend), so static musl works.
#
# A consideration for the Rust side, not a build problem: musl's malloc is
# slower than glibc's under many threads; a global allocator (mimalloc,
# jemalloc) in nexus-bin would remove that difference.
FROM rust:1-alpine AS build

# bash: librdkafka's configure is a bash script. build-base: gcc, g++,
# make, musl-dev, binutils (readelf below). nodejs and npm: the Studio's
# code editor is bundled by nexus-actors/build.rs with esbuild from npm.
# perl: build scripts that shell out to it (cheap insurance).
RUN apk add --no-cache bash build-base ca-certificates linux-headers nodejs npm perl

WORKDIR /src

# CI=true makes nexus-actors/build.rs fail instead of embedding an editor
# that only says it is missing. LIBZ_SYS_STATIC=1 builds zlib from source
# and links it statically (librdkafka's `libz` feature).
ENV CI=true \
    LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never \
    CARGO_NET_RETRY=5

# The editor's packages first, pinned by package-lock.json: this layer is
# reused while only Rust code changes.
COPY nexus-actors/ui-editor/package.json nexus-actors/ui-editor/package-lock.json nexus-actors/ui-editor/
RUN npm ci --prefix nexus-actors/ui-editor --no-audit --no-fund --loglevel=error

COPY . .

# --target the host triple, so that +crt-static applies to the binary and
# not to proc-macros (which cannot be static). The readelf check fails the
# build if the result still needs a shared library.
RUN host="$(rustc -vV | sed -n 's/^host: //p')" \
 && RUSTFLAGS="-C target-feature=+crt-static" \
    cargo build --release --locked -p nexus-bin --target "$host" \
 && install -m 0755 "target/$host/release/nexus" /nexus \
 && if readelf -d /nexus | grep -q NEEDED; then echo "nexus is not static:"; readelf -d /nexus; exit 1; fi \
 && /nexus --version

# What the scratch image needs besides the binary: a data directory and a
# key directory for the runtime user (owned by it through COPY --chown
# below; docker gives a new named volume its mount point's owner), and a
# /tmp.
RUN mkdir -p /rootfs/data /rootfs/keys /rootfs/tmp \
 && chmod 0700 /rootfs/data /rootfs/keys \
 && chmod 1777 /rootfs/tmp

# ---------------------------------------------------------------------------
# panel-runtime: where the user's code runs (the `panel` container of
# deploy/k8s/templates/*.yaml). Their launcher is `python3 -c ...` reading
# nexus-panel.json, which may name `node`; the App's init container runs
# `cp -a` from this image too. Standard library only: the panel templates
# need nothing else, and user code brings what it installs into /home.
FROM debian:bookworm-slim AS panel-runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates nodejs python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 panel \
 && useradd --uid 10001 --gid 10001 --home-dir /home --no-create-home --shell /usr/sbin/nologin panel

# The Pods run with a read-only root: Python must not try to write .pyc
# files next to the code it imports from the image.
ENV HOME=/home \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home
USER 10001:10001

# ---------------------------------------------------------------------------
# panel-host: docker-compose's panel manager. The local driver runs panels
# as processes beside it and needs what `scripts/lib.sh ensure_sandbox`
# installs on a developer machine (network namespaces with iproute2 and
# nftables, gVisor or bubblewrap, ext4 volumes), python3 and node for the
# user code, and root. Never used in Kubernetes, where panels are Pods.
# It also gives the compose file's one-shot `keys` service a shell.
FROM panel-runtime AS panel-host

USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap e2fsprogs iproute2 mount nftables runsc util-linux \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /nexus /usr/local/bin/nexus
WORKDIR /
ENTRYPOINT ["/usr/local/bin/nexus"]

# ---------------------------------------------------------------------------
# nexus: the binary on nothing. No shell, so no exec probes or CMD-SHELL
# health checks: the HTTP endpoints (/healthz, /readyz) are the checks.
# Last, so that a plain `docker build .` makes this image.
FROM scratch AS nexus

COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build --chown=10001:10001 /rootfs/data /data
COPY --from=build --chown=10001:10001 /rootfs/keys /keys
COPY --from=build /rootfs/tmp /tmp
COPY --from=build /nexus /nexus

# In a container loopback reaches nobody: listen on every address. The
# deployment files set these too, so they read the same without the image.
ENV NEXUS_HTTP=0.0.0.0:7070 \
    NEXUS_GATEWAY=0.0.0.0:7071 \
    NEXUS_DATA_DIR=/data \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
EXPOSE 7070 7071
USER 10001:10001
ENTRYPOINT ["/nexus"]
