package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// ConsolePort is the device that carries an Instance's console.
type ConsolePort string

const (
	// ConsoleSerial is the ISA serial port, the guest's ttyS0.
	ConsoleSerial ConsolePort = "serial"
	// ConsoleVirtio is a virtconsole port on a virtio-serial bus of its
	// own, the guest's hvc0 (the guest needs the virtio_console driver).
	// QEMU's virtconsole does not make the guest wait for the host: what
	// the console's socket cannot take when the guest writes is dropped.
	// QEMU's end gets as large a socket buffer as the kernel allows (8
	// MiB with CAP_NET_ADMIN, else twice net.core.wmem_max: 425,984 bytes
	// by default), so output is lost only when this process reads nothing
	// for as long as the guest takes to write that much (a few seconds of
	// a TCG guest printing short lines as fast as it can, with 8 MiB).
	// Use ConsoleSerial where no byte may be lost.
	ConsoleVirtio ConsolePort = "virtio"
)

// DefaultConsoleHistory is how much of what the guest wrote a console
// keeps when InstanceOptions.ConsoleHistory is zero: enough for the boot
// log of a verbose kernel.
const DefaultConsoleHistory = 1 << 20

// instanceConsole is the chardev id of the console an Instance adds to
// QEMU's command line.
const instanceConsole = "instance-console"

// consoleParams returns the arguments that connect port to the chardev on
// QEMU's descriptor fd.
func consoleParams(port ConsolePort, fd int) ([]string, error) {
	chardev := inheritedSocket(instanceConsole, fd)
	switch port {
	case ConsoleSerial:
		return append(chardev, "-serial", "chardev:"+instanceConsole), nil
	case ConsoleVirtio:
		return append(chardev,
			"-device", "virtio-serial-pci,id="+instanceConsole+"-bus",
			"-device", "virtconsole,chardev="+instanceConsole+",bus="+instanceConsole+"-bus.0"), nil
	}
	return nil, fmt.Errorf("Console is %q, not ConsoleSerial or ConsoleVirtio", port)
}

// consoleSendBuffer is the send buffer consoleChannel asks for on QEMU's
// end of the console's socket pair, which the kernel doubles. QEMU's
// virtconsole drops what that buffer cannot take when the guest writes, so
// it is as large as the kernel gives: 8 MiB to a process with
// CAP_NET_ADMIN (SO_SNDBUFFORCE), else twice net.core.wmem_max (425,984
// bytes on a default kernel; a line the guest writes on its own takes
// about 700 bytes of it). Measured with the guest writing 40,000 numbered
// lines to hvc0 while this process ran under -race with GOMAXPROCS=1 and a
// goroutine computing: the default 212,992 bytes lost 13 to 542 lines a
// run, 425,984 and 8 MiB none in 4 runs each.
const consoleSendBuffer = 4 << 20

// consoleChannel returns the console's socket pair, with QEMU's end's
// send buffer grown to consoleSendBuffer, or as near as the kernel allows.
func consoleChannel() (ours, theirs *os.File, err error) {
	ours, theirs, err = socketPair()
	if err != nil {
		return nil, nil, err
	}
	rc, err := theirs.SyscallConn()
	if err == nil {
		rc.Control(func(fd uintptr) {
			if syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUFFORCE, consoleSendBuffer) != nil {
				// Capped at net.core.wmem_max, which is no error.
				syscall.SetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF, consoleSendBuffer)
			}
		})
	}
	return ours, theirs, nil
}

// SerialConsole is the guest's console of an Instance started with
// InstanceOptions.Console. QEMU inherits one end of a socket pair as the
// console's backend, and a goroutine reads it all, whoever is reading, into
// a bounded history (and the optional ConsoleLog). On ConsoleSerial nothing
// the guest writes is lost, from its first byte: QEMU's UART waits for the
// socket. On ConsoleVirtio, QEMU's virtconsole drops what the socket cannot
// take rather than make the guest wait, so output can be lost when this
// process does not read for a long while (see ConsoleVirtio). Its
// methods may be called from any number of goroutines.
//
// WaitFor, WaitForRegexp and WaitForPrompt wait at the console's own
// position, which each wait moves past what it matched: one goroutine's
// waits each see what follows the previous one's match. Goroutines that
// wait for different things at once each take a ConsoleCursor (Cursor),
// which has a position of its own.
type SerialConsole struct {
	conn   net.Conn
	sink   *outputSink // nil without InstanceOptions.ConsoleLog
	done   chan struct{}
	cursor *ConsoleCursor // the position of the console's own waits

	mu      sync.Mutex    // guards the fields below
	hist    tail          // the last bytes the guest wrote
	changed chan struct{} // closed, and replaced, when bytes come or the console ends
	ended   bool
}

// newSerialConsole reads the guest's console from our end of its channel.
func newSerialConsole(f *os.File, history int, log io.Writer) (*SerialConsole, error) {
	conn, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, err
	}
	if history <= 0 {
		history = DefaultConsoleHistory
	}
	c := &SerialConsole{conn: conn, hist: tail{max: history}, done: make(chan struct{}), changed: make(chan struct{})}
	c.cursor = &ConsoleCursor{c: c}
	if log != nil {
		c.sink = newOutputSink(log, "console output")
		go c.sink.run()
	}
	go c.read()
	return c, nil
}

// read takes everything the guest writes. It waits on nothing but the
// socket and the console's lock, which no one holds for longer than it
// takes to look at what came since they last looked.
func (c *SerialConsole) read() {
	defer close(c.done)
	defer c.conn.Close()
	buf := make([]byte, 32<<10)
	for {
		n, err := c.conn.Read(buf)
		if n > 0 {
			c.add(buf[:n])
			if c.sink != nil {
				c.sink.add(buf[:n])
			}
		}
		if err != nil {
			break
		}
	}
	c.mu.Lock()
	c.ended = true
	close(c.changed)
	c.mu.Unlock()
	if c.sink != nil {
		c.sink.finish()
	}
}

// add appends p to the history and wakes the waits.
func (c *SerialConsole) add(p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hist.write(p)
	close(c.changed)
	c.changed = make(chan struct{})
}

// History returns the last bytes the guest wrote to its console: at most
// InstanceOptions.ConsoleHistory of them (DefaultConsoleHistory when it is
// zero).
func (c *SerialConsole) History() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	_, b := c.hist.since(0)
	return bytes.Clone(b)
}

// Write sends p to the guest's console, as typed input. It blocks while
// the guest does not read and the buffers are full; Close ends it.
func (c *SerialConsole) Write(p []byte) (int, error) {
	return c.conn.Write(p)
}

// WaitFor waits until the guest has written a line that contains substr
// and returns that line, without its line ending. The search starts where
// the previous wait's match ended (at the start of the history for the
// first), so it sees lines written before the call, and a wait never
// returns the same line twice. That position is the console's: waits from
// several goroutines at once each move it past what they matched, so one
// may pass over a line another wanted; give each goroutine a Cursor of its
// own. Only ended lines are searched, since the line being written may
// still grow: wait for a prompt with WaitForPrompt. If ctx ends first, or
// the console ends (QEMU exited), WaitFor returns an error that says so.
func (c *SerialConsole) WaitFor(ctx context.Context, substr string) (string, error) {
	return c.cursor.WaitFor(ctx, substr)
}

// WaitForRegexp is WaitFor for a line that re matches.
func (c *SerialConsole) WaitForRegexp(ctx context.Context, re *regexp.Regexp) (string, error) {
	return c.cursor.WaitForRegexp(ctx, re)
}

// WaitForPrompt waits, at the console's position as WaitFor does, until the
// guest has written prompt, at the end of a line or not ("login: ", a
// shell's "# "), and returns the line up to the end of the prompt.
func (c *SerialConsole) WaitForPrompt(ctx context.Context, prompt string) (string, error) {
	return c.cursor.WaitForPrompt(ctx, prompt)
}

// Cursor returns a position in the console's output, at its end now, with
// waits of its own: they see only what the guest writes from now on, and
// move only this cursor. Take it before asking the guest for what it will
// wait for, as one subscribes before sending a QMP command.
func (c *SerialConsole) Cursor() *ConsoleCursor {
	c.mu.Lock()
	defer c.mu.Unlock()
	return &ConsoleCursor{c: c, pos: c.hist.end()}
}

// ConsoleCursor is a position in a SerialConsole's output, from which its
// waits search and which each moves past what it matched. A cursor is for
// one goroutine at a time; the console has any number of them.
type ConsoleCursor struct {
	c   *SerialConsole
	pos int64 // guarded by c.mu
}

// WaitFor waits until the guest has written, after the cursor, a line that
// contains substr, moves the cursor past that line and returns it, without
// its line ending. Only ended lines are searched.
func (cur *ConsoleCursor) WaitFor(ctx context.Context, substr string) (string, error) {
	return cur.wait(ctx, strconv.Quote(substr), lineMatch(func(line string) bool { return strings.Contains(line, substr) }))
}

// WaitForRegexp is WaitFor for a line that re matches.
func (cur *ConsoleCursor) WaitForRegexp(ctx context.Context, re *regexp.Regexp) (string, error) {
	return cur.wait(ctx, "/"+re.String()+"/", lineMatch(re.MatchString))
}

// WaitForPrompt waits until the guest has written prompt after the cursor,
// at the end of a line or not, moves the cursor past it and returns the
// line up to the end of the prompt. An empty prompt is an error.
func (cur *ConsoleCursor) WaitForPrompt(ctx context.Context, prompt string) (string, error) {
	if prompt == "" {
		return "", errors.New("qemu: console: waiting for an empty prompt")
	}
	return cur.wait(ctx, "prompt "+strconv.Quote(prompt), promptMatch(prompt))
}

// matcher looks for a match in b, the bytes from where the last look
// ended to the end: it returns where the match starts and ends in b, and
// on no match, how much of b it need not look at again. A matcher of
// whole lines is always given b from the start of a line.
type matcher struct {
	lines bool
	look  func(b []byte) (start, end int, found bool, seen int)
}

// lineMatch looks in the ended lines of b for one that match takes.
func lineMatch(match func(string) bool) matcher {
	return matcher{lines: true, look: func(b []byte) (int, int, bool, int) {
		seen := 0
		for {
			line, _, complete := bytes.Cut(b[seen:], []byte{'\n'})
			if !complete {
				// The line being written may still grow: "block add v"
				// is not yet "block add vda".
				return 0, 0, false, seen
			}
			next := seen + len(line) + 1
			if match(string(bytes.TrimRight(line, "\r"))) {
				return seen, next, true, 0
			}
			seen = next
		}
	}}
}

// promptMatch looks in b for prompt, ended line or not.
func promptMatch(prompt string) matcher {
	return matcher{look: func(b []byte) (int, int, bool, int) {
		i := bytes.Index(b, []byte(prompt))
		if i < 0 {
			// A prompt cut in two by a read has its start in the last
			// len(prompt)-1 bytes: those are looked at again.
			return 0, 0, false, max(0, len(b)-len(prompt)+1)
		}
		return i, i + len(prompt), true, 0
	}}
}

// wait runs match over what the guest writes after the cursor until it
// finds something, and returns the line it is in, up to the match's end.
// Each look covers only what came since the last, so a wait costs the
// console's reader no more than the bytes it adds.
func (cur *ConsoleCursor) wait(ctx context.Context, what string, match matcher) (string, error) {
	c := cur.c
	first := true
	var from int64 // where the next look starts
	for {
		c.mu.Lock()
		if first {
			from = cur.pos
		}
		if first || from < c.hist.kept() {
			// The first look, or what the last one left fell out of
			// the history meanwhile.
			from, first = c.startFrom(from, match.lines), false
		}
		base, b := c.hist.since(from)
		start, end, found, seen := match.look(b)
		var text string
		if found {
			// Never back: another wait on this cursor may have moved
			// it past this match meanwhile.
			cur.pos = max(cur.pos, base+int64(end))
			text = c.lineTo(base+int64(start), base+int64(end))
		}
		from = base + int64(seen)
		changed, ended := c.changed, c.ended
		c.mu.Unlock()
		if found {
			return text, nil
		}
		if ended {
			return "", fmt.Errorf("qemu: console: no %s before the console ended", what)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return "", fmt.Errorf("qemu: console: waiting for %s: %w", what, contextError(ctx))
		}
	}
}

// startFrom returns where a look from pos starts. A look for bytes starts
// at pos, or at the oldest byte kept. A look for whole lines starts at the
// start of pos's line: a cursor a prompt left mid-line sees that line
// whole, once it ends. A line whose start fell out of the history is
// partial, and the look starts at the next one. c.mu is held.
func (c *SerialConsole) startFrom(pos int64, lines bool) int64 {
	kept, end := c.hist.kept(), c.hist.end()
	pos = min(max(pos, kept), end)
	if !lines {
		return pos
	}
	_, b := c.hist.since(kept)
	if i := bytes.LastIndexByte(b[:pos-kept], '\n'); i >= 0 {
		return kept + int64(i) + 1
	}
	if c.hist.startsLine(kept) {
		return kept
	}
	if i := bytes.IndexByte(b[pos-kept:], '\n'); i >= 0 {
		return pos + int64(i) + 1
	}
	return end
}

// lineTo returns the line that holds offset at, from its start (or the
// oldest byte kept) to offset end, without a line ending. c.mu is held.
func (c *SerialConsole) lineTo(at, end int64) string {
	from, b := c.hist.since(0)
	line := b[:end-from]
	if i := bytes.LastIndexByte(line[:at-from], '\n'); i >= 0 {
		line = line[i+1:]
	}
	return string(bytes.TrimRight(line, "\r\n"))
}

// NewReader returns a reader of the console's output from the start of
// its history on: Read blocks until the guest writes more, and returns
// io.EOF once the console has ended and everything has been read. A
// reader that falls more than the history behind skips what was dropped.
func (c *SerialConsole) NewReader() io.Reader {
	c.mu.Lock()
	defer c.mu.Unlock()
	return &consoleReader{c: c, pos: c.hist.kept()}
}

type consoleReader struct {
	c   *SerialConsole
	pos int64
}

func (r *consoleReader) Read(p []byte) (int, error) {
	c := r.c
	for {
		c.mu.Lock()
		from, b := c.hist.since(r.pos)
		n := copy(p, b)
		r.pos = from + int64(n)
		changed, ended := c.changed, c.ended
		c.mu.Unlock()
		switch {
		case n > 0 || len(p) == 0:
			return n, nil
		case ended:
			return 0, io.EOF
		}
		<-changed
	}
}

// Done returns a channel that is closed once the console has ended: QEMU
// exited, or the Instance was closed.
func (c *SerialConsole) Done() <-chan struct{} { return c.done }

// close ends the console and waits for its reader.
func (c *SerialConsole) close() {
	c.conn.Close()
	<-c.done
	if c.sink != nil {
		c.sink.abandon()
	}
}
