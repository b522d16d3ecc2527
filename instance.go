package qemu

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// The Instance: a QEMU process of this one's, with its QMP session, its
// stderr, and optionally its console and guest agent. Its start is in
// start.go, its reaping in reap.go, its end in stop.go, and the handle on a
// QEMU started before in attach.go.

// Default bounds of the steps of Instance.Stop, and of the wait for QEMU
// to end after SIGKILL in Stop and Close.
const (
	DefaultPowerdownTimeout = 30 * time.Second
	DefaultQuitTimeout      = 5 * time.Second
	DefaultTermTimeout      = 5 * time.Second
	DefaultKillTimeout      = 5 * time.Second
)

// InstanceOptions says how StartInstance and StartCustomInstance run QEMU.
// The zero value is ready to use.
type InstanceOptions struct {
	// Stderr, if not nil, receives a copy of everything QEMU writes to
	// its stderr, in order. It is written from a goroutine of its own
	// through a backlog of about 2 MiB, so a slow Stderr never stalls
	// QEMU: when the backlog is full its oldest bytes are dropped and a
	// line saying how many is written in their place.
	Stderr io.Writer

	// EventCh, if not nil, receives the QMP session's events, as
	// QMPConfig.EventCh does. It is closed when the session ends,
	// including when the start fails.
	EventCh chan<- QMPEvent

	// Logger receives the log lines of the instance and its QMP session;
	// nil means none.
	Logger QMPLog

	// PowerdownTimeout, QuitTimeout and TermTimeout bound the steps of
	// Stop; zero means DefaultPowerdownTimeout, DefaultQuitTimeout and
	// DefaultTermTimeout.
	PowerdownTimeout time.Duration
	QuitTimeout      time.Duration
	TermTimeout      time.Duration

	// KeepRunning lets QEMU outlive this process, for a daemon that is
	// restarted while its VMs run on: QEMU gets no parent-death signal
	// and runs in a session of its own. Without it, QEMU is killed
	// (SIGKILL) when this process dies, even by SIGKILL. Set PIDFile and
	// QMPSocket too, so that a new process can find QEMU again with
	// AttachInstance.
	KeepRunning bool

	// PIDFile, if set, is where QEMU writes its pid (-pidfile).
	PIDFile string

	// QMPSocket, if set, is a unix socket path QEMU also serves QMP on
	// (server=on,wait=off), for AttachInstance. QEMU serves one client
	// per socket at a time.
	QMPSocket string

	// Console, if set, connects the guest's console to a socket pair that
	// QEMU inherits (after the QMP channel), read from QEMU's start:
	// ConsoleSerial (ttyS0), where nothing the guest writes is lost, or
	// ConsoleVirtio (hvc0), where QEMU drops what this process does not
	// read in time (see ConsoleVirtio). Instance.Console returns it.
	Console ConsolePort

	// GuestAgent, if set, adds a channel for the QEMU guest agent: a
	// virtio serial controller and a port named GuestAgentPort, whose
	// backend is a socket pair QEMU inherits (after the console), so
	// there is no path. Instance.GuestAgent returns its client, which
	// watches the port: calls under way when the guest closes it fail
	// with ErrAgentPortClosed.
	GuestAgent bool

	// ConsoleHistory bounds how much of the console's output is kept;
	// zero means DefaultConsoleHistory.
	ConsoleHistory int

	// ConsoleLog, if not nil, receives a copy of the console's output,
	// through a backlog like Stderr's, so that it never stalls the guest.
	ConsoleLog io.Writer

	// Env holds KEY=VALUE pairs added to this process's environment for
	// QEMU. StartInstance adds Config.Env before them.
	Env []string

	// NoPowerdown makes Stop start at quit, for a guest the caller knows
	// cannot act on the power button (one still booting, say), which
	// would otherwise hold Stop for PowerdownTimeout.
	NoPowerdown bool

	// KillTimeout bounds the wait for QEMU to end after SIGKILL, in Stop
	// and Close; zero means DefaultKillTimeout. Only a process stuck in
	// the kernel (an uninterruptible read from a dead NFS server, say)
	// outlasts it.
	KillTimeout time.Duration
}

// Instance is a QEMU process started by StartInstance or
// StartCustomInstance, with its QMP session. QEMU runs in the foreground
// as a child of this process: Wait reports how it ended, Stop ends it, and
// it is always reaped. An Instance's methods may be called from any number
// of goroutines.
//
// QEMU runs in a process group of its own, so a terminal's Ctrl-C does not
// reach it and Stop and Close signal whatever it started too; when QEMU
// exits, anything left in its group is killed.
type Instance struct {
	cmd     *exec.Cmd // nil for an attached Instance
	pid     int
	args    []string
	pidfd   int // an attached Instance's handle on QEMU's process; -1 otherwise
	qmp     *QMP
	version QMPVersion
	log     QMPLog
	opts    InstanceOptions

	stderr     *tailBuffer
	stderrR    *os.File
	stderrRead chan struct{} // closed when the stderr pipe has been read to its end
	sink       *outputSink   // nil without InstanceOptions.Stderr
	console    *SerialConsole
	agent      *GuestAgent

	// exited is closed once QEMU has been reaped, with state and
	// waitErr set, and with sigMu held; drained after it, once QEMU's
	// stderr has been read to its end (or the grace for what QEMU left
	// holding it has run out).
	exited  chan struct{}
	drained chan struct{}
	state   *os.ProcessState
	waitErr error // what cmd.Wait returned

	// sigMu is held while a signal is sent to QEMU's group and while QEMU
	// is reaped and exited closed, so that no signal can reach the group
	// of a reaped pid, which another process may have by then.
	sigMu sync.Mutex

	stopTurn  chan struct{} // holds a token while a Stop runs
	killed    atomic.Bool   // SIGKILL was sent to a running QEMU
	shutdown  atomic.Int32  // a shutdownState, kept by watchShutdown
	closeOnce sync.Once
}

// QMP returns the instance's QMP session, negotiated and ready for
// commands. Closing the instance shuts it down.
func (inst *Instance) QMP() *QMP { return inst.qmp }

// GuestAgent returns the client of the guest agent's channel, or nil when
// the Instance was started without InstanceOptions.GuestAgent. Closing the
// instance ends it.
func (inst *Instance) GuestAgent() *GuestAgent { return inst.agent }

// Console returns the guest's console, or nil when the Instance was
// started without InstanceOptions.Console. Closing the instance ends it.
func (inst *Instance) Console() *SerialConsole { return inst.console }

// Version returns the QEMU version from the QMP greeting.
func (inst *Instance) Version() QMPVersion {
	v := inst.version
	v.Capabilities = append([]string(nil), v.Capabilities...)
	return v
}

// Pid returns QEMU's process id.
func (inst *Instance) Pid() int { return inst.pid }

// Args returns QEMU's command line, the binary first, as it was started.
func (inst *Instance) Args() []string {
	return append([]string(nil), inst.args...)
}

// CommandLine returns QEMU's command line quoted for a POSIX shell, for
// logs and for running it again by hand (less the inherited descriptors).
func (inst *Instance) CommandLine() string {
	var b strings.Builder
	for i, arg := range inst.Args() {
		if i > 0 {
			b.WriteByte(' ')
		}
		b.WriteString(shellQuote(arg))
	}
	return b.String()
}

// Stderr returns the last MiB, at most, of what QEMU has written to its
// stderr.
func (inst *Instance) Stderr() string { return inst.stderr.String() }

// Done returns a channel that is closed once QEMU has exited and been
// reaped, and its stderr read to the end.
func (inst *Instance) Done() <-chan struct{} { return inst.drained }

// Wait waits for QEMU to exit and returns how it ended: its exit status or
// the signal that killed it. Any number of goroutines may wait, before or
// after QEMU exits; it is reaped once whatever they do. Wait also waits,
// as os/exec does, until QEMU's stderr has been read to its end and, with
// InstanceOptions.Stderr, given to that writer, or Close is called. If ctx
// ends first, Wait returns an error that wraps ctx.Err(); once all that is
// over, Wait returns how QEMU ended whatever ctx says. A nil ctx means
// context.Background().
func (inst *Instance) Wait(ctx context.Context) (*os.ProcessState, error) {
	ctx = orBackground(ctx)
	// The state first, so that a done ctx cannot hide a finished QEMU.
	if !isClosed(inst.drained) {
		select {
		case <-inst.drained:
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu: wait for pid %d: %w", inst.Pid(), contextError(ctx))
		}
	}
	if s := inst.sink; s != nil && !isClosed(s.done) && !isClosed(s.abandoned) {
		select {
		case <-s.done:
		case <-s.abandoned:
		case <-ctx.Done():
			return nil, fmt.Errorf("qemu: wait for pid %d: copying stderr: %w", inst.Pid(), contextError(ctx))
		}
	}
	if inst.cmd == nil {
		return nil, nil // attached: QEMU is not a child, its status is not ours to know
	}
	if inst.state == nil {
		return nil, fmt.Errorf("qemu: wait for pid %d: %w", inst.Pid(), inst.waitErr)
	}
	return inst.state, nil
}

// Close kills QEMU and what it started if it is still running (use Stop
// first for a graceful end), waits until QEMU has been reaped, at most
// KillTimeout, and shuts the QMP session down. A QEMU that outlasts the
// bound (stuck in the kernel) makes Close return an error that says so;
// it is still reaped when it ends. InstanceOptions.Stderr gets nothing
// more, though a Write in progress cannot be interrupted. Close may be
// called more than once, and concurrently with any other method; calls
// after the first return nil and do nothing.
func (inst *Instance) Close() error {
	var err error
	inst.closeOnce.Do(func() {
		_, err = inst.kill(context.Background())
		inst.qmp.Shutdown()
		if inst.agent != nil {
			inst.agent.Close()
		}
		if inst.console != nil {
			inst.console.close()
		}
		if inst.sink != nil {
			inst.sink.abandon()
		}
	})
	return err
}

func (inst *Instance) hasExited() bool { return isClosed(inst.exited) }

// waitExited waits until QEMU exits or ctx ends, and reports whether QEMU
// has exited.
func (inst *Instance) waitExited(ctx context.Context) bool {
	select {
	case <-inst.exited:
		return true
	case <-ctx.Done():
		return inst.hasExited()
	}
}

// isClosed reports whether ch, which is only ever closed, has been.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}
