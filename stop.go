package qemu

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// StopStep is the step of Instance.Stop that ended QEMU.
type StopStep int

const (
	// StopExited means QEMU had exited before Stop asked it to.
	StopExited StopStep = iota
	// StopPowerdown means the guest shut down after system_powerdown.
	StopPowerdown
	// StopQuit means QEMU exited on the QMP quit command.
	StopQuit
	// StopTerm means QEMU exited on SIGTERM.
	StopTerm
	// StopKill means QEMU was killed with SIGKILL.
	StopKill
)

// String returns the step's name: "exited", "powerdown", "quit", "SIGTERM"
// or "SIGKILL".
func (s StopStep) String() string {
	switch s {
	case StopExited:
		return "exited"
	case StopPowerdown:
		return "powerdown"
	case StopQuit:
		return "quit"
	case StopTerm:
		return "SIGTERM"
	case StopKill:
		return "SIGKILL"
	}
	return "StopStep(" + strconv.Itoa(int(s)) + ")"
}

// StopReport says how Instance.StopWithReport went: the step that ended
// QEMU and every step that ran, in order, with how long each took.
type StopReport struct {
	Step  StopStep
	Steps []StopAttempt
}

// StopAttempt is one step of the stop ladder that ran.
type StopAttempt struct {
	Step     StopStep
	Duration time.Duration
	// Outcome says what came of it: "the guest shut down", "no
	// SHUTDOWN within 30s", "QEMU exited", and so on.
	Outcome string
}

// String returns the steps in order, such as "powerdown 3.1s (no SHUTDOWN
// within 3s), quit 12ms (QEMU exited): quit".
func (r StopReport) String() string {
	var b strings.Builder
	for i, a := range r.Steps {
		if i > 0 {
			b.WriteString(", ")
		}
		fmt.Fprintf(&b, "%v %v (%s)", a.Step, a.Duration.Round(time.Millisecond), a.Outcome)
	}
	if len(r.Steps) == 0 {
		b.WriteString("no step ran")
	}
	return b.String() + ": " + r.Step.String()
}

// record adds the step that started at start.
func (r *StopReport) record(step StopStep, start time.Time, outcome string) {
	r.Steps = append(r.Steps, StopAttempt{Step: step, Duration: time.Since(start), Outcome: outcome})
}

// Stop ends QEMU, gracefully when it can: it sends system_powerdown and
// waits up to PowerdownTimeout for the guest to shut down (the SHUTDOWN
// event or QEMU's exit); then sends quit and waits up to QuitTimeout; then
// SIGTERM (with SIGCONT, so that a stopped QEMU can act on it) and waits up
// to TermTimeout; then SIGKILL. Signals go to QEMU's process group, which
// also holds whatever QEMU started. Stop returns once QEMU has exited and
// been reaped, with the step that ended it; StopWithReport also says which
// steps ran and how long each took.
//
// After a SHUTDOWN, Stop waits for QEMU to exit, and sends quit only when
// QEMU said, with STOP, that it stays (-no-shutdown); the step is still
// StopPowerdown. When the guest has shut down by itself (SHUTDOWN, and no
// STOP) and QEMU is exiting, Stop sends nothing and waits up to
// QuitTimeout: an exit then is StopExited; a STOP means QEMU stays, and
// Stop goes on as for a guest that is not running; with neither, it goes
// on at SIGTERM. A SHUTDOWN that comes just after the powerdown's wait is
// treated the same way, and an exit then is StopExited too. When
// query-status says the guest is not running (paused, started with -S,
// suspended, shut down), it cannot act on the power button, and Stop starts
// at quit; so it does with InstanceOptions.NoPowerdown. When the QMP
// session has already ended, Stop starts at SIGTERM.
//
// Stop returns StopExited when QEMU exited by itself: before Stop was
// called (at once, then, whatever ctx says) or during a step that did not
// cause it. If ctx ends before QEMU has exited, Stop goes straight to
// SIGKILL and returns StopKill with an error that wraps ctx.Err(). Calls
// to Stop are serialised; one that waits for another also goes to SIGKILL
// when its ctx ends. A nil ctx means context.Background().
func (inst *Instance) Stop(ctx context.Context) (StopStep, error) {
	r, err := inst.StopWithReport(ctx)
	return r.Step, err
}

// StopWithReport is Stop, returning the report of the steps that ran.
func (inst *Instance) StopWithReport(ctx context.Context) (StopReport, error) {
	return inst.StopWithOptions(ctx, StopOptions{})
}

// StopOptions bound the steps of one Stop, for a caller that knows more
// than when the Instance started: that the guest is still booting and
// will ignore the power button (NoPowerdown), or that it needs longer to
// shut down this time. A zero field means the InstanceOptions' value (and
// its default).
type StopOptions struct {
	// NoPowerdown makes this Stop start at quit.
	NoPowerdown bool

	PowerdownTimeout time.Duration
	QuitTimeout      time.Duration
	TermTimeout      time.Duration
}

// StopWithOptions is StopWithReport with the steps bounded by opts.
func (inst *Instance) StopWithOptions(ctx context.Context, opts StopOptions) (StopReport, error) {
	s := &stopRun{inst: inst, opts: StopOptions{
		NoPowerdown:      opts.NoPowerdown || inst.opts.NoPowerdown,
		PowerdownTimeout: orDefault(opts.PowerdownTimeout, orDefault(inst.opts.PowerdownTimeout, DefaultPowerdownTimeout)),
		QuitTimeout:      orDefault(opts.QuitTimeout, orDefault(inst.opts.QuitTimeout, DefaultQuitTimeout)),
		TermTimeout:      orDefault(opts.TermTimeout, orDefault(inst.opts.TermTimeout, DefaultTermTimeout)),
	}}
	var err error
	s.r.Step, err = s.stop(orBackground(ctx))
	if inst.hasExited() {
		// What QEMU wrote last is read soon after its exit (stderrGrace
		// at most), so that Wait after Stop returns at once.
		<-inst.drained
	}
	inst.log.Infof("qemu: stop pid %d: %v", inst.Pid(), s.r)
	return s.r, err
}

// stopRun is one Stop: the Instance, the bounds of its steps (every field
// set), and the report of the steps that ran.
type stopRun struct {
	inst *Instance
	opts StopOptions
	r    StopReport
}

func (s *stopRun) stop(ctx context.Context) (StopStep, error) {
	inst := s.inst
	// The state first: on a QEMU that has exited, a done ctx must not
	// turn the answer into a SIGKILL.
	if inst.hasExited() {
		return StopExited, nil
	}
	select {
	case inst.stopTurn <- struct{}{}:
		defer func() { <-inst.stopTurn }()
	case <-ctx.Done():
		return s.killStep(ctx)
	}
	if inst.hasExited() {
		return StopExited, nil
	}
	step := StopKill
	if ctx.Err() == nil {
		step = s.ladder(ctx)
	}
	switch {
	case step == StopKill || !inst.hasExited():
		return s.killStep(ctx)
	case inst.killed.Load():
		// Close killed QEMU while a step was waiting.
		return StopKill, nil
	}
	return step, nil
}

// ladder runs Stop's graceful steps and returns the one that ended QEMU,
// or StopKill when none did.
func (s *stopRun) ladder(ctx context.Context) StopStep {
	inst := s.inst
	if s.leavingByItself(ctx) {
		return StopExited
	}
	if !isClosed(inst.qmp.Done()) && !inst.isLeaving() {
		guestDown := false
		if !s.opts.NoPowerdown && s.guestRunning(ctx) {
			var exited bool
			exited, guestDown = s.powerdown(ctx)
			switch {
			case exited && guestDown:
				return StopPowerdown
			case exited:
				return StopExited
			}
		}
		// A guest that shut down but whose QEMU stays (-no-shutdown) was
		// sent quit by powerdown already.
		if !guestDown && ctx.Err() == nil {
			// A SHUTDOWN may have come since the powerdown's wait.
			if s.leavingByItself(ctx) {
				return StopExited
			}
			if !inst.isLeaving() && s.quit(ctx) {
				return StopQuit
			}
		}
	}
	if inst.hasExited() {
		return StopExited
	}
	if ctx.Err() == nil {
		return s.terminate(ctx)
	}
	return StopKill
}

// guestRunning asks QEMU whether the guest is running. Only a clear no is
// a no: when QEMU does not say, Stop tries the power button anyway. A
// guest that is not running (paused, started with -S, suspended, or shut
// down under -no-shutdown) cannot act on the power button; waiting for it
// would only spend the timeout.
func (s *stopRun) guestRunning(ctx context.Context) bool {
	inst := s.inst
	var status struct {
		Running *bool `json:"running"`
	}
	qctx, cancel := context.WithTimeout(ctx, s.opts.QuitTimeout)
	defer cancel()
	if err := inst.qmp.ExecuteCommand(qctx, "query-status", nil, &status); err != nil || status.Running == nil {
		return true
	}
	if !*status.Running {
		inst.log.Infof("qemu: stop pid %d: the guest is not running, so no system_powerdown", inst.Pid())
	}
	return *status.Running
}

// powerdown is Stop's first step. It reports whether QEMU has exited and
// whether the guest shut down.
func (s *stopRun) powerdown(ctx context.Context) (exited, guestDown bool) {
	inst, r := s.inst, &s.r
	start := time.Now()
	pctx, cancel := context.WithTimeout(ctx, s.opts.PowerdownTimeout)
	defer cancel()
	if inst.isLeaving() {
		// A SHUTDOWN came with query-status's reply: the ladder waits.
		return inst.hasExited(), false
	}
	// The call returns on SHUTDOWN (also when QEMU then closes the
	// connection), on QEMU closing the connection without it, on an error
	// or when pctx ends.
	err := inst.qmp.ExecuteSystemPowerdown(pctx)
	if err == nil {
		s.leaveAfterShutdown(ctx)
		r.record(StopPowerdown, start, "the guest shut down")
		return inst.hasExited(), true
	}
	inst.log.Infof("qemu: stop pid %d: %v", inst.Pid(), err)
	if lostToPeer(err) {
		// QEMU went away without a SHUTDOWN: it is exiting.
		exited = inst.waitExited(pctx)
		r.record(StopPowerdown, start, "QEMU exited without SHUTDOWN")
		return exited, false
	}
	if pctx.Err() != nil && ctx.Err() == nil {
		r.record(StopPowerdown, start, fmt.Sprintf("no SHUTDOWN within %v", s.opts.PowerdownTimeout))
	} else {
		r.record(StopPowerdown, start, err.Error())
	}
	return inst.hasExited(), false
}

// shutdownState is what QEMU's events say of the guest's shutdown, which
// decides what Stop may send: nothing to a QEMU that is leaving.
type shutdownState int32

const (
	// notShutDown: no SHUTDOWN, or a RESUME since the last one.
	notShutDown shutdownState = iota
	// leaving: SHUTDOWN, and no STOP or RESUME since: QEMU is exiting.
	leaving
	// staying: SHUTDOWN, then STOP: QEMU stays (-no-shutdown, or the
	// shutdown action "pause"), and exits when told to.
	staying
)

// watchShutdown keeps inst.shutdown up to date with q's events, before
// anyone else sees them: a caller handed SHUTDOWN who calls Stop at once
// finds it leaving. QEMU sends no event before qmp_capabilities, so it is
// called before them.
func (inst *Instance) watchShutdown(q *QMP) {
	q.router.observe(func(ev QMPEvent) {
		switch ev.Name {
		case "SHUTDOWN":
			inst.shutdown.Store(int32(leaving))
		case "STOP":
			inst.shutdown.CompareAndSwap(int32(leaving), int32(staying))
		case "RESUME":
			inst.shutdown.Store(int32(notShutDown))
		}
	})
}

// isLeaving reports whether QEMU said, with SHUTDOWN and no STOP or RESUME
// since, that it is exiting.
func (inst *Instance) isLeaving() bool { return shutdownState(inst.shutdown.Load()) == leaving }

// leavingByItself reports whether QEMU, which sent SHUTDOWN and no STOP
// since, then exited. It sends nothing to a QEMU that is exiting (see
// leaveAfterShutdown): it waits up to QuitTimeout for the exit, or for a
// STOP that says QEMU stays (-no-shutdown), and returns false then, as it
// does at once when there was no such SHUTDOWN.
func (s *stopRun) leavingByItself(ctx context.Context) bool {
	inst := s.inst
	stops := inst.qmp.Subscribe(EventFilter{Names: []string{"STOP"}})
	defer stops.Close()
	if !inst.isLeaving() {
		return false
	}
	qctx, cancel := context.WithTimeout(ctx, s.opts.QuitTimeout)
	defer cancel()
	// Receive ends with an error when QEMU exits, since the session ends.
	if _, err := stops.Receive(qctx); err == nil {
		return false
	}
	return inst.waitExited(qctx)
}

// leaveAfterShutdown makes sure that QEMU exits after the guest shut
// down: it sends quit only to a QEMU that is not leaving, one that said
// with a STOP after the SHUTDOWN that it stays (-no-shutdown, or the
// shutdown action "pause"), or was resumed since; watchShutdown has noted
// those events before anyone is handed them. A command
// that reaches a QEMU already exiting can crash it: QEMU 10.0.2 segfaulted
// (a NULL coroutine in aio_co_wake, from the monitor) when quit came
// during its cleanup after SHUTDOWN.
func (s *stopRun) leaveAfterShutdown(ctx context.Context) {
	inst := s.inst
	if s.leavingByItself(ctx) || inst.isLeaving() || inst.hasExited() {
		return
	}
	qctx, cancel := context.WithTimeout(ctx, s.opts.QuitTimeout)
	defer cancel()
	inst.qmp.ExecuteQuit(qctx)
	inst.waitExited(qctx)
}

// quit is Stop's second step.
func (s *stopRun) quit(ctx context.Context) bool {
	inst, r := s.inst, &s.r
	start := time.Now()
	qctx, cancel := context.WithTimeout(ctx, s.opts.QuitTimeout)
	defer cancel()
	if err := inst.qmp.ExecuteQuit(qctx); err != nil {
		inst.log.Infof("qemu: stop pid %d: %v", inst.Pid(), err)
		r.record(StopQuit, start, err.Error())
		return inst.hasExited()
	}
	if !inst.waitExited(qctx) {
		r.record(StopQuit, start, "QEMU still running")
		return false
	}
	r.record(StopQuit, start, "QEMU exited")
	return true
}

// terminate is Stop's third step. It returns StopTerm when QEMU exited
// after SIGTERM, StopExited when it had exited before, and StopKill when
// it is still running.
func (s *stopRun) terminate(ctx context.Context) StopStep {
	inst, r := s.inst, &s.r
	start := time.Now()
	inst.log.Warningf("qemu: stop pid %d: sending SIGTERM", inst.Pid())
	if !inst.signalGroup(syscall.SIGTERM) {
		return StopExited
	}
	inst.signalGroup(syscall.SIGCONT)
	tctx, cancel := context.WithTimeout(ctx, s.opts.TermTimeout)
	defer cancel()
	if inst.waitExited(tctx) {
		r.record(StopTerm, start, "QEMU exited")
		return StopTerm
	}
	r.record(StopTerm, start, "QEMU still running")
	return StopKill
}

// signalGroup sends sig to QEMU's process group while QEMU is running, and
// reports whether it did. A QEMU that has exited is not signalled, reaped
// or not: the signal would not be what ended it, and once it is reaped its
// pid, the group's id, may belong to another process. An attached QEMU,
// reaped by someone else, is signalled through its pidfd, which names that
// process and no other, and its group is left alone.
func (inst *Instance) signalGroup(sig syscall.Signal) bool {
	inst.sigMu.Lock()
	defer inst.sigMu.Unlock()
	if inst.hasExited() || inst.cmd != nil && exitedNoReap(inst.Pid()) {
		return false
	}
	var wasKilled bool
	if sig == syscall.SIGKILL {
		// Before the signal: a Stop that sees the exit must see why.
		wasKilled = inst.killed.Swap(true)
	}
	if inst.cmd == nil {
		if err := signalPidfd(inst.pidfd, sig); err != nil {
			// ESRCH: the attached QEMU exited before the watcher saw it.
			inst.killed.Store(wasKilled)
			return false
		}
		return true
	}
	syscall.Kill(-inst.Pid(), sig)
	return true
}

// killStep is kill as Stop's last step: StopExited when QEMU had exited
// by itself before any SIGKILL, StopKill otherwise.
func (s *stopRun) killStep(ctx context.Context) (StopStep, error) {
	inst, r := s.inst, &s.r
	start := time.Now()
	sent, err := inst.kill(ctx)
	if !sent && err == nil && !inst.killed.Load() {
		return StopExited, nil
	}
	// Sent now, or by a concurrent Stop or Close: SIGKILL ended QEMU.
	outcome := "QEMU exited"
	if err != nil {
		outcome = err.Error()
	}
	r.record(StopKill, start, outcome)
	return StopKill, err
}

// kill is Close's only step: SIGKILL to QEMU's process group, then wait
// until QEMU has been reaped, at most KillTimeout. It reports whether it
// sent the signal; when it did not, QEMU had exited by itself, and ctx
// does not matter.
func (inst *Instance) kill(ctx context.Context) (sent bool, err error) {
	sent = inst.signalGroup(syscall.SIGKILL)
	if sent {
		inst.log.Warningf("qemu: stop pid %d: sent SIGKILL", inst.Pid())
	}
	d := orDefault(inst.opts.KillTimeout, DefaultKillTimeout)
	kctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	if !inst.waitExited(kctx) {
		if sent {
			err = fmt.Errorf("qemu: stop pid %d: still running %v after SIGKILL, stuck in the kernel (state D) or traced", inst.Pid(), d)
		} else {
			err = fmt.Errorf("qemu: stop pid %d: exited but not reaped within %v (traced?)", inst.Pid(), d)
		}
		if ctx.Err() != nil {
			err = fmt.Errorf("%w: %w", err, contextError(ctx))
		}
		return sent, err
	}
	if ctx.Err() != nil && sent {
		return sent, fmt.Errorf("qemu: stop pid %d: %w (QEMU killed)", inst.Pid(), contextError(ctx))
	}
	return sent, nil
}
