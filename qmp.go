package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"reflect"
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
// belongs to the reader goroutine.
//
// It keeps one json.Decoder for the session, fed one line at a time,
// rather than calling json.Unmarshal per line: Unmarshal allocates its
// decoding state afresh each time, 6 allocations for a reply where the
// kept Decoder makes 1 (measured with testing.AllocsPerRun on a
// query-status reply), which is what keeps a command with a struct result
// within 8 allocations. json.Valid proves first that the line is exactly
// one JSON value, so the Decoder never reads past it.
type qmpDecoder struct {
	src lineReader
	dec *json.Decoder
	m   qmpLine
}

// lineReader is the Decoder's input: the line being decoded.
type lineReader struct{ line []byte }

func (r *lineReader) Read(p []byte) (int, error) {
	if len(r.line) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.line)
	r.line = r.line[n:]
	return n, nil
}

// keptDecoderLine is the longest line decoded through the kept Decoder,
// whose buffer grows to the longest line it has read; a longer one goes
// through json.Unmarshal, so that one large reply leaves no large buffer.
const keptDecoderLine = 64 << 10

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
	var err error
	if len(line) > keptDecoderLine {
		err = json.Unmarshal(line, m)
	} else {
		if d.dec == nil {
			d.dec = json.NewDecoder(&d.src)
		}
		d.src.line = line
		if err = d.dec.Decode(m); err != nil {
			d.dec = nil // start afresh after anything unexpected
		}
	}
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

// execute sends one command, waits for its reply and decodes the reply's
// "return" value into result, unless result is nil. args, when not nil,
// must encode to a JSON object; result, when not nil, must be a pointer.
// Both are checked before anything is sent.
func (q *QMP) execute(ctx context.Context, name string, args, result interface{}) error {
	return q.s.execute(ctx, name, args, result, nil)
}

// encodeArgs encodes a command's arguments, which must be a JSON object.
func encodeArgs(args interface{}) ([]byte, error) {
	if args == nil {
		return nil, nil
	}
	argsJSON, err := json.Marshal(args)
	if err != nil {
		return nil, fmt.Errorf("encode arguments: %w", err)
	}
	if len(argsJSON) == 0 || argsJSON[0] != '{' {
		return nil, fmt.Errorf("arguments encode to %.20s, not a JSON object", argsJSON)
	}
	return argsJSON, nil
}

// checkResult refuses a result that a reply could not be decoded into.
func checkResult(result interface{}) error {
	if result == nil {
		return nil
	}
	if v := reflect.ValueOf(result); v.Kind() != reflect.Pointer || v.IsNil() {
		return fmt.Errorf("result is a %T, not a non-nil pointer", result)
	}
	return nil
}

// commandError wraps err with the command's name and the object it is
// about.
func commandError(name, about string, err error) error {
	return labelError("qmp", name, about, err)
}

// labelError wraps err with the protocol, the command's name and the
// object it is about: "qmp: device_del nic0: ...".
func labelError(proto, name, about string, err error) error {
	if about != "" {
		name += " " + about
	}
	return fmt.Errorf("%s: %s: %w", proto, name, err)
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
// what was asked for. A quit that could not be written is an error.
func (q *QMP) ExecuteQuit(ctx context.Context) error {
	if err := q.execute(ctx, "quit", nil, nil); err != nil && !lostToPeer(err) {
		return fmt.Errorf("qmp: quit: %w", err)
	}
	return nil
}

// ExecuteSystemPowerdown sends the system_powerdown command to the instance.
// This function will block until both the reply and the SHUTDOWN event have
// been received, in either order; a SHUTDOWN followed by QEMU closing the
// connection counts as success.
func (q *QMP) ExecuteSystemPowerdown(ctx context.Context) error {
	_, err := q.runAndWait(ctx, "system_powerdown", "", nil, nil, EventFilter{Names: []string{"SHUTDOWN"}})
	return err
}

// ExecuteDeviceDel deletes guest portion of a QEMU device by sending a
// device_del command. devID is the identifier of the device to delete.
// Typically it would match the devID parameter passed to an earlier call to
// ExecuteDeviceAdd. It must be a valid QMP identifier.
//
// This method blocks until the reply and a DEVICE_DELETED event whose
// data.device is devID have been received, in either order. When the guest
// refuses the unplug (QEMU sends DEVICE_UNPLUG_GUEST_ERROR for the device),
// it fails at once with an error that wraps ErrUnplugRefused.
func (q *QMP) ExecuteDeviceDel(ctx context.Context, devID string) error {
	args := idArgs{devID}
	ev, err := q.runAndWait(ctx, "device_del", devID, args, nil, DeviceUnplugFilter(devID))
	if err == nil && ev.Name == "DEVICE_UNPLUG_GUEST_ERROR" {
		err = commandError("device_del", devID, ErrUnplugRefused)
	}
	return err
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
		args := idArgs{blockdevID}
		return q.run(ctx, "x-blockdev-del", blockdevID, args, nil)
	}
}

// nodeNameArgs and idArgs are the arguments of the many commands that
// take only a node name or only an id.
type nodeNameArgs struct {
	NodeName string `json:"node-name"`
}

type idArgs struct {
	ID string `json:"id"`
}
