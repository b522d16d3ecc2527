package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strconv"
)

// agentChunk is how much one guest-file-read or guest-file-write carries,
// so that a copy of any size makes lines of about 1.4 MB (base64): the
// agent's speed here is per byte, 1 and 4 MiB chunks alike (GUEST.md).
const agentChunk = 1 << 20

// GuestFile is a file open in the guest through the agent's guest-file-*
// commands. Read, Write and Seek work as io.ReadWriteSeeker's, each call
// bounded by the file's context (as a net.Conn's deadline bounds its
// calls): the one given to OpenFile, until SetContext gives another, so a
// long copy can have a budget of its own. ReadFrom and WriteTo make
// io.Copy move 1 MiB a command. The agent has no stat: Size seeks. A
// GuestFile is not safe for concurrent use: the agent keeps one position
// per handle.
type GuestFile struct {
	a      *GuestAgent
	ctx    context.Context
	handle int
	path   string
	closed bool
}

// OpenFile runs guest-file-open for the guest's path with an fopen mode
// ("r" when empty). ctx bounds every call on the returned file.
func (a *GuestAgent) OpenFile(ctx context.Context, path, mode string) (*GuestFile, error) {
	args := struct {
		Path string `json:"path"`
		Mode string `json:"mode,omitempty"`
	}{path, mode}
	h, err := callFor[int](ctx, a, "guest-file-open", path, args)
	if err != nil {
		return nil, err
	}
	return &GuestFile{a: a, ctx: ctx, handle: h, path: path}, nil
}

// errFileClosed is the error of a call on a closed GuestFile.
var errFileClosed = errors.New("file already closed")

func (f *GuestFile) args() handleArgs { return handleArgs{f.handle} }

type handleArgs struct {
	Handle int `json:"handle"`
}

func (f *GuestFile) run(name string, args, result interface{}) error {
	if f.closed {
		return fmt.Errorf("qga: %s %s: %w", name, f.path, errFileClosed)
	}
	return f.a.call(f.ctx, name, f.path, args, result)
}

// Read reads up to len(p) bytes (at most 1 MiB a call) at the file's
// position. At the end of the file it returns io.EOF.
func (f *GuestFile) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	var r struct {
		Count int    `json:"count"`
		Buf   []byte `json:"buf-b64"`
		EOF   bool   `json:"eof"`
	}
	args := struct {
		handleArgs
		Count int `json:"count"`
	}{f.args(), min(len(p), agentChunk)}
	if err := f.run("guest-file-read", args, &r); err != nil {
		return 0, err
	}
	if len(r.Buf) > len(p) || r.Count != len(r.Buf) {
		return 0, fmt.Errorf("qga: guest-file-read %s: %d bytes (count %d) for %d asked", f.path, len(r.Buf), r.Count, len(p))
	}
	n := copy(p, r.Buf)
	if n == 0 && r.EOF {
		return 0, io.EOF
	}
	return n, nil
}

// Write writes p at the file's position, 1 MiB a command.
func (f *GuestFile) Write(p []byte) (int, error) {
	n := 0
	for n < len(p) {
		chunk := p[n:min(len(p), n+agentChunk)]
		var r struct {
			Count int `json:"count"`
		}
		args := struct {
			handleArgs
			Buf []byte `json:"buf-b64"`
		}{f.args(), chunk}
		if err := f.run("guest-file-write", args, &r); err != nil {
			return n, err
		}
		if r.Count <= 0 || r.Count > len(chunk) {
			return n, fmt.Errorf("qga: guest-file-write %s: %d of %d bytes written", f.path, r.Count, len(chunk))
		}
		n += r.Count
	}
	return n, nil
}

// ReadFrom writes what r reads into the file, 1 MiB a command, until r's
// io.EOF, and returns how many bytes it wrote.
func (f *GuestFile) ReadFrom(r io.Reader) (int64, error) {
	buf := make([]byte, agentChunk)
	var total int64
	for {
		n, err := io.ReadFull(r, buf)
		if n > 0 {
			m, werr := f.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if err == io.EOF || err == io.ErrUnexpectedEOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// WriteTo reads the file from its position to its end into w, 1 MiB a
// command, and returns how many bytes it copied.
func (f *GuestFile) WriteTo(w io.Writer) (int64, error) {
	buf := make([]byte, agentChunk)
	var total int64
	for {
		n, err := f.Read(buf)
		if n > 0 {
			m, werr := w.Write(buf[:n])
			total += int64(m)
			if werr != nil {
				return total, werr
			}
		}
		if err == io.EOF {
			return total, nil
		}
		if err != nil {
			return total, err
		}
	}
}

// Seek sets the file's position as io.Seeker does (whence io.SeekStart,
// io.SeekCurrent or io.SeekEnd) and returns the new position.
func (f *GuestFile) Seek(offset int64, whence int) (int64, error) {
	names := map[int]string{io.SeekStart: "set", io.SeekCurrent: "cur", io.SeekEnd: "end"}
	name, ok := names[whence]
	if !ok {
		return 0, fmt.Errorf("qga: guest-file-seek %s: whence %d is not io.SeekStart, io.SeekCurrent or io.SeekEnd", f.path, whence)
	}
	var r struct {
		Position int64 `json:"position"`
	}
	args := struct {
		handleArgs
		Offset int64  `json:"offset"`
		Whence string `json:"whence"`
	}{f.args(), offset, name}
	err := f.run("guest-file-seek", args, &r)
	return r.Position, err
}

// SetContext makes ctx bound the file's calls from now on, in place of
// the context given to OpenFile or to the previous SetContext.
func (f *GuestFile) SetContext(ctx context.Context) { f.ctx = ctx }

// Size returns the file's size: it seeks to the end and back to where the
// file's position was (three guest-file-seek commands).
func (f *GuestFile) Size() (int64, error) {
	pos, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return 0, err
	}
	size, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		return 0, err
	}
	if _, err := f.Seek(pos, io.SeekStart); err != nil {
		return 0, err
	}
	return size, nil
}

// Flush runs guest-file-flush: what the agent buffered goes to the guest's
// kernel.
func (f *GuestFile) Flush() error {
	return f.run("guest-file-flush", f.args(), nil)
}

// Close runs guest-file-close, so the agent lets go of its handle: when
// OpenFile's context is done, with agentCleanupTimeout of its own. Calls
// after the first return an error.
func (f *GuestFile) Close() error {
	if f.closed {
		return f.run("guest-file-close", nil, nil)
	}
	ctx := f.ctx
	if ctx.Err() != nil {
		var cancel context.CancelFunc
		ctx, cancel = graceContext(ctx, agentCleanupTimeout)
		defer cancel()
	}
	f.closed = true
	return f.a.call(ctx, "guest-file-close", f.path, f.args(), nil)
}

// String names the file: its guest path and agent handle.
func (f *GuestFile) String() string { return f.path + " (handle " + strconv.Itoa(f.handle) + ")" }
