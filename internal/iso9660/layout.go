package iso9660

import (
	"fmt"
	"sort"
	"time"
)

// Layout: where every directory's records, path table and file goes in
// the image, in blocks.

// entry is a node placed in the image: its names in both trees and
// where its data goes.
type entry struct {
	node   *Node
	parent *entry
	isoID  []byte // ISO 9660 file identifier, ";1" included for files
	jolID  []byte // Joliet identifier, UCS-2 big-endian
	// A directory's children, in the order of each tree.
	priKids, jolKids []*entry
	subdirs          int
	// For a directory: its number in each path table and the extent and
	// size of its records in each tree. For a file: its data.
	priNum, jolNum   uint16
	priExt, jolExt   uint32
	priSize, jolSize uint32
	extent           uint32
	size             uint32
}

// layout is where everything of an image goes.
type layout struct {
	t                      time.Time
	root                   *entry
	priDirs, jolDirs       []*entry // in path table order
	files                  []*entry // in extent order
	priPT, jolPT           uint32   // path table sizes in bytes
	priL, priM, jolL, jolM uint32   // their extents
	blocks                 uint32   // of the whole image
}

func layOut(root *Node, t time.Time) (*layout, error) {
	if root == nil {
		root = &Node{Children: map[string]*Node{}}
	}
	l := &layout{t: t}
	l.root = place(root, nil)
	l.root.isoID, l.root.jolID = []byte{0}, []byte{0}
	l.priDirs = dirOrder(l.root, func(e *entry) []*entry { return e.priKids })
	l.jolDirs = dirOrder(l.root, func(e *entry) []*entry { return e.jolKids })
	for i, d := range l.priDirs {
		d.priNum = uint16(i + 1)
	}
	for i, d := range l.jolDirs {
		d.jolNum = uint16(i + 1)
	}
	l.priPT = pathTableSize(l.priDirs, func(e *entry) []byte { return e.isoID })
	l.jolPT = pathTableSize(l.jolDirs, func(e *entry) []byte { return e.jolID })

	next := uint64(firstExtent)
	take := func(bytes uint64) uint32 {
		ext := next
		next += (bytes + BlockSize - 1) / BlockSize
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
	collectFiles(l.root, &l.files)
	for _, f := range l.files {
		f.size = uint32(f.node.Size)
		f.extent = take(uint64(f.size))
	}
	if next > 1<<32-1 {
		return nil, fmt.Errorf("image of %d blocks, more than 32 bits can address", next)
	}
	l.blocks = uint32(next)
	return l, nil
}

// place makes the entry of n and its children, naming each child in
// both trees.
func place(n *Node, parent *entry) *entry {
	e := &entry{node: n, parent: parent}
	if !n.IsDir() {
		return e
	}
	names := make([]string, 0, len(n.Children))
	for name := range n.Children {
		names = append(names, name)
	}
	sort.Strings(names)
	used := make(map[string]bool, len(names))
	for _, name := range names {
		c := place(n.Children[name], e)
		c.isoID = []byte(identifier(name, c.node.IsDir(), used))
		c.jolID = jolietIdentifier(name)
		if c.node.IsDir() {
			e.subdirs++
		}
		e.priKids = append(e.priKids, c)
	}
	e.jolKids = append([]*entry(nil), e.priKids...)
	sortRecords(e.priKids, false)
	sortRecords(e.jolKids, true)
	return e
}

// dirOrder lists the directories of the tree at root in path table
// order: by level, then by parent's number, then by identifier, which is
// breadth first with each directory's children in identifier order.
func dirOrder(root *entry, kids func(*entry) []*entry) []*entry {
	order := []*entry{root}
	for i := 0; i < len(order); i++ {
		for _, c := range kids(order[i]) {
			if c.node.IsDir() {
				order = append(order, c)
			}
		}
	}
	return order
}

// collectFiles lists the files under e, depth first, by name.
func collectFiles(e *entry, files *[]*entry) {
	kids := append([]*entry(nil), e.priKids...)
	sort.Slice(kids, func(i, j int) bool { return kids[i].node.Name < kids[j].node.Name })
	for _, c := range kids {
		if c.node.IsDir() {
			collectFiles(c, files)
		} else {
			*files = append(*files, c)
		}
	}
}

func pathTableSize(dirs []*entry, id func(*entry) []byte) uint32 {
	var n uint32
	for _, d := range dirs {
		n += 8 + uint32(len(id(d))+len(id(d))%2)
	}
	return n
}

// dirSize is the size of a directory's records in one tree: whole
// blocks, since a record may not cross a block boundary.
func (l *layout) dirSize(d *entry, joliet bool) uint32 {
	var blocks, used uint32 = 1, 0
	for _, n := range l.recordLengths(d, joliet) {
		if used+n > BlockSize {
			blocks++
			used = 0
		}
		used += n
	}
	return blocks * BlockSize
}

// recordLengths lists the lengths of a directory's records in one tree,
// "." and ".." first. Only the lengths matter here, so extents are zero.
func (l *layout) recordLengths(d *entry, joliet bool) []uint32 {
	recs := l.records(d, joliet)
	lens := make([]uint32, len(recs))
	for i, r := range recs {
		lens[i] = uint32(len(r))
	}
	return lens
}
