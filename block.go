package qemu

import (
	"context"
	"errors"
	"os"
	"strings"
)

// Typed block commands: the seed package's blockdev-add and
// x-blockdev-del, a node graph built with blockdev-add, format layer over
// protocol layer, and the queries that read it back.

// ExecuteBlockdevAdd sends a blockdev-add to the QEMU instance. device is the
// path of the device to add, e.g., /dev/rdb0, and blockdevID is an identifier
// used to name the device. As this identifier will be passed directly to QMP,
// it must obey QMP's naming rules, e,g., it must start with a letter.
//
// The argument form follows the QEMU version from the greeting: up to 2.7
// the "options" wrapper with "id", from 2.8 the flat form with "node-name".
// The file driver is "host_device" when device is a block or character
// device, "file" otherwise.
func (q *QMP) ExecuteBlockdevAdd(ctx context.Context, device, blockdevID string) error {
	file := blockdevFile{Driver: fileDriver(device), Filename: device}
	var args interface{}
	if q.version.atLeast(2, 8) {
		args = blockdevOptions{Driver: "raw", NodeName: blockdevID, File: file}
	} else {
		args = struct {
			Options blockdevOptions `json:"options"`
		}{blockdevOptions{Driver: "raw", ID: blockdevID, File: file}}
	}
	return q.run(ctx, "blockdev-add", blockdevID, args, nil)
}

type blockdevFile struct {
	Driver   string `json:"driver"`
	Filename string `json:"filename"`
}

type blockdevOptions struct {
	Driver   string       `json:"driver"`
	ID       string       `json:"id,omitempty"`
	NodeName string       `json:"node-name,omitempty"`
	File     blockdevFile `json:"file"`
}

// ExecuteXBlockdevDel deletes a block device by sending a x-blockdev-del
// command. blockdevID is the id of the block device to be deleted.
// Typically, this will match the id passed to ExecuteBlockdevAdd. It must be
// a valid QMP id.
//
// The command follows the QEMU version from the greeting: x-blockdev-del
// with "id" up to 2.7, with "node-name" on 2.8, and blockdev-del with
// "node-name" from 2.9, where the command lost its x- prefix.
func (q *QMP) ExecuteXBlockdevDel(ctx context.Context, blockdevID string) error {
	switch {
	case q.version.atLeast(2, 9):
		return q.run(ctx, "blockdev-del", blockdevID, nodeNameArgs{blockdevID}, nil)
	case q.version.atLeast(2, 8):
		return q.run(ctx, "x-blockdev-del", blockdevID, nodeNameArgs{blockdevID}, nil)
	default:
		args := idArgs{blockdevID}
		return q.run(ctx, "x-blockdev-del", blockdevID, args, nil)
	}
}

// BlockdevNode is a node for blockdev-add: a format (raw, qcow2) over a
// protocol layer, which is either a file named here (File) or a node added
// before (FileNode).
type BlockdevNode struct {
	// NodeName names the node, for device_add's drive and blockdev-del.
	NodeName string

	// Driver is the format: "raw" or "qcow2" (or any other QEMU has).
	Driver string

	// File is the protocol layer, added with the node; ignored when
	// FileNode is set.
	File BlockdevFile

	// FileNode names an existing node to use as the protocol layer.
	FileNode string

	// Backing, for qcow2, names the node of the backing image, replacing
	// the one named in the image; NoBacking opens the image with none.
	// With neither, QEMU opens the backing file the image names.
	Backing   string
	NoBacking bool

	// ReadOnly opens the node read-only; AutoReadOnly lets QEMU fall back
	// to read-only when the file cannot be opened for writing.
	ReadOnly     bool
	AutoReadOnly bool

	// CacheDirect bypasses the host's page cache (O_DIRECT); CacheNoFlush
	// ignores the guest's flushes.
	CacheDirect  bool
	CacheNoFlush bool

	// Discard is "ignore" or "unmap": whether the guest's discards free
	// space in the image. Empty leaves QEMU's default, ignore.
	Discard string
}

// BlockdevFile is a protocol layer: a host file or device.
type BlockdevFile struct {
	// Filename is the host path, or /dev/fdset/N for a file passed with
	// ExecuteAddFD.
	Filename string

	// Driver is "file" or "host_device"; empty chooses host_device for a
	// block or character device and file otherwise, as ExecuteBlockdevAdd
	// does.
	Driver string

	// AIO is "threads", "native" (which needs CacheDirect) or "io_uring";
	// empty leaves QEMU's default, threads.
	AIO string
}

// args returns blockdev-add's arguments.
func (n BlockdevNode) args() (map[string]interface{}, error) {
	if n.NodeName == "" || n.Driver == "" {
		return nil, errors.New("NodeName and Driver must be set")
	}
	a := map[string]interface{}{"driver": n.Driver, "node-name": n.NodeName}
	switch {
	case n.FileNode != "":
		a["file"] = n.FileNode
	case n.File.Filename != "":
		a["file"] = n.File.args()
	default:
		return nil, errors.New("neither File.Filename nor FileNode is set")
	}
	switch {
	case n.Backing != "" && n.NoBacking:
		return nil, errors.New("both Backing and NoBacking are set")
	case n.Backing != "":
		a["backing"] = n.Backing
	case n.NoBacking:
		a["backing"] = nil
	}
	if n.ReadOnly {
		a["read-only"] = true
	}
	if n.AutoReadOnly {
		a["auto-read-only"] = true
	}
	if n.CacheDirect || n.CacheNoFlush {
		a["cache"] = map[string]bool{"direct": n.CacheDirect, "no-flush": n.CacheNoFlush}
	}
	if n.Discard != "" {
		a["discard"] = n.Discard
	}
	return a, nil
}

func (f BlockdevFile) args() map[string]interface{} {
	driver := f.Driver
	if driver == "" {
		driver = fileDriver(f.Filename)
	}
	a := map[string]interface{}{"driver": driver, "filename": f.Filename}
	if f.AIO != "" {
		a["aio"] = f.AIO
	}
	return a
}

// fileDriver is host_device for a block or character device, file
// otherwise (QEMU 6.0 removed devices from file).
func fileDriver(path string) string {
	if fi, err := os.Stat(path); err == nil && fi.Mode()&os.ModeDevice != 0 {
		return "host_device"
	}
	return "file"
}

// ExecuteBlockdevAddNode adds a block node (blockdev-add) with its format
// and protocol layers: unlike ExecuteBlockdevAdd, which exposes any file as
// raw, it opens a qcow2 image as qcow2.
func (q *QMP) ExecuteBlockdevAddNode(ctx context.Context, node BlockdevNode) error {
	args, err := node.args()
	if err != nil {
		return commandError("blockdev-add", node.NodeName, err)
	}
	return q.run(ctx, "blockdev-add", node.NodeName, args, nil)
}

// ExecuteBlockdevDel deletes a block node that no device uses any more
// (blockdev-del).
func (q *QMP) ExecuteBlockdevDel(ctx context.Context, nodeName string) error {
	return q.run(ctx, "blockdev-del", nodeName, nodeNameArgs{nodeName}, nil)
}

// ExecuteBlockResize grows or shrinks a node to size bytes (block_resize);
// the guest sees the new size of its disk.
func (q *QMP) ExecuteBlockResize(ctx context.Context, nodeName string, size int64) error {
	args := struct {
		NodeName string `json:"node-name"`
		Size     int64  `json:"size"`
	}{nodeName, size}
	return q.run(ctx, "block_resize", nodeName, args, nil)
}

// BlockNodeInfo is a node as query-named-block-nodes lists it, with the
// image below it.
type BlockNodeInfo struct {
	NodeName string    `json:"node-name"`
	Driver   string    `json:"drv"`
	File     string    `json:"file"`
	ReadOnly bool      `json:"ro"`
	Image    ImageInfo `json:"image"`
}

// ImageInfo describes an image and, through BackingImage, its backing
// chain.
type ImageInfo struct {
	Filename     string     `json:"filename"`
	Format       string     `json:"format"`
	VirtualSize  int64      `json:"virtual-size"`
	BackingFile  string     `json:"backing-filename,omitempty"`
	BackingImage *ImageInfo `json:"backing-image,omitempty"`
}

// ExecuteQueryNamedBlockNodes lists the block nodes (query-named-block-nodes).
func (q *QMP) ExecuteQueryNamedBlockNodes(ctx context.Context) ([]BlockNodeInfo, error) {
	return runFor[[]BlockNodeInfo](ctx, q, "query-named-block-nodes", "", nil)
}

// BlockInfo is a block backend as query-block lists it: a drive, or the
// backend of a device; Inserted is its top node, absent for an empty one.
type BlockInfo struct {
	Device   string         `json:"device"`
	QDev     string         `json:"qdev"`
	Inserted *BlockNodeInfo `json:"inserted,omitempty"`
}

// ExecuteQueryBlock lists the block backends (query-block).
func (q *QMP) ExecuteQueryBlock(ctx context.Context) ([]BlockInfo, error) {
	return runFor[[]BlockInfo](ctx, q, "query-block", "", nil)
}

// FindBlockDevice returns the backend of the device with id devID among
// blocks (ExecuteQueryBlock), or nil: its Inserted.NodeName is the node the
// device reads and writes, after a mirror's pivot too. A device given a
// node (-device ...,drive=NODE, device_add) has an empty Device; QEMU
// names it in QDev, by its id or by its QOM path (virtio devices:
// /machine/peripheral/ID/virtio-backend).
func FindBlockDevice(blocks []BlockInfo, devID string) *BlockInfo {
	path := "/machine/peripheral/" + devID
	for i, b := range blocks {
		if b.QDev == devID || b.QDev == path || strings.HasPrefix(b.QDev, path+"/") {
			return &blocks[i]
		}
	}
	return nil
}
