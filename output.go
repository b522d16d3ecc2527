package qemu

import (
	"fmt"
	"io"
	"strings"
	"sync"
)

// What QEMU and the guest write, kept bounded: QEMU's stderr and the
// console's history keep their last bytes, and a sink copies them to the
// caller's writer without ever making QEMU wait for it.

// maxStderr bounds how much of QEMU's stderr is kept: the last bytes,
// which hold the error that made it exit.
const maxStderr = 1 << 20

// tailBuffer is an io.Writer that keeps the last max bytes written to it,
// so that a QEMU writing without end cannot make the launcher hold
// unbounded memory. It may be read while it is written.
type tailBuffer struct {
	max int
	mu  sync.Mutex
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	// Trim only once twice the limit is reached, so that each byte is
	// moved a bounded number of times.
	if len(b.buf) > 2*b.max {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-b.max:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf) > b.max {
		return string(b.buf[len(b.buf)-b.max:])
	}
	return string(b.buf)
}

// outputSink copies what QEMU writes (its stderr, the guest's console) to
// the caller's writer from a goroutine of its own, through a bounded
// backlog, so that the writer's speed never matters to QEMU.
type outputSink struct {
	w         io.Writer
	what      string        // what is copied, for the notice of dropped bytes
	ready     chan struct{} // wakes run
	done      chan struct{} // closed when run has returned
	abandoned chan struct{} // closed by abandon
	once      sync.Once

	mu       sync.Mutex // guards the fields below
	backlog  []byte
	dropped  int64
	finished bool // no more input
	discard  bool // w failed or the sink was abandoned
}

func newOutputSink(w io.Writer, what string) *outputSink {
	return &outputSink{w: w, what: what, ready: make(chan struct{}, 1), done: make(chan struct{}), abandoned: make(chan struct{})}
}

// abandon makes the sink write nothing more.
func (s *outputSink) abandon() {
	s.stop()
	s.once.Do(func() { close(s.abandoned) })
	s.wake()
}

// stop drops the backlog and what is added from now on.
func (s *outputSink) stop() {
	s.mu.Lock()
	s.discard = true
	s.backlog = nil
	s.mu.Unlock()
}

func (s *outputSink) add(p []byte) {
	s.mu.Lock()
	if !s.discard {
		s.backlog = append(s.backlog, p...)
		// Trim to half the limit, so that each byte is moved a bounded
		// number of times.
		if len(s.backlog) > 2*maxStderr {
			over := len(s.backlog) - maxStderr
			s.dropped += int64(over)
			s.backlog = append(s.backlog[:0], s.backlog[over:]...)
		}
	}
	s.mu.Unlock()
	s.wake()
}

func (s *outputSink) finish() {
	s.mu.Lock()
	s.finished = true
	s.mu.Unlock()
	s.wake()
}

func (s *outputSink) wake() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// run writes the backlog to w until the input has finished and all of it
// is written, or w fails.
func (s *outputSink) run() {
	defer close(s.done)
	var chunk []byte
	for {
		s.mu.Lock()
		chunk, s.backlog = s.backlog, chunk[:0]
		dropped, finished, discard := s.dropped, s.finished, s.discard
		s.dropped = 0
		s.mu.Unlock()
		if discard {
			return
		}
		if dropped > 0 {
			notice := fmt.Sprintf("[qemu: %d bytes of %s dropped: the writer was too slow]\n", dropped, s.what)
			if !s.write([]byte(notice)) {
				return
			}
		}
		if len(chunk) > 0 {
			if !s.write(chunk) {
				return
			}
			continue
		}
		if finished {
			return
		}
		<-s.ready
	}
}

func (s *outputSink) write(p []byte) bool {
	if _, err := s.w.Write(p); err != nil {
		s.stop()
		return false
	}
	return true
}

// lastLines returns the last n non-empty lines of s, joined with " | " and
// shortened to a size fit for an error message.
func lastLines(s string, n int) string {
	var lines []string
	for rest := strings.TrimRight(s, "\r\n\t "); rest != "" && len(lines) < n; {
		line := rest
		if i := strings.LastIndexByte(rest, '\n'); i >= 0 {
			line, rest = rest[i+1:], strings.TrimRight(rest[:i], "\r\n\t ")
		} else {
			rest = ""
		}
		if line = strings.TrimSpace(line); line != "" {
			lines = append(lines, line)
		}
	}
	for i, j := 0, len(lines)-1; i < j; i, j = i+1, j-1 {
		lines[i], lines[j] = lines[j], lines[i]
	}
	const max = 2048
	msg := strings.Join(lines, " | ")
	if len(msg) > max {
		msg = "..." + msg[len(msg)-max:]
	}
	return msg
}
