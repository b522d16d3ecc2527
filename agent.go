package qemu

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strconv"
	"sync"
)

// GuestAgentPort is the name of the virtio serial port the QEMU guest agent
// (qemu-ga) listens on in the guest.
const GuestAgentPort = "org.qemu.guest_agent.0"

// ErrAgentCommandUnavailable is the cause of a typed guest-agent call of a
// command that the agent's guest-info does not list, or lists as disabled.
// Nothing was sent.
var ErrAgentCommandUnavailable = errors.New("the guest agent does not offer the command")

// ErrAgentPortClosed is the cause of a guest-agent call that failed because
// the guest closed the agent's port while the call was under way: the
// agent died or was stopped, or the guest is going down. It needs
// GuestAgentConfig.QMP and Port, which an Instance's agent has; without
// them such a call waits for its context. QEMU sends at most one
// VSERPORT_CHANGE a second per port, the latest: a close within a second
// of the port's last change is seen up to a second late, and one undone
// by a reopen within that second is not seen at all.
var ErrAgentPortClosed = errors.New("the guest closed the agent's port")

// GuestAgentConfig configures a guest-agent session.
type GuestAgentConfig struct {
	// Logger receives the session's log lines; nil logs nothing.
	Logger QMPLog

	// QMP, if set, is the QMP session of the QEMU whose guest runs the
	// agent. Shutdown then also completes on its SHUTDOWN event, which
	// is how a QEMU started with -no-shutdown tells it.
	QMP *QMP

	// Port, with QMP, is the id of the agent's virtserialport device
	// (its -device id, not its name). QEMU's VSERPORT_CHANGE events then
	// say when the guest closes the port, and the calls under way then
	// fail with ErrAgentPortClosed.
	Port string
}

// GuestAgent is a client of the QEMU guest agent, qemu-ga, the daemon in a
// guest that runs commands for the host over a virtio serial port. It runs
// on the same session engine as QMP: one reader, one command in flight,
// every call bounded by its context (its write included), and every call
// failed when the channel ends.
//
// The agent has no greeting, and an agent that is not running reads
// nothing and answers nothing; what is on the channel may be owed to an
// earlier client or to a command given up on. So the first call, and the
// first after any call whose context ended before its reply, sends a 0xFF
// byte (which resets the agent's parser) and guest-sync-delimited with a
// fresh random id, and skips every reply until the one that carries that
// id after the agent's own 0xFF. A reply to a command the client gave up
// on is never handed to another command.
//
// With GuestAgentConfig.QMP and Port (an Instance's agent has both), the
// calls under way when the guest closes the agent's port fail at once with
// ErrAgentPortClosed; otherwise they wait for their contexts.
//
// The typed calls check first that guest-info lists the command as
// enabled (ErrAgentCommandUnavailable otherwise); Execute sends anything.
// Error replies are *QMPError values, wrapped, with the agent's class and
// description. A GuestAgent's methods may be called from any number of
// goroutines.
type GuestAgent struct {
	s   *session
	qmp *QMP

	mu       sync.Mutex             // guards the fields below
	version  string                 // the agent's, from guest-info
	commands map[string]bool        // from guest-info: enabled, by name; nil until asked
	portSub  *Subscription          // the port's closing, while watchPort watches it
	underway map[*underwayCall]bool // the calls the port's closing fails; nil unless watched
}

// OpenGuestAgent connects to the unix socket of a guest agent's channel
// (a chardev socket on QEMU's side, with a virtserialport named
// GuestAgentPort in the guest). ctx bounds the connection only: the agent
// is first spoken to by the first call, which fails with its context if
// no agent is running by then.
func OpenGuestAgent(ctx context.Context, socket string, cfg GuestAgentConfig) (*GuestAgent, error) {
	if len(socket) > maxSocketPath {
		return nil, fmt.Errorf("qga: connect to %s: the path is %d bytes, longer than the %d a unix socket path may have", socket, len(socket), maxSocketPath)
	}
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", socket)
	if err != nil && ctx.Err() != nil {
		err = contextError(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("qga: connect to %s: %w", socket, err)
	}
	return newGuestAgent(conn, cfg), nil
}

// newGuestAgent runs a guest-agent session over conn, which it owns from
// then on.
func newGuestAgent(conn net.Conn, cfg GuestAgentConfig) *GuestAgent {
	a := &GuestAgent{}
	// A file chunk's reply (agentChunk, base64: 1.4 MB) is read 64 KiB
	// a read.
	a.s = newSession(conn, bufio.NewReaderSize(conn, 64<<10), protocol{
		name:   "qga",
		decode: decodeAgentLine,
		event:  func(QMPEvent) {},
		end:    a.sessionEnded,
		resync: agentSync,
	}, orNullLogger(cfg.Logger))
	a.useQMP(cfg.QMP, cfg.Port)
	return a
}

// useQMP gives the agent its QEMU's QMP session, for Shutdown, and
// watches port on it when port is set.
func (a *GuestAgent) useQMP(q *QMP, port string) {
	a.qmp = q
	if q == nil || port == "" {
		return
	}
	sub := q.Subscribe(EventFilter{Names: []string{"VSERPORT_CHANGE"}, Data: map[string]string{"id": port, "open": "false"}})
	a.mu.Lock()
	a.underway = map[*underwayCall]bool{}
	a.portSub = sub
	a.mu.Unlock()
	// The session's error is set before sessionEnded runs: of the two,
	// the later sees the other's part and closes sub.
	if a.s.ended() != nil {
		sub.Close()
	}
	go a.watchPort(sub)
}

// watchPort fails the calls under way each time sub says the guest closed
// the agent's port. It returns when either session ends.
func (a *GuestAgent) watchPort(sub *Subscription) {
	for {
		if _, err := sub.Receive(context.Background()); err != nil {
			return
		}
		a.mu.Lock()
		for g := range a.underway {
			g.cancel(ErrAgentPortClosed)
		}
		a.mu.Unlock()
	}
}

// sessionEnded is the session's end: watchPort has nothing left to do.
func (a *GuestAgent) sessionEnded(error) {
	a.mu.Lock()
	sub := a.portSub
	a.mu.Unlock()
	if sub != nil {
		sub.Close()
	}
}

// underwayCall is a call under way, as the port's closing would fail it.
type underwayCall struct{ cancel context.CancelCauseFunc }

// guard returns ctx, cancelled with ErrAgentPortClosed when the guest
// closes the agent's port before release is called.
func (a *GuestAgent) guard(ctx context.Context) (_ context.Context, release func()) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.underway == nil {
		return ctx, func() {}
	}
	gctx, cancel := context.WithCancelCause(ctx)
	g := &underwayCall{cancel}
	a.underway[g] = true
	return gctx, func() {
		a.mu.Lock()
		delete(a.underway, g)
		a.mu.Unlock()
		cancel(nil)
	}
}

// agentSync returns a guest-sync-delimited with a fresh id, preceded by the
// 0xFF that makes the agent drop any half-read command, and taking only the
// delimited reply that carries the id. (qemu-ga 7.2 answers the 0xFF
// itself with a parse error, which is skipped like any stale reply.)
func agentSync() request {
	// The schema's int is 64-bit signed: a non-negative one fits.
	id := strconv.AppendInt(nil, rand.Int64(), 10)
	return request{
		prefix: []byte{0xFF},
		name:   "guest-sync-delimited",
		args:   append(append([]byte(`{"id":`), id...), '}'),
		accept: func(f frame) bool {
			return f.delimited && f.err == nil && bytes.Equal(f.ret, id)
		},
	}
}

// agentLine is every kind of line the agent sends.
type agentLine struct {
	Return json.RawMessage `json:"return"`
	Error  *QMPError       `json:"error"`
}

// decodeAgentLine decodes one line from the agent. What comes before its
// last 0xFF is stale (the 0xFF starts the reply to guest-sync-delimited),
// and so is anything before the first '{' after that: the rest of a reply
// cut short when an earlier agent died, say.
func decodeAgentLine(line []byte) (frame, error) {
	var f frame
	if i := bytes.LastIndexByte(line, 0xFF); i >= 0 {
		line, f.delimited = line[i+1:], true
	}
	i := bytes.IndexByte(line, '{')
	if i < 0 {
		return frame{}, errors.New("no JSON object")
	}
	var m agentLine
	if err := json.Unmarshal(line[i:], &m); err != nil {
		return frame{}, fmt.Errorf("not a guest agent reply: %w", err)
	}
	switch {
	case m.Error != nil:
		f.kind, f.err = frameReply, m.Error
	case m.Return != nil:
		f.kind, f.ret = frameReply, m.Return
	default:
		return frame{}, errors.New("neither a return nor an error")
	}
	return f, nil
}

// Close ends the session; calls in flight and after it fail with an error
// that wraps ErrShutdown. It returns once the session's goroutine has
// ended, and may be called more than once.
func (a *GuestAgent) Close() error {
	a.s.shutdown()
	return nil
}

// Done returns a channel that is closed when the session has ended: the
// channel closed (QEMU exited), a read or a write failed, or Close was
// called. Err then says which.
func (a *GuestAgent) Done() <-chan struct{} { return a.s.done }

// Err returns nil until Done is closed, and then why the session ended.
func (a *GuestAgent) Err() error { return a.s.endedErr() }

// Execute runs any guest-agent command, with no check of guest-info. args
// may be nil or anything that encodes to a JSON object; result, when not
// nil, must be a pointer and receives the reply's "return" value. It is
// the call for the commands that reply on success; for one that does not
// (guest-suspend-*), it returns when ctx ends.
func (a *GuestAgent) Execute(ctx context.Context, name string, args, result interface{}) error {
	return a.run(ctx, name, args, result)
}

// run sends one command and decodes its reply into result, wrapping any
// error with the command's name.
func (a *GuestAgent) run(ctx context.Context, name string, args, result interface{}) error {
	if err := a.execute(ctx, name, args, result); err != nil {
		return labelError("qga", name, "", err)
	}
	return nil
}

func (a *GuestAgent) execute(ctx context.Context, name string, args, result interface{}) error {
	gctx, release := a.guard(ctx)
	defer release()
	err := a.s.execute(gctx, name, args, result, nil)
	if portClosed(ctx, gctx) {
		// The caller's context did not end: the error is the port's
		// closing alone, still saying whether the command was written.
		if unanswered(err) {
			return &unansweredError{ErrAgentPortClosed}
		}
		return ErrAgentPortClosed
	}
	return err
}

// portClosed reports whether gctx, made by guard from ctx, ended because
// the guest closed the agent's port rather than because ctx ended.
func portClosed(ctx, gctx context.Context) bool {
	return ctx.Err() == nil && gctx.Err() != nil
}

// call is run for a typed command, which the agent must offer. A command
// the agent has disabled since guest-info said otherwise (a frozen agent
// disables all but the freeze status and thaw) comes back as
// CommandNotFound: that too is ErrAgentCommandUnavailable, and the list is
// asked for again next time.
func (a *GuestAgent) call(ctx context.Context, name, about string, args, result interface{}) error {
	if err := a.offers(ctx, name); err != nil {
		return labelError("qga", name, about, err)
	}
	err := a.execute(ctx, name, args, result)
	var qerr *QMPError
	if errors.As(err, &qerr) && qerr.Class == "CommandNotFound" {
		a.mu.Lock()
		a.commands = nil
		a.mu.Unlock()
		err = fmt.Errorf("%w: %w", ErrAgentCommandUnavailable, err)
	}
	if err != nil {
		return labelError("qga", name, about, err)
	}
	return nil
}

// callFor is call for a command whose reply decodes into a T.
func callFor[T any](ctx context.Context, a *GuestAgent, name, about string, args interface{}) (T, error) {
	var result T
	err := a.call(ctx, name, about, args, &result)
	return result, err
}

// offers checks that guest-info lists name as enabled. The list is asked
// for once, and again when it lacks the command, since a restarted agent
// may offer more.
func (a *GuestAgent) offers(ctx context.Context, name string) error {
	a.mu.Lock()
	enabled := a.commands[name]
	a.mu.Unlock()
	if enabled {
		return nil
	}
	if _, err := a.info(ctx); err != nil {
		return err
	}
	a.mu.Lock()
	enabled, known := a.commands[name]
	version := a.version
	a.mu.Unlock()
	switch {
	case !known:
		return fmt.Errorf("%w: qemu-ga %s has no %s", ErrAgentCommandUnavailable, version, name)
	case !enabled:
		return fmt.Errorf("%w: qemu-ga %s has %s disabled", ErrAgentCommandUnavailable, version, name)
	}
	return nil
}

// info runs guest-info and keeps its list of commands for offers.
func (a *GuestAgent) info(ctx context.Context) (GuestAgentInfo, error) {
	var info GuestAgentInfo
	if err := a.execute(ctx, "guest-info", nil, &info); err != nil {
		return info, fmt.Errorf("guest-info: %w", err)
	}
	commands := make(map[string]bool, len(info.SupportedCommands))
	for _, c := range info.SupportedCommands {
		commands[c.Name] = c.Enabled
	}
	a.mu.Lock()
	a.version, a.commands = info.Version, commands
	a.mu.Unlock()
	return info, nil
}

// instanceAgent is the chardev id of the guest agent's channel an Instance
// adds with InstanceOptions.GuestAgent.
const instanceAgent = "instance-agent"

// instanceAgentPort is the device id of that channel's virtserialport.
const instanceAgentPort = instanceAgent + "-port"

// agentParams renders the guest agent's channel on the socket QEMU
// inherits as descriptor fd: a virtio serial controller of its own, and on
// it the port the agent opens.
func agentParams(fd int) []string {
	bus := SerialDevice{Driver: VirtioSerial, ID: instanceAgent + "-bus"}
	port := GenericDevice{Driver: VirtioSerialPort, ID: instanceAgentPort, Bus: bus.ID + ".0", Properties: []DeviceProperty{
		{"chardev", instanceAgent}, {"name", GuestAgentPort}}}
	params := inheritedSocket(instanceAgent, fd)
	params = append(params, bus.QemuParams(nil)...)
	return append(params, port.QemuParams(nil)...)
}
