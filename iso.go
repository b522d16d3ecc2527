package qemu

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode/utf16"
	"unicode/utf8"
)

// Limits of ISOImage. ECMA-119 allows eight levels of directories, the root
// included, and 32-bit file sizes (without multi-extent files, which this
// writer does not make); Joliet allows 64 UCS-2 characters in a name. A
// name's Rock Ridge NM entry shares a directory record of at most 255
// bytes, of even length, with at most 89 others: 33 of the record's fixed
// part, 14 of the longest ISO 9660 file name ("ABCDEFGH.EXT;1") and its pad
// byte, 36 of the PX entry and 5 of NM's own header. That leaves 165.
const (
	// MaxISOFileSize is the largest file an ISOImage holds.
	MaxISOFileSize = 1<<32 - 1
	// MaxISODepth is the most elements a file's path in an ISOImage has
	// (a directory's has one fewer): the root and seven directories.
	MaxISODepth = 8
	// MaxISONameLen is the most characters in one element of a path.
	MaxISONameLen = 64
	// MaxISONameBytes is the most bytes in one element of a path, UTF-8
	// encoded (55 characters of three bytes, say): what its directory
	// record has room for.
	MaxISONameBytes = 165
	// MaxISOPathLen is the most bytes in a whole path.
	MaxISOPathLen = 255
	// MaxISODirs is the most directories in an ISOImage, the root
	// included: path tables number them with 16 bits.
	MaxISODirs = 65535
	// MaxISOLabelLen is the most characters in an ISOImage's Label.
	MaxISOLabelLen = 32
)

const (
	isoBlock       = 2048
	isoSystemArea  = 16 // blocks before the first volume descriptor
	isoFirstExtent = isoSystemArea + 3
	// isoJolietLabelLen is what a Joliet volume identifier holds: 32
	// bytes of UCS-2.
	isoJolietLabelLen = 16
	isoFileMode       = 0o100444 // S_IFREG r--r--r--
	isoDirMode        = 0o040555 // S_IFDIR r-xr-xr-x
	isoApplication    = "GITHUB.COM/FC93C01D/QEMU"
	isoCopyBuffer     = 256 << 10
	// A directory record holds its year as years since 1900 in one byte.
	isoMinYear, isoMaxYear = 1900, 1900 + 255
)

// ISOImage is an ISO 9660 image to be written: a volume label and a tree
// of files and directories. Its zero value is an empty image with no
// label; add entries with AddFile, AddFileFrom, AddDir or AddFS, then call
// Write or WriteFile. Directories that a path passes through are added
// implicitly.
//
// The image carries each name three ways: an ISO 9660 name (upper case,
// 8.3, which no modern reader shows), Rock Ridge entries with the full
// name, a mode and a link count, and a Joliet tree with the full name in
// UCS-2. Linux, and the isoinfo and xorriso tools, read the Rock Ridge
// names; mounted with -o norock, Linux reads the Joliet ones; Windows reads
// Joliet. Files are recorded read-only (0444, directories 0555), owned by
// root. Joliet readers compare names without case (Linux does unless
// mounted with check=strict), so of two names that differ only in case,
// they find one: Rock Ridge keeps both apart.
//
// Entries are sorted, and every time recorded in the image is ModTime, so
// the same entries, label and ModTime always give the same bytes.
//
// The limits: a path has at most MaxISODepth elements (MaxISODepth-1 for a
// directory) and MaxISOPathLen bytes; an element is 1 to MaxISONameLen
// characters of the Unicode Basic Multilingual Plane in at most
// MaxISONameBytes bytes, with no control character and none of * / : ; ? \
// (Joliet's reserved characters); a file holds at most MaxISOFileSize
// bytes; an image holds at most MaxISODirs directories. Breaking one is an
// error from the call that adds the entry.
//
// An ISOImage is not safe for concurrent use.
type ISOImage struct {
	// Label is the volume identifier, at most MaxISOLabelLen printable
	// ASCII characters (Write refuses others). The Joliet volume
	// descriptor holds its first 16. cloud-init finds its seed by it.
	Label string
	// ModTime is the time recorded for the volume and every entry, in
	// UTC, to the second (the volume descriptors keep hundredths too). It
	// must fall in the years 1900 to 2155 (UTC). The zero value means the
	// time Write is called.
	ModTime time.Time

	root *isoNode
	dirs int // directories in the tree, the root included
}

// isoNode is one entry of an ISOImage's tree.
type isoNode struct {
	name     string
	children map[string]*isoNode // nil for a file
	size     int64
	open     func() (io.ReadCloser, error)
}

func (n *isoNode) isDir() bool { return n.children != nil }

// AddFile adds a file named name (a slash-separated path relative to the
// image's root) holding data. The image keeps data, which must not change
// until the last Write returns.
func (im *ISOImage) AddFile(name string, data []byte) error {
	return im.add(name, &isoNode{size: int64(len(data)), open: func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(data)), nil
	}})
}

// AddFileFrom adds a file named name of size bytes whose content Write
// reads from what open returns, and closes. Each Write opens it once, only
// when it reaches the file, so a large tree never has to be in memory. An
// error from open, or a reader that gives more or fewer than size bytes,
// fails that Write; this holds for an empty file too, which is opened and
// must give no byte.
func (im *ISOImage) AddFileFrom(name string, size int64, open func() (io.ReadCloser, error)) error {
	if open == nil {
		return fmt.Errorf("qemu: iso: %s: no content", name)
	}
	if size < 0 || size > MaxISOFileSize {
		return fmt.Errorf("qemu: iso: %s: size %d is not between 0 and %d bytes", name, size, int64(MaxISOFileSize))
	}
	return im.add(name, &isoNode{size: size, open: open})
}

// AddDir adds a directory named name, for directories that hold nothing;
// one that a file's path passes through needs no AddDir.
func (im *ISOImage) AddDir(name string) error {
	return im.add(name, &isoNode{children: map[string]*isoNode{}})
}

// AddFS adds every directory and regular file of fsys (os.DirFS of a
// directory, say) under the image's root. It records their sizes now and
// reads their content during Write. Anything else (a symbolic link, a
// device) is an error.
func (im *ISOImage) AddFS(fsys fs.FS) error {
	return fs.WalkDir(fsys, ".", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("qemu: iso: %w", err)
		}
		if p == "." {
			return nil
		}
		if d.IsDir() {
			return im.AddDir(p)
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("qemu: iso: %s: not a regular file or directory", p)
		}
		fi, err := d.Info()
		if err != nil {
			return fmt.Errorf("qemu: iso: %w", err)
		}
		return im.AddFileFrom(p, fi.Size(), func() (io.ReadCloser, error) { return fsys.Open(p) })
	})
}

// add puts n at name, creating the directories on the way.
func (im *ISOImage) add(name string, n *isoNode) error {
	elems, err := checkISOPath(name, n.isDir())
	if err != nil {
		return fmt.Errorf("qemu: iso: %w", err)
	}
	if n.size > MaxISOFileSize {
		return fmt.Errorf("qemu: iso: %s: %d bytes, more than the %d a file may hold", name, n.size, int64(MaxISOFileSize))
	}
	if im.root == nil {
		im.root = &isoNode{children: map[string]*isoNode{}}
		im.dirs = 1
	}
	// Check everything before changing anything: a failed add leaves the
	// tree as it was.
	newDirs := 0
	if n.isDir() {
		newDirs++
	}
	dir := im.root
	for i, e := range elems[:len(elems)-1] {
		c := dir.children[e]
		if c == nil {
			newDirs += len(elems) - 1 - i
			break
		}
		if !c.isDir() {
			return fmt.Errorf("qemu: iso: %s: %s is a file", name, strings.Join(elems[:i+1], "/"))
		}
		dir = c
	}
	if im.dirs+newDirs > MaxISODirs {
		return fmt.Errorf("qemu: iso: %s: more than %d directories", name, MaxISODirs)
	}
	dir = im.root
	for _, e := range elems[:len(elems)-1] {
		c := dir.children[e]
		if c == nil {
			c = &isoNode{name: e, children: map[string]*isoNode{}}
			dir.children[e] = c
			im.dirs++
		}
		dir = c
	}
	last := elems[len(elems)-1]
	if old := dir.children[last]; old != nil {
		if old.isDir() && n.isDir() {
			return nil // already there, implicitly or not
		}
		return fmt.Errorf("qemu: iso: %s: already in the image", name)
	}
	n.name = last
	dir.children[last] = n
	if n.isDir() {
		im.dirs++
	}
	return nil
}

// checkISOPath splits name into its elements, checking the limits.
func checkISOPath(name string, dir bool) ([]string, error) {
	if !utf8.ValidString(name) {
		return nil, fmt.Errorf("%q: not UTF-8", name)
	}
	if name == "" || name == "." || !fs.ValidPath(name) {
		return nil, fmt.Errorf("%q: not a relative slash-separated path without . or .. elements", name)
	}
	if len(name) > MaxISOPathLen {
		return nil, fmt.Errorf("%s: path longer than %d bytes", name, MaxISOPathLen)
	}
	elems := strings.Split(name, "/")
	depth := MaxISODepth
	if dir {
		depth--
	}
	if len(elems) > depth {
		return nil, fmt.Errorf("%s: %d path elements, more than the %d allowed", name, len(elems), depth)
	}
	for _, e := range elems {
		if err := checkISOName(e); err != nil {
			return nil, fmt.Errorf("%s: %w", name, err)
		}
	}
	return elems, nil
}

func checkISOName(e string) error {
	if n := utf8.RuneCountInString(e); n > MaxISONameLen {
		return fmt.Errorf("name %q has %d characters, more than %d", e, n, MaxISONameLen)
	}
	if len(e) > MaxISONameBytes {
		return fmt.Errorf("name %q has %d bytes, more than %d", e, len(e), MaxISONameBytes)
	}
	for _, r := range e {
		switch {
		case r < 0x20 || r == 0x7f:
			return fmt.Errorf("name %q holds a control character", e)
		case r > 0xffff:
			return fmt.Errorf("name %q holds %U, outside the Basic Multilingual Plane that Joliet's UCS-2 covers", e, r)
		case strings.ContainsRune(`*/:;?\`, r):
			return fmt.Errorf("name %q holds %q, which Joliet reserves", e, r)
		}
	}
	return nil
}

func checkISOLabel(label string) error {
	if len(label) > MaxISOLabelLen {
		return fmt.Errorf("label %q longer than %d characters", label, MaxISOLabelLen)
	}
	for i := 0; i < len(label); i++ {
		if label[i] < 0x20 || label[i] > 0x7e {
			return fmt.Errorf("label %q: not printable ASCII", label)
		}
	}
	return nil
}

// WriteFile writes the image to path with mode 0600: under a temporary
// name in path's directory, synced, then renamed to path, so that path
// never holds a partial image and an existing file is replaced atomically.
// If ctx ends first, nothing is left and the error wraps ctx.Err().
func (im *ISOImage) WriteFile(ctx context.Context, path string) error {
	if err := writeFileAtomic(path, func(f *os.File) error { return im.write(ctx, f) }); err != nil {
		return fmt.Errorf("qemu: iso %s: %w", path, err)
	}
	return nil
}

// Write writes the image to w. It reads each file's content once, in
// order, in reads of up to 256 KiB that go to w through a 64 KiB
// bufio.Writer, so it holds no more than about 320 KiB of the image. If ctx ends first, it
// stops and returns an error wrapping ctx.Err(); w then holds part of an
// image. A ModTime outside the years 1900 to 2155, which a directory
// record's one-byte year cannot hold, is an error.
func (im *ISOImage) Write(ctx context.Context, w io.Writer) error {
	if err := im.write(ctx, w); err != nil {
		return fmt.Errorf("qemu: iso: %w", err)
	}
	return nil
}

func (im *ISOImage) write(ctx context.Context, w io.Writer) error {
	if err := checkISOLabel(im.Label); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return contextError(ctx)
	}
	t := im.ModTime
	if t.IsZero() {
		t = time.Now()
	}
	t = t.UTC()
	if y := t.Year(); y < isoMinYear || y > isoMaxYear {
		return fmt.Errorf("ModTime %s: outside the years %d to %d that ISO 9660 records", t.Format(time.RFC3339), isoMinYear, isoMaxYear)
	}
	l, err := layOutISO(im.root, t)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 64<<10)
	if err := l.write(ctx, bw, im.Label); err != nil {
		return err
	}
	return bw.Flush()
}

// isoEntry is a node placed in the image: its names in both trees and
// where its data goes.
type isoEntry struct {
	node   *isoNode
	parent *isoEntry
	isoID  []byte // ISO 9660 file identifier, ";1" included for files
	jolID  []byte // Joliet identifier, UCS-2 big-endian
	// A directory's children, in the order of each tree.
	priKids, jolKids []*isoEntry
	subdirs          int
	// For a directory: its number in each path table and the extent and
	// size of its records in each tree. For a file: its data.
	priNum, jolNum   uint16
	priExt, jolExt   uint32
	priSize, jolSize uint32
	extent           uint32
	size             uint32
}

// isoLayout is where everything of an image goes.
type isoLayout struct {
	t                      time.Time
	root                   *isoEntry
	priDirs, jolDirs       []*isoEntry // in path table order
	files                  []*isoEntry // in extent order
	priPT, jolPT           uint32      // path table sizes in bytes
	priL, priM, jolL, jolM uint32      // their extents
	blocks                 uint32      // of the whole image
}

func layOutISO(root *isoNode, t time.Time) (*isoLayout, error) {
	if root == nil {
		root = &isoNode{children: map[string]*isoNode{}}
	}
	l := &isoLayout{t: t}
	l.root = placeISO(root, nil)
	l.root.isoID, l.root.jolID = []byte{0}, []byte{0}
	l.priDirs = isoDirOrder(l.root, func(e *isoEntry) []*isoEntry { return e.priKids })
	l.jolDirs = isoDirOrder(l.root, func(e *isoEntry) []*isoEntry { return e.jolKids })
	for i, d := range l.priDirs {
		d.priNum = uint16(i + 1)
	}
	for i, d := range l.jolDirs {
		d.jolNum = uint16(i + 1)
	}
	l.priPT = isoPathTableSize(l.priDirs, func(e *isoEntry) []byte { return e.isoID })
	l.jolPT = isoPathTableSize(l.jolDirs, func(e *isoEntry) []byte { return e.jolID })

	next := uint64(isoFirstExtent)
	take := func(bytes uint64) uint32 {
		ext := next
		next += (bytes + isoBlock - 1) / isoBlock
		return uint32(ext)
	}
	l.priL, l.priM = take(uint64(l.priPT)), take(uint64(l.priPT))
	l.jolL, l.jolM = take(uint64(l.jolPT)), take(uint64(l.jolPT))
	for _, d := range l.priDirs {
		d.priSize = l.dirSize(d, false)
		d.priExt = take(uint64(d.priSize))
	}
	for _, d := range l.jolDirs {
		d.jolSize = l.dirSize(d, true)
		d.jolExt = take(uint64(d.jolSize))
	}
	collectISOFiles(l.root, &l.files)
	for _, f := range l.files {
		f.size = uint32(f.node.size)
		f.extent = take(uint64(f.size))
	}
	if next > 1<<32-1 {
		return nil, fmt.Errorf("image of %d blocks, more than 32 bits can address", next)
	}
	l.blocks = uint32(next)
	return l, nil
}

// placeISO makes the entry of n and its children, naming each child in
// both trees.
func placeISO(n *isoNode, parent *isoEntry) *isoEntry {
	e := &isoEntry{node: n, parent: parent}
	if !n.isDir() {
		return e
	}
	names := make([]string, 0, len(n.children))
	for name := range n.children {
		names = append(names, name)
	}
	sort.Strings(names)
	used := make(map[string]bool, len(names))
	for _, name := range names {
		c := placeISO(n.children[name], e)
		c.isoID = []byte(isoIdentifier(name, c.node.isDir(), used))
		c.jolID = jolietIdentifier(name)
		if c.node.isDir() {
			e.subdirs++
		}
		e.priKids = append(e.priKids, c)
	}
	e.jolKids = append([]*isoEntry(nil), e.priKids...)
	sortISORecords(e.priKids, false)
	sortISORecords(e.jolKids, true)
	return e
}

// sortISORecords puts a directory's children in the order ECMA-119 §9.3
// gives its records: by file name, then by extension, each compared as if
// the shorter were padded with spaces, then by version, highest first.
// That is not the order of the raw identifiers: "A.;1" comes before
// "A.1;1", since the empty extension reads as spaces. Joliet names, in
// UCS-2, follow the same rule, with the extension after the last dot.
// Directory identifiers are all name, which also gives the order §6.9.1
// wants for each parent's directories in the path tables. Identifiers
// equal under the rule (Joliet's "a" and "a ") keep the order of their
// raw bytes, so the result never depends on the order of the input.
func sortISORecords(kids []*isoEntry, joliet bool) {
	type key struct {
		name, ext []uint16
		version   int
		raw       string
	}
	keys := make(map[*isoEntry]key, len(kids))
	for _, c := range kids {
		id := c.isoID
		if joliet {
			id = c.jolID
		}
		name, ext, version := isoIDParts(isoIDUnits(id, joliet), c.node.isDir())
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

// isoIDUnits returns an identifier's characters: its bytes in the primary
// tree, its UCS-2 code units in the Joliet one.
func isoIDUnits(id []byte, joliet bool) []uint16 {
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

// isoIDParts splits an identifier into what §9.3 orders by: a file's name
// ends at its last dot, its extension at the semicolon that starts its
// version number. A directory's identifier is all name.
func isoIDParts(id []uint16, dir bool) (name, ext []uint16, version int) {
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

// isoIdentifier makes the ISO 9660 level 1 name of name: upper case
// d-characters, at most eight before the dot and three after it, ";1" for
// a file. A name already used in the directory gets a number in place of
// its last characters.
func isoIdentifier(name string, dir bool, used map[string]bool) string {
	base, ext := name, ""
	if !dir {
		if i := strings.LastIndexByte(name, '.'); i >= 0 {
			base, ext = name[:i], name[i+1:]
		}
	}
	base, ext = isoDChars(base, 8), isoDChars(ext, 3)
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

// isoDChars maps s to at most max d-characters (A-Z, 0-9 and _).
func isoDChars(s string, max int) string {
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

// isoDirOrder lists the directories of the tree at root in path table
// order: by level, then by parent's number, then by identifier, which is
// breadth first with each directory's children in identifier order.
func isoDirOrder(root *isoEntry, kids func(*isoEntry) []*isoEntry) []*isoEntry {
	order := []*isoEntry{root}
	for i := 0; i < len(order); i++ {
		for _, c := range kids(order[i]) {
			if c.node.isDir() {
				order = append(order, c)
			}
		}
	}
	return order
}

// collectISOFiles lists the files under e, depth first, by name.
func collectISOFiles(e *isoEntry, files *[]*isoEntry) {
	kids := append([]*isoEntry(nil), e.priKids...)
	sort.Slice(kids, func(i, j int) bool { return kids[i].node.name < kids[j].node.name })
	for _, c := range kids {
		if c.node.isDir() {
			collectISOFiles(c, files)
		} else {
			*files = append(*files, c)
		}
	}
}

func isoPathTableSize(dirs []*isoEntry, id func(*isoEntry) []byte) uint32 {
	var n uint32
	for _, d := range dirs {
		n += 8 + uint32(len(id(d))+len(id(d))%2)
	}
	return n
}

// dirSize is the size of a directory's records in one tree: whole
// blocks, since a record may not cross a block boundary.
func (l *isoLayout) dirSize(d *isoEntry, joliet bool) uint32 {
	var blocks, used uint32 = 1, 0
	for _, n := range l.recordLengths(d, joliet) {
		if used+n > isoBlock {
			blocks++
			used = 0
		}
		used += n
	}
	return blocks * isoBlock
}

// recordLengths lists the lengths of a directory's records in one tree,
// "." and ".." first. Only the lengths matter here, so extents are zero.
func (l *isoLayout) recordLengths(d *isoEntry, joliet bool) []uint32 {
	recs := l.records(d, joliet)
	lens := make([]uint32, len(recs))
	for i, r := range recs {
		lens[i] = uint32(len(r))
	}
	return lens
}

// records builds a directory's records in one tree.
func (l *isoLayout) records(d *isoEntry, joliet bool) [][]byte {
	parent := d.parent
	if parent == nil {
		parent = d // the root's ".." is the root
	}
	kids := d.priKids
	if joliet {
		kids = d.jolKids
	}
	recs := make([][]byte, 0, 2+len(kids))
	recs = append(recs, l.record(d, []byte{0}, joliet, d.parent == nil),
		l.record(parent, []byte{1}, joliet, false))
	for _, c := range kids {
		id := c.isoID
		if joliet {
			id = c.jolID
		}
		recs = append(recs, l.record(c, id, joliet, false))
	}
	return recs
}

// Rock Ridge's ER entry names the extension; Linux uses Rock Ridge names
// only where the root's "." record carries one.
var (
	rripID          = "RRIP_1991A"
	rripDescription = "POSIX FILE SYSTEM SEMANTICS (RRIP 1.10)"
	rripSource      = "IEEE P1282 ROCK RIDGE INTERCHANGE PROTOCOL"
)

// record builds the directory record of e under identifier id. In the
// primary tree it carries Rock Ridge entries: SP and ER in the root's ".",
// PX always, NM for named entries.
func (l *isoLayout) record(e *isoEntry, id []byte, joliet, rootDot bool) []byte {
	var ext, size uint32
	var flags byte
	switch {
	case !e.node.isDir():
		ext, size = e.extent, e.size
	case joliet:
		ext, size, flags = e.jolExt, e.jolSize, 2
	default:
		ext, size, flags = e.priExt, e.priSize, 2
	}
	var su []byte
	if !joliet {
		if rootDot {
			su = append(su, 'S', 'P', 7, 1, 0xbe, 0xef, 0)
		}
		mode, links := uint32(isoFileMode), uint32(1)
		if e.node.isDir() {
			mode, links = isoDirMode, uint32(2+e.subdirs)
		}
		px := make([]byte, 36)
		copy(px, "PX")
		px[2], px[3] = 36, 1
		putBoth32(px[4:], mode)
		putBoth32(px[12:], links)
		su = append(su, px...) // uid and gid 0
		if len(id) > 1 || id[0] > 1 {
			su = append(su, 'N', 'M', byte(5+len(e.node.name)), 1, 0)
			su = append(su, e.node.name...)
		}
		if rootDot {
			su = append(su, 'E', 'R', byte(8+len(rripID)+len(rripDescription)+len(rripSource)), 1,
				byte(len(rripID)), byte(len(rripDescription)), byte(len(rripSource)), 1)
			su = append(su, rripID+rripDescription+rripSource...)
		}
	}
	n := 33 + len(id)
	if len(id)%2 == 0 {
		n++
	}
	n += len(su)
	n += n % 2
	r := make([]byte, n)
	r[0] = byte(n)
	putBoth32(r[2:], ext)
	putBoth32(r[10:], size)
	isoRecordTime(r[18:25], l.t)
	r[25] = flags
	putBoth16(r[28:], 1) // volume sequence number
	r[32] = byte(len(id))
	copy(r[33:], id)
	copy(r[33+len(id)+(1-len(id)%2):], su)
	return r
}

func putBoth16(b []byte, v uint16) {
	binary.LittleEndian.PutUint16(b, v)
	binary.BigEndian.PutUint16(b[2:], v)
}

func putBoth32(b []byte, v uint32) {
	binary.LittleEndian.PutUint32(b, v)
	binary.BigEndian.PutUint32(b[4:], v)
}

// isoRecordTime writes t in a directory record's 7-byte form, in UTC.
func isoRecordTime(b []byte, t time.Time) {
	b[0] = byte(t.Year() - 1900)
	b[1], b[2] = byte(t.Month()), byte(t.Day())
	b[3], b[4], b[5] = byte(t.Hour()), byte(t.Minute()), byte(t.Second())
	b[6] = 0
}

// isoVolumeTime writes t in a volume descriptor's 17-byte form, in UTC.
func isoVolumeTime(b []byte, t time.Time) {
	copy(b, fmt.Sprintf("%04d%02d%02d%02d%02d%02d%02d", t.Year(), int(t.Month()), t.Day(),
		t.Hour(), t.Minute(), t.Second(), t.Nanosecond()/1e7))
	b[16] = 0
}

// write writes the whole image in extent order.
func (l *isoLayout) write(ctx context.Context, w *bufio.Writer, label string) error {
	if _, err := w.Write(make([]byte, isoSystemArea*isoBlock)); err != nil {
		return err
	}
	w.Write(l.volumeDescriptor(1, label))
	w.Write(l.volumeDescriptor(2, label))
	term := make([]byte, isoBlock)
	term[0] = 255
	copy(term[1:], "CD001\x01")
	w.Write(term)
	for _, pt := range []struct {
		dirs   []*isoEntry
		joliet bool
		order  binary.ByteOrder
	}{
		{l.priDirs, false, binary.LittleEndian}, {l.priDirs, false, binary.BigEndian},
		{l.jolDirs, true, binary.LittleEndian}, {l.jolDirs, true, binary.BigEndian},
	} {
		writeISOBlocks(w, l.pathTable(pt.dirs, pt.joliet, pt.order))
	}
	for _, joliet := range []bool{false, true} {
		dirs := l.priDirs
		if joliet {
			dirs = l.jolDirs
		}
		for _, d := range dirs {
			block := make([]byte, 0, isoBlock)
			for _, r := range l.records(d, joliet) {
				if len(block)+len(r) > isoBlock {
					writeISOBlocks(w, block)
					block = block[:0]
				}
				block = append(block, r...)
			}
			writeISOBlocks(w, block)
		}
	}
	if err := w.Flush(); err != nil {
		return err
	}
	buf := make([]byte, isoCopyBuffer)
	for _, f := range l.files {
		if err := copyISOFile(ctx, w, f, buf); err != nil {
			return err
		}
	}
	return nil
}

// writeISOBlocks writes b padded with zeros to whole blocks. Errors stick
// in w, for the caller's next Flush.
func writeISOBlocks(w *bufio.Writer, b []byte) {
	w.Write(b)
	if pad := (isoBlock - len(b)%isoBlock) % isoBlock; pad > 0 {
		w.Write(make([]byte, pad))
	}
}

// copyISOFile copies one file's content, checking its size and ctx.
func copyISOFile(ctx context.Context, w *bufio.Writer, f *isoEntry, buf []byte) error {
	name := isoEntryPath(f)
	if ctx.Err() != nil {
		return contextError(ctx)
	}
	// An empty file is opened too: a failing opener, or a reader with
	// bytes for a file added as empty, fails the write as for any other.
	rc, err := f.node.open()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer rc.Close()
	var n int64
	for {
		if ctx.Err() != nil {
			return contextError(ctx)
		}
		m, rerr := rc.Read(buf)
		if n+int64(m) > int64(f.size) {
			return fmt.Errorf("%s: more than the %d bytes it was added with", name, f.size)
		}
		if m > 0 {
			if _, err := w.Write(buf[:m]); err != nil {
				return err
			}
			n += int64(m)
		}
		if rerr == io.EOF {
			break
		}
		if rerr != nil {
			return fmt.Errorf("%s: %w", name, rerr)
		}
	}
	if n != int64(f.size) {
		return fmt.Errorf("%s: %d bytes, not the %d it was added with", name, n, f.size)
	}
	if pad := (isoBlock - n%isoBlock) % isoBlock; pad > 0 {
		clear(buf[:pad])
		_, err := w.Write(buf[:pad])
		return err
	}
	return nil
}

func isoEntryPath(e *isoEntry) string {
	var elems []string
	for ; e.parent != nil; e = e.parent {
		elems = append(elems, e.node.name)
	}
	for i, j := 0, len(elems)-1; i < j; i, j = i+1, j-1 {
		elems[i], elems[j] = elems[j], elems[i]
	}
	return path.Join(elems...)
}

// pathTable builds one path table of a tree in one byte order.
func (l *isoLayout) pathTable(dirs []*isoEntry, joliet bool, order binary.ByteOrder) []byte {
	var b []byte
	for _, d := range dirs {
		id, ext, parent := d.isoID, d.priExt, d
		if d.parent != nil {
			parent = d.parent
		}
		num := parent.priNum
		if joliet {
			id, ext, num = d.jolID, d.jolExt, parent.jolNum
		}
		rec := make([]byte, 8+len(id)+len(id)%2)
		rec[0] = byte(len(id))
		order.PutUint32(rec[2:], ext)
		order.PutUint16(rec[6:], num)
		copy(rec[8:], id)
		b = append(b, rec...)
	}
	return b
}

// volumeDescriptor builds the primary (typ 1) or Joliet (typ 2) volume
// descriptor.
func (l *isoLayout) volumeDescriptor(typ byte, label string) []byte {
	vd := make([]byte, isoBlock)
	vd[0] = typ
	copy(vd[1:], "CD001\x01")
	text := func(b []byte, s string) { // a-characters, space padded
		copy(b, s+strings.Repeat(" ", len(b)-len(s)))
	}
	if typ == 2 {
		text = func(b []byte, s string) { // UCS-2, space padded
			u := utf16.Encode([]rune(s))
			for i := 0; i+1 < len(b); i += 2 {
				c := uint16(' ')
				if i/2 < len(u) {
					c = u[i/2]
				}
				binary.BigEndian.PutUint16(b[i:], c)
			}
		}
		copy(vd[88:], "%/E") // UCS-2 level 3
	}
	text(vd[8:40], "")
	if typ == 2 && len(label) > isoJolietLabelLen {
		label = label[:isoJolietLabelLen]
	}
	text(vd[40:72], label)
	putBoth32(vd[80:], l.blocks)
	putBoth16(vd[120:], 1) // volume set size
	putBoth16(vd[124:], 1) // volume sequence number
	putBoth16(vd[128:], isoBlock)
	root := l.root
	ptSize, lpt, mpt := l.priPT, l.priL, l.priM
	if typ == 2 {
		ptSize, lpt, mpt = l.jolPT, l.jolL, l.jolM
	}
	putBoth32(vd[132:], ptSize)
	binary.LittleEndian.PutUint32(vd[140:], lpt)
	binary.BigEndian.PutUint32(vd[148:], mpt)
	// The root's record without its system use area.
	copy(vd[156:190], l.record(root, []byte{0}, typ == 2, false)[:34])
	vd[156] = 34
	for _, f := range [][2]int{{190, 318}, {318, 446}, {446, 574}} { // volume set, publisher, preparer
		text(vd[f[0]:f[1]], "")
	}
	text(vd[574:702], isoApplication)
	for _, f := range [][2]int{{702, 739}, {739, 776}, {776, 813}} { // copyright, abstract, bibliography
		text(vd[f[0]:f[1]], "")
	}
	isoVolumeTime(vd[813:], l.t) // created
	isoVolumeTime(vd[830:], l.t) // modified
	copy(vd[847:], "0000000000000000")
	copy(vd[864:], "0000000000000000")
	vd[881] = 1 // file structure version
	return vd
}
