package qemu

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// ConsolePort is the device that carries an Instance's console.
type ConsolePort string

const (
	// ConsoleSerial is the ISA serial port, the guest's ttyS0.
	ConsoleSerial ConsolePort = "serial"
	// ConsoleVirtio is a virtconsole port on a virtio-serial bus of its
	// own, the guest's hvc0 (the guest needs the virtio_console driver).
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

// SerialConsole is the guest's console of an Instance started with
// InstanceOptions.Console. QEMU inherits one end of a socket pair as the
// console's backend, so nothing the guest writes is lost, from its first
// byte: a goroutine reads it all into a bounded history (and the optional
// ConsoleLog), whoever is reading. Its methods may be called from any
// number of goroutines.
type SerialConsole struct {
	conn net.Conn
	sink *outputSink // nil without InstanceOptions.ConsoleLog
	done chan struct{}

	mu      sync.Mutex // guards the fields below
	hist    []byte     // the last bytes the guest wrote; hist[0] is at offset start
	start   int64
	max     int
	mark    int64         // where the next wait looks from
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
	c := &SerialConsole{conn: conn, max: history, done: make(chan struct{}), changed: make(chan struct{})}
	if log != nil {
		c.sink = newOutputSink(log, "console output")
		go c.sink.run()
	}
	go c.read()
	return c, nil
}

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

// add appends p to the history, trimming it to max once it holds twice
// that, so that each byte is moved a bounded number of times.
func (c *SerialConsole) add(p []byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.hist = append(c.hist, p...)
	if over := len(c.hist) - c.max; len(c.hist) > 2*c.max {
		c.hist = append(c.hist[:0], c.hist[over:]...)
		c.start += int64(over)
	}
	close(c.changed)
	c.changed = make(chan struct{})
}

// History returns the last bytes the guest wrote to its console, at most
// InstanceOptions.ConsoleHistory of them (between it and twice it).
func (c *SerialConsole) History() []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	return bytes.Clone(c.hist)
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
// returns the same line twice. The position is the console's, shared by
// every wait: waits from several goroutines at once each move it past what
// they matched, so one may pass over a line another wanted. Only ended
// lines are searched: the line
// being written may still grow, so a prompt with no newline after it is
// not seen (read it with NewReader). If ctx ends first, or the
// console ends (QEMU exited), WaitFor returns an error that says so.
func (c *SerialConsole) WaitFor(ctx context.Context, substr string) (string, error) {
	return c.wait(ctx, strconv.Quote(substr), func(line string) bool { return strings.Contains(line, substr) })
}

// WaitForRegexp is WaitFor for a line that re matches.
func (c *SerialConsole) WaitForRegexp(ctx context.Context, re *regexp.Regexp) (string, error) {
	return c.wait(ctx, "/"+re.String()+"/", re.MatchString)
}

func (c *SerialConsole) wait(ctx context.Context, what string, match func(string) bool) (string, error) {
	for {
		c.mu.Lock()
		line, found := c.search(match)
		changed, ended := c.changed, c.ended
		c.mu.Unlock()
		if found {
			return line, nil
		}
		if ended {
			return "", fmt.Errorf("qemu: console: no line with %s before the console ended", what)
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return "", fmt.Errorf("qemu: console: waiting for a line with %s: %w", what, ctx.Err())
		}
	}
}

// search looks for a matching ended line from the mark on, and moves the
// mark past it. Only the wait holding c.mu calls it.
func (c *SerialConsole) search(match func(string) bool) (string, bool) {
	var rest []byte
	if c.mark >= c.start {
		rest = c.hist[c.mark-c.start:]
	} else if i := bytes.IndexByte(c.hist, '\n'); i >= 0 {
		// The mark fell out of the history: its first line may be the
		// tail of one, so the search starts at the next.
		rest = c.hist[i+1:]
	}
	for {
		line, after, complete := bytes.Cut(rest, []byte{'\n'})
		if !complete {
			// The line being written may still grow: "block add v"
			// is not yet "block add vda".
			return "", false
		}
		if text := string(bytes.TrimRight(line, "\r")); match(text) {
			c.mark = c.start + int64(len(c.hist)-len(after))
			return text, true
		}
		rest = after
	}
}

// NewReader returns a reader of the console's output from the start of
// its history on: Read blocks until the guest writes more, and returns
// io.EOF once the console has ended and everything has been read. A
// reader that falls more than the history behind skips what was dropped.
func (c *SerialConsole) NewReader() io.Reader {
	c.mu.Lock()
	defer c.mu.Unlock()
	return &consoleReader{c: c, pos: c.start}
}

type consoleReader struct {
	c   *SerialConsole
	pos int64
}

func (r *consoleReader) Read(p []byte) (int, error) {
	c := r.c
	for {
		c.mu.Lock()
		r.pos = max(r.pos, c.start)
		n := copy(p, c.hist[r.pos-c.start:])
		r.pos += int64(n)
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
