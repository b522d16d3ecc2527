// Package iso9660 encodes a tree of files as an ISO 9660 image with Rock
// Ridge and Joliet names: the records, path tables, names and layout
// behind the qemu package's ISOImage, which checks the tree's limits
// before it gets here.
package iso9660

import (
	"bufio"
	"context"
	"io"
	"time"
)

// The encoder's constants; the tests' independent reader of images uses
// those that are exported.
const (
	// BlockSize is the size of a logical block, and so of a sector.
	BlockSize   = 2048
	systemArea  = 16 // blocks before the first volume descriptor
	firstExtent = systemArea + 3
	// JolietLabelLen is what a Joliet volume identifier holds: 32
	// bytes of UCS-2.
	JolietLabelLen = 16
	// FileMode and DirMode are the Rock Ridge modes of every file and
	// directory: read-only.
	FileMode    = 0o100444 // S_IFREG r--r--r--
	DirMode     = 0o040555 // S_IFDIR r-xr-xr-x
	application = "GITHUB.COM/FC93C01D/QEMU"
	copyBuffer  = 256 << 10
	// MinYear and MaxYear bound the times an image can record: a
	// directory record holds its year as years since 1900 in one byte.
	MinYear, MaxYear = 1900, 1900 + 255
)

// Write writes the image of the tree under root (an empty image when root
// is nil), labelled label, with t as the time of every entry. It reads
// each file's content once, in order, in reads of up to 256 KiB that go to
// w through a 64 KiB bufio.Writer. When ctx ends first it returns
// ctx.Err(), and w holds part of an image.
func Write(ctx context.Context, w io.Writer, root *Node, label string, t time.Time) error {
	l, err := layOut(root, t)
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 64<<10)
	if err := l.write(ctx, bw, label); err != nil {
		return err
	}
	return bw.Flush()
}

// Node is one entry of an image's tree.
type Node struct {
	Name     string
	Children map[string]*Node // nil for a file
	Size     int64
	// Open gives a file's content, which must be Size bytes.
	Open func() (io.ReadCloser, error)
}

// IsDir reports whether n is a directory.
func (n *Node) IsDir() bool { return n.Children != nil }
