package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"-machine":                "-machine",
		"q35,accel=kvm":           "q35,accel=kvm",
		"/tmp/a b":                "'/tmp/a b'",
		"":                        "''",
		"it's":                    `'it'\''s'`,
		"console=ttyS0 panic=-1":  "'console=ttyS0 panic=-1'",
		"$HOME":                   "'$HOME'",
		"socket,id=x,path=/a;b|c": "'socket,id=x,path=/a;b|c'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestLastLines(t *testing.T) {
	in := "one\n\ntwo\r\n  three  \nfour\n\n"
	if got, want := lastLines(in, 3), "two | three | four"; got != want {
		t.Errorf("lastLines(%q, 3) = %q, want %q", in, got, want)
	}
	if got := lastLines("", 3); got != "" {
		t.Errorf("lastLines of nothing = %q", got)
	}
	long := strings.Repeat("x", 5000)
	if got := lastLines(long, 5); len(got) != 2048+3 || !strings.HasPrefix(got, "...") {
		t.Errorf("lastLines of a 5000-byte line: %d bytes", len(got))
	}
}

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

func TestStartInstanceRefusesBadInput(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	ctx := context.Background()
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	cases := map[string]func(InstanceOptions) (*Instance, error){
		"daemonize knob": func(o InstanceOptions) (*Instance, error) {
			return StartInstance(ctx, Config{Path: path, Knobs: Knobs{Daemonize: true}}, o)
		},
		"daemonize param": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(ctx, path, []string{"-S", "-daemonize"}, nil, o)
		},
		"nil fd": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(ctx, path, nil, []*os.File{nil}, o)
		},
		"newline in name": func(o InstanceOptions) (*Instance, error) {
			return StartInstance(ctx, Config{Path: path, Name: "a\nb"}, o)
		},
		"missing binary": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(ctx, filepath.Join(dir, "nope"), nil, nil, o)
		},
		"cancelled context": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(cancelled, path, nil, nil, o)
		},
	}
	for name, start := range cases {
		events := make(chan QMPEvent)
		inst, err := start(InstanceOptions{EventCh: events})
		if err == nil {
			inst.Close()
			t.Errorf("%s: started", name)
			continue
		}
		t.Logf("%s: %v", name, err)
		if name == "cancelled context" && !errors.Is(err, context.Canceled) {
			t.Errorf("%s: error does not wrap context.Canceled", name)
		}
		select {
		case _, ok := <-events:
			if ok {
				t.Errorf("%s: EventCh got an event", name)
			}
		default:
			t.Errorf("%s: EventCh left open", name)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("a refused start ran the stand-in")
	}
}

// qmpStandIn is a shell fragment that makes a stand-in speak QMP on its
// descriptor $QMP (3 unless set): qmp_greet sends the greeting, qmp_serve
// answers every command with an empty return, exits on quit, and on
// system_powerdown touches $DIR/powerdown, then sends SHUTDOWN and exits
// unless $POWERBUTTON is "ignore". After SHUTDOWN, $AFTER "stay" makes it
// send STOP and stay, as -no-shutdown does, and "linger" makes it take a
// second to exit and save in $DIR/after-shutdown a command sent meanwhile
// (qmp_linger, which checkQuietAfterShutdown reads); "stopfirst" is linger
// with a STOP and a RESUME before the SHUTDOWN.
// With $RUNNING set, query-status answers that the guest's running is
// $RUNNING.
const qmpStandIn = `
QMP=${QMP:-3}
qmp_greet() {
	printf '%s\n' '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}' >&$QMP
}
qmp_event() {
	printf '{"event": "%s", "timestamp": {"seconds": 1, "microseconds": 2}}\n' "$1" >&$QMP
}
qmp_linger() {
	sleep 0.5
	timeout 0.5 sh -c 'read -r line; printf "%s\n" "$line" >"$1"' - "$DIR/after-shutdown" <&$QMP
	exit 0
}
qmp_serve() {
	while read -r line <&$QMP; do
		case $line in
		*query-status*)
			if [ -n "$RUNNING" ]; then
				printf '{"return": {"status": "paused", "running": %s}}\n' "$RUNNING" >&$QMP
				continue
			fi;;
		esac
		printf '{"return": {}}\n' >&$QMP
		case $line in
		*'"quit"'*) exit 0;;
		*system_powerdown*)
			touch "$DIR/powerdown"
			[ "$POWERBUTTON" = ignore ] && continue
			if [ "$AFTER" = stopfirst ]; then
				qmp_event STOP
				qmp_event RESUME
			fi
			qmp_event SHUTDOWN
			case $AFTER in
			stay) qmp_event STOP;;
			linger|stopfirst) qmp_linger;;
			*) exit 0;;
			esac;;
		esac
	done
}
`

// checkReaped fails the test unless the process is gone from /proc: reaped,
// not a zombie.
func checkReaped(t *testing.T, pid int) {
	t.Helper()
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		stat, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		t.Errorf("process %d still exists: %s", pid, stat)
	}
}

// checkNoGoroutines fails the test if a goroutine of an Instance or a QMP
// session is left.
func checkNoGoroutines(t *testing.T) {
	t.Helper()
	if gs := lingeringSessionGoroutines(); gs != "" {
		t.Errorf("goroutines left:\n%s", gs)
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
	want := path + ` -name 'it'\''s a test' -chardev socket,id=instance-qmp,fd=3 -mon chardev=instance-qmp,mode=control`
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

// checkQuietAfterShutdown fails the test if the stand-in in dir saved a
// command that came while it was exiting after SHUTDOWN (qmp_linger).
func checkQuietAfterShutdown(t *testing.T, dir string) {
	t.Helper()
	if b, err := os.ReadFile(filepath.Join(dir, "after-shutdown")); err == nil && strings.TrimSpace(string(b)) != "" {
		t.Errorf("sent to an exiting QEMU after SHUTDOWN: %s", b)
	}
}

// startStandIn starts the stand-in at path as QEMU, closed when the test
// ends.
func startStandIn(t *testing.T, path string, opts InstanceOptions) *Instance {
	t.Helper()
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Close() })
	return inst
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

// countingWriter counts what is written to it, optionally blocking each
// write until release is closed.
type countingWriter struct {
	release chan struct{}
	mu      sync.Mutex
	n       int
	dropped int // writes that said bytes were dropped
	tail    []byte
}

func (w *countingWriter) Write(p []byte) (int, error) {
	if w.release != nil {
		<-w.release
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.n += len(p)
	if strings.Contains(string(p), "bytes of stderr dropped") {
		w.dropped++
	}
	w.tail = append(w.tail, p...)
	if len(w.tail) > 4096 {
		w.tail = append(w.tail[:0], w.tail[len(w.tail)-4096:]...)
	}
	return len(p), nil
}

func (w *countingWriter) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return string(w.tail)
}

// floodStandIn writes 5 MB to stderr before it speaks QMP.
const floodStandIn = qmpStandIn + `
head -c 5000000 /dev/zero | tr '\0' x >&2
echo >&2
echo "qemu: last words" >&2
qmp_greet
qmp_serve`

// runFlood runs floodStandIn to its end, with w as InstanceOptions.Stderr,
// and returns the closed Instance. A w with a release channel blocks until
// the start has returned, which QEMU reaches only once all its stderr has
// been written.
func runFlood(t *testing.T, w *countingWriter) *Instance {
	t.Helper()
	path, _ := standIn(t, "qemu", floodStandIn)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inst, err := StartCustomInstance(ctx, path, nil, nil, InstanceOptions{Stderr: w})
	if w.release != nil {
		close(w.release)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	stopWithin(t, inst, 10*time.Second)
	if _, err := inst.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	inst.Close()
	return inst
}

func TestInstanceStderrFlood(t *testing.T) {
	w := &countingWriter{}
	inst := runFlood(t, w)
	tail := inst.Stderr()
	if len(tail) != maxStderr || !strings.HasSuffix(tail, "x\nqemu: last words\n") {
		t.Errorf("Stderr() holds %d bytes ending %q; want %d ending with the last words", len(tail), lastLines(tail, 1), maxStderr)
	}
	if want := 5000000 + len("\nqemu: last words\n"); w.n != want {
		t.Errorf("InstanceOptions.Stderr got %d bytes, want %d", w.n, want)
	}
	checkNoGoroutines(t)
}

func TestInstanceSlowStderrWriterDoesNotStallQEMU(t *testing.T) {
	w := &countingWriter{release: make(chan struct{})}
	runFlood(t, w)
	got := w.String()
	if w.dropped == 0 || !strings.HasSuffix(got, "qemu: last words\n") {
		t.Errorf("the slow writer saw %d notices of dropped bytes; its last output: %q", w.dropped, lastLines(got, 1))
	}
	if w.n > 2*maxStderr+200 {
		t.Errorf("the slow writer got %d bytes, more than the backlog holds", w.n)
	}
	checkNoGoroutines(t)
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

func TestInstanceFilesAndConfig(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
QMP=4
[ -e /proc/self/fd/3 ] || { echo "no fd 3" >&2; exit 1; }
qmp_greet
qmp_serve`)
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	config := Config{Path: path, Name: "vm1",
		Devices: []Device{NetDevice{Type: TAP, Driver: VirtioNet, ID: "n0", IFName: "t0", FDs: []*os.File{f}}}}
	inst, err := StartInstance(context.Background(), config, InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	args := inst.Args()
	if got := strings.Join(args[len(args)-4:], " "); got != "-chardev socket,id=instance-qmp,fd=4 -mon chardev=instance-qmp,mode=control" {
		t.Errorf("QMP channel arguments: %s", got)
	}
	if !strings.Contains(inst.CommandLine(), "fds=3") {
		t.Errorf("the device's file is not descriptor 3: %s", inst.CommandLine())
	}
	if step := stopWithin(t, inst, 10*time.Second); step != StopPowerdown {
		t.Errorf("Stop ended at %v, want powerdown", step)
	}
	inst.Close()
	checkNoGoroutines(t)
}

// waitForFile waits for a stand-in to create file.
func waitForFile(t *testing.T, file string) {
	t.Helper()
	for i := 0; i < 1000; i++ {
		if _, err := os.Stat(file); err == nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("%s never appeared", file)
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

func TestInstanceCloseAbandonsBlockedStderr(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
echo "qemu: a line" >&2
qmp_greet
qmp_serve`)
	w := &countingWriter{release: make(chan struct{})}
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{Stderr: w})
	if err != nil {
		t.Fatal(err)
	}
	stopWithin(t, inst, 10*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if _, err := inst.Wait(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Wait with the writer blocked = %v, want the deadline", err)
	}
	inst.Close()
	if state, err := inst.Wait(context.Background()); err != nil || !state.Success() {
		t.Errorf("Wait after Close = %v, %v", state, err)
	}
	close(w.release)
	checkNoGoroutines(t)
}

func TestInstanceExitBeforeQMP(t *testing.T) {
	path, _ := standIn(t, "qemu", "exit 0")
	if _, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{}); err == nil ||
		!strings.Contains(err.Error(), "exited before QMP was ready (exit status 0): (nothing on stderr)") {
		t.Errorf("start of a stand-in that exits at once: %v", err)
	}
	for name, body := range map[string]string{
		"before the greeting": "",
		"after the greeting":  qmpStandIn + "qmp_greet",
	} {
		t.Run(name, func(t *testing.T) {
			path, _ := standIn(t, "qemu", body+`
echo "qemu: warming up" >&2
echo "qemu: -frobnicate: invalid option" >&2
exit 3`)
			events := make(chan QMPEvent)
			_, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{EventCh: events})
			if err == nil {
				t.Fatal("started")
			}
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
				t.Errorf("error %v does not carry exit status 3", err)
			}
			if !strings.Contains(err.Error(), "qemu: warming up | qemu: -frobnicate: invalid option") {
				t.Errorf("error %q does not carry QEMU's last lines", err)
			}
			if _, ok := <-events; ok {
				t.Error("EventCh got an event")
			}
			checkNoGoroutines(t)
		})
	}
}

func TestInstanceExitLeavingAChild(t *testing.T) {
	for name, body := range map[string]string{
		"before the greeting": "",
		"after the greeting":  qmpStandIn + "qmp_greet",
	} {
		t.Run(name, func(t *testing.T) {
			// The child holds the QMP channel and stderr open.
			path, dir := standIn(t, "qemu", body+`
sleep 600 &
echo $! > "$DIR/child"
echo "qemu: leaving a child" >&2
exit 3`)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := StartCustomInstance(ctx, path, nil, nil, InstanceOptions{})
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 || !strings.Contains(err.Error(), "leaving a child") {
				t.Errorf("start: %v; want exit status 3 and the stand-in's message", err)
			}
			waitGone(t, readPID(t, filepath.Join(dir, "child")))
			checkNoGoroutines(t)
		})
	}
}

// waitGone waits for a process that is not this one's child to end (its
// new parent reaps it).
func waitGone(t *testing.T, pid int) {
	t.Helper()
	for i := 0; i < 500; i++ {
		stat, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		if err != nil || zombie(stat) {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Errorf("process %d outlived its QEMU", pid)
}

func TestInstanceNotQMP(t *testing.T) {
	path, dir := standIn(t, "qemu", `echo $$ > "$DIR/pid"
echo "this is not QMP" >&3
exec sleep 600`)
	_, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{})
	if err == nil || !strings.Contains(err.Error(), "not a QMP greeting") {
		t.Fatalf("start: %v", err)
	}
	checkReaped(t, readPID(t, filepath.Join(dir, "pid")))
	checkNoGoroutines(t)
}

func TestInstanceStartCancelledKillsQEMU(t *testing.T) {
	path, dir := standIn(t, "qemu", `echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
exec sleep 600`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		inst *Instance
		err  error
	}
	done := make(chan result, 1)
	go func() {
		inst, err := StartCustomInstance(ctx, path, nil, nil, InstanceOptions{})
		done <- result{inst, err}
	}()
	pid := waitForPID(t, filepath.Join(dir, "pid"), done)
	cancel()
	r := <-done
	if r.err == nil {
		r.inst.Close()
		t.Fatal("started")
	}
	if !errors.Is(r.err, context.Canceled) || !strings.Contains(r.err.Error(), "QEMU killed") {
		t.Errorf("start: %v", r.err)
	}
	checkReaped(t, pid)
	checkNoGoroutines(t)
}

func TestInstanceRealQEMUBadOption(t *testing.T) {
	bin, firmware := requireQEMU(t)
	params := append([]string{"-machine", "none", "-nodefaults", "-display", "none",
		"-device", "no-such-driver"}, firmware...)
	_, err := StartCustomInstance(context.Background(), bin, params, nil, InstanceOptions{})
	if err == nil {
		t.Fatal("started")
	}
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 1 {
		t.Errorf("error %v does not carry exit status 1", err)
	}
	if !strings.Contains(err.Error(), "'no-such-driver' is not a valid device model name") {
		t.Errorf("error %q does not carry QEMU's message", err)
	}
	checkNoGoroutines(t)
}

func TestInstanceRealQEMUStartContextEndsWithStart(t *testing.T) {
	bin, firmware := requireQEMU(t)
	ctx, cancel := context.WithCancel(context.Background())
	params := append([]string{"-S", "-machine", "none", "-nodefaults", "-display", "none"}, firmware...)
	inst, err := StartCustomInstance(ctx, bin, params, nil, InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	cancel()
	var status struct {
		Status string `json:"status"`
	}
	qctx, qcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer qcancel()
	if err := inst.QMP().ExecuteCommand(qctx, "query-status", nil, &status); err != nil || status.Status != "prelaunch" {
		t.Errorf("query-status after the start context ended: %q, %v", status.Status, err)
	}
	select {
	case <-inst.Done():
		t.Fatal("QEMU exited when the start context ended")
	default:
	}
	// The guest has not started (-S), so Stop skips the power button and
	// its 30 s PowerdownTimeout: a bound of 20 s fails if it does not.
	if step := stopWithin(t, inst, 20*time.Second); step != StopQuit {
		t.Errorf("Stop ended at %v, want quit", step)
	}
	checkReaped(t, inst.Pid())
}

// startGuestInstance boots the test guest as an Instance with its console
// on InstanceOptions.Console (ConsoleSerial unless opts says otherwise)
// and returns once the guest is ready; cleanup closes it.
func startGuestInstance(t testing.TB, kernelParams string, opts InstanceOptions, extra ...string) *Instance {
	t.Helper()
	inst := startGuest(t, kernelParams, opts, extra...)
	ctx := ctxTimeout(t, 2*time.Minute)
	if _, err := inst.Console().WaitFor(ctx, guestReadyLine); err != nil {
		t.Fatalf("%v; console:\n%s\nQEMU's stderr: %s", err, inst.Console().History(), inst.Stderr())
	}
	return inst
}

// startGuest starts the test guest as an Instance with its console, and
// returns at once.
func startGuest(t testing.TB, kernelParams string, opts InstanceOptions, extra ...string) *Instance {
	t.Helper()
	kernel, initrd := requireGuest(t)
	_, firmware := requireQEMU(t)
	accel, _ := guestAccel()
	if opts.Console == "" {
		opts.Console = ConsoleSerial
	}
	machine := []string{"-machine", "q35"}
	if slices.Contains(extra, "-machine") {
		machine = nil // the caller's
	}
	params := []string{"-m", "256", "-nodefaults", "-display", "none", "-no-user-config",
		"-kernel", kernel, "-initrd", initrd, "-append", strings.TrimSpace(guestKernelParams + " " + kernelParams)}
	params = append(append(append(append(machine, params...), accel...), firmware...), extra...)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	inst, err := StartCustomInstance(ctx, realVM.bin, params, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Close() })
	return inst
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
			t.Errorf("Stop ended at %v, want SIGTERM", r.Step)
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

// exitingStandIn negotiates QMP, then exits 0 at its next command.
const exitingStandIn = qmpStandIn + `
qmp_greet
read -r line <&3
printf '{"return": {}}\n' >&3
read -r line <&3
exit 0`

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

// A QEMU that exits by itself while something outside its group holds its
// stderr is reaped at once: Stop in the time stderr takes to drain says
// exited, not SIGTERM, and no signal goes to the reaped pid's group. The
// Instance's session says how it ended.
func TestInstanceExitedBeforeStderrDrained(t *testing.T) {
	path, dir := standIn(t, "qemu", qmpStandIn+`
qmp_greet
read -r line <&3
printf '{"return": {}}\n' >&3
DIR="$DIR" setsid sh -c 'echo $$ > "$DIR/holder"; exec sleep 3' 3>&- >/dev/null &
while [ ! -s "$DIR/holder" ]; do sleep 0.01; done
read -r line <&3
exit 0`)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	waitForFile(t, filepath.Join(dir, "holder"))
	holder := readPID(t, filepath.Join(dir, "holder"))
	defer syscall.Kill(holder, syscall.SIGKILL)
	inst.QMP().ExecuteCommand(context.Background(), "exit-now", nil, nil)
	select {
	case <-inst.QMP().Done():
	case <-time.After(5 * time.Second):
		t.Fatal("session did not end with QEMU")
	}
	if err := inst.QMP().Err(); !errors.Is(err, ErrDisconnected) {
		t.Errorf("session's end: %v, want ErrDisconnected", err)
	}
	waitGone(t, inst.Pid())
	if step := stopWithin(t, inst, 10*time.Second); step != StopExited {
		t.Errorf("Stop after QEMU exited by itself = %v, want exited", step)
	}
	if state, err := inst.Wait(context.Background()); err != nil || !state.Success() {
		t.Errorf("Wait = %v, %v", state, err)
	}
}

// ptraceHelper, in the environment of this test binary, makes it trace the
// process it names and never wait for it: a process that then gets SIGKILL
// stays unreaped, as one stuck in the kernel would.
const ptraceHelper = "QEMU_TEST_PTRACE_PID"

func traceAndNeverWait(pid string) {
	n, err := strconv.Atoi(pid)
	if err != nil {
		fmt.Println(err)
		os.Exit(2)
	}
	// The tracer is this thread: it must stay.
	runtime.LockOSThread()
	const ptraceSeize = 0x4206
	if _, _, e := syscall.Syscall6(syscall.SYS_PTRACE, ptraceSeize, uintptr(n), 0, 0, 0, 0); e != 0 {
		fmt.Println("PTRACE_SEIZE:", e)
		os.Exit(2)
	}
	fmt.Println("tracing")
	time.Sleep(time.Hour)
	os.Exit(0)
}

// Close is bounded for a QEMU that will not go away after SIGKILL, and says
// so; the QEMU is reaped once it can be.
func TestInstanceCloseBoundedForAProcessThatWillNotDie(t *testing.T) {
	path, _ := standIn(t, "qemu", qmpStandIn+`
qmp_greet
qmp_serve`)
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{KillTimeout: 300 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	tracer := exec.Command(os.Args[0], "-test.run=^$")
	tracer.Env = append(os.Environ(), ptraceHelper+"="+strconv.Itoa(inst.Pid()))
	out, err := tracer.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := tracer.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		tracer.Process.Kill()
		tracer.Wait()
	}()
	if line, _ := bufio.NewReader(out).ReadString('\n'); line != "tracing\n" {
		t.Skipf("cannot trace the stand-in here: %q", line)
	}
	err = returnsWithin(t, 10*time.Second, inst.Close)
	if err == nil || !strings.Contains(err.Error(), "still running 300ms after SIGKILL") {
		t.Fatalf("Close of a process that will not go: %v", err)
	}
	select {
	case <-inst.Done():
		t.Fatal("Done closed for a process not reaped")
	default:
	}
	tracer.Process.Kill()
	tracer.Wait()
	ctx := ctxTimeout(t, 10*time.Second)
	state, err := inst.Wait(ctx)
	if err != nil {
		t.Fatalf("Wait once the tracer is gone: %v", err)
	}
	if ws, ok := state.Sys().(syscall.WaitStatus); !ok || ws.Signal() != syscall.SIGKILL {
		t.Errorf("Wait = %v, want killed by SIGKILL", state)
	}
	checkReaped(t, inst.Pid())
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
