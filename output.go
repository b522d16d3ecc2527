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

// tail keeps the last bytes written to it: the buffer grows to twice max,
// then drops what is older than the last max bytes, so that each byte is
// moved a bounded number of times. It knows where its first byte stands
// in everything written, so readers can keep positions in it. QEMU's
// stderr (tailBuffer), the console's history and the sinks' backlogs are
// tails. A tail is its owner's to lock.
type tail struct {
	buf   []byte
	max   int
	start int64 // the offset of buf[0] in everything written
}

// write appends p and returns how many bytes it dropped to stay bounded.
func (t *tail) write(p []byte) int {
	t.buf = append(t.buf, p...)
	if len(t.buf) <= 2*t.max {
		return 0
	}
	over := len(t.buf) - t.max
	t.buf = append(t.buf[:0], t.buf[over:]...)
	t.start += int64(over)
	return over
}

// end returns the offset just past the last byte written.
func (t *tail) end() int64 { return t.start + int64(len(t.buf)) }

// kept returns the offset of the oldest byte shown: the last max bytes.
func (t *tail) kept() int64 { return max(t.start, t.end()-int64(t.max)) }

// since returns the bytes shown from offset off (or from the oldest kept,
// if off is older; none, if off is past the end) to the end, and where
// they start. The slice is valid until the next write.
func (t *tail) since(off int64) (from int64, b []byte) {
	from = min(max(off, t.kept()), t.end())
	return from, t.buf[from-t.start:]
}

// startsLine reports whether offset off is known to start a line: it is
// the first byte ever written, or the byte before it, still held, is a
// newline.
func (t *tail) startsLine(off int64) bool {
	if off == 0 {
		return true
	}
	i := off - 1 - t.start
	return i >= 0 && i < int64(len(t.buf)) && t.buf[i] == '\n'
}

// take returns every byte held and leaves the tail empty, its buffer now
// spare's.
func (t *tail) take(spare []byte) []byte {
	b := t.buf
	t.start += int64(len(b))
	t.buf = spare[:0]
	return b
}

// tailBuffer is an io.Writer that keeps the last max bytes written to it,
// so that a QEMU writing without end cannot make the launcher hold
// unbounded memory. It may be read while it is written.
type tailBuffer struct {
	mu sync.Mutex
	t  tail
}

func newTailBuffer(max int) *tailBuffer { return &tailBuffer{t: tail{max: max}} }

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.t.write(p)
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	_, last := b.t.since(0)
	return string(last)
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
	backlog  tail       // of maxStderr: up to twice that before it drops
	dropped  int64
	finished bool // no more input
	discard  bool // w failed or the sink was abandoned
}

func newOutputSink(w io.Writer, what string) *outputSink {
	return &outputSink{w: w, what: what, backlog: tail{max: maxStderr},
		ready: make(chan struct{}, 1), done: make(chan struct{}), abandoned: make(chan struct{})}
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
	s.backlog.take(nil)
	s.mu.Unlock()
}

func (s *outputSink) add(p []byte) {
	s.mu.Lock()
	if !s.discard {
		s.dropped += int64(s.backlog.write(p))
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
		chunk = s.backlog.take(chunk)
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
