package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// launchLog is a QMPLog that records what it is told.
type launchLog struct {
	mu       sync.Mutex
	infos    []string
	warnings []string
}

func (l *launchLog) V(int32) bool { return true }

func (l *launchLog) Infof(f string, a ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.infos = append(l.infos, fmt.Sprintf(f, a...))
}

func (l *launchLog) Warningf(f string, a ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.warnings = append(l.warnings, fmt.Sprintf(f, a...))
}

func (l *launchLog) Errorf(f string, a ...interface{}) { l.Warningf("error: "+f, a...) }

func (l *launchLog) Warnings() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.warnings...)
}

func TestLaunchCustomQemuArgsAndFDs(t *testing.T) {
	path, dir := standIn(t, "qemu", recordArgs+`
cat <&3 > "$DIR/fd3" || exit 9
cat <&4 > "$DIR/fd4" || exit 9`)
	var fds []*os.File
	for _, content := range []string{"three", "four"} {
		name := filepath.Join(t.TempDir(), content)
		if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fds = append(fds, f)
	}
	params := []string{"-name", "a,,b", "-append", "console=ttyS0 quiet", "", "-x'\"$HOME"}
	log := &launchLog{}
	out, err := LaunchCustomQemu(testCtx(t), path, params, fds, log)
	if out != "" || err != nil {
		t.Fatalf("LaunchCustomQemu = %q, %v; want success", out, err)
	}
	if got := readArgs(t, dir); !reflect.DeepEqual(got, params) {
		t.Errorf("QEMU got arguments %q, want %q", got, params)
	}
	for n, want := range map[string]string{"fd3": "three", "fd4": "four"} {
		if got, _ := os.ReadFile(filepath.Join(dir, n)); string(got) != want {
			t.Errorf("QEMU read %q from %s, want %q", got, n, want)
		}
	}
	if len(log.Warnings()) != 0 {
		t.Errorf("warnings for a silent success: %q", log.Warnings())
	}
}

func TestLaunchCustomQemuFailure(t *testing.T) {
	path, _ := standIn(t, "qemu", `echo "qemu: some noise" >&2
echo "qemu: -device foo: 'foo' is not a valid device model name" >&2
exit 3`)
	out, err := LaunchCustomQemu(testCtx(t), path, nil, nil, nil)
	if err == nil {
		t.Fatal("a failing QEMU gave no error")
	}
	want := "qemu: some noise\nqemu: -device foo: 'foo' is not a valid device model name\n"
	if out != want {
		t.Errorf("stderr = %q, want %q", out, want)
	}
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
		t.Errorf("error %v does not carry exit status 3", err)
	}
	if !strings.Contains(err.Error(), "'foo' is not a valid device model name") {
		t.Errorf("error %q does not quote QEMU's last line", err)
	}
}

func TestLaunchCustomQemuSuccessLogsStderr(t *testing.T) {
	path, _ := standIn(t, "qemu", `echo "qemu: warning: short-form boolean option 'server' deprecated" >&2`)
	log := &launchLog{}
	out, err := LaunchCustomQemu(testCtx(t), path, nil, nil, log)
	if out != "" || err != nil {
		t.Fatalf("LaunchCustomQemu = %q, %v; want success", out, err)
	}
	if w := strings.Join(log.Warnings(), "\n"); !strings.Contains(w, "short-form boolean option") {
		t.Errorf("QEMU's stderr on success was not logged as a warning; warnings: %q", w)
	}
}

func TestLaunchCustomQemuStderrBounded(t *testing.T) {
	path, _ := standIn(t, "qemu", `head -c 3000000 /dev/zero | tr '\0' x >&2
echo >&2
echo "qemu: the real error" >&2
exit 1`)
	out, err := LaunchCustomQemu(testCtx(t), path, nil, nil, nil)
	if err == nil {
		t.Fatal("a failing QEMU gave no error")
	}
	if len(out) > maxStderr {
		t.Errorf("kept %d bytes of stderr, want at most %d", len(out), maxStderr)
	}
	if !strings.HasSuffix(out, "qemu: the real error\n") {
		t.Errorf("stderr does not end with QEMU's last line: ...%q", out[max(0, len(out)-40):])
	}
}

func TestLaunchCustomQemuContextCancel(t *testing.T) {
	// The pid file comes after the line on stderr, so that the test, which
	// cancels once it sees the file, cancels after the line was written.
	path, dir := standIn(t, "qemu", `echo "qemu: started" >&2
echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
exec sleep 600`)
	ctx, cancel := context.WithCancel(testCtx(t))
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := LaunchCustomQemu(ctx, path, nil, nil, nil)
		done <- result{out, err}
	}()
	pid := waitForPID(t, filepath.Join(dir, "pid"), done)
	cancel()
	r := <-done
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("error %v does not wrap context.Canceled", r.err)
	}
	if !strings.Contains(r.out, "qemu: started") {
		t.Errorf("stderr = %q, want what QEMU wrote before it was stopped", r.out)
	}
	// Reaped, not just killed: the process is gone from the table.
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process %d still exists after LaunchCustomQemu returned (kill 0: %v)", pid, err)
	}
}

// waitForPID waits for a stand-in to write its process id to file, or
// fails the test if the launch ended first.
func waitForPID[T any](t *testing.T, file string, done <-chan T) int {
	t.Helper()
	for {
		if _, err := os.Stat(file); err == nil {
			return readPID(t, file)
		}
		select {
		case r := <-done:
			t.Fatalf("launch ended before the stand-in started: %+v", r)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// readPID returns the process id a stand-in wrote to file, and fails the
// test if there is none: a check of that process would otherwise look at
// no process at all, and pass.
func readPID(t *testing.T, file string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 0 {
		t.Fatalf("bad pid file %q: %v", b, err)
	}
	return pid
}

func TestLaunchCustomQemuContextDoneBeforeStart(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := LaunchCustomQemu(ctx, path, nil, nil, nil)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v does not wrap context.Canceled", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran under a context that was already done")
	}
}

// TestLaunchCustomQemuDaemonKeepsStderr stands in for a -daemonize QEMU
// whose daemon keeps stderr open: the launch must end when the launching
// process exits, not when the daemon does.
func TestLaunchCustomQemuDaemonKeepsStderr(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
	}{{"success", 0}, {"failure", 1}} {
		t.Run(tt.name, func(t *testing.T) {
			path, dir := standIn(t, "qemu", fmt.Sprintf(`sleep 600 &
echo $! > "$DIR/daemon"
echo "qemu: parent done" >&2
exit %d`, tt.status))
			t.Cleanup(func() {
				if b, err := os.ReadFile(filepath.Join(dir, "daemon")); err == nil {
					var pid int
					fmt.Sscan(string(b), &pid)
					syscall.Kill(pid, syscall.SIGKILL)
				}
			})
			ctx := testCtx(t)
			log := &launchLog{}
			out, err := LaunchCustomQemu(ctx, path, nil, nil, log)
			if ctx.Err() != nil {
				t.Fatal("LaunchCustomQemu waited for the daemon that holds stderr")
			}
			if tt.status == 0 {
				if out != "" || err != nil {
					t.Errorf("LaunchCustomQemu = %q, %v; want success", out, err)
				}
				if w := strings.Join(log.Warnings(), "\n"); !strings.Contains(w, "qemu: parent done") {
					t.Errorf("stderr not logged; warnings: %q", w)
				}
				return
			}
			if err == nil || out != "qemu: parent done\n" {
				t.Errorf("LaunchCustomQemu = %q, %v; want QEMU's stderr and an error", out, err)
			}
		})
	}
}

func TestLaunchCustomQemuMissingBinary(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-qemu")
	_, err := LaunchCustomQemu(testCtx(t), missing, nil, nil, nil)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing binary: error %v, want one naming %s and wrapping fs.ErrNotExist", err, missing)
	}

	t.Setenv("PATH", t.TempDir())
	_, err = LaunchCustomQemu(testCtx(t), "", nil, nil, nil)
	if !errors.Is(err, exec.ErrNotFound) || !strings.Contains(err.Error(), "qemu-system-x86_64") {
		t.Errorf("no QEMU in PATH: error %v, want one naming qemu-system-x86_64 and wrapping exec.ErrNotFound", err)
	}
}

func TestLaunchCustomQemuDefaultPath(t *testing.T) {
	_, dir := standIn(t, "qemu-system-x86_64", recordArgs)
	t.Setenv("PATH", dir)
	if out, err := LaunchCustomQemu(nil, "", []string{"-version"}, nil, nil); out != "" || err != nil {
		t.Fatalf("LaunchCustomQemu = %q, %v; want success", out, err)
	}
	if got := readArgs(t, dir); !reflect.DeepEqual(got, []string{"-version"}) {
		t.Errorf("qemu-system-x86_64 from PATH got %q", got)
	}
}

func TestLaunchCustomQemuNilFile(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	_, err := LaunchCustomQemu(testCtx(t), path, nil, []*os.File{nil}, nil)
	if err == nil || !strings.Contains(err.Error(), "fds[0] is nil") {
		t.Errorf("error %v, want one about fds[0]", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran with a nil file")
	}
}

func TestLaunchQemuStandIn(t *testing.T) {
	path, dir := standIn(t, "qemu", recordArgs+`
cat <&3 > "$DIR/fd3" || exit 9
cat <&4 > "$DIR/fd4" || exit 9`)
	var files []*os.File
	for _, content := range []string{"first", "second"} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.WriteString(content)
		w.Close()
		defer r.Close()
		files = append(files, r)
	}
	config := Config{
		Path: path,
		Name: "vm,1",
		Devices: []Device{
			NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0", IFName: "tap0", FDs: files[:1]},
			NetDevice{Type: TAP, Driver: VirtioNet, ID: "net1", IFName: "tap1", FDs: files[1:]},
		},
		Kernel: Kernel{Path: "/k", Params: "a b"},
	}
	out, err := LaunchQemu(config, nil)
	if out != "" || err != nil {
		t.Fatalf("LaunchQemu = %q, %v; want success", out, err)
	}
	want := append(argv("-name vm,,1 -device virtio-net,netdev=net0 -netdev tap,id=net0,fds=3 "+
		"-device virtio-net,netdev=net1 -netdev tap,id=net1,fds=4 -kernel /k -append"), "a b")
	if got := readArgs(t, dir); !reflect.DeepEqual(got, want) {
		t.Errorf("QEMU got %q\nwant %q", got, want)
	}
	for n, want := range map[string]string{"fd3": "first", "fd4": "second"} {
		if got, _ := os.ReadFile(filepath.Join(dir, n)); string(got) != want {
			t.Errorf("QEMU read %q from %s, want %q", got, n, want)
		}
	}
}

func TestLaunchQemuUsesConfigCtx(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := LaunchQemu(Config{Path: path, Ctx: ctx}, nil)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v does not wrap the Config's context error", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran under a Config.Ctx that was already done")
	}
}

// TestRealQEMUDaemonize launches a real QEMU with -daemonize through
// LaunchQemu: it returns once the VM is up, and the VM answers QMP.
func TestRealQEMUDaemonize(t *testing.T) {
	bin, fw := requireQEMU(t)
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "qmp.sock")
	config := Config{
		Path:       bin,
		Machine:    Machine{Type: "q35", Acceleration: "tcg"},
		QMPSockets: []QMPSocket{{Type: Unix, Name: sock, Server: true, NoWait: true}},
		Knobs:      Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true},
	}
	log := &launchLog{}
	params, fds := renderConfig(config, log)
	params = append(append(params, "-S"), fw...)
	ctx := testCtx(t)
	if out, err := LaunchCustomQemu(ctx, bin, params, fds, log); err != nil {
		t.Fatalf("launch %q: %v\n%s", params, err, out)
	}
	if w := log.Warnings(); len(w) != 0 {
		t.Errorf("QEMU wrote to stderr: %q", w)
	}
	// The daemon is up: its QMP socket exists now, with no polling.
	gone := make(chan struct{})
	q, _, err := QMPStart(ctx, sock, QMPConfig{}, gone)
	if err != nil {
		t.Fatalf("QMP of the daemonized QEMU: %v", err)
	}
	defer q.Shutdown()
	if err := q.ExecuteQMPCapabilities(ctx); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteQuit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone:
	case <-ctx.Done():
		t.Fatal("the daemonized QEMU did not close QMP after quit")
	}
}

// TestRealQEMUDaemonizeCancelled cancels the launch of a -daemonize QEMU
// whose daemon is still starting (waiting for a client on its wait=on QMP
// socket): the launching process is killed, and the daemon exits by itself
// once it has started and finds no parent to report to.
func TestRealQEMUDaemonizeCancelled(t *testing.T) {
	bin, fw := requireQEMU(t)
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "wait.sock")
	config := Config{
		Path:       bin,
		Machine:    Machine{Type: "q35", Acceleration: "tcg"},
		QMPSockets: []QMPSocket{{Type: Unix, Name: sock, Server: true}},
		Knobs:      Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true},
	}
	params, fds := renderConfig(config, nil)
	params = append(append(params, "-S"), fw...)
	t.Cleanup(func() {
		for _, pid := range processesWithArg(sock) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	ctx, cancel := context.WithCancel(testCtx(t))
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := LaunchCustomQemu(ctx, bin, params, fds, nil)
		done <- result{out, err}
	}()
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case r := <-done:
			t.Fatalf("launch ended before the daemon listened: %v\n%s", r.err, r.out)
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	if r := <-done; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("launch error %v does not wrap context.Canceled", r.err)
	}
	// Let the daemon go on: it finishes starting, finds its parent gone
	// and exits.
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("connect to the daemon: %v", err)
	}
	defer conn.Close()
	waitCtx := testCtx(t)
	for len(processesWithArg(sock)) > 0 {
		select {
		case <-waitCtx.Done():
			t.Fatalf("the daemon of a cancelled launch is still running: %v", processesWithArg(sock))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// processesWithArg returns the live processes one of whose arguments
// contains s.
func processesWithArg(s string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(s)) {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && zombie(stat) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// TestRealQEMUFailure checks that QEMU's own message comes back from a
// launch it refuses.
func TestRealQEMUFailure(t *testing.T) {
	bin, fw := requireQEMU(t)
	config := Config{Path: bin, Machine: Machine{Type: "q35", Acceleration: "tcg"}, Knobs: Knobs{NoDefaults: true},
		Devices: []Device{SerialDevice{Driver: "no-such-device", ID: "x"}}}
	params, fds := renderConfig(config, nil)
	params = append(append(params, "-S", "-display", "none"), fw...)
	out, err := LaunchCustomQemu(testCtx(t), bin, params, fds, nil)
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || !strings.Contains(out, "no-such-device") ||
		!strings.Contains(err.Error(), "no-such-device") {
		t.Errorf("LaunchCustomQemu = %q, %v; want QEMU's complaint about no-such-device", out, err)
	}
}
