#!/usr/bin/env bash
# Stages the runtime image's whole root filesystem from a built `tailsk8s` binary:
#   deploy/rootfs.sh TAILSK8S_BINARY OUT_DIR
# OUT_DIR/rootfs gets the binary, the tools the router runs (`ip` for routes and rules, `nft`
# for the pod masquerade rule) or an operator wants in the pod (`wg`), the shared libraries they
# link and the dynamic loader — nothing else: no shell, no package manager, no build tools.
# Both build paths use it: the Dockerfile's build stage (users, with registry images) and
# scripts/image (offline, on this machine), so the two images hold the same files.
set -euo pipefail
binary=${1:?usage: rootfs.sh TAILSK8S_BINARY OUT_DIR}
out=${2:?usage: rootfs.sh TAILSK8S_BINARY OUT_DIR}
root="$out/rootfs"
rm -rf "$root"
mkdir -p "$root/usr/bin" "$root/usr/sbin" "$root/etc" "$root/tmp" \
    "$root/var/run/wireguard" "$root/var/lib/tailsk8s" "$root/etc/tailsk8s"
chmod 1777 "$root/tmp"
chmod 0700 "$root/var/lib/tailsk8s"

tools=("$binary:/usr/bin/tailsk8s")
for tool in wg ip nft; do
    path=$(command -v "$tool") || { echo "rootfs.sh: $tool not found (install wireguard-tools, iproute2, nftables)" >&2; exit 1; }
    case "$tool" in wg) tools+=("$path:/usr/bin/$tool") ;; *) tools+=("$path:/usr/sbin/$tool") ;; esac
done

copy_with_libraries() {
    local from=$1 to=$2
    install -D -m 0755 "$from" "$root$to"
    # `ldd` lists "name => /path (addr)" for libraries and "/path (addr)" for the loader.
    ldd "$from" | awk '/=> \// { print $3 } /^\t\// { print $1 }' | while read -r lib; do
        real=$(readlink -f "$lib")
        [[ -e "$root$lib" ]] || install -D -m "$(stat -c %a "$real")" "$real" "$root$lib"
    done
}
for pair in "${tools[@]}"; do
    copy_with_libraries "${pair%%:*}" "${pair#*:}"
done
# The loader is found through /lib64 on x86-64; Debian also keeps libraries under /usr/lib.
[[ -e "$root/lib64/ld-linux-x86-64.so.2" ]] || { echo "rootfs.sh: no dynamic loader staged" >&2; exit 1; }

# The few files glibc and iproute2 read: user and group names, protocol names, routing tables.
printf 'root:x:0:0:root:/root:/usr/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
[[ -f /etc/protocols ]] && cp /etc/protocols "$root/etc/protocols"
[[ -d /etc/iproute2 ]] && cp -r /etc/iproute2 "$root/etc/iproute2"
echo "rootfs.sh: staged $(find "$root" -type f | wc -l) files, $(du -sh "$root" | cut -f1) in $root"
