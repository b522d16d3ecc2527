package iso9660

import (
	"cmp"
	"encoding/binary"
	"slices"
	"sort"
	"strconv"
	"strings"
	"unicode/utf16"
)

// Names: each entry's ISO 9660 identifier (upper case, 8.3, made unique
// in its directory) and Joliet identifier (UCS-2), and the order ECMA-119
// gives the records that carry them.

// sortRecords puts a directory's children in the order ECMA-119 §9.3
// gives its records: by file name, then by extension, each compared as if
// the shorter were padded with spaces, then by version, highest first.
// That is not the order of the raw identifiers: "A.;1" comes before
// "A.1;1", since the empty extension reads as spaces. Joliet names, in
// UCS-2, follow the same rule, with the extension after the last dot.
// Directory identifiers are all name, which also gives the order §6.9.1
// wants for each parent's directories in the path tables. Identifiers
// equal under the rule (Joliet's "a" and "a ") keep the order of their
// raw bytes, so the result never depends on the order of the input.
func sortRecords(kids []*entry, joliet bool) {
	type key struct {
		name, ext []uint16
		version   int
		raw       string
	}
	keys := make(map[*entry]key, len(kids))
	for _, c := range kids {
		id := c.isoID
		if joliet {
			id = c.jolID
		}
		name, ext, version := idParts(idUnits(id, joliet), c.node.IsDir())
		keys[c] = key{name, ext, version, string(id)}
	}
	sort.Slice(kids, func(i, j int) bool {
		a, b := keys[kids[i]], keys[kids[j]]
		if c := comparePadded(a.name, b.name); c != 0 {
			return c < 0
		}
		if c := comparePadded(a.ext, b.ext); c != 0 {
			return c < 0
		}
		if a.version != b.version {
			return a.version > b.version
		}
		return a.raw < b.raw
	})
}

// idUnits returns an identifier's characters: its bytes in the primary
// tree, its UCS-2 code units in the Joliet one.
func idUnits(id []byte, joliet bool) []uint16 {
	if !joliet {
		u := make([]uint16, len(id))
		for i, b := range id {
			u[i] = uint16(b)
		}
		return u
	}
	u := make([]uint16, len(id)/2)
	for i := range u {
		u[i] = binary.BigEndian.Uint16(id[2*i:])
	}
	return u
}

// idParts splits an identifier into what §9.3 orders by: a file's name
// ends at its last dot, its extension at the semicolon that starts its
// version number. A directory's identifier is all name.
func idParts(id []uint16, dir bool) (name, ext []uint16, version int) {
	if dir {
		return id, nil, 0
	}
	if i := slices.Index(id, ';'); i >= 0 {
		version, _ = strconv.Atoi(string(utf16.Decode(id[i+1:])))
		id = id[:i]
	}
	for i := len(id) - 1; i >= 0; i-- {
		if id[i] == '.' {
			return id[:i], id[i+1:], version
		}
	}
	return id, nil, version
}

// comparePadded compares a and b as if the shorter had spaces appended.
func comparePadded(a, b []uint16) int {
	for i := 0; i < len(a) || i < len(b); i++ {
		x, y := uint16(' '), uint16(' ')
		if i < len(a) {
			x = a[i]
		}
		if i < len(b) {
			y = b[i]
		}
		if x != y {
			return cmp.Compare(x, y)
		}
	}
	return 0
}

// identifier makes the ISO 9660 level 1 name of name: upper case
// d-characters, at most eight before the dot and three after it, ";1" for
// a file. A name already used in the directory gets a number in place of
// its last characters.
func identifier(name string, dir bool, used map[string]bool) string {
	base, ext := name, ""
	if !dir {
		if i := strings.LastIndexByte(name, '.'); i >= 0 {
			base, ext = name[:i], name[i+1:]
		}
	}
	base, ext = dChars(base, 8), dChars(ext, 3)
	if base == "" {
		base = "_"
	}
	id := func(b string) string {
		if dir {
			return b
		}
		return b + "." + ext
	}
	cand := id(base)
	for i := 1; used[cand]; i++ {
		n := strconv.Itoa(i)
		b := base
		if len(b)+len(n) > 8 {
			b = b[:8-len(n)]
		}
		cand = id(b + n)
	}
	used[cand] = true
	if dir {
		return cand
	}
	return cand + ";1"
}

// dChars maps s to at most max d-characters (A-Z, 0-9 and _).
func dChars(s string, max int) string {
	var b strings.Builder
	for _, r := range s {
		if b.Len() == max {
			break
		}
		switch {
		case r >= 'a' && r <= 'z':
			b.WriteByte(byte(r - 'a' + 'A'))
		case r >= 'A' && r <= 'Z', r >= '0' && r <= '9', r == '_':
			b.WriteByte(byte(r))
		default:
			b.WriteByte('_')
		}
	}
	return b.String()
}

func jolietIdentifier(name string) []byte {
	u := utf16.Encode([]rune(name))
	b := make([]byte, 2*len(u))
	for i, c := range u {
		binary.BigEndian.PutUint16(b[2*i:], c)
	}
	return b
}
