#!/usr/bin/env bash
# build.sh [OUTDIR] builds the test guest from Debian packages only:
#   OUTDIR/vmlinux    the uncompressed kernel of linux-image-amd64 (QEMU boots
#                     it through its PVH entry, twice as fast as the bzImage
#                     under TCG)
#   OUTDIR/initrd.gz  busybox-static, a few modules and testdata/guest/init
# OUTDIR defaults to testdata/guest/out. Packages are fetched with
# `apt-get download` and unpacked with `dpkg-deb -x`; nothing is installed.
# An existing build is reused while the files it was made from are
# unchanged; `make clean` (or removing OUTDIR) forces a fresh one.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/out}

# Modules the guest loads, with their dependencies from modules.dep: disks,
# network, consoles, 9p, CD-ROMs, the ACPI power button and its input device,
# the file systems of a ConfigDrive (FAT needs its code page and charset),
# nvdimm, the memory balloon, and ext4 (which also mounts ext2, and needs a
# crc32c) for the guest agent's freeze tests.
modules=(
	virtio_pci virtio_blk virtio_net virtio_console virtio_scsi
	9pnet_virtio 9p button evdev ata_piix ahci sr_mod sd_mod
	isofs vfat nls_cp437 nls_ascii nls_utf8 nfit nd_pmem virtio_balloon
	ext4 crc32c_generic
)
# The guest agent and the packages of the libraries its binary loads
# (checked below: a library from anywhere else fails the build).
agent_packages=(qemu-guest-agent libc6 libglib2.0-0 libnuma1 libudev1 liburing2 libpcre2-8-0)
inputs=("$here/build.sh" "$here/init" "$here/testguest-block" "$here/testguest-agent")

die() {
	echo "build.sh: $*" >&2
	exit 1
}

inputs_hash=$(cat "${inputs[@]}" | sha256sum | cut -d' ' -f1)
if [[ -f $out/vmlinux && -f $out/initrd.gz && -f $out/inputs.sha256 &&
	$(<"$out/inputs.sha256") == "$inputs_hash" ]]; then
	exit 0
fi

for tool in apt-get dpkg-deb gzip sha256sum; do
	command -v "$tool" >/dev/null || die "$tool not found (this script needs Debian's apt and dpkg)"
done
mkdir -p "$out/debs"
out=$(cd "$out" && pwd)
debs=$out/debs
work=$(mktemp -d "${TMPDIR:-/tmp}/testguest.XXXXXX")
trap 'rm -rf "$work"' EXIT

# fetch downloads packages (NAME or NAME=VERSION) into $debs. Empty or stale
# apt lists make apt-get fail to find a package: then, and only then, the
# lists are updated once.
lists_updated=
fetch() {
	if (cd "$debs" && apt-get download -qq -o APT::Sandbox::User=root "$@") 2>"$work/apt.err"; then
		return
	fi
	[[ -z $lists_updated ]] || die "apt-get download $*: $(<"$work/apt.err")"
	lists_updated=1
	if [[ $(id -u) != 0 ]]; then
		die "apt-get download $* failed and updating the apt lists needs root: $(<"$work/apt.err")"
	fi
	apt-get update -qq || die "apt-get update failed"
	fetch "$@"
}

# deb prints the path of the downloaded .deb of package $1.
deb() {
	local f
	for f in "$debs/$1"_*.deb; do
		[[ -f $f ]] || die "no .deb of $1 in $debs"
		echo "$f"
		return
	done
}

# unpack extracts package $1 into $work/$1.
unpack() {
	mkdir -p "$work/$1"
	dpkg-deb -x "$(deb "$1")" "$work/$1"
}

# The linux-image-amd64 metapackage names the current kernel package.
rm -f "$debs"/linux-image-amd64_*.deb
fetch linux-image-amd64
kdep=$(dpkg-deb -f "$(deb linux-image-amd64)" Depends)
[[ $kdep =~ ^(linux-image-[^ ]+-amd64)\ \(=\ ([^\)]+)\)$ ]] ||
	die "unexpected Depends of linux-image-amd64: $kdep"
kpkg=${BASH_REMATCH[1]}
kver=${BASH_REMATCH[2]}
if [[ ! -f $debs/${kpkg}_${kver//:/%3a}_amd64.deb ]]; then
	rm -f "$debs/$kpkg"_*.deb
	fetch "$kpkg=$kver"
fi
for p in busybox-static "${agent_packages[@]}"; do
	[[ -n $(compgen -G "$debs/${p}_*.deb") ]] || fetch "$p"
done
unpack "$kpkg"
unpack busybox-static
busybox=$work/busybox-static/bin/busybox

# The bzImage holds the kernel as an xz stream (with the x86 BCJ filter,
# which busybox's unxz lacks, so xz-utils does the decompression).
xz=$(command -v xz || true)
if [[ -z $xz ]]; then
	[[ -n $(compgen -G "$debs/xz-utils_*.deb") ]] || fetch xz-utils
	unpack xz-utils
	xz=$work/xz-utils/usr/bin/xz
fi
kroot=$work/$kpkg
release=${kpkg#linux-image-}
bzimage=$kroot/boot/vmlinuz-$release
[[ -f $bzimage ]] || die "$kpkg has no boot/vmlinuz-$release"
offset=$(grep -obUaP '\xFD7zXZ\x00' "$bzimage" | sed -n '1s/:.*//p')
[[ -n $offset ]] || die "no xz stream in $bzimage"
# xz stops reading at the end of the stream, so tail may die of SIGPIPE.
{ tail -c +"$((offset + 1))" "$bzimage" || true; } | "$xz" -dc --single-stream >"$work/vmlinux" ||
	die "decompressing the kernel in $bzimage failed"
[[ $(head -c 4 "$work/vmlinux" | od -An -c | tr -d ' ') == '177ELF' ]] ||
	die "the xz stream in $bzimage is not an ELF kernel"

# Modules in load order: each after everything it depends on.
moddir=$kroot/lib/modules/$release
"$busybox" depmod -b "$kroot" "$release" || die "depmod failed"
declare -A deps path seen
while IFS= read -r line; do
	p=${line%%:*}
	deps[$p]=${line#*:}
	n=${p##*/}
	n=${n%%.ko*}
	path[${n//-/_}]=$p
done <"$moddir/modules.dep"
order=()
visit() {
	local d
	[[ -z ${seen[$1]-} ]] || return 0
	seen[$1]=1
	for d in ${deps[$1]}; do
		visit "$d"
	done
	order+=("$1")
}
for m in "${modules[@]}"; do
	if [[ -n ${path[$m]-} ]]; then
		visit "${path[$m]}"
	elif ! grep -q "/$m\.ko" "$moddir/modules.builtin"; then
		die "module $m is not in $kpkg"
	fi
done

root=$work/root
mkdir -p "$root"/{bin,dev,proc,sys,run,mnt,tmp,var/log,etc/testguest,etc/acpi/PWRF,lib/modules}
cp "$busybox" "$root/bin/busybox"
for applet in $("$busybox" --list); do
	[[ $applet == busybox ]] || ln -s busybox "$root/bin/$applet"
done
install -m 755 "$here/init" "$root/init"
install -m 755 "$here/testguest-block" "$root/bin/testguest-block"
printf '#!/bin/sh\necho "TESTGUEST: power button: powering off" >/dev/ttyS0\nsync\npoweroff -f\n' \
	>"$root/etc/acpi/PWRF/00000080"
chmod 755 "$root/etc/acpi/PWRF/00000080"
for p in "${order[@]}"; do
	mkdir -p "$root/lib/modules/${p%/*}"
	cp "$moddir/$p" "$root/lib/modules/$p"
	echo "$p"
done >"$root/etc/testguest/modules"

# The guest agent: qemu-ga and every library the unpacked dynamic loader
# resolves for it, each from one of the agent's packages, into
# /lib/x86_64-linux-gnu (the loader at the path its ELF header names).
agent=$work/agent
mkdir -p "$agent"
for p in "${agent_packages[@]}"; do
	dpkg-deb -x "$(deb "$p")" "$agent"
done
qga=$agent/usr/sbin/qemu-ga
loader=$agent/lib64/ld-linux-x86-64.so.2
[[ -x $qga && -e $loader ]] || die "qemu-guest-agent or libc6 lacks usr/sbin/qemu-ga or lib64/ld-linux-x86-64.so.2"
libpath=$agent/lib/x86_64-linux-gnu:$agent/usr/lib/x86_64-linux-gnu
mkdir -p "$root/lib64" "$root/lib/x86_64-linux-gnu"
cp -L "$loader" "$root/lib64/ld-linux-x86-64.so.2"
install -m 755 "$qga" "$root/bin/qemu-ga"
"$loader" --library-path "$libpath" --list "$qga" >"$work/qga.libs" ||
	die "the dynamic loader of libc6 cannot resolve qemu-ga's libraries"
while read -r name arrow lib _; do
	# The loader itself is listed by its path, and the vDSO without one.
	[[ $arrow == "=>" && $name != */* ]] || continue
	[[ $lib == "$agent"/* ]] || die "qemu-ga needs $name, which none of ${agent_packages[*]} has ($lib)"
	cp -L "$lib" "$root/lib/x86_64-linux-gnu/$name"
done <"$work/qga.libs"
# What the agent's commands read: a user with a home (guest-ssh-*), a host
# name and an os-release (guest-get-host-name, guest-get-osinfo).
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
printf 'root:x:0:\n' >"$root/etc/group"
printf 'testguest\n' >"$root/etc/hostname"
printf 'ID=testguest\nNAME="Test guest"\nPRETTY_NAME="Test guest (busybox)"\nVERSION_ID=1\n' >"$root/etc/os-release"
mkdir -p "$root/root" "$root/sbin"
chmod 700 "$root/root"
# qemu-ga runs /sbin/shutdown (-P, -H or -r, then a time and a message) for
# guest-shutdown and /sbin/hwclock for guest-set-time.
ln -s /bin/busybox "$root/sbin/hwclock"
cat >"$root/sbin/shutdown" <<'SHUTDOWN'
#!/bin/sh
echo "TESTGUEST: shutdown $*" >/dev/console
sync
how=poweroff
for arg; do
	case $arg in
	-r) how=reboot ;;
	-H) how=halt ;;
	esac
done
$how -f
SHUTDOWN
chmod 755 "$root/sbin/shutdown"
install -m 755 "$here/testguest-agent" "$root/bin/testguest-agent"

# The kernel opens /dev/console for init before devtmpfs is mounted.
if [[ $(id -u) == 0 ]]; then
	mknod -m 600 "$root/dev/console" c 5 1
fi

# Reproducible: sorted names, one mtime, root owner, no inode or device
# numbers from this machine, no name or time in the gzip header.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -mindepth 1 | sort |
	"$busybox" cpio -o -H newc -R 0:0 --ignore-devno --renumber-inodes 2>/dev/null) |
	gzip -n -9 >"$work/initrd.gz"

mv "$work/vmlinux" "$out/vmlinux"
mv "$work/initrd.gz" "$out/initrd.gz"
echo "$kpkg $kver" >"$out/kernel"
echo "$inputs_hash" >"$out/inputs.sha256"
echo "build.sh: built $out/vmlinux and initrd.gz from $kpkg $kver" >&2
