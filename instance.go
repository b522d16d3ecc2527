package qemu

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"
)

// Default bounds of the steps of Instance.Stop, and of the wait for QEMU
// to end after SIGKILL in Stop and Close.
const (
	DefaultPowerdownTimeout = 30 * time.Second
	DefaultQuitTimeout      = 5 * time.Second
	DefaultTermTimeout      = 5 * time.Second
	DefaultKillTimeout      = 5 * time.Second
)

// instanceMonitor is the chardev id of the QMP channel an Instance adds to
// QEMU's command line.
const instanceMonitor = "instance-qmp"

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
	exiting   atomic.Bool   // QEMU sent SHUTDOWN, and no STOP or RESUME since; set by watchShutdown
	closeOnce sync.Once
}

// StartInstance starts QEMU with the command line config describes, as
// LaunchQemu does, and returns once its QMP session is connected and
// negotiated (qmp_capabilities has been sent). QEMU is not daemonized:
// config.Knobs.Daemonize is an error, and config.Ctx is not used.
//
// The VM is headless unless config asks for a display (Knobs.NoGraphic,
// or -display, -vnc, -spice, -sdl or -curses in ExtraParams):
// StartInstance adds -display none, since QEMU with no display option
// opens one of its own, an unauthenticated VNC server on 127.0.0.1:5900
// where there is no window system. LaunchQemu renders the Config as the
// seed package did, without it.
//
// Unlike LaunchQemu, which leaves an invalid device out with a warning,
// StartInstance refuses a Config with any invalid part, before QEMU
// starts, with an error that names each one ("Devices[1] (BlockDevice):
// File is empty"): it does not start another VM than the one described.
//
// ctx bounds the start only. If it ends before QMP is ready, QEMU is
// killed and reaped and the error wraps ctx.Err(); once StartInstance has
// returned, ctx has no effect on the VM. If QEMU exits before QMP is ready
// (a bad option, usually), the error carries its exit status (an
// *exec.ExitError, wrapped, when it is not 0) and its last lines of
// stderr.
//
// The QMP channel is a socket pair whose one end QEMU inherits, as its
// file descriptor 3+len(fds) for the fds config's devices registered, so
// there is no socket path to wait for. config.QMPSockets, if any, are
// added as usual.
func StartInstance(ctx context.Context, config Config, opts InstanceOptions) (*Instance, error) {
	problems := configProblems(&config)
	if config.Knobs.Daemonize {
		problems = append(problems, "Knobs.Daemonize is set, but an Instance runs QEMU in the foreground")
	}
	if len(problems) > 0 {
		return nil, abandonEvents(opts, fmt.Errorf("qemu: start: invalid Config: %s", strings.Join(problems, "; ")))
	}
	params, fds := renderConfig(config, opts.Logger)
	if !asksForDisplay(&config) {
		params = append(params, "-display", "none")
	}
	opts.Env = append(config.Env[:len(config.Env):len(config.Env)], opts.Env...)
	return StartCustomInstance(ctx, config.Path, params, fds, opts)
}

// asksForDisplay reports whether config chooses a display: Knobs.NoGraphic,
// or one of QEMU's display options in ExtraParams.
func asksForDisplay(config *Config) bool {
	if config.Knobs.NoGraphic {
		return true
	}
	for _, p := range config.ExtraParams {
		name, isOption := strings.CutPrefix(p, "-")
		if !isOption {
			continue
		}
		// QEMU takes an option with one dash or two.
		switch strings.TrimPrefix(name, "-") {
		case "display", "nographic", "vnc", "spice", "sdl", "curses":
			return true
		}
	}
	return false
}

// StartCustomInstance starts the QEMU binary at path (qemu-system-x86_64
// from PATH when path is "") with params and returns as StartInstance
// does. QEMU inherits fds, fds[i] as its file descriptor 3+i, and the QMP
// channel as descriptor 3+len(fds), which StartCustomInstance adds to
// params as
//
//	-chardev socket,id=instance-qmp,fd=N -mon chardev=instance-qmp,mode=control
//
// params must not contain -daemonize. A nil ctx means
// context.Background().
func StartCustomInstance(ctx context.Context, path string, params []string, fds []*os.File, opts InstanceOptions) (*Instance, error) {
	ctx = orBackground(ctx)
	if path == "" {
		path = defaultQEMU
	}
	if err := checkStart(ctx, path, params, fds); err != nil {
		return nil, abandonEvents(opts, err)
	}
	inst, ours, err := startProcess(path, params, fds, opts)
	if err != nil {
		return nil, abandonEvents(opts, err)
	}
	// QEMU exiting must end the wait for QMP even when something it left
	// behind keeps the channel open.
	cctx, cancel := context.WithCancel(ctx)
	go inst.cancelOnExit(cctx, cancel)
	err = inst.connect(cctx, ours)
	cancel()
	if err != nil {
		return nil, inst.failStart(ctx, err)
	}
	return inst, nil
}

// cancelOnExit cancels ctx if QEMU exits before ctx is done.
func (inst *Instance) cancelOnExit(ctx context.Context, cancel context.CancelFunc) {
	select {
	case <-inst.exited:
		cancel()
	case <-ctx.Done():
	}
}

// checkStart refuses what StartCustomInstance cannot start.
func checkStart(ctx context.Context, path string, params []string, fds []*os.File) error {
	for i, f := range fds {
		if f == nil {
			return fmt.Errorf("qemu: start %s: fds[%d] is nil", path, i)
		}
	}
	for _, p := range params {
		if p == "-daemonize" || p == "--daemonize" {
			return fmt.Errorf("qemu: start %s: %s in params, but an Instance runs QEMU in the foreground", path, p)
		}
	}
	if ctx.Err() != nil {
		return fmt.Errorf("qemu: start %s: %w", path, contextError(ctx))
	}
	return nil
}

// abandonEvents closes the caller's EventCh for a start that failed before
// a QMP session could own it, and returns err.
func abandonEvents(opts InstanceOptions, err error) error {
	if opts.EventCh != nil {
		close(opts.EventCh)
	}
	return err
}

// startProcess starts QEMU with the QMP channel, the console if asked
// for, and a stderr pipe. It returns our end of the QMP channel.
func startProcess(path string, params []string, fds []*os.File, opts InstanceOptions) (*Instance, *os.File, error) {
	fail := func(what string, err error, files ...*os.File) (*Instance, *os.File, error) {
		for _, f := range files {
			f.Close()
		}
		return nil, nil, fmt.Errorf("qemu: start %s: %s: %w", path, what, err)
	}
	args := make([]string, 0, len(params)+14)
	args = append(args, params...)
	args = append(args, inheritedSocket(instanceMonitor, 3+len(fds))...)
	args = append(args, "-mon", "chardev="+instanceMonitor+",mode=control")
	if opts.QMPSocket != "" {
		args = append(args, QMPSocket{Type: Unix, Name: opts.QMPSocket, Server: true, NoWait: true}.params()...)
	}
	if opts.PIDFile != "" {
		args = append(args, "-pidfile", opts.PIDFile)
	}
	next := 4 + len(fds) // the descriptor of the next channel QEMU inherits
	if opts.Console != "" {
		cargs, err := consoleParams(opts.Console, next)
		if err != nil {
			return fail("InstanceOptions", err)
		}
		args = append(args, cargs...)
		next++
	}
	if opts.GuestAgent {
		args = append(args, agentParams(next)...)
	}
	ours, theirs, err := socketPair()
	if err != nil {
		return fail("QMP channel", err)
	}
	extra := append(fds[:len(fds):len(fds)], theirs)
	parentEnds := []*os.File{theirs}
	var conOurs *os.File
	if opts.Console != "" {
		var conTheirs *os.File
		if conOurs, conTheirs, err = consoleChannel(); err != nil {
			return fail("console channel", err, ours, theirs)
		}
		extra = append(extra, conTheirs)
		parentEnds = append(parentEnds, conTheirs)
	}
	var agentOurs *os.File
	if opts.GuestAgent {
		var agentTheirs *os.File
		if agentOurs, agentTheirs, err = socketPair(); err != nil {
			return fail("guest agent channel", err, append(parentEnds, ours, conOurs)...)
		}
		extra = append(extra, agentTheirs)
		parentEnds = append(parentEnds, agentTheirs)
	}
	stderrR, stderrW, err := os.Pipe()
	if err != nil {
		return fail("stderr pipe", err, append(parentEnds, ours, conOurs, agentOurs)...)
	}
	cmd := exec.Command(path, args...)
	cmd.ExtraFiles = extra
	if len(opts.Env) > 0 {
		cmd.Env = append(os.Environ(), opts.Env...)
	}
	// An *os.File, so that os/exec starts no copying goroutine that Wait
	// would wait for; the Instance drains the pipe itself.
	cmd.Stderr = stderrW
	// Its own process group, so that Stop and Close can signal whatever
	// QEMU (or a wrapper script standing for it) has started, too. The
	// parent-death signal is the kernel's, sent when the thread that
	// forks QEMU ends; os/exec kills the child itself if this process
	// died between the fork and the prctl.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if opts.KeepRunning {
		// A session of its own (and so a group): no hang-up from this
		// process's terminal reaches it.
		cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	}

	inst := newInstance(append([]string{cmd.Path}, cmd.Args[1:]...), opts)
	inst.cmd, inst.pidfd = cmd, -1
	inst.stderrR, inst.stderrRead = stderrR, make(chan struct{})
	inst.log.Infof("qemu: starting %s", inst.CommandLine())
	err = cmd.Start()
	for _, f := range parentEnds {
		f.Close()
	}
	stderrW.Close()
	if err != nil {
		ours.Close()
		stderrR.Close()
		if conOurs != nil {
			conOurs.Close()
		}
		if agentOurs != nil {
			agentOurs.Close()
		}
		if errors.Is(err, exec.ErrNotFound) && path == defaultQEMU {
			return nil, nil, fmt.Errorf("qemu: start: %w (Debian and Ubuntu ship it in qemu-system-x86)", err)
		}
		return nil, nil, fmt.Errorf("qemu: start %s: %w", path, err)
	}
	inst.pid = cmd.Process.Pid
	if agentOurs != nil {
		// As for the console: a socket made just now.
		conn, err := net.FileConn(agentOurs)
		agentOurs.Close()
		if err != nil {
			inst.log.Errorf("qemu: guest agent channel: %v", err)
		} else {
			inst.agent = newGuestAgent(conn, GuestAgentConfig{Logger: opts.Logger})
		}
	}
	if conOurs != nil {
		// Cannot fail for a socket made just now; if it did, QEMU would
		// run without a console reader, which the error below prevents.
		if inst.console, err = newSerialConsole(conOurs, opts.ConsoleHistory, opts.ConsoleLog); err != nil {
			inst.log.Errorf("qemu: console: %v", err)
		}
	}
	if opts.Stderr != nil {
		inst.sink = newOutputSink(opts.Stderr, "stderr")
		go inst.sink.run()
	}
	go inst.readStderr()
	go inst.reap()
	return inst, ours, nil
}

// inheritedSocket is the chardev of a socket QEMU inherits as descriptor
// fd: the QMP channel, the console.
func inheritedSocket(id string, fd int) []string {
	return []string{"-chardev", "socket,id=" + id + ",fd=" + strconv.Itoa(fd)}
}

// newInstance returns the state an Instance starts with, for a QEMU
// started here or attached to.
func newInstance(args []string, opts InstanceOptions) *Instance {
	return &Instance{
		args:     args,
		log:      orNullLogger(opts.Logger),
		opts:     opts,
		stderr:   &tailBuffer{max: maxStderr},
		exited:   make(chan struct{}),
		drained:  make(chan struct{}),
		stopTurn: make(chan struct{}, 1),
	}
}

// socketPair returns a connected pair of unix stream sockets, both
// close-on-exec; os/exec clears that flag on the end it passes to QEMU.
func socketPair() (ours, theirs *os.File, err error) {
	// Holding ForkLock keeps a concurrent fork from inheriting the
	// descriptors before they are marked close-on-exec.
	syscall.ForkLock.RLock()
	fd, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
	if err == nil {
		syscall.CloseOnExec(fd[0])
		syscall.CloseOnExec(fd[1])
	}
	syscall.ForkLock.RUnlock()
	if err != nil {
		return nil, nil, os.NewSyscallError("socketpair", err)
	}
	return os.NewFile(uintptr(fd[0]), "qmp"), os.NewFile(uintptr(fd[1]), "qmp-qemu"), nil
}

// connect runs the QMP session over our end of the channel and negotiates
// it. inst.qmp is set once the session exists, negotiated or not.
func (inst *Instance) connect(ctx context.Context, ours *os.File) error {
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return err
	}
	cfg := QMPConfig{Logger: inst.opts.Logger, EventCh: inst.opts.EventCh}
	q, version, err := qmpStartConn(ctx, conn, cfg, nil)
	if err != nil {
		return err
	}
	inst.qmp, inst.version = q, *version
	inst.watchShutdown(q)
	if inst.agent != nil {
		// Before the Instance is anyone's: Shutdown reads it.
		inst.agent.useQMP(q, instanceAgentPort)
	}
	return q.ExecuteQMPCapabilities(ctx)
}

// failStart ends a start that failed with cause: it makes sure QEMU is
// gone and reaped, and says why the start failed, in QEMU's words when
// QEMU exited by itself.
func (inst *Instance) failStart(ctx context.Context, cause error) error {
	path := inst.cmd.Path
	if inst.agent != nil {
		inst.agent.Close()
	}
	if inst.qmp != nil {
		inst.qmp.Shutdown() // which closes EventCh
	} else {
		abandonEvents(inst.opts, nil)
	}
	if ctx.Err() == nil && closedByQEMU(cause) {
		// QEMU closes its end of the channel when it exits: give it a
		// moment to finish, so that its status and message can be
		// reported.
		wctx, cancel := context.WithTimeout(ctx, DefaultQuitTimeout)
		inst.waitExited(wctx)
		cancel()
	}
	if inst.hasExited() && ctx.Err() == nil {
		return inst.exitedAtStart()
	}
	inst.kill(context.Background())
	if ctx.Err() != nil {
		return fmt.Errorf("qemu: start %s: QMP not ready: %w (QEMU killed)", path, contextError(ctx))
	}
	msg := lastLines(inst.Stderr(), 5)
	if msg != "" {
		msg = "; QEMU's stderr: " + msg
	}
	return fmt.Errorf("qemu: start %s: QMP: %w (QEMU killed)%s", path, cause, msg)
}

// closedByQEMU reports whether err says that QEMU closed the QMP channel:
// the read ended, or a write found no one at the other end.
func closedByQEMU(err error) bool {
	return errors.Is(err, io.EOF) || errors.Is(err, ErrDisconnected) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.EPIPE)
}

// exitedAtStart is the error for a QEMU that exited before QMP was ready.
func (inst *Instance) exitedAtStart() error {
	path := inst.cmd.Path
	<-inst.drained // for QEMU's last words
	msg := lastLines(inst.Stderr(), 5)
	if msg == "" {
		msg = "(nothing on stderr)"
	}
	if inst.waitErr != nil {
		// An *exec.ExitError, whose message is the exit status.
		return fmt.Errorf("qemu: start %s: exited before QMP was ready: %w: %s", path, inst.waitErr, msg)
	}
	return fmt.Errorf("qemu: start %s: exited before QMP was ready (%s): %s", path, inst.state, msg)
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

// readStderr drains QEMU's stderr into the tail and the caller's sink until
// the pipe ends.
func (inst *Instance) readStderr() {
	defer close(inst.stderrRead)
	buf := make([]byte, 32<<10)
	for {
		n, err := inst.stderrR.Read(buf)
		if n > 0 {
			inst.stderr.Write(buf[:n])
			if inst.sink != nil {
				inst.sink.add(buf[:n])
			}
		}
		if err != nil {
			break
		}
	}
	inst.stderrR.Close()
	if inst.sink != nil {
		inst.sink.finish()
	}
}

// reap waits for QEMU to exit and reaps it, exactly once, then waits for
// the end of its stderr.
func (inst *Instance) reap() {
	pid := inst.cmd.Process.Pid
	// Until QEMU is reaped, its pid, which is its group's id, cannot be
	// reused: learn of the exit without reaping, so that whatever QEMU
	// started and left in its group can be killed without any risk of
	// signalling another group.
	waited := waitExitNoReap(pid)
	inst.sigMu.Lock()
	if waited {
		// Only for a zombie we know of: if waitid failed, the pid may
		// already be reaped and reused.
		syscall.Kill(-pid, syscall.SIGKILL)
	}
	err := inst.cmd.Wait()
	inst.state, inst.waitErr = inst.cmd.ProcessState, err
	close(inst.exited)
	inst.sigMu.Unlock()
	inst.log.Infof("qemu: pid %d ended: %s", pid, inst.state)
	select {
	case <-inst.stderrRead:
	case <-time.After(stderrGrace):
		// Something QEMU started still holds stderr open; what QEMU
		// wrote is in the pipe by now.
		inst.stderrR.SetReadDeadline(time.Now())
		<-inst.stderrRead
	}
	close(inst.drained)
}

// waitExitNoReap waits until the child pid has exited, leaving it a
// zombie for cmd.Wait to reap, and reports whether waitid said so; on
// any other error it leaves cmd.Wait to report.
func waitExitNoReap(pid int) bool {
	var info siginfo
	for {
		err := waitid(pid, &info, syscall.WEXITED|wNoWait)
		if err != syscall.EINTR {
			return err == nil
		}
	}
}

// exitedNoReap reports whether the child pid has exited, without reaping it.
func exitedNoReap(pid int) bool {
	var info siginfo
	err := waitid(pid, &info, syscall.WEXITED|syscall.WNOHANG|wNoWait)
	return err == nil && info.pid != 0
}

// wNoWait is Linux's WNOWAIT, which package syscall lacks: waitid leaves
// the child waitable.
const wNoWait = 0x01000000

// siginfo is the start of Linux's siginfo_t as waitid fills it for a
// child (64-bit layout), padded to the kernel's 128 bytes.
type siginfo struct {
	signo, errno, code, _ int32
	pid                   int32
	uid                   uint32
	status                int32
	_                     [100]byte
}

func waitid(pid int, info *siginfo, options int) error {
	const pPID = 1 // P_PID: wait for the child whose pid is given
	_, _, e := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid), uintptr(unsafe.Pointer(info)), uintptr(options), 0, 0)
	if e != 0 {
		return e
	}
	return nil
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

// shellQuote quotes s for a POSIX shell, leaving words that need no
// quoting as they are.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
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

// isClosed reports whether ch, which is only ever closed, has been.
func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func orBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
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
