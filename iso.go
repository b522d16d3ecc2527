package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/fc93c01d/qemu/internal/iso9660"
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

	root *iso9660.Node
	dirs int // directories in the tree, the root included
}

// AddFile adds a file named name (a slash-separated path relative to the
// image's root) holding data. The image keeps data, which must not change
// until the last Write returns.
func (im *ISOImage) AddFile(name string, data []byte) error {
	return im.add(name, &iso9660.Node{Size: int64(len(data)), Open: func() (io.ReadCloser, error) {
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
	return im.add(name, &iso9660.Node{Size: size, Open: open})
}

// AddDir adds a directory named name, for directories that hold nothing;
// one that a file's path passes through needs no AddDir.
func (im *ISOImage) AddDir(name string) error {
	return im.add(name, &iso9660.Node{Children: map[string]*iso9660.Node{}})
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
func (im *ISOImage) add(name string, n *iso9660.Node) error {
	elems, err := checkISOPath(name, n.IsDir())
	if err != nil {
		return fmt.Errorf("qemu: iso: %w", err)
	}
	if n.Size > MaxISOFileSize {
		return fmt.Errorf("qemu: iso: %s: %d bytes, more than the %d a file may hold", name, n.Size, int64(MaxISOFileSize))
	}
	if im.root == nil {
		im.root = &iso9660.Node{Children: map[string]*iso9660.Node{}}
		im.dirs = 1
	}
	// Check everything before changing anything: a failed add leaves the
	// tree as it was.
	newDirs := 0
	if n.IsDir() {
		newDirs++
	}
	dir := im.root
	for i, e := range elems[:len(elems)-1] {
		c := dir.Children[e]
		if c == nil {
			newDirs += len(elems) - 1 - i
			break
		}
		if !c.IsDir() {
			return fmt.Errorf("qemu: iso: %s: %s is a file", name, strings.Join(elems[:i+1], "/"))
		}
		dir = c
	}
	if im.dirs+newDirs > MaxISODirs {
		return fmt.Errorf("qemu: iso: %s: more than %d directories", name, MaxISODirs)
	}
	dir = im.root
	for _, e := range elems[:len(elems)-1] {
		c := dir.Children[e]
		if c == nil {
			c = &iso9660.Node{Name: e, Children: map[string]*iso9660.Node{}}
			dir.Children[e] = c
			im.dirs++
		}
		dir = c
	}
	last := elems[len(elems)-1]
	if old := dir.Children[last]; old != nil {
		if old.IsDir() && n.IsDir() {
			return nil // already there, implicitly or not
		}
		return fmt.Errorf("qemu: iso: %s: already in the image", name)
	}
	n.Name = last
	dir.Children[last] = n
	if n.IsDir() {
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
	if y := t.Year(); y < iso9660.MinYear || y > iso9660.MaxYear {
		return fmt.Errorf("ModTime %s: outside the years %d to %d that ISO 9660 records", t.Format(time.RFC3339), iso9660.MinYear, iso9660.MaxYear)
	}
	if err := iso9660.Write(ctx, w, im.root, im.Label, t); err != nil {
		if ctx.Err() != nil && errors.Is(err, ctx.Err()) {
			return contextError(ctx)
		}
		return err
	}
	return nil
}
