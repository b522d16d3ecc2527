package qemu

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestStopStepString(t *testing.T) {
	want := []string{"exited", "powerdown", "quit", "SIGTERM", "SIGKILL"}
	for i, w := range want {
		if got := StopStep(i).String(); got != w {
			t.Errorf("StopStep(%d) = %q, want %q", i, got, w)
		}
	}
	if got := StopStep(9).String(); got != "StopStep(9)" {
		t.Errorf("StopStep(9) = %q", got)
	}
}

func stopWithin(t *testing.T, inst *Instance, d time.Duration) StopStep {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	step, err := inst.Stop(ctx)
	if err != nil {
		t.Fatalf("Stop: %v (step %v)", err, step)
	}
	return step
}

func TestInstanceStandInPowerdown(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
echo "qemu: starting" >&2
qmp_greet
qmp_serve`)
	events := make(chan QMPEvent, 4)
	inst, err := StartCustomInstance(context.Background(), path, []string{"-name", "it's a test"}, nil,
		InstanceOptions{EventCh: events})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	want := path + ` -name 'it'\''s a test' -chardev socket,id=instance-qmp,fd=3 -qmp chardev:instance-qmp`
	if got := inst.CommandLine(); got != want {
		t.Errorf("CommandLine() = %s\nwant %s", got, want)
	}
	if v := inst.Version(); v.Major != 7 || v.Minor != 2 {
		t.Errorf("Version() = %+v", v)
	}
	if err := inst.QMP().ExecuteCommand(context.Background(), "query-status", nil, nil); err != nil {
		t.Errorf("query-status: %v", err)
	}
	if step := stopWithin(t, inst, 10*time.Second); step != StopPowerdown {
		t.Errorf("Stop ended at %v, want powerdown", step)
	}
	state, err := inst.Wait(context.Background())
	if err != nil || !state.Success() {
		t.Errorf("Wait = %v, %v; want exit status 0", state, err)
	}
	if ev, ok := <-events; !ok || ev.Name != "SHUTDOWN" {
		t.Errorf("first event: %+v (open %v), want SHUTDOWN", ev, ok)
	}
	if got := inst.Stderr(); got != "qemu: starting\n" {
		t.Errorf("Stderr() = %q", got)
	}
	if step := stopWithin(t, inst, time.Second); step != StopExited {
		t.Errorf("second Stop ended at %v, want exited", step)
	}
	checkReaped(t, inst.Pid())
	if err := inst.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	if err := inst.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if err := inst.QMP().ExecuteCont(context.Background()); err == nil {
		t.Error("a command after Close succeeded")
	}
	checkNoGoroutines(t)
}

// TestInstanceStandInAfterShutdown checks what Stop sends once the guest
// has shut down: quit to a QEMU that said with STOP that it stays, and
// nothing to one that is exiting, since a command during QEMU's cleanup can
// crash it.
func TestInstanceStandInAfterShutdown(t *testing.T) {
	for _, after := range []string{"stay", "linger", "stopfirst"} {
		t.Run(after, func(t *testing.T) {
			path, dir := standIn(t, "qemu", "AFTER="+after+"\n"+qmpStandIn+`
qmp_greet
qmp_serve`)
			inst := startStandIn(t, path, InstanceOptions{})
			r, err := inst.StopWithReport(testCtx(t))
			if err != nil || r.Step != StopPowerdown || len(r.Steps) != 1 {
				t.Errorf("Stop: %v, %v; want powerdown alone", r, err)
			}
			if state, err := inst.Wait(context.Background()); err != nil || !state.Success() {
				t.Errorf("Wait = %v, %v", state, err)
			}
			checkQuietAfterShutdown(t, dir)
		})
	}
}

// TestInstanceStandInShutDownByItself: a guest that shut down by itself
// leaves a QEMU that is exiting, and Stop sends it nothing; unless STOP
// follows, as under -no-shutdown, and then Stop goes on at once.
func TestInstanceStandInShutDownByItself(t *testing.T) {
	path, dir := standIn(t, "qemu", qmpStandIn+`
qmp_greet
read -r line <&$QMP
printf '{"return": {}}\n' >&$QMP
printf '%s\n' '{"event": "SHUTDOWN", "data": {"guest": true}, "timestamp": {"seconds": 1, "microseconds": 2}}' >&$QMP
qmp_linger`)
	events := make(chan QMPEvent, 4)
	inst := startStandIn(t, path, InstanceOptions{EventCh: events})
	if ev := <-events; ev.Name != "SHUTDOWN" {
		t.Fatalf("event %+v, want SHUTDOWN", ev)
	}
	r, err := inst.StopWithReport(testCtx(t))
	if err != nil || r.Step != StopExited {
		t.Errorf("Stop: %v, %v; want exited", r, err)
	}
	checkQuietAfterShutdown(t, dir)

	t.Run("with the reply", func(t *testing.T) {
		// The SHUTDOWN just before the reply to Stop's query-status:
		// no system_powerdown follows.
		path, dir := standIn(t, "qemu", qmpStandIn+`
qmp_greet
read -r line <&$QMP
printf '{"return": {}}\n' >&$QMP
read -r line <&$QMP
qmp_event SHUTDOWN
printf '{"return": {"status": "running", "running": true}}\n' >&$QMP
qmp_linger`)
		inst := startStandIn(t, path, InstanceOptions{})
		r, err := inst.StopWithReport(testCtx(t))
		if err != nil || r.Step != StopExited {
			t.Errorf("Stop: %v, %v; want exited", r, err)
		}
		checkQuietAfterShutdown(t, dir)
	})
	t.Run("no-shutdown", func(t *testing.T) {
		// STOP a moment after the SHUTDOWN, and then QEMU stays, paused,
		// until quit. A Stop that waited for an exit would wait out its
		// context: its QuitTimeout is longer.
		path, _ := standIn(t, "qemu", "RUNNING=false\n"+qmpStandIn+`
qmp_greet
read -r line <&$QMP
printf '{"return": {}}\n' >&$QMP
qmp_event SHUTDOWN
sleep 0.3
qmp_event STOP
qmp_serve`)
		events := make(chan QMPEvent, 4)
		inst := startStandIn(t, path, InstanceOptions{EventCh: events, QuitTimeout: time.Minute})
		if ev := <-events; ev.Name != "SHUTDOWN" {
			t.Fatalf("event %+v, want SHUTDOWN", ev)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		r, err := inst.StopWithReport(ctx)
		if err != nil || r.Step != StopQuit {
			t.Errorf("Stop: %v, %v; want quit", r, err)
		}
	})
}

func TestInstanceStopKillsWhatIgnoresEverything(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
trap '' TERM
qmp_greet
read -r line <&3
printf '{"return": {}}\n' >&3
exec sleep 600`)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{
		PowerdownTimeout: 200 * time.Millisecond,
		QuitTimeout:      200 * time.Millisecond,
		TermTimeout:      300 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	if step := stopWithin(t, inst, 30*time.Second); step != StopKill {
		t.Errorf("Stop ended at %v, want SIGKILL", step)
	}
	state, err := inst.Wait(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ws, ok := state.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Errorf("Wait = %v, want killed by SIGKILL", state)
	}
	checkReaped(t, inst.Pid())
	inst.Close()
	checkNoGoroutines(t)
}

func TestInstanceStopWithDoneContextKills(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
qmp_greet
qmp_serve`)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	step, err := inst.Stop(ctx)
	if step != StopKill || !errors.Is(err, context.Canceled) {
		t.Errorf("Stop with a cancelled context = %v, %v; want SIGKILL and context.Canceled", step, err)
	}
	// Once QEMU has exited, a done context does not hide how it ended.
	for i := 0; i < 100; i++ {
		if state, err := inst.Wait(ctx); err != nil || state == nil {
			t.Fatalf("Wait with a done context after the exit = %v, %v", state, err)
		}
	}
	checkReaped(t, inst.Pid())
	inst.Close()
	checkNoGoroutines(t)
}

// TestInstanceStopPausedGuest checks that Stop does not press the power
// button of a guest that is not running, which could not act on it.
func TestInstanceStopPausedGuest(t *testing.T) {
	path, dir := standIn(t, "qemu", qmpStandIn+`
RUNNING=false
qmp_greet
qmp_serve`)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{PowerdownTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	if step := stopWithin(t, inst, 30*time.Second); step != StopQuit {
		t.Errorf("Stop ended at %v, want quit", step)
	}
	if _, err := os.Stat(filepath.Join(dir, "powerdown")); err == nil {
		t.Error("Stop sent system_powerdown to a guest that is not running")
	}
	checkReaped(t, inst.Pid())
}

func TestInstanceConcurrentStops(t *testing.T) {
	path, dir := standIn(t, "qemu", qmpStandIn+`
POWERBUTTON=ignore
qmp_greet
qmp_serve`)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{PowerdownTimeout: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	type result struct {
		step StopStep
		err  error
	}
	first := make(chan result, 1)
	go func() {
		step, err := inst.Stop(context.Background())
		first <- result{step, err}
	}()
	waitForFile(t, filepath.Join(dir, "powerdown"))

	// A second Stop waits for the first, but not past its context.
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	step, err := inst.Stop(ctx)
	if step != StopKill || !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("second Stop = %v, %v; want SIGKILL and the deadline", step, err)
	}
	if r := <-first; r.step != StopKill || r.err != nil {
		t.Errorf("first Stop = %v, %v; want SIGKILL, since QEMU was killed", r.step, r.err)
	}
	state, err := inst.Wait(context.Background())
	if ws, ok := state.Sys().(syscall.WaitStatus); err != nil || !ok || ws.Signal() != syscall.SIGKILL {
		t.Errorf("Wait = %v, %v; want killed by SIGKILL", state, err)
	}
	if err := inst.Close(); err != nil {
		t.Errorf("Close: %v", err)
	}
	checkNoGoroutines(t)
}

func TestInstanceRealQEMUStopSteps(t *testing.T) {
	requireGuest(t)
	short := InstanceOptions{
		PowerdownTimeout: 3 * time.Second,
		QuitTimeout:      2 * time.Second,
		TermTimeout:      10 * time.Second,
	}
	// steps checks the report's steps, in order, and their outcomes.
	steps := func(t *testing.T, r StopReport, want ...string) {
		t.Helper()
		t.Logf("Stop: %v", r)
		var got []string
		for _, a := range r.Steps {
			got = append(got, a.Step.String()+": "+a.Outcome)
			if a.Duration <= 0 {
				t.Errorf("step %v took %v", a.Step, a.Duration)
			}
		}
		if strings.Join(got, "; ") != strings.Join(want, "; ") {
			t.Errorf("steps %q, want %q", got, want)
		}
	}
	report := func(t *testing.T, inst *Instance) StopReport {
		t.Helper()
		r, err := inst.StopWithReport(ctxTimeout(t, time.Minute))
		if err != nil {
			t.Fatalf("Stop: %v (%v)", err, r)
		}
		return r
	}
	// With -no-shutdown, QEMU stays after SHUTDOWN, paused, until quit.
	for _, tc := range []struct {
		name  string
		extra []string
	}{{"powerdown", nil}, {"no-shutdown", []string{"-no-shutdown"}}} {
		t.Run(tc.name, func(t *testing.T) {
			inst := startGuestInstance(t, "", InstanceOptions{}, tc.extra...)
			r := report(t, inst)
			if r.Step != StopPowerdown {
				t.Errorf("Stop ended at %v, want powerdown", r.Step)
			}
			steps(t, r, "powerdown: the guest shut down")
			if state, err := inst.Wait(context.Background()); err != nil || !state.Success() {
				t.Errorf("Wait = %v, %v", state, err)
			}
			checkReaped(t, inst.Pid())
		})
	}
	t.Run("quit", func(t *testing.T) {
		inst := startGuestInstance(t, "testguest.powerbutton=ignore", short)
		r := report(t, inst)
		if r.Step != StopQuit {
			t.Errorf("Stop ended at %v, want quit", r.Step)
		}
		steps(t, r, "powerdown: no SHUTDOWN within 3s", "quit: QEMU exited")
		if d := r.Steps[0].Duration; d < 3*time.Second || d > 4*time.Second {
			t.Errorf("powerdown waited %v, want its 3 s bound", d)
		}
		checkReaped(t, inst.Pid())
	})
	t.Run("no powerdown", func(t *testing.T) {
		opts := short
		opts.NoPowerdown = true
		inst := startGuestInstance(t, "testguest.powerbutton=ignore", opts)
		r := report(t, inst)
		if r.Step != StopQuit {
			t.Errorf("Stop ended at %v, want quit", r.Step)
		}
		steps(t, r, "quit: QEMU exited")
	})
	t.Run("stopped", func(t *testing.T) {
		inst := startGuestInstance(t, "", short)
		if err := syscall.Kill(inst.Pid(), syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		r := report(t, inst)
		// query-status gets no answer from a stopped QEMU, so the
		// power button is tried; then quit, unanswered too; then SIGTERM
		// with SIGCONT, on which QEMU exits.
		if r.Step != StopTerm {
			// What QEMU said tells whether it took the signal (it
			// writes "terminating on signal 15") and was slow to exit.
			inst.Wait(context.Background())
			t.Errorf("Stop ended at %v, want SIGTERM; QEMU's stderr:\n%s", r.Step, inst.Stderr())
		}
		steps(t, r, "powerdown: no SHUTDOWN within 3s", "quit: qmp: quit: context deadline exceeded", "SIGTERM: QEMU exited")
		state, err := inst.Wait(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("a stopped QEMU: Stop ended at %v, QEMU %v", r.Step, state)
		checkReaped(t, inst.Pid())
	})
	checkNoGoroutines(t)
}

// Once QEMU has exited, a done context gives the exit's answer every time:
// Stop and Wait look at the state before they look at the context.
func TestInstanceDoneContextOnExitedQEMU(t *testing.T) {
	path, _ := standIn(t, "qemu", exitingStandIn)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{Stderr: &countingWriter{}})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	inst.QMP().ExecuteCommand(context.Background(), "exit-now", nil, nil)
	// Once Wait has returned, QEMU's exit and its stderr's copy are over.
	if _, err := inst.Wait(context.Background()); err != nil {
		t.Fatal(err)
	}
	done, cancel := context.WithCancel(context.Background())
	cancel()
	for i := range 1000 {
		if step, err := inst.Stop(done); step != StopExited || err != nil {
			t.Fatalf("Stop %d with a done context = %v, %v; want exited", i, step, err)
		}
		if state, err := inst.Wait(done); err != nil || !state.Success() {
			t.Fatalf("Wait %d with a done context = %v, %v; want exit status 0", i, state, err)
		}
	}
}

// One Stop can choose its own bounds: skip the power button of a guest
// that ignores it, or wait for it less than the Instance's bound, and the
// report says what ran.
func TestInstanceStopWithOptions(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
qmp_greet
qmp_serve`)
	for _, tc := range []struct {
		opts  StopOptions
		steps string
	}{
		{StopOptions{NoPowerdown: true}, "quit"},
		{StopOptions{PowerdownTimeout: 100 * time.Millisecond}, "powerdown quit"},
	} {
		inst := startStandIn(t, path, InstanceOptions{Env: []string{"POWERBUTTON=ignore"}})
		r, err := inst.StopWithOptions(ctxTimeout(t, 20*time.Second), tc.opts)
		var steps []string
		for _, a := range r.Steps {
			steps = append(steps, a.Step.String())
		}
		if err != nil || r.Step != StopQuit || strings.Join(steps, " ") != tc.steps {
			t.Errorf("%+v: %v, %v; want steps %s", tc.opts, r, err, tc.steps)
		}
		if tc.opts.PowerdownTimeout != 0 && (len(r.Steps) == 0 || !strings.Contains(r.Steps[0].Outcome, "within 100ms")) {
			t.Errorf("%+v: the powerdown step %+v, want its own bound", tc.opts, r.Steps)
		}
	}
}
