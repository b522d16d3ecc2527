package iso9660

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"path"
	"strings"
	"time"
	"unicode/utf16"
)

// Writing the laid-out image: volume descriptors, path tables, directory
// records with their Rock Ridge entries, and the files' content.

// write writes the whole image in extent order.
func (l *layout) write(ctx context.Context, w *bufio.Writer, label string) error {
	if _, err := w.Write(make([]byte, systemArea*BlockSize)); err != nil {
		return err
	}
	w.Write(l.volumeDescriptor(1, label))
	w.Write(l.volumeDescriptor(2, label))
	term := make([]byte, BlockSize)
	term[0] = 255
	copy(term[1:], "CD001\x01")
	w.Write(term)
	for _, pt := range []struct {
		dirs   []*entry
		joliet bool
		order  binary.ByteOrder
	}{
		{l.priDirs, false, binary.LittleEndian}, {l.priDirs, false, binary.BigEndian},
		{l.jolDirs, true, binary.LittleEndian}, {l.jolDirs, true, binary.BigEndian},
	} {
		writeBlocks(w, l.pathTable(pt.dirs, pt.joliet, pt.order))
	}
	for _, joliet := range []bool{false, true} {
		dirs := l.priDirs
		if joliet {
			dirs = l.jolDirs
		}
		for _, d := range dirs {
			block := make([]byte, 0, BlockSize)
			for _, r := range l.records(d, joliet) {
				if len(block)+len(r) > BlockSize {
					writeBlocks(w, block)
					block = block[:0]
				}
				block = append(block, r...)
			}
			writeBlocks(w, block)
		}
	}
	if err := w.Flush(); err != nil {
		return err
	}
	buf := make([]byte, copyBuffer)
	for _, f := range l.files {
		if err := copyFile(ctx, w, f, buf); err != nil {
			return err
		}
	}
	return nil
}

// volumeDescriptor builds the primary (typ 1) or Joliet (typ 2) volume
// descriptor.
func (l *layout) volumeDescriptor(typ byte, label string) []byte {
	vd := make([]byte, BlockSize)
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
	if typ == 2 && len(label) > JolietLabelLen {
		label = label[:JolietLabelLen]
	}
	text(vd[40:72], label)
	putBoth32(vd[80:], l.blocks)
	putBoth16(vd[120:], 1) // volume set size
	putBoth16(vd[124:], 1) // volume sequence number
	putBoth16(vd[128:], BlockSize)
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
	text(vd[574:702], application)
	for _, f := range [][2]int{{702, 739}, {739, 776}, {776, 813}} { // copyright, abstract, bibliography
		text(vd[f[0]:f[1]], "")
	}
	volumeTime(vd[813:], l.t) // created
	volumeTime(vd[830:], l.t) // modified
	copy(vd[847:], "0000000000000000")
	copy(vd[864:], "0000000000000000")
	vd[881] = 1 // file structure version
	return vd
}

// pathTable builds one path table of a tree in one byte order.
func (l *layout) pathTable(dirs []*entry, joliet bool, order binary.ByteOrder) []byte {
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

// records builds a directory's records in one tree.
func (l *layout) records(d *entry, joliet bool) [][]byte {
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
func (l *layout) record(e *entry, id []byte, joliet, rootDot bool) []byte {
	var ext, size uint32
	var flags byte
	switch {
	case !e.node.IsDir():
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
		mode, links := uint32(FileMode), uint32(1)
		if e.node.IsDir() {
			mode, links = DirMode, uint32(2+e.subdirs)
		}
		px := make([]byte, 36)
		copy(px, "PX")
		px[2], px[3] = 36, 1
		putBoth32(px[4:], mode)
		putBoth32(px[12:], links)
		su = append(su, px...) // uid and gid 0
		if len(id) > 1 || id[0] > 1 {
			su = append(su, 'N', 'M', byte(5+len(e.node.Name)), 1, 0)
			su = append(su, e.node.Name...)
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
	recordTime(r[18:25], l.t)
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

// recordTime writes t in a directory record's 7-byte form, in UTC.
func recordTime(b []byte, t time.Time) {
	b[0] = byte(t.Year() - 1900)
	b[1], b[2] = byte(t.Month()), byte(t.Day())
	b[3], b[4], b[5] = byte(t.Hour()), byte(t.Minute()), byte(t.Second())
	b[6] = 0
}

// volumeTime writes t in a volume descriptor's 17-byte form, in UTC.
func volumeTime(b []byte, t time.Time) {
	copy(b, fmt.Sprintf("%04d%02d%02d%02d%02d%02d%02d", t.Year(), int(t.Month()), t.Day(),
		t.Hour(), t.Minute(), t.Second(), t.Nanosecond()/1e7))
	b[16] = 0
}

// writeBlocks writes b padded with zeros to whole blocks. Errors stick
// in w, for the caller's next Flush.
func writeBlocks(w *bufio.Writer, b []byte) {
	w.Write(b)
	if pad := (BlockSize - len(b)%BlockSize) % BlockSize; pad > 0 {
		w.Write(make([]byte, pad))
	}
}

// copyFile copies one file's content, checking its size and ctx.
func copyFile(ctx context.Context, w *bufio.Writer, f *entry, buf []byte) error {
	name := entryPath(f)
	if ctx.Err() != nil {
		return ctx.Err()
	}
	// An empty file is opened too: a failing opener, or a reader with
	// bytes for a file added as empty, fails the write as for any other.
	rc, err := f.node.Open()
	if err != nil {
		return fmt.Errorf("%s: %w", name, err)
	}
	defer rc.Close()
	var n int64
	for {
		if ctx.Err() != nil {
			return ctx.Err()
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
	if pad := (BlockSize - n%BlockSize) % BlockSize; pad > 0 {
		clear(buf[:pad])
		_, err := w.Write(buf[:pad])
		return err
	}
	return nil
}

func entryPath(e *entry) string {
	var elems []string
	for ; e.parent != nil; e = e.parent {
		elems = append(elems, e.node.Name)
	}
	for i, j := 0, len(elems)-1; i < j; i, j = i+1, j-1 {
		elems[i], elems[j] = elems[j], elems[i]
	}
	return path.Join(elems...)
}
