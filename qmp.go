package qemu

// The QMP client: connecting and the greeting, decoding QEMU's lines, and
// running commands on the session engine; the typed commands are in the
// files of their areas.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"time"
)

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

// maxSocketPath is the longest unix socket path the kernel takes: its
// sun_path has 108 bytes, one of them for the terminating NUL.
const maxSocketPath = 107

// QMP is a structure that contains the internal state used by startQMPLoop
// and the go routines it spawns. All the contents of this structure are
// private.
//
// A QMP session runs on the package's session engine: one reader goroutine
// decodes every line from QEMU, commands are written one at a time in call
// order, each after the previous one's reply, and every event goes to the
// subscriptions whose filter selects it (Subscribe). QMPConfig.EventCh is
// one such subscription, with a goroutine of its own that forwards its
// events. Its methods may be called from any number of goroutines.
type QMP struct {
	s       *session
	router  router
	version *QMPVersion

	// stopEvents ends the EventCh forwarder at once, for Shutdown;
	// forwarded is closed when the forwarder has closed EventCh.
	stopEvents context.CancelFunc
	forwarded  chan struct{}
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
	if len(socket) > maxSocketPath {
		closeIfSet(disconnectedCh)
		return nil, nil, fmt.Errorf("qmp: connect to %s: the path is %d bytes, longer than the %d a unix socket path may have", socket, len(socket), maxSocketPath)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil && ctx.Err() != nil {
		err = contextError(ctx)
	}
	if err != nil {
		closeIfSet(disconnectedCh)
		return nil, nil, fmt.Errorf("qmp: connect to %s: %w", socket, err)
	}
	return qmpStartConn(ctx, conn, cfg, disconnectedCh)
}

// qmpStartConn runs a QMP session over conn, which it owns from then on.
func qmpStartConn(ctx context.Context, conn net.Conn, cfg QMPConfig, disconnectedCh chan struct{}) (*QMP, *QMPVersion, error) {
	log := orNullLogger(cfg.Logger)
	r := bufio.NewReaderSize(conn, 4<<10)
	version, err := readGreeting(ctx, conn, r, log)
	if err != nil {
		conn.Close()
		closeIfSet(disconnectedCh)
		return nil, nil, err
	}
	q := &QMP{version: version}
	if cfg.EventCh != nil {
		// Subscribed before the reader starts, so it sees every event.
		sub := q.Subscribe(EventFilter{})
		ectx, stop := context.WithCancel(context.Background())
		q.stopEvents, q.forwarded = stop, make(chan struct{})
		go forwardEvents(ectx, sub, cfg.EventCh, q.forwarded)
	}
	var dec qmpDecoder
	q.s = newSession(conn, r, protocol{
		name:   "qmp",
		decode: dec.decode,
		event:  q.router.publish,
		end: func(err error) {
			q.router.end(err)
			closeIfSet(disconnectedCh)
		},
	}, log)
	v := *version
	return q, &v, nil
}

func closeIfSet(ch chan struct{}) {
	if ch != nil {
		close(ch)
	}
}

// forwardEvents sends what sub receives to ch until the session has ended
// and everything queued has gone, or ctx ends; then it closes ch.
func forwardEvents(ctx context.Context, sub *Subscription, ch chan<- QMPEvent, done chan struct{}) {
	defer close(done)
	defer close(ch)
	defer sub.Close()
	for {
		ev, err := sub.Receive(ctx)
		if err != nil || ctx.Err() != nil {
			// Shutdown drops what is queued, whether or not someone
			// is reading EventCh at that moment.
			return
		}
		select {
		case ch <- ev:
		case <-ctx.Done():
			return
		}
	}
}

// greetingLine is the first line of a QMP session.
type greetingLine struct {
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
	Event string `json:"event"`
}

// readGreeting reads lines until QEMU's greeting. ctx is honoured by moving
// the read deadline when it ends, which needs no goroutine of its own.
func readGreeting(ctx context.Context, conn net.Conn, r *bufio.Reader, log QMPLog) (*QMPVersion, error) {
	if ctx.Err() != nil {
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", contextError(ctx))
	}
	expire := context.AfterFunc(ctx, func() {
		conn.SetReadDeadline(time.Unix(1, 0))
	})
	version, err := scanGreeting(r, log)
	if !expire() {
		return nil, fmt.Errorf("qmp: waiting for greeting: %w", contextError(ctx))
	}
	return version, err
}

func scanGreeting(r *bufio.Reader, log QMPLog) (*QMPVersion, error) {
	var big []byte
	for {
		line, err := readLine(r, &big)
		if err != nil {
			return nil, fmt.Errorf("qmp: waiting for greeting: %w", err)
		}
		if len(line) == 0 {
			continue
		}
		var m greetingLine
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
			log.Infof("qmp: skipping event %s before the greeting", m.Event)
		default:
			return nil, fmt.Errorf("qmp: not a QMP greeting: %q", truncate(line))
		}
	}
}

// qmpDecoder decodes the lines of a QMP session after the greeting. It
// belongs to the reader goroutine, and decodes each line once, through a
// kept Decoder, into a qmpLine whatever the line turns out to be.
// json.Valid proves first that the line is exactly one JSON value.
type qmpDecoder struct {
	kept keptDecoder
	m    qmpLine
}

// qmpLine is every kind of line QEMU sends after the greeting, so that each
// line is decoded once whatever it turns out to be.
type qmpLine struct {
	Return    json.RawMessage        `json:"return"`
	Error     *QMPError              `json:"error"`
	Event     string                 `json:"event"`
	Data      map[string]interface{} `json:"data"`
	Timestamp struct {
		Seconds      int64 `json:"seconds"`
		Microseconds int64 `json:"microseconds"`
	} `json:"timestamp"`
}

func (d *qmpDecoder) decode(line []byte) (frame, error) {
	if line[0] != '{' || !json.Valid(line) {
		return frame{}, errors.New("not a JSON object")
	}
	// Reset, so that the reply's value and the event's data decode into
	// new memory, which the frame hands on.
	d.m = qmpLine{}
	m := &d.m
	err := d.kept.decode(line, m)
	if err != nil {
		return frame{}, fmt.Errorf("not a QMP message: %w", err)
	}
	switch {
	case m.Event != "":
		return frame{kind: frameEvent, event: QMPEvent{
			Name:      m.Event,
			Data:      m.Data,
			Timestamp: time.Unix(m.Timestamp.Seconds, m.Timestamp.Microseconds*int64(time.Microsecond)),
		}}, nil
	case m.Error != nil:
		return frame{kind: frameReply, err: m.Error}, nil
	case m.Return != nil:
		return frame{kind: frameReply, ret: m.Return}, nil
	}
	return frame{}, errors.New("neither a reply nor an event")
}

// Shutdown closes the domain socket used to monitor a QEMU instance and
// terminates all the go routines spawned by QMPStart to manage that
// instance. QMP.Shutdown does not shut down the running instance. Calling
// QMP.Shutdown will result in the disconnectedCh channel being closed,
// indicating that we have lost connection to the QMP instance. In this case
// it does not indicate that the instance has quit.
//
// Shutdown returns once every goroutine of the session has ended; EventCh
// is closed at once, and what it had not delivered is dropped. It may be
// called more than once, concurrently with other methods, and after the
// disconnectedCh channel is closed; calls after the first have no effect.
// Execute methods called after it return an error that wraps ErrShutdown.
func (q *QMP) Shutdown() {
	q.s.shutdown()
	if q.stopEvents != nil {
		q.stopEvents()
		<-q.forwarded
	}
}

// Done returns a channel that is closed when the session has ended: QEMU
// closed the connection (it exited, usually), a read or write failed, or
// Shutdown was called. Err then says which.
func (q *QMP) Done() <-chan struct{} { return q.s.done }

// Err returns nil until Done is closed, and then why the session ended: an
// error that wraps ErrShutdown after Shutdown, or ErrDisconnected when the
// connection ended otherwise.
func (q *QMP) Err() error { return q.s.endedErr() }

// Subscribe returns a subscription to the session's events that filter
// selects. Every event QEMU sends after Subscribe has returned is offered
// to it, so subscribing before sending a command never misses the events
// the command causes, even those QEMU sends before its reply. Close the
// subscription when done with it; until then it holds what it queues.
func (q *QMP) Subscribe(filter EventFilter) *Subscription {
	return q.router.subscribe(filter)
}

// execute sends one command, waits for its reply and decodes the reply's
// "return" value into result, unless result is nil. args, when not nil,
// must encode to a JSON object; result, when not nil, must be a pointer.
// Both are checked before anything is sent.
func (q *QMP) execute(ctx context.Context, name string, args, result interface{}) error {
	return q.s.execute(ctx, name, args, result, nil)
}

// run executes a command for one of the Execute methods, wrapping any error
// with the command's name and the object it is about.
func (q *QMP) run(ctx context.Context, name, about string, args, result interface{}) error {
	if err := q.execute(ctx, name, args, result); err != nil {
		return commandError(name, about, err)
	}
	return nil
}

// runFor is run for a command whose reply decodes into a T, which it
// returns.
func runFor[T any](ctx context.Context, q *QMP, name, about string, args interface{}) (T, error) {
	var result T
	err := q.run(ctx, name, about, args, &result)
	return result, err
}

// ExecuteCommand runs any QMP command. args may be nil or anything that
// encodes to a JSON object; result, when not nil, must be a pointer, and
// receives the decoded "return" value of the reply. Both are checked
// before anything is sent. A QMP error reply is returned as a *QMPError,
// wrapped.
func (q *QMP) ExecuteCommand(ctx context.Context, name string, args interface{}, result interface{}) error {
	return q.run(ctx, name, "", args, result)
}

// ExecuteCommandAndWait runs a command as ExecuteCommand does and then
// waits for the first event that filter selects, which it returns. It
// subscribes before the command is sent, so the event may come before the
// reply or after it. If QEMU closes the connection after the command was
// sent, an event that came before that still completes the command. ctx
// bounds the command and the wait.
//
// For the usual waits: JobStatusFilter for a job reaching "concluded",
// MigrationFilter for a migration ending, DeviceUnplugFilter for an unplug.
func (q *QMP) ExecuteCommandAndWait(ctx context.Context, name string, args, result interface{}, filter EventFilter) (QMPEvent, error) {
	return q.runAndWait(ctx, name, "", args, result, filter)
}

// runAndWait runs a command that completes only when an event has come too.
func (q *QMP) runAndWait(ctx context.Context, name, about string, args, result interface{}, filter EventFilter) (QMPEvent, error) {
	sub := q.Subscribe(filter)
	defer sub.Close()
	err := q.execute(ctx, name, args, result)
	if err != nil && !lostToPeer(err) {
		return QMPEvent{}, commandError(name, about, err)
	}
	// After a lost reply the session has ended, so Receive returns at
	// once: with the event if it came before the end.
	ev, rerr := sub.Receive(ctx)
	switch {
	case rerr == nil:
		return ev, nil
	case err != nil:
		return QMPEvent{}, commandError(name, about, err)
	}
	return QMPEvent{}, commandError(name, about, fmt.Errorf("waiting for %s: %w", filter.label(), rerr))
}

// ExecuteQMPCapabilities executes the qmp_capabilities command on the
// instance. It has to be the first command of a session.
func (q *QMP) ExecuteQMPCapabilities(ctx context.Context) error {
	return q.run(ctx, "qmp_capabilities", "", nil, nil)
}

type idArgs struct {
	ID string `json:"id"`
}

// nodeNameArgs and idArgs are the arguments of the many commands that
// take only a node name or only an id.
type nodeNameArgs struct {
	NodeName string `json:"node-name"`
}
