#!/usr/bin/env bash
# Fetches the newest Debian cloud kernel of one series and builds an initramfs for the
# proxy's runs on it (tests/e2e_kernels/init): `prepare.sh SERIES CACHE_DIR PROXY_BIN`
# leaves CACHE_DIR/SERIES/vmlinuz and CACHE_DIR/SERIES/initrd.cpio. Bookworm's kernels
# come through the host's apt, Debian 11's through a private apt set-up in
# CACHE_DIR/bullseye-apt that leaves the host's alone. Called by tests/e2e_kernels.rs.
set -euo pipefail

series=$1 cache=$2 proxy=$3
here=$(cd "$(dirname "$0")" && pwd)
# Absolute: apt would take relative Dir:: paths as relative to its own directories.
mkdir -p "$cache"
cache=$(cd "$cache" && pwd)

# Writes an apt configuration of its own for Debian 11 under the cache and prints its
# path: its own sources, package lists and caches, and none of the host's sources, pins,
# installed packages or update hooks, so neither side sees the other's lists. apt checks
# the lists' signatures against debian-archive-keyring, whose bookworm version holds
# bullseye's keys. Only bullseye itself: its last point release (11.11) has its final
# 5.10 kernel, while bullseye-security's newer ones are not in every mirror's pool.
bullseye_apt() {
    local dir=$cache/bullseye-apt
    mkdir -p "$dir/lists/partial" "$dir/cache/archives/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg]" \
        "http://deb.debian.org/debian bullseye main" >"$dir/sources.list"
    cat >"$dir/apt.conf" <<END
Dir::Etc::SourceList "$dir/sources.list";
Dir::Etc::SourceParts "/dev/null";
Dir::Etc::Preferences "/dev/null";
Dir::Etc::PreferencesParts "/dev/null";
Dir::State::Lists "$dir/lists";
Dir::State::status "/dev/null";
Dir::Cache "$dir/cache";
// Root owns these directories, so apt's unprivileged download user could not write them.
APT::Sandbox::User "root";
// The host's update hooks (AppStream, PackageKit) and extra index files serve its lists.
#clear APT::Update::Post-Invoke-Success;
Acquire::IndexTargets::deb::DEP-11::DefaultEnabled "false";
END
    echo "$dir/apt.conf"
}

# apt's options for the kernel package: none (the host's set-up) unless set here.
apt=()
case $series in
# 6.1 and 5.10 packages are named by ABI (6.1.0-N), 6.12 backports by upstream version.
6.1) pattern='^linux-image-6\.1\.0-[0-9]+-cloud-amd64-unsigned$' ;;
6.12) pattern='^linux-image-6\.12\.[0-9]+\+deb12-cloud-amd64-unsigned$' ;;
5.10)
    pattern='^linux-image-5\.10\.0-[0-9]+-cloud-amd64-unsigned$'
    apt=(-c "$(bullseye_apt)")
    ;;
*) echo "unknown kernel series $series" >&2; exit 2 ;;
esac

newest() {
    apt-cache "${apt[@]}" search --names-only "$pattern" | cut -d' ' -f1 | sort -V | tail -n 1
}

# Downloads and unpacks package $1 into $cache/$1 unless that is already there, with
# apt options $2...; never installs it on the host.
unpacked() {
    local dir=$cache/$1
    if [ ! -e "$dir/.done" ]; then
        rm -rf "$dir" "$dir.deb"
        mkdir -p "$dir.deb"
        # As root, apt's unprivileged download user cannot write here: say it may be root.
        (cd "$dir.deb" && apt-get download -qq -o APT::Sandbox::User=root "${@:2}" "$1" >&2)
        dpkg-deb -x "$dir.deb"/*.deb "$dir"
        rm -rf "$dir.deb"
        touch "$dir/.done"
    fi
    echo "$dir"
}

package=$(newest)
if [ -z "$package" ]; then
    # Absent or stale package lists: refresh them once.
    apt-get "${apt[@]}" update -qq
    package=$(newest)
fi
[ -n "$package" ] || { echo "apt-cache lists no package matching $pattern" >&2; exit 1; }
echo "kernel package: $package" >&2
kernel_dir=$(unpacked "$package" "${apt[@]}")
busybox_dir=$(unpacked busybox-static)

out=$cache/$series
root=$out/initrd
rm -rf "$root"
mkdir -p "$root"/{bin,dev,proc,sys,run,tmp,var,modules} "$out"
ln -sfn "$(echo "$kernel_dir"/boot/vmlinuz-*)" "$out/vmlinuz"
ln -s ../run "$root/var/run"
cp "$busybox_dir/bin/busybox" "$root/bin/"
cp "$here/init" "$root/init"
chmod +x "$root/init"

# Host binaries with every shared library ldd names (it lists the whole closure, the
# dynamic loader included); ip and ping go to /usr/bin whatever the host's layout.
mkdir -p "$root/usr/bin"
for bin in "$(command -v ip)" "$(command -v ping)" "$proxy"; do
    case $bin in
    "$proxy") cp "$bin" "$root/bin/uringproxy" ;;
    *) cp "$bin" "$root/usr/bin/" ;;
    esac
    for lib in $(ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done

# Modules go in decompressed, so neither busybox insmod nor the kernel has to. The packages
# ship no modules.dep (depmod makes it on install), so read each module's own
# depends= field and stop if it names anything: that module would have to be added too.
for name in tun veth; do
    src=$(find "$kernel_dir/lib/modules" -name "$name.ko*" | head -n 1)
    [ -n "$src" ] || { echo "$package has no $name.ko" >&2; exit 1; }
    case $src in
    *.xz) xz -dc "$src" ;;
    *.zst) zstd -qdc "$src" ;;
    *) cat "$src" ;;
    esac >"$root/modules/$name.ko"
    deps=$(tr '\0' '\n' <"$root/modules/$name.ko" | sed -n 's/^depends=//p')
    [ -z "$deps" ] || { echo "$name.ko depends on $deps, which the initramfs lacks" >&2; exit 1; }
done

# Uncompressed: under TCG, a gzip'd archive (15 MB to 5.5 MB) took 2.5 s longer to boot.
(cd "$root" && find . | cpio -o -H newc --quiet) >"$out/initrd.cpio"
