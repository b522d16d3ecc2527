package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime"
	"sync"
	"time"
)

// QMPLog is a logging interface used by the qemu package to log various
// interesting pieces of information. Rather than introduce a dependency on a
// given logging package, qemu presents this interface that allows clients to
// provide their own logging type which they can use to seamlessly integrate
// qemu's logs into their own logs. A QMPLog implementation can be specified in
// the QMPConfig structure.
type QMPLog interface {
	// V returns true if the given argument is less than or equal
	// to the implementation's defined verbosity level.
	V(int32) bool

	// Infof writes informational output to the log. A newline will be
	// added to the output if one is not provided.
	Infof(string, ...interface{})

	// Warningf writes warning output to the log. A newline will be
	// added to the output if one is not provided.
	Warningf(string, ...interface{})

	// Errorf writes error output to the log. A newline will be
	// added to the output if one is not provided.
	Errorf(string, ...interface{})
}

// nullLogger discards everything, so that a nil QMPLog never needs a check
// at the call sites.
type nullLogger struct{}

func (nullLogger) V(int32) bool                    { return false }
func (nullLogger) Infof(string, ...interface{})    {}
func (nullLogger) Warningf(string, ...interface{}) {}
func (nullLogger) Errorf(string, ...interface{})   {}

// orNullLogger returns l, or a logger that discards everything when l is nil.
func orNullLogger(l QMPLog) QMPLog {
	if l == nil {
		return nullLogger{}
	}
	return l
}

// QMPConfig is a configuration structure that can be used to specify a
// logger and a channel to which logs and QMP events are to be sent. If
// neither of these fields are specified, or are set to nil, no logs will be
// written and no QMP events will be reported to the client.
type QMPConfig struct {
	// EventCh can be specified by clients who wish to receive QMP events.
	// Events are queued inside the client until they are read, so a slow
	// reader never stalls commands and no event is dropped. The client
	// closes EventCh when the session ends: after a disconnect once every
	// queued event has been delivered, after Shutdown at once.
	EventCh chan<- QMPEvent

	// Logger is used by QMPStart and all the goroutines it spawns to log
	// information. nil means no logging.
	Logger QMPLog
}

// QMPEvent contains a single QMP event, sent on the QMPConfig.EventCh channel.
type QMPEvent struct {
	// The name of the event, e.g., DEVICE_DELETED
	Name string

	// The data associated with the event. The contents of this map are
	// unprocessed by the qemu package. It is simply the result of
	// unmarshalling the QMP json event. Here's an example map
	// map[string]interface{}{
	//	"driver": "virtio-blk-pci",
	//	"drive":  "drive_3437843748734873483",
	// }
	Data map[string]interface{}

	// The event's timestamp converted to a time.Time object.
	Timestamp time.Time
}

// QMPVersion contains the version number and the capabilities of a QEMU
// instance, as reported in the QMP greeting message.
type QMPVersion struct {
	Major        int
	Minor        int
	Micro        int
	Capabilities []string
}

// atLeast reports whether the version is major.minor or later.
func (v *QMPVersion) atLeast(major, minor int) bool {
	return v.Major > major || (v.Major == major && v.Minor >= minor)
}

// QMPError is an error reply from QEMU: a command that QEMU received and
// refused. Class is QEMU's error class (e.g. "DeviceNotFound",
// "GenericError") and Desc its human-readable description.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error returns the class and the description.
func (e *QMPError) Error() string {
	return e.Class + ": " + e.Desc
}

// maxLineSize bounds one line from QEMU. query-qmp-schema alone is several
// hundred KiB, so the bound is generous; it exists so that a peer that never
// sends a newline cannot make the client grow its buffer without end.
const maxLineSize = 16 << 20

var (
	errShutdown     = errors.New("session was shut down")
	errDisconnected = errors.New("connection to QEMU ended")
)

// lostReplyError is the error of a command that was sent but whose session
// ended before its reply came.
type lostReplyError struct{ err error }

func (e *lostReplyError) Error() string { return "no reply: " + e.err.Error() }
func (e *lostReplyError) Unwrap() error { return e.err }

// QMP is a structure that contains the internal state used by startQMPLoop
// and the go routines it spawns. All the contents of this structure are
// private.
//
// A QMP session has one reader goroutine, which decodes every line from
// QEMU, and, when QMPConfig.EventCh is set, one goroutine that forwards
// queued events to it. Commands are written by their callers, one at a time:
// a caller takes the turn, writes its command in one write, waits for the
// reply and gives the turn back once it has read it. A caller that gives up
// leaves the turn to the reader, which gives it back when the late reply has
// come. So exactly one command is ever in flight and every reply belongs to
// it.
type QMP struct {
	conn    net.Conn
	log     QMPLog
	eventCh chan<- QMPEvent
	version *QMPVersion

	// turn holds a token while a command is in flight. Blocked senders on
	// a channel are served in arrival order, so commands go out in call
	// order.
	turn chan struct{}
	// wbuf is the write buffer, owned by whoever holds the turn.
	wbuf []byte
	// replies carries the reply to the caller of the command in flight.
	// It is empty whenever the turn is free: each reply put in it is
	// taken out by that command's caller, also one that gave up.
	replies chan reply
	// rbuf holds the "return" value of the reply in flight, copied out of
	// the reader's buffer; the reader fills it for the command in flight,
	// whose caller reads it before giving the turn back.
	rbuf []byte
	// msg is the reader's decode target, reused for every line.
	msg message
	// eventNames interns event names; only the reader uses it.
	eventNames map[string]string

	// done is closed when the session has ended; err then says why.
	done chan struct{}
	// stop is closed by Shutdown to make the event forwarder quit at once.
	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
	// eventReady wakes the event forwarder.
	eventReady chan struct{}

	mu  sync.Mutex // guards the fields below
	err error
	// pending is set while a command's caller waits for its reply;
	// abandoned while the reply of a command whose caller gave up is
	// still to come.
	pending   bool
	abandoned bool
	waiters   []*eventWaiter
	events    []QMPEvent
	// forwarding is set while the forwarder holds events it has taken
	// from events but not delivered yet, and once it has quit; the
	// reader then queues every event rather than send it itself.
	forwarding bool
	ended      bool
}

// reply is what the reader hands to the caller of the command in flight.
type reply struct {
	ret json.RawMessage
	err error
}

// eventWaiter is a caller waiting for an event that completes its command,
// such as SHUTDOWN after system_powerdown.
type eventWaiter struct {
	name   string
	device string // for DEVICE_DELETED: the data.device to match
	seen   chan struct{}
	fired  bool
}

// message is every kind of line QEMU sends, so that each line is decoded
// once whatever it turns out to be.
type message struct {
	QMP *struct {
		Version struct {
			QEMU struct {
				Major int `json:"major"`
				Minor int `json:"minor"`
				Micro int `json:"micro"`
			} `json:"qemu"`
		} `json:"version"`
		Capabilities []string `json:"capabilities"`
	} `json:"QMP"`
	Return    json.RawMessage        `json:"return"`
	Error     *QMPError              `json:"error"`
	Event     string                 `json:"event"`
	Data      map[string]interface{} `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

// QMPStart connects to a QMP unix socket and waits for QEMU's greeting,
// honouring ctx for both. Events that arrive before the greeting are
// skipped; a line that is not JSON fails at once, since the socket then does
// not speak QMP. The returned session is ready for ExecuteQMPCapabilities,
// which must be its first command.
//
// disconnectedCh, if not nil, is closed when the session ends: when QEMU
// closes the connection, when Shutdown is called, or when QMPStart itself
// fails. Each call therefore needs a fresh channel.
func QMPStart(ctx context.Context, socket string, cfg QMPConfig, disconnectedCh chan struct{}) (*QMP, *QMPVersion, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil {
		closeIfSet(disconnectedCh)
		return nil, nil, fmt.Errorf("qmp: connect to %s: %w", socket, err)
	}
	return qmpStartConn(ctx, conn, cfg, disconnectedCh)
}

// qmpStartConn runs a QMP session over conn, which it owns from then on.
func qmpStartConn(ctx context.Context, conn net.Conn, cfg QMPConfig, disconnectedCh chan struct{}) (*QMP, *QMPVersion, error) {
	q := &QMP{
		conn:       conn,
		log:        orNullLogger(cfg.Logger),
		eventCh:    cfg.EventCh,
		turn:       make(chan struct{}, 1),
		replies:    make(chan reply, 1),
		done:       make(chan struct{}),
		stop:       make(chan struct{}),
		eventReady: make(chan struct{}, 1),
	}
	r := bufio.NewReaderSize(conn, 4<<10)
	version, err := q.readGreeting(ctx, r)
	if err != nil {
		conn.Close()
		closeIfSet(disconnectedCh)
		return nil, nil, err
	}
	q.version = version
	q.wg.Add(1)
	go q.readLoop(r, disconnectedCh)
	if q.eventCh != nil {
		q.wg.Add(1)
		go q.forwardEvents()
	}
	v := *version
	return q, &v, nil
}

func closeIfSet(ch chan struct{}) {
	if ch != nil {
		close(ch)
	}
}

// readGreeting reads lines until QEMU's greeting. ctx is honoured by moving
// the read deadline when it ends, which needs no goroutine of its own.
func (q *QMP) readGreeting(ctx context.Context, r *bufio.Reader) (*QMPVersion, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", err)
	}
	expire := context.AfterFunc(ctx, func() {
		q.conn.SetReadDeadline(time.Unix(1, 0))
	})
	version, err := q.scanGreeting(r)
	if !expire() {
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", ctx.Err())
	}
	return version, err
}

func (q *QMP) scanGreeting(r *bufio.Reader) (*QMPVersion, error) {
	var big []byte
	for {
		line, err := readLine(r, &big)
		if err != nil {
			return nil, fmt.Errorf("qmp: waiting for greeting: %w", err)
		}
		if len(line) == 0 {
			continue
		}
		var m message
		if err := json.Unmarshal(line, &m); err != nil {
			return nil, fmt.Errorf("qmp: not a QMP greeting: %q: %w", truncate(line), err)
		}
		switch {
		case m.QMP != nil:
			v := &m.QMP.Version.QEMU
			caps := m.QMP.Capabilities
			if caps == nil {
				caps = []string{}
			}
			return &QMPVersion{Major: v.Major, Minor: v.Minor, Micro: v.Micro, Capabilities: caps}, nil
		case m.Event != "":
			q.log.Infof("qmp: skipping event %s before the greeting", m.Event)
		default:
			return nil, fmt.Errorf("qmp: not a QMP greeting: %q", truncate(line))
		}
	}
}

// readLine returns the next line without its line ending. The slice is only
// valid until the next call. Lines longer than the reader's buffer are
// gathered in *big, up to maxLineSize.
func readLine(r *bufio.Reader, big *[]byte) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		buf := append((*big)[:0], line...)
		for err == bufio.ErrBufferFull {
			line, err = r.ReadSlice('\n')
			if len(buf)+len(line) > maxLineSize {
				return nil, fmt.Errorf("line from QEMU longer than %d bytes", maxLineSize)
			}
			buf = append(buf, line...)
		}
		*big = buf
		line = buf
	}
	if err != nil {
		return nil, err
	}
	return bytes.TrimSpace(line), nil
}

func truncate(line []byte) []byte {
	if len(line) > 80 {
		return line[:80]
	}
	return line
}

// readLoop decodes every line from QEMU until the connection ends, then ends
// the session.
func (q *QMP) readLoop(r *bufio.Reader, disconnectedCh chan struct{}) {
	defer q.wg.Done()
	var big []byte
	var err error
	for {
		var line []byte
		line, err = readLine(r, &big)
		if err != nil {
			break
		}
		if woke := q.dispatch(line); woke && r.Buffered() > 0 {
			// The goroutine just handed an event is next to run on
			// this P, until the next line, usually the reply that came
			// with the event, readies its caller in its place and
			// sends it to the back of the queue: tens of µs more at
			// p99 for an event in the benchmarks. Yielding lets it
			// run first. In the benchmarks the reply then waits about
			// a microsecond; in a busy program the reader, now on the
			// global run queue, may wait longer.
			runtime.Gosched()
		}
		if cap(big) > 1<<20 {
			// Don't hold a huge buffer for the rest of the session
			// because of one large reply.
			big = nil
		}
	}
	q.end(err)
	closeIfSet(disconnectedCh)
}

// dispatch handles one line from QEMU. Everything it keeps is copied out of
// line, which the reader reuses. It reports whether the line was an event
// that may have woken a goroutine waiting on EventCh.
func (q *QMP) dispatch(line []byte) (woke bool) {
	if len(line) == 0 {
		return false
	}
	if ret, ok := plainReturn(line); ok {
		q.handleReply(reply{ret: ret}, true)
		return false
	}
	if ev, ok := q.plainEvent(line); ok {
		return q.handleEvent(ev)
	}
	q.msg = message{}
	if err := json.Unmarshal(line, &q.msg); err != nil {
		q.log.Warningf("qmp: skipping a line that is not a JSON object: %q", truncate(line))
		return false
	}
	m := &q.msg
	switch {
	case m.Event != "":
		return q.handleEvent(QMPEvent{
			Name:      m.Event,
			Data:      m.Data,
			Timestamp: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*int64(time.Microsecond)),
		})
	case m.Error != nil:
		q.handleReply(reply{err: m.Error}, false)
	case m.Return != nil:
		q.handleReply(reply{ret: m.Return}, false)
	default:
		q.log.Warningf("qmp: skipping a line that is neither a reply nor an event: %q", truncate(line))
	}
	return false
}

// plainReturnPrefix is how QEMU starts a successful reply to a command
// sent without an id.
const plainReturnPrefix = `{"return": `

// plainReturn recognises the common reply, {"return": VALUE}, without
// decoding it, and returns VALUE. VALUE being valid JSON proves the line is
// exactly that object with that one key: a top-level comma, which another
// key would need, is not valid inside a single JSON value. Any other line
// goes through the full decoder.
func plainReturn(line []byte) ([]byte, bool) {
	if !bytes.HasPrefix(line, []byte(plainReturnPrefix)) || line[len(line)-1] != '}' {
		return nil, false
	}
	ret := line[len(plainReturnPrefix) : len(line)-1]
	if !json.Valid(ret) {
		return nil, false
	}
	return ret, true
}

// plainEventPrefix and the other pieces below are the layout every QEMU
// from 2.x to 10 writes an event in:
//
//	{"timestamp": {"seconds": S, "microseconds": U}, "event": "NAME"}
//
// with , "data": {...} before the closing brace when the event has data.
const (
	plainEventPrefix = `{"timestamp": {"seconds": `
	plainEventMicro  = `, "microseconds": `
	plainEventName   = `}, "event": "`
	plainEventData   = `, "data": `
)

// plainEvent recognises an event in QEMU's layout and decodes only its
// data, which STOP, RESUME and most other frequent events don't have.
// Anything that departs from the layout goes through the full decoder.
func (q *QMP) plainEvent(line []byte) (QMPEvent, bool) {
	rest, ok := bytes.CutPrefix(line, []byte(plainEventPrefix))
	if !ok {
		return QMPEvent{}, false
	}
	sec, rest, ok := cutDigits(rest)
	if !ok {
		return QMPEvent{}, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(plainEventMicro)); !ok {
		return QMPEvent{}, false
	}
	usec, rest, ok := cutDigits(rest)
	if !ok {
		return QMPEvent{}, false
	}
	if rest, ok = bytes.CutPrefix(rest, []byte(plainEventName)); !ok {
		return QMPEvent{}, false
	}
	// QAPI event names are upper case letters, digits and underscores,
	// so a name with anything else (an escape, say) takes the full path.
	end := 0
	for end < len(rest) && (rest[end] >= 'A' && rest[end] <= 'Z' || rest[end] >= '0' && rest[end] <= '9' || rest[end] == '_') {
		end++
	}
	if end == 0 || end == len(rest) || rest[end] != '"' {
		return QMPEvent{}, false
	}
	name, rest := rest[:end], rest[end+1:]
	var data map[string]interface{}
	if string(rest) != "}" {
		if rest, ok = bytes.CutPrefix(rest, []byte(plainEventData)); !ok || len(rest) < 3 ||
			rest[0] != '{' || rest[len(rest)-1] != '}' {
			return QMPEvent{}, false
		}
		if data, ok = decodeObject(rest[:len(rest)-1]); !ok {
			return QMPEvent{}, false
		}
	}
	return QMPEvent{
		Name:      q.internName(name),
		Data:      data,
		Timestamp: time.Unix(sec, usec*int64(time.Microsecond)),
	}, true
}

// decodeObject decodes an event's data. Unmarshal validates it too, so a
// line that only looks like an event is refused here and logged by the
// full path. It is a function of its own, and not inlined, so that the
// map's pointer, which escapes into Unmarshal, is only allocated for events
// that have data.
//
//go:noinline
func decodeObject(raw []byte) (map[string]interface{}, bool) {
	var data map[string]interface{}
	if json.Unmarshal(raw, &data) != nil {
		return nil, false
	}
	return data, true
}

// cutDigits parses the unsigned decimal number at the start of b as JSON
// writes it: no leading zero. More than 18 digits could overflow, and are
// refused.
func cutDigits(b []byte) (n int64, rest []byte, ok bool) {
	i := 0
	for i < len(b) && b[i] >= '0' && b[i] <= '9' {
		if i == 18 || i == 1 && b[0] == '0' {
			return 0, b, false
		}
		n = n*10 + int64(b[i]-'0')
		i++
	}
	return n, b[i:], i > 0
}

// internName returns name as a string, allocating only the first time the
// session sees it, since a session sees the same few events over and over.
// The table belongs to the reader goroutine; it is bounded, so that a peer
// making names up cannot grow it without end.
func (q *QMP) internName(name []byte) string {
	if s, ok := q.eventNames[string(name)]; ok {
		return s
	}
	s := string(name)
	if len(q.eventNames) < 64 {
		if q.eventNames == nil {
			q.eventNames = make(map[string]string)
		}
		q.eventNames[s] = s
	}
	return s
}

// handleReply hands the reply to the command in flight, or drops it when
// its caller gave up, giving the turn back for it. inReadBuf says that
// r.ret points into the reader's buffer, so it must be copied.
func (q *QMP) handleReply(r reply, inReadBuf bool) {
	q.mu.Lock()
	pending, abandoned := q.pending, q.abandoned
	q.pending, q.abandoned = false, false
	q.mu.Unlock()
	switch {
	case pending:
		if inReadBuf {
			q.rbuf = append(q.rbuf[:0], r.ret...)
			r.ret = q.rbuf
		}
		q.replies <- r
	case abandoned:
		<-q.turn
	default:
		q.log.Warningf("qmp: skipping a reply with no command in flight")
	}
}

// handleEvent wakes the commands waiting for this event and queues it for
// EventCh. It reports whether it sent the event into an empty EventCh,
// which is what can wake a goroutine waiting on it; a send into a buffer
// with events in it wakes nobody.
func (q *QMP) handleEvent(ev QMPEvent) (woke bool) {
	q.mu.Lock()
	for _, w := range q.waiters {
		if w.matches(ev) && !w.fired {
			w.fired = true
			close(w.seen)
		}
	}
	if q.eventCh == nil {
		q.mu.Unlock()
		return false
	}
	if len(q.events) == 0 && !q.forwarding {
		// Every earlier event has been delivered, so handing this one
		// to a reader already waiting keeps the order and saves waking
		// the forwarder, a goroutine switch on the way of every event.
		// The send never blocks, and the mutex keeps the forwarder from
		// closing EventCh under it.
		empty := len(q.eventCh) == 0
		select {
		case q.eventCh <- ev:
			q.mu.Unlock()
			return empty
		default:
		}
	}
	q.events = append(q.events, ev)
	q.mu.Unlock()
	q.wakeForwarder()
	return false
}

func (w *eventWaiter) matches(ev QMPEvent) bool {
	if ev.Name != w.name {
		return false
	}
	if w.device == "" {
		return true
	}
	dev, _ := ev.Data["device"].(string)
	return dev == w.device
}

func (q *QMP) wakeForwarder() {
	select {
	case q.eventReady <- struct{}{}:
	default:
	}
}

// end is the one place where a session ends: it records why, fails the
// command in flight and lets the event forwarder finish.
func (q *QMP) end(cause error) {
	q.mu.Lock()
	if q.err == nil {
		if errors.Is(cause, io.EOF) {
			q.err = errDisconnected
		} else {
			q.err = fmt.Errorf("%w: %w", errDisconnected, cause)
		}
	}
	pending := q.pending
	q.pending, q.abandoned = false, false
	q.ended = true
	err := q.err
	q.mu.Unlock()
	if pending {
		q.replies <- reply{err: &lostReplyError{err}}
	}
	q.conn.Close()
	close(q.done)
	q.wakeForwarder()
}

// forwardEvents delivers queued events to EventCh in arrival order and
// closes it when the session is over.
func (q *QMP) forwardEvents() {
	defer q.wg.Done()
	defer func() {
		q.mu.Lock()
		q.forwarding = true // for good: the reader must not send any more
		q.mu.Unlock()
		close(q.eventCh)
	}()
	var batch []QMPEvent
	for {
		q.mu.Lock()
		batch, q.events = q.events, batch[:0]
		q.forwarding = len(batch) > 0
		ended := q.ended
		q.mu.Unlock()
		for i := range batch {
			select {
			case q.eventCh <- batch[i]:
			case <-q.stop:
				return
			}
			batch[i] = QMPEvent{}
		}
		if len(batch) > 0 {
			continue
		}
		if ended {
			return
		}
		select {
		case <-q.eventReady:
		case <-q.stop:
			return
		}
	}
}

// Shutdown closes the domain socket used to monitor a QEMU instance and
// terminates all the go routines spawned by QMPStart to manage that
// instance. QMP.Shutdown does not shut down the running instance. Calling
// QMP.Shutdown will result in the disconnectedCh channel being closed,
// indicating that we have lost connection to the QMP instance. In this case
// it does not indicate that the instance has quit.
//
// Shutdown returns once every goroutine of the session has ended. It may be
// called more than once, concurrently with other methods, and after the
// disconnectedCh channel is closed; calls after the first have no effect.
// Execute methods called after it return an error.
func (q *QMP) Shutdown() {
	q.stopOnce.Do(func() {
		q.mu.Lock()
		if q.err == nil {
			q.err = errShutdown
		}
		q.mu.Unlock()
		close(q.stop)
		q.conn.Close()
	})
	q.wg.Wait()
}

// sessionErr returns why the session ended.
func (q *QMP) sessionErr() error {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.err
}

// execute sends one command, waits for its reply and decodes the reply's
// "return" value into result, unless result is nil. args, when not nil,
// must encode to a JSON object.
func (q *QMP) execute(ctx context.Context, name string, args, result interface{}) error {
	var argsJSON []byte
	if args != nil {
		var err error
		if argsJSON, err = json.Marshal(args); err != nil {
			return fmt.Errorf("encode arguments: %w", err)
		}
		if len(argsJSON) == 0 || argsJSON[0] != '{' {
			return fmt.Errorf("arguments encode to %.20s, not a JSON object", argsJSON)
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	select {
	case q.turn <- struct{}{}:
	case <-ctx.Done():
		return ctx.Err()
	case <-q.done:
		return q.sessionErr()
	}
	if err := q.send(name, argsJSON); err != nil {
		<-q.turn
		return err
	}
	select {
	case r := <-q.replies:
		err := r.err
		if err == nil && result != nil {
			if err = json.Unmarshal(r.ret, result); err != nil {
				err = fmt.Errorf("decode reply: %w", err)
			}
		}
		if cap(q.rbuf) > 1<<20 {
			// Don't hold a huge buffer for the rest of the session
			// because of one large reply.
			q.rbuf = nil
		}
		<-q.turn
		return err
	case <-ctx.Done():
		q.abandon()
		return ctx.Err()
	}
}

// abandon is execute giving up on the command in flight. If its reply is
// still to come, the reader drops it and gives the turn back; if it is
// already on its way, abandon takes it, so that the next command finds
// the replies channel empty.
func (q *QMP) abandon() {
	q.mu.Lock()
	waiting := q.pending
	if waiting {
		q.pending, q.abandoned = false, true
	}
	q.mu.Unlock()
	if !waiting {
		<-q.replies
		<-q.turn
	}
}

// send writes a command while its caller holds the turn, after marking it
// as the command in flight.
func (q *QMP) send(name string, argsJSON []byte) error {
	q.mu.Lock()
	err := q.err
	if err == nil {
		q.pending = true
	}
	q.mu.Unlock()
	if err != nil {
		return err
	}
	q.wbuf = appendCommand(q.wbuf[:0], name, argsJSON)
	if _, err := q.conn.Write(q.wbuf); err != nil {
		// A partial write leaves QEMU's parser in an unknown state, so
		// the session cannot go on; closing the connection makes the
		// reader end it and fail this command.
		q.conn.Close()
	}
	return nil
}

// appendCommand appends the wire form of a command: no id, since only one
// command is ever in flight, no empty "arguments", and a newline so QEMU's
// parser need not wait for more input.
func appendCommand(buf []byte, name string, argsJSON []byte) []byte {
	buf = append(buf, `{"execute":`...)
	buf = appendJSONString(buf, name)
	if argsJSON != nil {
		buf = append(buf, `,"arguments":`...)
		buf = append(buf, argsJSON...)
	}
	return append(buf, "}\n"...)
}

// appendJSONString appends s as a JSON string. Command names are plain
// ASCII; anything else goes through encoding/json.
func appendJSONString(buf []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
			b, _ := json.Marshal(s)
			return append(buf, b...)
		}
	}
	buf = append(buf, '"')
	buf = append(buf, s...)
	return append(buf, '"')
}

// run executes a command for one of the Execute methods, wrapping any error
// with the command's name and the object it is about.
func (q *QMP) run(ctx context.Context, name, about string, args, result interface{}) error {
	if err := q.execute(ctx, name, args, result); err != nil {
		if about != "" {
			name += " " + about
		}
		return fmt.Errorf("qmp: %s: %w", name, err)
	}
	return nil
}

// ExecuteCommand runs any QMP command. args may be nil or anything that
// encodes to a JSON object; result, when not nil, receives the decoded
// "return" value of the reply. A QMP error reply is returned as a *QMPError,
// wrapped.
func (q *QMP) ExecuteCommand(ctx context.Context, name string, args interface{}, result interface{}) error {
	return q.run(ctx, name, "", args, result)
}

// ExecuteQMPCapabilities executes the qmp_capabilities command on the
// instance. It has to be the first command of a session.
func (q *QMP) ExecuteQMPCapabilities(ctx context.Context) error {
	return q.run(ctx, "qmp_capabilities", "", nil, nil)
}

// ExecuteStop sends the stop command to the instance.
func (q *QMP) ExecuteStop(ctx context.Context) error {
	return q.run(ctx, "stop", "", nil, nil)
}

// ExecuteCont sends the cont command to the instance.
func (q *QMP) ExecuteCont(ctx context.Context) error {
	return q.run(ctx, "cont", "", nil, nil)
}

// ExecuteQuit sends the quit command to the instance, terminating the QMP
// instance immediately. It succeeds when QEMU replies, and also when QEMU
// closes the connection after the command was sent, since QEMU exiting is
// what was asked for.
func (q *QMP) ExecuteQuit(ctx context.Context) error {
	if err := q.execute(ctx, "quit", nil, nil); err != nil && !lostToQEMU(err) {
		return fmt.Errorf("qmp: quit: %w", err)
	}
	return nil
}

// lostToQEMU reports whether err says that QEMU closed the connection after
// the command was sent, as opposed to Shutdown, a context, an error reply or
// a session that had ended before.
func lostToQEMU(err error) bool {
	var lost *lostReplyError
	return errors.As(err, &lost) && errors.Is(err, errDisconnected)
}

// ExecuteSystemPowerdown sends the system_powerdown command to the instance.
// This function will block until both the reply and the SHUTDOWN event have
// been received, in either order; a SHUTDOWN followed by QEMU closing the
// connection counts as success.
func (q *QMP) ExecuteSystemPowerdown(ctx context.Context) error {
	return q.runAndWait(ctx, "system_powerdown", "", nil, &eventWaiter{name: "SHUTDOWN"})
}

// ExecuteDeviceDel deletes guest portion of a QEMU device by sending a
// device_del command. devID is the identifier of the device to delete.
// Typically it would match the devID parameter passed to an earlier call to
// ExecuteDeviceAdd. It must be a valid QMP identifier.
//
// This method blocks until the reply and a DEVICE_DELETED event whose
// data.device is devID have been received, in either order.
func (q *QMP) ExecuteDeviceDel(ctx context.Context, devID string) error {
	args := struct {
		ID string `json:"id"`
	}{devID}
	return q.runAndWait(ctx, "device_del", devID, args, &eventWaiter{name: "DEVICE_DELETED", device: devID})
}

// runAndWait runs a command that completes only when an event has come too.
// The waiter is registered before the command is written, since QEMU may
// send the event before the reply.
func (q *QMP) runAndWait(ctx context.Context, name, about string, args interface{}, w *eventWaiter) error {
	w.seen = make(chan struct{})
	q.mu.Lock()
	q.waiters = append(q.waiters, w)
	q.mu.Unlock()
	defer q.removeWaiter(w)

	label := name
	if about != "" {
		label += " " + about
	}
	err := q.execute(ctx, name, args, nil)
	if err != nil && !(lostToQEMU(err) && q.eventSeen(w)) {
		return fmt.Errorf("qmp: %s: %w", label, err)
	}
	select {
	case <-w.seen:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("qmp: %s: waiting for %s: %w", label, w.name, ctx.Err())
	case <-q.done:
		if q.eventSeen(w) {
			return nil
		}
		return fmt.Errorf("qmp: %s: waiting for %s: %w", label, w.name, q.sessionErr())
	}
}

// eventSeen reports whether w's event has come; the mutex that guards the
// waiters guards their state too.
func (q *QMP) eventSeen(w *eventWaiter) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return w.fired
}

func (q *QMP) removeWaiter(w *eventWaiter) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for i, x := range q.waiters {
		if x == w {
			q.waiters = append(q.waiters[:i], q.waiters[i+1:]...)
			return
		}
	}
}

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
	file := blockdevFile{Driver: "file", Filename: device}
	if fi, err := os.Stat(device); err == nil && fi.Mode()&os.ModeDevice != 0 {
		file.Driver = "host_device"
	}
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

// ExecuteDeviceAdd adds the guest portion of a device to a QEMU instance
// using the device_add command. blockdevID should match the blockdevID
// passed to a previous call to ExecuteBlockdevAdd. devID is the id of the
// device to add. Both strings must be valid QMP identifiers. driver is the
// name of the driver,e.g., virtio-blk-pci, and bus is the name of the bus.
// bus is optional.
func (q *QMP) ExecuteDeviceAdd(ctx context.Context, blockdevID, devID, driver, bus string) error {
	args := struct {
		ID     string `json:"id"`
		Driver string `json:"driver"`
		Drive  string `json:"drive"`
		Bus    string `json:"bus,omitempty"`
	}{devID, driver, blockdevID, bus}
	return q.run(ctx, "device_add", devID, args, nil)
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
		args := struct {
			ID string `json:"id"`
		}{blockdevID}
		return q.run(ctx, "x-blockdev-del", blockdevID, args, nil)
	}
}

type nodeNameArgs struct {
	NodeName string `json:"node-name"`
}
