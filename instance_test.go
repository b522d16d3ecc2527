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
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

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
	if got := strings.Join(args[len(args)-4:], " "); got != "-chardev socket,id=instance-qmp,fd=4 -qmp chardev:instance-qmp" {
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
