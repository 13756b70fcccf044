# Shared helpers for the shell tools. Source after setting TOOL=<name>.
# shellcheck shell=bash

umask 022
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)
IMAGES=$REPO/images

log() { printf '%s: %s\n' "$TOOL" "$*" >&2; }
die() { printf '%s: error: %s\n' "$TOOL" "$*" >&2; exit 1; }

trap 'die "unexpected failure (status $?) at line $LINENO: $BASH_COMMAND"' ERR

sha256() { sha256sum "$1" | cut -d' ' -f1; }

# shquote WORD: WORD as one single-quoted shell word (for generated sh scripts).
shquote() { local q="'\\''"; printf "'%s'" "${1//\'/$q}"; }

# apt_quiet ARGS...: apt-get ARGS, its output shown only when it fails.
apt_quiet() {
    local out
    out=$(DEBIAN_FRONTEND=noninteractive apt-get -q "$@" 2>&1) \
        || { printf '%s\n' "$out" >&2; die "apt-get $* failed"; }
}

# Run `apt-get update` at most once per process.
_apt_updated=
apt_update_once() {
    [[ -n $_apt_updated ]] && return 0
    log "apt-get update"
    apt_quiet update
    _apt_updated=1
}

# ensure_pkgs PKG...: install the Debian packages that are not installed yet.
ensure_pkgs() {
    local p missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q ' installed$' || missing+=("$p")
    done
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing packages (${missing[*]}); run as root or install them"
    apt_update_once
    log "installing ${missing[*]}"
    apt_quiet -y install --no-install-recommends "${missing[@]}"
}

# is_elf FILE: true when FILE starts with the ELF magic.
is_elf() { [[ -f $1 && $(head -c 4 "$1" | od -An -c | tr -d ' ') == '177ELF' ]]; }

# Write reproducible newc cpio of directory $1 to file $2 (atomically).
make_cpio() {
    local dir=$1 out=$2
    ( cd "$dir" && find . -mindepth 1 -exec touch -h -d @0 {} + \
        && find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc --reproducible -R 0:0 ) >"$out.tmp.$$" \
        || { rm -f "$out.tmp.$$"; die "cpio of $dir failed"; }
    mv -f "$out.tmp.$$" "$out"
}

# install_busybox ROOT: static busybox at ROOT/bin/busybox, applet symlinks,
# the usual top-level directories and a minimal /etc.
install_busybox() {
    local r=$1 bb=/bin/busybox applet
    ! ldd "$bb" >/dev/null 2>&1 || die "$bb is not static (is busybox-static installed?)"
    mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root}
    cp "$bb" "$r/bin/busybox"
    for applet in $("$bb" --list-full); do
        [[ -e $r/$applet ]] || ln -s /bin/busybox "$r/$applet"
    done
    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$r/etc/passwd"
    printf 'root:x:0:\n' >"$r/etc/group"
    printf '127.0.0.1 localhost\n::1 localhost\n' >"$r/etc/hosts"
}
