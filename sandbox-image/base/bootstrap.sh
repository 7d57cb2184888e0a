#!/usr/bin/env bash
# Make sure the local base image exists (default tci-base:bookworm).
#
# Order of preference: an image already present, `docker pull
# debian:bookworm-slim`, and finally (for hosts without any registry) a
# minbase bookworm root filesystem built by debootstrap from Debian's package
# archive and imported with `docker import`.
set -euo pipefail

base_image="${BASE_IMAGE:-tci-base:bookworm}"
mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
security_mirror="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"
suite=bookworm

log() { echo "bootstrap: $*"; }

if docker image inspect "$base_image" >/dev/null 2>&1; then
    log "$base_image already exists, nothing to do"
    exit 0
fi

log "trying docker pull debian:$suite-slim"
if docker pull "debian:$suite-slim"; then
    docker tag "debian:$suite-slim" "$base_image"
    log "tagged debian:$suite-slim as $base_image"
    exit 0
fi

log "pull failed (no registry?); building $base_image with debootstrap from $mirror"
# debootstrap chroots and creates device nodes: it needs root. Where we can
# become root without a password, run the rest as root so `make up` /
# `make test` stay the whole set-up; otherwise say what to run.
if [[ $(id -u) -ne 0 ]]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        log "re-running as root with sudo"
        exec sudo -n --preserve-env=BASE_IMAGE,DEBIAN_MIRROR,DEBIAN_SECURITY_MIRROR,TMPDIR "$0" "$@"
    fi
    echo "bootstrap: debootstrap needs root (it chroots and creates device nodes); re-run as root" >&2
    exit 1
fi
if ! command -v debootstrap >/dev/null 2>&1; then
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "bootstrap: debootstrap is not installed and there is no apt-get to install it with;" >&2
        echo "    install debootstrap with your package manager, then re-run." >&2
        exit 1
    fi
    log "installing debootstrap with apt-get"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/tci-rootfs.XXXXXX")"
trap 'rm -rf --one-file-system "$rootfs"' EXIT

log "debootstrap --variant=minbase $suite (takes a minute or two)"
debootstrap --variant=minbase "$suite" "$rootfs" "$mirror"

log "configuring apt and trimming the root filesystem"
# Same sources as the official image: release, updates and security.
cat > "$rootfs/etc/apt/sources.list" <<SOURCES
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
SOURCES
# Like debian:*-slim: packages installed later skip docs, man pages and
# translations, which nobody reads inside a sandbox.
cat > "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
DPKG
# Keep images built on top of this one free of apt caches.
cat > "$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* \
       "$rootfs"/var/log/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* \
       "$rootfs"/tmp/* "$rootfs"/dev/*
find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
# A container gets its own hostname and resolver from the engine.
rm -f "$rootfs/etc/hostname" "$rootfs/etc/resolv.conf"

log "importing into docker as $base_image"
tar --numeric-owner -C "$rootfs" -c . \
    | docker import --change 'CMD ["bash"]' \
        --message "debootstrap --variant=minbase $suite $mirror" - "$base_image"
log "done: $(docker image inspect -f '{{.Size}}' "$base_image" | awk '{printf "%.0f MB", $1/1e6}')"
