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
	"syscall"
)

// Starting an Instance: QEMU in the foreground with the channels it
// inherits (QMP, the console, the guest agent: socket pairs, so there is
// no path to wait for), its stderr drained from the start, and a start
// that fails leaving nothing behind.

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
	opts.Env = append(config.Env[:len(config.Env):len(config.Env)], opts.Env...)
	if err := checkVersion(ctx, &config, opts.Env); err != nil {
		return nil, abandonEvents(opts, err)
	}
	params, fds := renderConfig(config, opts.Logger)
	if !asksForDisplay(&config) {
		params = append(params, "-display", "none")
	}
	return StartCustomInstance(ctx, config.Path, params, fds, opts)
}

// checkVersion refuses the parts of config that the QEMU it names cannot
// take: properties the package renders that a QEMU version no longer has
// (BlockDevice.SCSI's scsi=on, which 9.1 removed from virtio-blk). Only a
// Config with such a part costs a run of QEMU with -version (in env, as
// the start would run it) before the start.
func checkVersion(ctx context.Context, config *Config, env []string) error {
	var scsi []int
	for i, d := range config.Devices {
		switch b := d.(type) {
		case BlockDevice:
			if b.SCSI {
				scsi = append(scsi, i)
			}
		case *BlockDevice:
			if b != nil && b.SCSI {
				scsi = append(scsi, i)
			}
		}
	}
	if len(scsi) == 0 {
		return nil
	}
	path := config.Path
	if path == "" {
		path = defaultQEMU
	}
	v, err := qemuVersion(ctx, path, env)
	if err != nil {
		return fmt.Errorf("qemu: start %s: asking its version: %w", path, err)
	}
	if !v.atLeast(9, 1) {
		return nil
	}
	var problems []string
	for _, i := range scsi {
		problems = append(problems, fmt.Sprintf("Devices[%d] (BlockDevice): SCSI is set, but QEMU %d.%d.%d has no scsi property on virtio-blk (removed in 9.1)", i, v.Major, v.Minor, v.Micro))
	}
	return fmt.Errorf("qemu: start %s: invalid Config: %s", path, strings.Join(problems, "; "))
}

// qemuVersion runs the QEMU at path with -version and reads its version
// from the first line ("QEMU emulator version 10.0.2 (...)").
func qemuVersion(ctx context.Context, path string, env []string) (QMPVersion, error) {
	ctx = orBackground(ctx)
	if ctx.Err() != nil {
		return QMPVersion{}, contextError(ctx)
	}
	cmd := exec.CommandContext(ctx, path, "-version")
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	// A wrapper whose child holds stdout does not hold the start.
	cmd.WaitDelay = stderrGrace
	out, err := cmd.Output()
	switch {
	case ctx.Err() != nil:
		return QMPVersion{}, contextError(ctx)
	case errors.Is(err, exec.ErrNotFound) && path == defaultQEMU:
		return QMPVersion{}, fmt.Errorf("%w (Debian and Ubuntu ship it in qemu-system-x86)", err)
	case err != nil && !errors.Is(err, exec.ErrWaitDelay):
		return QMPVersion{}, err
	}
	var v QMPVersion
	first, _, _ := strings.Cut(string(out), "\n")
	if _, err := fmt.Sscanf(first, "QEMU emulator version %d.%d.%d", &v.Major, &v.Minor, &v.Micro); err != nil {
		return QMPVersion{}, fmt.Errorf("no version in %q", first)
	}
	return v, nil
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
//	-chardev socket,id=instance-qmp,fd=N -qmp chardev:instance-qmp
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

// instanceMonitor is the chardev id of the QMP channel an Instance adds to
// QEMU's command line.
const instanceMonitor = "instance-qmp"

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
	// -qmp chardev:ID rather than -mon chardev=ID,mode=control, which
	// QEMU 11.1 warns is deprecated; both give the same session on 7.2,
	// 10.0 and 11.1.
	args = append(args, "-qmp", "chardev:"+instanceMonitor)
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

// newInstance returns the state an Instance starts with, for a QEMU
// started here or attached to.
func newInstance(args []string, opts InstanceOptions) *Instance {
	return &Instance{
		args:     args,
		log:      orNullLogger(opts.Logger),
		opts:     opts,
		stderr:   newTailBuffer(maxStderr),
		exited:   make(chan struct{}),
		drained:  make(chan struct{}),
		stopTurn: make(chan struct{}, 1),
	}
}

// cancelOnExit cancels ctx if QEMU exits before ctx is done.
func (inst *Instance) cancelOnExit(ctx context.Context, cancel context.CancelFunc) {
	select {
	case <-inst.exited:
		cancel()
	case <-ctx.Done():
	}
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

// readStderr drains QEMU's stderr into the tail and the caller's sink until
// the pipe ends.
func (inst *Instance) readStderr() {
	defer close(inst.stderrRead)
	// 4 KiB, on the goroutine's stack: with 32 KiB that stack grew to
	// 64 KiB, the most of what an idle Instance held
	// (BenchmarkManyInstances: 80 KiB of stacks each before, 24 after).
	buf := make([]byte, 4<<10)
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
