package qemu

import (
	"context"
	"errors"
	"os"
	"strconv"
)

// Passing open files to QEMU. Each command here sends its file as
// SCM_RIGHTS ancillary data on the command's own write, so the file can
// never be matched to another command; it needs a session on a unix socket
// (QMPStart's, or an Instance's socket pair) and no QMP capability. The
// caller keeps its file: QEMU receives a duplicate of the descriptor, so
// the file may be closed as soon as the call has returned, whatever it
// returned.

// ExecuteGetFD sends f to QEMU under name (getfd), for the commands that
// take a file by name: netdev_add's tap fd, migrate's fd: URI, and so on.
func (q *QMP) ExecuteGetFD(ctx context.Context, name string, f *os.File) error {
	args := fdNameArgs{name}
	return q.runWithFile(ctx, "getfd", name, args, nil, f)
}

type fdNameArgs struct {
	FDName string `json:"fdname"`
}

// ExecuteCloseFD closes the file QEMU holds under name (closefd).
func (q *QMP) ExecuteCloseFD(ctx context.Context, name string) error {
	args := fdNameArgs{name}
	return q.run(ctx, "closefd", name, args, nil)
}

// AddFDOptions are add-fd's optional arguments.
type AddFDOptions struct {
	// FDSetID is the fd set to add to; nil makes QEMU start a new one.
	FDSetID *int
	// Opaque is a free-form string QEMU keeps beside the file and
	// query-fdsets lists.
	Opaque string
}

// AddFDInfo is what add-fd returns: the fd set the file went into and the
// descriptor number QEMU gave it.
type AddFDInfo struct {
	FDSetID int `json:"fdset-id"`
	FD      int `json:"fd"`
}

// ExecuteAddFD adds f to an fd set (add-fd). QEMU then opens it for any
// file name /dev/fdset/ID, such as a blockdev-add's filename, when the
// access mode asked for matches the file's; a set is freed once no
// descriptor is in it and none is in use.
func (q *QMP) ExecuteAddFD(ctx context.Context, f *os.File, opts AddFDOptions) (AddFDInfo, error) {
	args := struct {
		FDSetID *int   `json:"fdset-id,omitempty"`
		Opaque  string `json:"opaque,omitempty"`
	}{opts.FDSetID, opts.Opaque}
	var info AddFDInfo
	about := ""
	if opts.FDSetID != nil {
		about = "fdset " + strconv.Itoa(*opts.FDSetID)
	}
	err := q.runWithFile(ctx, "add-fd", about, args, &info, f)
	return info, err
}

// ExecuteRemoveFD removes the descriptor fd from fd set fdsetID
// (remove-fd), or the whole set when fd is nil. QEMU closes a descriptor
// once nothing uses it any more.
func (q *QMP) ExecuteRemoveFD(ctx context.Context, fdsetID int, fd *int) error {
	args := struct {
		FDSetID int  `json:"fdset-id"`
		FD      *int `json:"fd,omitempty"`
	}{fdsetID, fd}
	return q.run(ctx, "remove-fd", "fdset "+strconv.Itoa(fdsetID), args, nil)
}

// FDSet is one fd set, as query-fdsets lists it.
type FDSet struct {
	FDSetID int          `json:"fdset-id"`
	FDs     []FDSetEntry `json:"fds"`
}

// FDSetEntry is one descriptor of an fd set.
type FDSetEntry struct {
	FD     int    `json:"fd"`
	Opaque string `json:"opaque,omitempty"`
}

// ExecuteQueryFDSets lists the fd sets QEMU holds (query-fdsets).
func (q *QMP) ExecuteQueryFDSets(ctx context.Context) ([]FDSet, error) {
	return runFor[[]FDSet](ctx, q, "query-fdsets", "", nil)
}

// runWithFile runs a command with f sent on its write.
func (q *QMP) runWithFile(ctx context.Context, name, about string, args, result interface{}, f *os.File) error {
	if f == nil {
		return commandError(name, about, errors.New("the file is nil"))
	}
	if err := q.s.execute(ctx, name, args, result, []*os.File{f}); err != nil {
		return commandError(name, about, err)
	}
	return nil
}
