#!/usr/bin/env bash
# qemu10.sh [OUTDIR] puts QEMU 10.0 from bookworm-backports beside the
# system's QEMU: the .deb files of qemu-system-x86, qemu-system-common,
# qemu-system-data, seabios and the opengl and spice module packages are
# unpacked with `dpkg-deb -x` into OUTDIR (default testdata/qemu10), nothing
# is installed. It runs on Debian 12's libraries (the same ones QEMU 7.2
# uses) as
#
#   QEMU_MODULE_DIR=OUTDIR/usr/lib/x86_64-linux-gnu/qemu \
#   OUTDIR/usr/bin/qemu-system-x86_64 -L OUTDIR/usr/share/qemu -L OUTDIR/usr/share/seabios ...
#
# QEMU_MODULE_DIR matters: without it QEMU 10.0 loads the system QEMU's
# modules (ui-opengl.so when no -display is given, all of them for
# `-device help`), which fail with "Only modules from the same build can be
# loaded" and can abort it. The two module packages are fetched so that
# every module the system QEMU has is found in OUTDIR first.
#
# apt-get gets a private sources list, lists and cache under OUTDIR/.apt
# (the host's apt configuration is never changed); the mirror is the one
# this machine already uses for Debian. An existing OUTDIR is reused. It
# prints nothing but errors.
set -euo pipefail
export LC_ALL=C

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=${1:-$here/qemu10}
suite=bookworm-backports
want='1:10.0.'
packages=(qemu-system-x86 qemu-system-common qemu-system-data seabios
	qemu-system-modules-opengl qemu-system-modules-spice)
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

die() {
	echo "qemu10.sh: $*" >&2
	exit 1
}

script_hash=$(sha256sum <"$here/qemu10.sh" | cut -d' ' -f1)
if [[ -x $out/usr/bin/qemu-system-x86_64 && -f $out/.apt/script.sha256 &&
	$(<"$out/.apt/script.sha256") == "$script_hash" ]]; then
	exit 0
fi

for tool in apt-get dpkg-deb; do
	command -v "$tool" >/dev/null || die "$tool not found (this script needs Debian's apt and dpkg)"
done
[[ -f $keyring ]] || die "$keyring missing (install the debian-archive-keyring package)"

# shellcheck source=debian-mirror.sh
. "$here/debian-mirror.sh"

mkdir -p "$out/.apt/lists/partial" "$out/.apt/cache/archives/partial" "$out/.apt/debs"
out=$(cd "$out" && pwd)
state=$out/.apt
# Only the Packages index: this private list exists to download four files.
echo "deb [signed-by=$keyring target=Packages] $(debian_mirror) $suite main" >"$state/sources.list"
apt_opts=(
	-qq
	-o "Dir::Etc::sourcelist=$state/sources.list"
	-o Dir::Etc::sourceparts=-
	-o "Dir::State::Lists=$state/lists"
	-o "Dir::Cache=$state/cache"
	-o APT::Sandbox::User=root
)

apt-get "${apt_opts[@]}" update >"$state/update.log" 2>&1 ||
	die "apt-get update of $suite failed: $(<"$state/update.log")"
rm -f "$state/debs"/*.deb
(cd "$state/debs" && apt-get "${apt_opts[@]}" download "${packages[@]/%//$suite}") >"$state/download.log" 2>&1 ||
	die "apt-get download from $suite failed: $(<"$state/download.log")"

version=$(dpkg-deb -f "$state/debs"/qemu-system-x86_*.deb Version)
[[ $version == "$want"* ]] || die "$suite has qemu-system-x86 $version, not ${want#1:}x"

rm -rf "$out/usr" "$out/etc" "$out/lib"
for deb in "$state/debs"/*.deb; do
	dpkg-deb -x "$deb" "$out"
done
"$out/usr/bin/qemu-system-x86_64" --version >/dev/null ||
	die "$out/usr/bin/qemu-system-x86_64 does not run"
rm -f "$state/debs"/*.deb
echo "$script_hash" >"$state/script.sha256"
