# Pinned Debian packages: a lock file of "name version sha256" lines (sha256 of the .deb),
# fetched with apt-get download into a cache directory. Source after tools/lib/common.sh.
# shellcheck shell=bash

# fetch_pinned_debs LOCK CACHE: every package of LOCK as a .deb in CACHE whose sha256 is
# the pinned one (cached files that match are kept, others downloaded), other .debs in
# CACHE removed (older pins). Sets the arrays names, versions and debs (paths), in the
# lock's order. A pin the archive no longer has is an error naming the lock's updater.
fetch_pinned_debs() {
    local lock=$1 cache=$2 name ver sum extra deb i got dl missing d
    local -a sums=() need=()
    local -A keep=()
    names=() versions=() debs=()
    [[ -f $lock ]] || die "$lock is missing"
    while read -r name ver sum extra; do
        [[ -z $name || $name == \#* ]] && continue
        [[ -n $ver && $sum =~ ^[0-9a-f]{64}$ && -z $extra ]] \
            || die "bad line in ${lock#"$REPO"/}: '$name $ver $sum $extra'"
        deb=$cache/${name}_${ver/:/%3a}.deb
        if [[ -f $deb && $(sha256 "$deb") != "$sum" ]]; then
            log "cached $deb does not match the pinned sha256; removing it"
            rm -f "$deb"
        fi
        [[ -f $deb ]] || need+=("$name=$ver")
        names+=("$name") versions+=("$ver") sums+=("$sum") debs+=("$deb")
    done <"$lock"
    ((${#names[@]})) || die "${lock#"$REPO"/} lists no package"
    mkdir -p "$cache"
    if ((${#need[@]})); then
        # Which pins the archive no longer has (security updates drop old versions).
        _pins_gone() {
            local have s
            have=$(apt-cache madison "${need[@]%%=*}" 2>/dev/null | awk -F' *[|] *' '{sub(/^ +/, "", $1); print $1 "=" $2}')
            for s in "${need[@]}"; do grep -qxF "$s" <<<"$have" || echo "$s"; done
        }
        missing=$(_pins_gone)
        if [[ -n $missing ]]; then apt_update_once; missing=$(_pins_gone); fi
        [[ -z $missing ]] || die "pinned package(s) no longer in the Debian archive: ${missing//$'\n'/ }; move the pins in ${lock#"$REPO"/} (its header names the tool) and commit it"
        log "downloading ${#need[@]} packages"
        dl=$(mktemp -d "$cache/.download.XXXXXX")
        ( cd "$dl" && apt-get -q -o APT::Sandbox::User=root download "${need[@]}" >/dev/null ) \
            || { rm -rf "$dl"; die "apt-get download failed for: ${need[*]}"; }
        for i in "${!names[@]}"; do
            [[ -f ${debs[i]} ]] && continue
            got=("$dl/${names[i]}_${versions[i]/:/%3a}_"*.deb)
            [[ -f ${got[0]} ]] || { rm -rf "$dl"; die "apt-get download gave no .deb for ${names[i]}=${versions[i]}"; }
            sum=$(sha256 "${got[0]}")
            [[ $sum == "${sums[i]}" ]] \
                || { rm -rf "$dl"; die "sha256 mismatch for ${names[i]}=${versions[i]}: got $sum, pinned ${sums[i]} (file removed)"; }
            mv -f "${got[0]}" "${debs[i]}"
        done
        rm -rf "$dl"
    fi
    for d in "${debs[@]}"; do keep[$d]=1; done
    for d in "$cache"/*.deb; do [[ ! -f $d || -n ${keep[$d]:-} ]] || rm -f "$d"; done
}
