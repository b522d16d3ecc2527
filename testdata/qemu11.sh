#!/usr/bin/env bash
# qemu11.sh [OUTDIR] puts QEMU 11.1 from Debian sid beside the system's QEMU
# without installing anything: sid's QEMU needs sid's glibc and about 110 more
# packages (118 in all in December 2026), so the whole closure of qemu-system-x86,
# qemu-system-common, qemu-system-data, seabios and the opengl and spice
# module packages (libc6 included, recommends left out) is resolved by apt
# against sid alone and unpacked with `dpkg-deb -x` into one tree, OUTDIR
# (default testdata/qemu11). Run it as
#
#   OUTDIR/qemu-system-x86_64 ...
#
# a shell wrapper that execs the tree's own dynamic loader:
#
#   QEMU_MODULE_DIR=OUTDIR/usr/lib/x86_64-linux-gnu/qemu \
#   exec OUTDIR/ld/qemu-system-x86_64 \
#       --library-path OUTDIR/usr/lib/x86_64-linux-gnu \
#       --argv0 "$0" OUTDIR/usr/bin/qemu-system-x86_64 "$@"
#
# (OUTDIR/ld/qemu-system-x86_64 is a link to the loader, OUTDIR/lib64/
# ld-linux-x86-64.so.2, named so that the process is called qemu-system-x86)
# so the pid, the inherited descriptors, the parent-death signal and the
# process group are QEMU's own. /proc/PID/cmdline starts with the loader's
# link and its four arguments, then QEMU's own arguments.
# Under the loader /proc/self/exe is the loader, and QEMU looks for its
# firmware, data and modules under DIR/qemu-bundle/<configured path>, DIR
# being the directory of /proc/self/exe (util/cutils.c get_relocated_path):
# a link OUTDIR/usr/lib/x86_64-linux-gnu/qemu-bundle -> ../../.. beside the
# real loader makes that the tree (bios-256k.bin, kvmvapic.bin, pvh.bin,
# efi-*.rom and vgabios-*.bin without -L). QEMU_MODULE_DIR matters as in
# qemu10.sh: without it a QEMU that finds no bundle loads the system QEMU's
# modules. Every library the binary and its modules need is checked to
# resolve inside the tree (the loader's --list); absolute symbolic links in
# the tree are made relative so that none leads back to the host.
#
# apt-get gets a private sources list (sid only, the mirror this machine uses
# for Debian), an empty dpkg status (so the resolver takes nothing from the
# host), lists and cache under OUTDIR/.apt; the host's apt configuration is
# never changed. sid's Release file can be past its Valid-Until date: its
# signature is checked against the archive keyring, its date is not. A
# complete OUTDIR made by this version of the script is reused. It prints
# nothing but errors.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/qemu11}
suite=sid
want='1:11.1.'
packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios)
# Taken when sid has them (every module the system QEMU has is then found in
# OUTDIR first).
optional=(qemu-system-modules-opengl qemu-system-modules-spice)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
multiarch=x86_64-linux-gnu

die() {
	echo "qemu11.sh: $*" >&2
	exit 1
}

script_hash=$(sha256sum <"${BASH_SOURCE[0]}" | cut -d' ' -f1)
if [[ -d $out ]]; then
	out=$(cd "$out" && pwd -P)
	if [[ -x $out/qemu-system-x86_64 && -f $out/.apt/script.sha256 &&
		$(<"$out/.apt/script.sha256") == "$script_hash $out" ]]; then
		exit 0
	fi
	# Everything in OUTDIR but .apt is replaced below: refuse a directory
	# this script did not make.
	if [[ ! -d $out/.apt && -n $(ls -A "$out") ]]; then
		die "$out exists, is not empty and was not made by qemu11.sh"
	fi
fi

for tool in apt-get apt-cache dpkg dpkg-deb sha256sum realpath; do
	command -v "$tool" >/dev/null || die "$tool not found (this script needs Debian's apt and dpkg)"
done
[[ $(dpkg --print-architecture) == amd64 ]] || die "this script needs an amd64 host, not $(dpkg --print-architecture)"
[[ -f $keyring ]] || die "$keyring missing (install the debian-archive-keyring package)"

# shellcheck source=debian-mirror.sh
. "$here/debian-mirror.sh"

mkdir -p "$out/.apt/lists/partial" "$out/.apt/cache/archives/partial" "$out/.apt/debs" "$out/.apt/empty.d"
out=$(cd "$out" && pwd -P)
[[ $out != *\'* ]] || die "OUTDIR must not contain a single quote: $out"
state=$out/.apt
rm -f "$state/script.sha256"
# Only the Packages index of amd64.
echo "deb [arch=amd64 signed-by=$keyring target=Packages] $(debian_mirror) $suite main" >"$state/sources.list"
# The resolver must see an empty system: nothing installed, no pins.
: >"$state/status"
apt_opts=(
	-qq
	-o "Dir::Etc::sourcelist=$state/sources.list"
	-o Dir::Etc::sourceparts=-
	-o Dir::Etc::preferences=/dev/null
	-o "Dir::Etc::preferencesparts=$state/empty.d"
	-o "Dir::State=$state"
	-o "Dir::State::Lists=$state/lists"
	-o "Dir::State::status=$state/status"
	-o "Dir::Cache=$state/cache"
	-o Dir::Cache::pkgcache=pkgcache.bin
	-o Dir::Cache::srcpkgcache=srcpkgcache.bin
	-o APT::Sandbox::User=root
	-o Acquire::Check-Valid-Until=false
)

apt-get "${apt_opts[@]}" update >"$state/update.log" 2>&1 ||
	die "apt-get update of $suite failed: $(<"$state/update.log")"

# The real (not only virtual) packages of sid among those asked for
# (apt-cache fails when one is missing, and shows the others).
have=" $({ apt-cache "${apt_opts[@]}" show --no-all-versions "${packages[@]}" "${optional[@]}" 2>/dev/null || true; } |
	sed -n 's/^Package: //p' | tr '\n' ' ') "
for p in "${packages[@]}"; do
	[[ $have == *" $p "* ]] || die "$suite has no package $p (see $state/update.log)"
done
roots=("${packages[@]}")
for p in "${optional[@]}"; do
	[[ $have != *" $p "* ]] || roots+=("$p")
done

# The closure: what `apt-get install` would install on an empty system.
apt-get "${apt_opts[@]}" -s --no-install-recommends install "${roots[@]}" >"$state/resolve.log" 2>&1 ||
	die "apt cannot resolve the dependencies of ${roots[*]} in $suite: $(<"$state/resolve.log")"
closure=()
while read -r word name version _; do
	[[ $word == Inst ]] || continue
	closure+=("$name=${version#(}")
done <"$state/resolve.log"
((${#closure[@]})) || die "apt resolved no packages for ${roots[*]}: $(<"$state/resolve.log")"
printf '%s\n' "${closure[@]}" >"$state/packages"
version=$(sed -n 's/^qemu-system-x86=//p' "$state/packages")
[[ $version == "$want"* ]] || die "$suite has qemu-system-x86 ${version:-(none)}, not ${want#1:}x"
for p in libc6 "${roots[@]}"; do
	grep -q "^$p=" "$state/packages" || die "the closure of ${roots[*]} lacks $p: $(<"$state/resolve.log")"
done

rm -f "$state/debs"/*.deb
(cd "$state/debs" && apt-get "${apt_opts[@]}" download "${closure[@]}") >"$state/download.log" 2>&1 ||
	die "apt-get download from $suite failed: $(<"$state/download.log")"
debs=("$state/debs"/*.deb)
((${#debs[@]} == ${#closure[@]})) ||
	die "downloaded ${#debs[@]} packages, expected ${#closure[@]}: $(<"$state/download.log")"

# Everything in OUTDIR but .apt is the tree of the previous run.
find "$out" -mindepth 1 -maxdepth 1 ! -name .apt -exec rm -rf {} +
for deb in "${debs[@]}"; do
	dpkg-deb -x "$deb" "$out" || die "dpkg-deb -x $deb failed"
done
# sid is merged-/usr: its packages ship /usr/lib64 and /usr/lib, the
# /lib64 and /lib links come from base-files, which is not unpacked.
for d in lib lib64; do
	[[ -e $out/$d || ! -d $out/usr/$d ]] || ln -s "usr/$d" "$out/$d"
done
# Absolute links would lead out of the tree (into the host's files).
while IFS= read -r -d '' link; do
	target=$(readlink "$link")
	ln -sfn "$(realpath -s -m --relative-to="${link%/*}" "$out$target")" "$link"
done < <(find "$out" -path "$out/.apt" -prune -o -type l -lname '/*' -print0)

loader=$out/lib64/ld-linux-x86-64.so.2
qemu=$out/usr/bin/qemu-system-x86_64
libpath=$out/usr/lib/$multiarch
moddir=$out/usr/lib/$multiarch/qemu
[[ -x $qemu ]] || die "qemu-system-x86 has no usr/bin/qemu-system-x86_64"
[[ -f $loader ]] || die "libc6 from $suite has no lib64/ld-linux-x86-64.so.2"
[[ -d $moddir ]] || die "qemu-system-common has no module directory usr/lib/$multiarch/qemu"

# QEMU looks for qemu-bundle beside /proc/self/exe, the real loader.
real_loader=$(readlink -f "$loader")
exec_dir=${real_loader%/*}
[[ $exec_dir == "$out"/* ]] || die "the loader $loader resolves outside the tree ($real_loader)"
ln -sfn "$(realpath -s -m --relative-to="$exec_dir" "$out")" "$exec_dir/qemu-bundle"
# The wrapper execs the loader through a link named like QEMU: the kernel
# names the process (comm, what ps and /proc/PID/status show) after the
# file execve was given, so it is qemu-system-x86 as for the system's QEMU,
# not ld-linux-x86-64; /proc/self/exe is still the real loader.
mkdir -p "$out/ld"
ln -sfn "$(realpath -s -m --relative-to="$out/ld" "$real_loader")" "$out/ld/qemu-system-x86_64"
# The firmware a PC guest loads, in one of Debian's firmware directories.
for f in bios-256k.bin kvmvapic.bin linuxboot_dma.bin pvh.bin efi-virtio.rom vgabios-stdvga.bin; do
	found=
	for d in usr/share/qemu usr/share/seabios usr/lib/ipxe/qemu; do
		[[ ! -f $exec_dir/qemu-bundle/$d/$f ]] || found=1
	done
	[[ -n $found ]] || die "$f is missing from the tree (or qemu-bundle is wrong)"
done

# Every library of the binary and of each module, resolved by the tree's
# loader as the wrapper runs it, must come from the tree.
for f in "$qemu" "$moddir"/*.so; do
	libs=$("$loader" --library-path "$libpath" --list "$f" 2>&1) ||
		die "the tree's loader cannot resolve the libraries of $f: $libs"
	while read -r name arrow lib _; do
		if [[ $arrow == "=>" ]]; then
			[[ $lib != not ]] || die "${f#"$out"/} needs $name, which no package of the closure has"
			[[ $lib == "$out"/* ]] || die "${f#"$out"/} needs $name, which comes from outside the tree ($lib)"
		elif [[ $name == /* && $name != "$out"/* ]]; then
			die "${f#"$out"/} loads $name from outside the tree"
		fi
	done <<<"$libs"
	# A symbol version that a library of the tree lacks.
	[[ $libs != *"not found"* ]] || die "the libraries of ${f#"$out"/} do not resolve: $libs"
done

# sq quotes $1 for sh.
sq() {
	printf "'%s'" "${1//\'/\'\\\'\'}"
}
wrapper=$out/qemu-system-x86_64
cat >"$wrapper.tmp" <<EOF
#!/bin/sh
# Made by testdata/qemu11.sh: QEMU $version from Debian sid, run by the
# dynamic loader of its own tree (exec: the pid and descriptors stay QEMU's).
QEMU_MODULE_DIR=$(sq "$moddir")
export QEMU_MODULE_DIR
exec $(sq "$out/ld/qemu-system-x86_64") --library-path $(sq "$libpath") --argv0 "\$0" $(sq "$qemu") "\$@"
EOF
chmod 755 "$wrapper.tmp"
mv -f "$wrapper.tmp" "$wrapper"

v=$("$wrapper" --version 2>&1) || die "$wrapper --version failed: $v"
[[ $v == "QEMU emulator version ${want#1:}"* ]] || die "$wrapper --version says: $v"
# -device help loads every device module; a machine loads its firmware (the BIOS,
# a VGA BIOS, a NIC's option ROM). Neither may complain.
err=$("$wrapper" -machine none -nodefaults -display none -device help 2>&1 >/dev/null) ||
	die "$wrapper -device help failed: $err"
[[ -z $err ]] || die "$wrapper -device help complains: $err"
err=$(printf '{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n' |
	"$wrapper" -machine q35 -accel tcg -nodefaults -display none -S -qmp stdio \
		-device VGA -nic user,model=virtio-net-pci 2>&1 >/dev/null) ||
	die "$wrapper cannot start a q35 machine: $err"
[[ -z $err ]] || die "$wrapper complains when it starts a q35 machine: $err"

# The packages and apt's binary caches (100 MB) are not needed any more.
rm -f "$state/debs"/*.deb "$state/cache"/*.bin
echo "$script_hash $out" >"$state/script.sha256"
