package qemu

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The real-VM layer of the tests. The environment chooses what runs:
//
//	QEMU_BIN           qemu-system-x86_64 to test (default: from PATH)
//	QEMU_FIRMWARE      colon-separated firmware dirs, each passed as -L DIR
//	QEMU_TEST_ACCEL    kvm or tcg: force the guest accelerator (default: probe)
//	QEMU_TEST_GUEST    directory with the test guest's vmlinux and initrd.gz
//	QEMU_TEST_REQUIRE  1: fail instead of skipping when QEMU or the guest is missing

// leakMarker is put in the environment of the test binary, so every QEMU it
// starts inherits it and TestMain can find any that outlived the tests.
const leakMarker = "QEMU_GO_TEST_RUN"

// realVM describes what this machine offers the real-VM tests.
var realVM struct {
	bin        string
	firmware   []string
	kernel     string
	initrd     string
	noQEMU     string // why QEMU tests can't run, or ""
	noGuest    string // why guest tests can't run, or ""
	require    bool
	accelOnce  sync.Once
	accelArgs  []string
	accelLabel string
}

func TestMain(m *testing.M) {
	flag.Parse()
	os.Setenv(leakMarker, strconv.Itoa(os.Getpid()))
	findRealVM()
	if realVM.noQEMU != "" || realVM.noGuest != "" {
		reason := realVM.noQEMU
		if reason == "" {
			reason = realVM.noGuest
		}
		if realVM.require {
			fmt.Fprintf(os.Stderr, "QEMU_TEST_REQUIRE is set but real-VM tests cannot run: %s\n", reason)
			os.Exit(1)
		}
		fmt.Printf("real-VM tests skipped: %s; `make test` installs QEMU, builds the guest and runs them\n", reason)
		skip := "^Example"
		if s := flag.Lookup("test.skip").Value.String(); s != "" {
			skip = s + "|" + skip
		}
		flag.Set("test.skip", skip)
	}
	code := m.Run()
	if msg := leftovers(); msg != "" {
		fmt.Fprintln(os.Stderr, msg)
		code = 1
	}
	os.Exit(code)
}

func findRealVM() {
	realVM.require = os.Getenv("QEMU_TEST_REQUIRE") == "1"
	bin := os.Getenv("QEMU_BIN")
	if bin == "" {
		bin = "qemu-system-x86_64"
	}
	if p, err := exec.LookPath(bin); err != nil {
		realVM.noQEMU = fmt.Sprintf("%s not found", bin)
	} else {
		realVM.bin = p
	}
	for _, dir := range filepath.SplitList(os.Getenv("QEMU_FIRMWARE")) {
		if dir != "" {
			realVM.firmware = append(realVM.firmware, "-L", dir)
		}
	}
	dir := os.Getenv("QEMU_TEST_GUEST")
	if dir == "" {
		dir = filepath.Join("testdata", "guest", "out")
	}
	dir, _ = filepath.Abs(dir)
	realVM.kernel = filepath.Join(dir, "vmlinux")
	realVM.initrd = filepath.Join(dir, "initrd.gz")
	for _, f := range []string{realVM.kernel, realVM.initrd} {
		if _, err := os.Stat(f); err != nil {
			realVM.noGuest = fmt.Sprintf("test guest not built (%s missing)", f)
		}
	}
}

// leftovers reports any QEMU process or session goroutine that outlived the
// tests. Both get a few seconds to go, since a QEMU told to quit takes a
// moment to exit.
func leftovers() string {
	var procs []int
	var gs string
	for i := 0; i < 50; i++ {
		procs = markedProcesses()
		gs = sessionGoroutines()
		if len(procs) == 0 && gs == "" {
			return ""
		}
		time.Sleep(100 * time.Millisecond)
	}
	msg := ""
	if len(procs) > 0 {
		msg += fmt.Sprintf("QEMU processes outlived the tests (killed now): %v\n", procs)
		for _, pid := range procs {
			if p, err := os.FindProcess(pid); err == nil {
				p.Kill()
			}
		}
	}
	if gs != "" {
		msg += "goroutines of a QMP session outlived the tests:\n" + gs
	}
	return msg
}

// markedProcesses lists the processes, other than this one, that carry this
// test binary's leak marker.
func markedProcesses() []int {
	want := []byte(leakMarker + "=" + strconv.Itoa(os.Getpid()) + "\x00")
	self := os.Getpid()
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !strings.Contains(string(env)+"\x00", string(want)) {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && zombie(stat) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

func zombie(stat []byte) bool {
	i := strings.LastIndexByte(string(stat), ')')
	return i > 0 && i+2 < len(stat) && stat[i+2] == 'Z'
}

// sessionGoroutines returns the stacks of goroutines running this
// package's QMP session code.
func sessionGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out strings.Builder
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "qemu.(*QMP).") {
			out.WriteString(g + "\n\n")
		}
	}
	return out.String()
}

// requireQEMU skips the test when QEMU is absent (and fails it when the
// environment requires real-VM tests). It returns the binary and the -L
// firmware arguments to start it with.
func requireQEMU(t testing.TB) (bin string, firmwareArgs []string) {
	t.Helper()
	if realVM.noQEMU != "" {
		if realVM.require {
			t.Fatalf("real-VM test cannot run: %s", realVM.noQEMU)
		}
		t.Skip(realVM.noQEMU)
	}
	return realVM.bin, append([]string(nil), realVM.firmware...)
}

// requireGuest is requireQEMU for tests that boot the test guest.
func requireGuest(t testing.TB) (kernel, initrd string) {
	t.Helper()
	requireQEMU(t)
	if realVM.noGuest != "" {
		if realVM.require {
			t.Fatalf("real-VM test cannot run: %s", realVM.noGuest)
		}
		t.Skip(realVM.noGuest)
	}
	return realVM.kernel, realVM.initrd
}

// guestKernelParams is the test guest's kernel command line.
const guestKernelParams = "console=ttyS0 panic=-1 quiet cryptomgr.notests"

// guestReadyLine is what the test guest prints once it is up.
const guestReadyLine = "TESTGUEST: ready"

// guestAccel returns the accelerator and CPU arguments for booting the test
// guest. It probes once per test binary: the guest boots under KVM in well
// under a second on an ordinary host, but on some hosts /dev/kvm exists and a
// guest kernel never finishes booting, so a KVM boot that is not ready within
// a short deadline means TCG.
func guestAccel() (args []string, label string) {
	realVM.accelOnce.Do(func() {
		kvm := []string{"-accel", "kvm", "-cpu", "host,-arch-capabilities"}
		tcg := []string{"-accel", "tcg", "-cpu", "qemu64"}
		switch forced := os.Getenv("QEMU_TEST_ACCEL"); forced {
		case "kvm":
			realVM.accelArgs, realVM.accelLabel = kvm, "kvm (forced by QEMU_TEST_ACCEL)"
		case "tcg":
			realVM.accelArgs, realVM.accelLabel = tcg, "tcg (forced by QEMU_TEST_ACCEL)"
		default:
			if err := probeKVM(kvm); err != nil {
				realVM.accelArgs, realVM.accelLabel = tcg, "tcg ("+err.Error()+")"
			} else {
				realVM.accelArgs, realVM.accelLabel = kvm, "kvm"
			}
		}
		fmt.Printf("real-VM tests boot the guest with %s\n", realVM.accelLabel)
	})
	return realVM.accelArgs, realVM.accelLabel
}

// probeKVM boots the guest under KVM and waits briefly for its ready line.
func probeKVM(kvmArgs []string) error {
	f, err := os.OpenFile("/dev/kvm", os.O_RDWR, 0)
	if err != nil {
		return fmt.Errorf("no usable /dev/kvm: %w", err)
	}
	f.Close()
	args := append([]string{"-machine", "q35", "-m", "256", "-nodefaults", "-display", "none",
		"-serial", "stdio", "-kernel", realVM.kernel, "-initrd", realVM.initrd,
		"-append", guestKernelParams}, kvmArgs...)
	args = append(args, realVM.firmware...)
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, realVM.bin, args...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return err
	}
	defer cmd.Wait()
	defer cmd.Process.Kill()
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if strings.Contains(sc.Text(), guestReadyLine) {
			return nil
		}
	}
	return fmt.Errorf("guest not ready under KVM within 4s")
}

// testVMOptions says how startTestVM boots the test guest.
type testVMOptions struct {
	Machine string   // default q35
	Extra   []string // more QEMU arguments
	Append  string   // more kernel parameters
}

// testVM is a QEMU running the test guest for one test, with its QMP
// session negotiated and its serial console connected.
type testVM struct {
	t       *testing.T
	QMP     *QMP
	Version *QMPVersion
	Events  chan QMPEvent
	Dir     string
	Gone    chan struct{} // disconnectedCh of the session
	cmd     *exec.Cmd
	exited  chan struct{}

	mu         sync.Mutex
	lines      []string
	next       int
	newLine    chan struct{}
	consoleEnd chan struct{}
	console    net.Conn
}

// startTestVM boots the test guest and returns once QMP is negotiated and
// the console is connected. QEMU starts paused so that no console output
// can be missed, and runs once the console is attached. Cleanup quits QEMU
// and reaps it.
func startTestVM(t *testing.T, opts testVMOptions) *testVM {
	t.Helper()
	kernel, initrd := requireGuest(t)
	bin, fw := requireQEMU(t)
	accel, _ := guestAccel()
	if opts.Machine == "" {
		opts.Machine = "q35"
	}
	dir := shortTempDir(t)
	qmpPath := filepath.Join(dir, "qmp.sock")
	conPath := filepath.Join(dir, "con.sock")
	params := opts.Append
	if params != "" {
		params = " " + params
	}
	args := []string{"-S", "-machine", opts.Machine, "-m", "256", "-nodefaults", "-display", "none",
		"-no-user-config",
		"-qmp", "unix:" + qmpPath + ",server=on,wait=off",
		"-chardev", "socket,id=con,path=" + conPath + ",server=on,wait=off",
		"-serial", "chardev:con",
		"-kernel", kernel, "-initrd", initrd, "-append", guestKernelParams + params}
	args = append(args, accel...)
	args = append(args, fw...)
	args = append(args, opts.Extra...)

	vm := &testVM{t: t, Dir: dir, Events: make(chan QMPEvent, 64), Gone: make(chan struct{}),
		exited: make(chan struct{}), newLine: make(chan struct{}, 1), consoleEnd: make(chan struct{})}
	vm.cmd = exec.Command(bin, args...)
	var stderr strings.Builder
	vm.cmd.Stderr = &stderr
	if err := vm.cmd.Start(); err != nil {
		t.Fatalf("start qemu: %v", err)
	}
	go func() { vm.cmd.Wait(); close(vm.exited) }()
	t.Cleanup(vm.close)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var err error
	for {
		vm.QMP, vm.Version, err = QMPStart(ctx, qmpPath, QMPConfig{EventCh: vm.Events}, vm.Gone)
		if err == nil {
			break
		}
		vm.Gone = make(chan struct{})
		vm.Events = make(chan QMPEvent, 64)
		select {
		case <-vm.exited:
			t.Fatalf("qemu exited at start: %s", stderr.String())
		case <-ctx.Done():
			t.Fatalf("qmp: %v", err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	if err := vm.QMP.ExecuteQMPCapabilities(ctx); err != nil {
		t.Fatalf("qmp_capabilities: %v", err)
	}
	vm.console, err = net.Dial("unix", conPath)
	if err != nil {
		t.Fatalf("connect console: %v", err)
	}
	go vm.readConsole()
	if err := vm.QMP.ExecuteCont(ctx); err != nil {
		t.Fatalf("cont: %v", err)
	}
	return vm
}

// shortTempDir returns a fresh temporary directory with a short path, since
// a unix socket path must fit in 108 bytes and t.TempDir's can be long.
func shortTempDir(t testing.TB) string {
	dir, err := os.MkdirTemp("", "qt")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func (vm *testVM) readConsole() {
	defer close(vm.consoleEnd)
	sc := bufio.NewScanner(vm.console)
	for sc.Scan() {
		line := strings.TrimRight(sc.Text(), "\r")
		vm.mu.Lock()
		vm.lines = append(vm.lines, line)
		vm.mu.Unlock()
		select {
		case vm.newLine <- struct{}{}:
		default:
		}
	}
}

// waitConsole returns the first console line containing substr that comes
// after the line the previous waitConsole returned.
func (vm *testVM) waitConsole(substr string, timeout time.Duration) (string, error) {
	deadline := time.After(timeout)
	for {
		vm.mu.Lock()
		for i := vm.next; i < len(vm.lines); i++ {
			if strings.Contains(vm.lines[i], substr) {
				vm.next = i + 1
				line := vm.lines[i]
				vm.mu.Unlock()
				return line, nil
			}
		}
		vm.mu.Unlock()
		select {
		case <-vm.newLine:
		case <-vm.consoleEnd:
			// The reader may have queued one last line before it ended.
			select {
			case <-vm.newLine:
				continue
			default:
			}
			return "", fmt.Errorf("console closed before a line with %q; console:\n%s", substr, vm.consoleText())
		case <-deadline:
			return "", fmt.Errorf("no console line with %q within %v; console so far:\n%s", substr, timeout, vm.consoleText())
		}
	}
}

func (vm *testVM) consoleText() string {
	vm.mu.Lock()
	defer vm.mu.Unlock()
	return strings.Join(vm.lines, "\n")
}

// waitExit waits for QEMU to exit.
func (vm *testVM) waitExit(timeout time.Duration) error {
	select {
	case <-vm.exited:
		return nil
	case <-time.After(timeout):
		return fmt.Errorf("qemu still running after %v", timeout)
	}
}

func (vm *testVM) close() {
	select {
	case <-vm.exited:
	default:
		if vm.QMP != nil {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			vm.QMP.ExecuteQuit(ctx)
			cancel()
		}
		if vm.waitExit(3*time.Second) != nil {
			vm.cmd.Process.Kill()
			<-vm.exited
		}
	}
	if vm.QMP != nil {
		vm.QMP.Shutdown()
	}
	if vm.console != nil {
		vm.console.Close()
	}
}
