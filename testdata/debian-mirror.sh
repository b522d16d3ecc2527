# debian-mirror.sh is sourced by qemu10.sh and qemu11.sh, which fetch
# Debian packages from the mirror this machine already uses.

# debian_mirror prints the URI of the Debian archive in this machine's apt
# sources (one-line and deb822 files), or deb.debian.org when there is none.
debian_mirror() {
	local files=() uri
	for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
		[[ -f $f ]] && files+=("$f")
	done
	if ((${#files[@]})); then
		uri=$(awk '
			function take(uri, suites,   n, s, i) {
				n = split(suites, s, /[ \t]+/)
				for (i = 1; i <= n; i++)
					if (s[i] == "bookworm" && found == "") found = uri
			}
			function stanza() {
				if (types ~ /(^|[ \t])deb([ \t]|$)/ && enabled != "no") {
					split(uris, u, /[ \t]+/)
					take(u[1], suites)
				}
				types = uris = suites = enabled = ""
			}
			FILENAME != last { if (last ~ /\.sources$/) stanza(); last = FILENAME }
			FILENAME ~ /\.sources$/ {
				if ($0 ~ /^[ \t]*$/) { stanza(); next }
				if (tolower($1) == "types:") { $1 = ""; types = $0 }
				if (tolower($1) == "uris:") { $1 = ""; sub(/^[ \t]+/, ""); uris = $0 }
				if (tolower($1) == "suites:") { $1 = ""; suites = $0 }
				if (tolower($1) == "enabled:") enabled = tolower($2)
				next
			}
			$1 == "deb" {
				line = $0
				sub(/^deb[ \t]+(\[[^]]*\][ \t]+)?/, "", line)
				split(line, w, /[ \t]+/)
				take(w[1], w[2])
			}
			END { if (last ~ /\.sources$/) stanza(); print found }
		' "${files[@]}")
	fi
	echo "${uri:-http://deb.debian.org/debian}"
}
