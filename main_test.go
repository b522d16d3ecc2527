package qemu

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"flag"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// The shared set-up of the tests: TestMain, what the machine offers the
// real-VM tests (QEMU, the test guest, tools), the leak checks, helpers for
// waiting and timing out, and the test VM: the guest booted as an
// Instance, asked questions on its console, with disks and a heartbeat.

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
	if pid := os.Getenv(ptraceHelper); pid != "" {
		traceAndNeverWait(pid)
	}
	if dir := os.Getenv(startHelper); dir != "" {
		startAndSleep(dir)
	}
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

// lingeringSessionGoroutines is sessionGoroutines after a short grace: a
// goroutine that has signalled its end may not have returned yet.
func lingeringSessionGoroutines() string {
	return lingering(func(gs string) bool { return gs != "" })
}

// lingering returns sessionGoroutines once left says nothing is left, or
// after a second of asking.
func lingering(left func(gs string) bool) string {
	gs := sessionGoroutines()
	for i := 0; i < 100 && left(gs); i++ {
		time.Sleep(10 * time.Millisecond)
		gs = sessionGoroutines()
	}
	return gs
}

// sessionGoroutines returns the stacks of goroutines running this
// package's QMP session or Instance code.
func sessionGoroutines() string {
	buf := make([]byte, 1<<20)
	buf = buf[:runtime.Stack(buf, true)]
	var out strings.Builder
	for _, g := range strings.Split(string(buf), "\n\n") {
		if strings.Contains(g, "qemu.(*QMP).") || strings.Contains(g, "qemu.(*Instance).") ||
			strings.Contains(g, "qemu.(*outputSink).") ||
			strings.Contains(g, "qemu.(*SerialConsole).") || strings.Contains(g, "qemu.(*session).") ||
			strings.Contains(g, "qemu.(*GuestAgent).") ||
			strings.Contains(g, "qemu.forwardEvents") {
			out.WriteString(g + "\n\n")
		}
	}
	return out.String()
}

// checkNoGoroutines fails the test if a goroutine of an Instance or a QMP
// session is left.
func checkNoGoroutines(t *testing.T) {
	t.Helper()
	if gs := lingeringSessionGoroutines(); gs != "" {
		t.Errorf("goroutines left:\n%s", gs)
	}
}

// checkGoroutinesBackTo fails the test unless the goroutine count comes
// back to before within a few seconds.
func checkGoroutinesBackTo(t *testing.T, before int) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Errorf("%d goroutines before, %d after:\n%s", before, n, sessionGoroutines())
	}
}

// checkReaped fails the test unless the process is gone from /proc: reaped,
// not a zombie.
func checkReaped(t *testing.T, pid int) {
	t.Helper()
	if _, err := os.Stat("/proc/" + strconv.Itoa(pid)); err == nil {
		stat, _ := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
		t.Errorf("process %d still exists: %s", pid, stat)
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

// requireTool returns the path of an independent reader the test needs,
// from PATH or from sbin.
func requireTool(t *testing.T, tool, pkg string) string {
	t.Helper()
	bin, err := exec.LookPath(tool)
	if err != nil {
		// Outside root's PATH, a tool may still be in sbin.
		for _, p := range []string{"/usr/sbin/" + tool, "/sbin/" + tool} {
			if _, serr := os.Stat(p); serr == nil {
				return p
			}
		}
		if realVM.require {
			t.Fatalf("%s not installed (Debian package %s; make deps installs it): %v", tool, pkg, err)
		}
		t.Skipf("%s not installed (Debian package %s): %v", tool, pkg, err)
	}
	return bin
}

// requireTun skips the test when this host cannot create tap devices.
func requireTun(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no tap devices here: %v", err)
	}
	f.Close()
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

// lockedBuffer is QEMU's stderr, written by os/exec while a test may read it.
type lockedBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

func ctxTimeout(t testing.TB, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// testCtx returns a context that only guards against a hang; no test
// depends on its length.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// pendingCall starts f and returns a channel with its result.
func pendingCall(f func() error) <-chan error {
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	return ch
}

// returnsWithin runs f in a goroutine and returns its error, or fails the
// test if it takes longer than d.
func returnsWithin(t *testing.T, d time.Duration, f func() error) error {
	t.Helper()
	ch := make(chan error, 1)
	go func() { ch <- f() }()
	select {
	case err := <-ch:
		return err
	case <-time.After(d):
		t.Fatalf("call did not return within %v", d)
		return nil
	}
}

func stillPending(t *testing.T, ch <-chan error, what string) {
	t.Helper()
	select {
	case err := <-ch:
		t.Fatalf("%s returned early: %v", what, err)
	case <-time.After(50 * time.Millisecond):
	}
}

// testLog is a QMPLog that records what it is given.
type testLog struct {
	mu    sync.Mutex
	lines []string
}

func (l *testLog) V(int32) bool { return true }

func (l *testLog) add(level, f string, a ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, level+": "+fmt.Sprintf(f, a...))
}

func (l *testLog) Infof(f string, a ...interface{}) { l.add("info", f, a...) }

func (l *testLog) Warningf(f string, a ...interface{}) { l.add("warning", f, a...) }

func (l *testLog) Errorf(f string, a ...interface{}) { l.add("error", f, a...) }

func (l *testLog) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// step runs one step of a real-VM test, named in the log; the
// Instances it starts live until the test ends.
func step(t *testing.T, name string, f func()) {
	t.Helper()
	t.Logf("step: %s", name)
	f()
}

func second[T any](_ T, err error) error { return err }

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
	accel, cpu := guestAccelCPU()
	return []string{"-accel", accel, "-cpu", cpu}, realVM.accelLabel
}

// guestAccelCPU returns the probed accelerator and its CPU model.
func guestAccelCPU() (accel, cpu string) {
	realVM.accelOnce.Do(func() {
		kvm := []string{"kvm", "host,-arch-capabilities"}
		tcg := []string{"tcg", "qemu64"}
		switch forced := os.Getenv("QEMU_TEST_ACCEL"); forced {
		case "kvm":
			realVM.accelArgs, realVM.accelLabel = kvm, "kvm (forced by QEMU_TEST_ACCEL)"
		case "tcg":
			realVM.accelArgs, realVM.accelLabel = tcg, "tcg (forced by QEMU_TEST_ACCEL)"
		default:
			if err := probeKVM([]string{"-accel", kvm[0], "-cpu", kvm[1]}); err != nil {
				realVM.accelArgs, realVM.accelLabel = tcg, "tcg ("+err.Error()+")"
			} else {
				realVM.accelArgs, realVM.accelLabel = kvm, "kvm"
			}
		}
		fmt.Fprintf(os.Stderr, "real-VM tests boot the guest with %s\n", realVM.accelLabel)
	})
	return realVM.accelArgs[0], realVM.accelArgs[1]
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
	checkNotDeprecated(t, inst)
	return inst
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

// guestAsk types cmd on the test guest's console and returns what follows
// "ans=" on the line cmd prints, once cmd has ended ("TESTGUEST: exit N"),
// so that the next wait starts after it. The tty's echo of cmd starts with
// the command itself, never with "ans=".
func guestAsk(t *testing.T, inst *Instance, cmd string) string {
	t.Helper()
	con := inst.Console()
	ctx := ctxTimeout(t, time.Minute)
	fmt.Fprintln(con, cmd)
	line, err := con.WaitForRegexp(ctx, regexp.MustCompile(`^ans=`))
	if err == nil {
		_, err = con.WaitFor(ctx, "TESTGUEST: exit ")
	}
	if err != nil {
		t.Fatalf("%s: %v; console:\n%s", cmd, err, con.History())
	}
	return line[len("ans="):]
}

// waitForGuest connects to the guest's serial console socket and reads it
// until the test guest says it is ready. It returns the connection, which
// the caller closes.
func waitForGuest(consoleSocket string) (net.Conn, error) {
	conn, err := net.Dial("unix", consoleSocket)
	if err != nil {
		return nil, err
	}
	conn.SetReadDeadline(time.Now().Add(2 * time.Minute))
	sc := bufio.NewScanner(conn)
	for sc.Scan() {
		if strings.Contains(sc.Text(), guestReadyLine) {
			conn.SetReadDeadline(time.Time{})
			return conn, nil
		}
	}
	conn.Close()
	return nil, fmt.Errorf("console ended before the guest was ready: %v", sc.Err())
}

// startPausedQEMU starts QEMU with -S and no guest, with its QMP session
// negotiated; cleanup quits it. It skips the test where QEMU is absent.
func startPausedQEMU(t *testing.T) (*QMP, *Instance) {
	t.Helper()
	bin, fw := requireQEMU(t)
	params := append([]string{"-S", "-machine", "none", "-nodefaults", "-display", "none"}, fw...)
	// No guest: nothing can answer the power button, even once running.
	inst, err := StartCustomInstance(ctxTimeout(t, 30*time.Second), bin, params, nil, InstanceOptions{NoPowerdown: true})
	if err != nil {
		t.Fatal(err)
	}
	checkNotDeprecated(t, inst)
	t.Cleanup(func() {
		inst.Stop(context.Background())
		inst.Close()
	})
	return inst.QMP(), inst
}

// checkNotDeprecated fails the test, once it has ended, if inst's QEMU
// warned on its stderr that something it was given is deprecated: the
// package renders and sends nothing QEMU deprecates, on any QEMU the
// suite runs. It closes inst first, unless a cleanup registered after it
// has: QEMU's stderr is whole once QEMU has exited.
func checkNotDeprecated(t testing.TB, inst *Instance) {
	t.Cleanup(func() {
		inst.Close()
		inst.Wait(context.Background())
		for _, line := range strings.Split(inst.Stderr(), "\n") {
			if strings.Contains(strings.ToLower(line), "deprecated") {
				t.Errorf("QEMU warned: %s", line)
			}
		}
	})
}

// vmSpec is how to start a QEMU for the migration and job tests: which
// binary, firmware and machine type.
type vmSpec struct {
	bin      string
	firmware []string // directories, for Config.FirmwareDirs
	env      []string
	machine  string
}

// testVM is the QEMU under test, with a q35 machine.
func testVM(t testing.TB) vmSpec {
	t.Helper()
	requireGuest(t)
	v := vmSpec{bin: realVM.bin, machine: "q35"}
	for i := 1; i < len(realVM.firmware); i += 2 {
		v.firmware = append(v.firmware, realVM.firmware[i])
	}
	return v
}

// start starts the test guest through StartInstance, and waits for its
// ready line unless incoming is set (-incoming), in which case QEMU waits
// for a migration; extra are added to the command line. Cleanup closes
// it.
func (v vmSpec) start(t testing.TB, incoming string, extra ...string) *Instance {
	t.Helper()
	return v.startWith(t, incoming, InstanceOptions{}, extra...)
}

// startWith is start with options; the console is always the serial
// port.
func (v vmSpec) startWith(t testing.TB, incoming string, opts InstanceOptions, extra ...string) *Instance {
	t.Helper()
	accel, _ := guestAccel()
	config := Config{
		Path:         v.bin,
		Machine:      Machine{Type: v.machine},
		Memory:       Memory{Size: "256M"},
		Knobs:        Knobs{NoDefaults: true, NoUserConfig: true},
		Kernel:       Kernel{Path: realVM.kernel, InitrdPath: realVM.initrd, Params: guestKernelParams},
		Incoming:     incoming,
		FirmwareDirs: v.firmware,
		Env:          v.env,
		ExtraParams:  append(append([]string{"-display", "none"}, accel...), extra...),
	}
	opts.Console = ConsoleSerial
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	inst, err := StartInstance(ctx, config, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Close() })
	checkNotDeprecated(t, inst)
	if incoming == "" {
		if _, err := inst.Console().WaitFor(ctx, guestReadyLine); err != nil {
			t.Fatalf("%v; console:\n%s\nQEMU's stderr: %s", err, inst.Console().History(), inst.Stderr())
		}
	}
	return inst
}

var heartbeatLine = regexp.MustCompile(`^HB (\d+)$`)

// startHeartbeat makes the guest write "HB N" on its console once a
// second, N counting from 0, and waits for the first beats.
func startHeartbeat(t *testing.T, inst *Instance) {
	t.Helper()
	fmt.Fprintln(inst.Console(), `(i=0; while :; do echo HB $i; i=$((i+1)); sleep 1; done) &`)
	if _, err := inst.Console().WaitFor(ctxTimeout(t, time.Minute), "HB 1"); err != nil {
		t.Fatalf("%v; console:\n%s", err, inst.Console().History())
	}
}

// lastBeat returns the last heartbeat in the console's history, or -1.
func lastBeat(inst *Instance) int {
	last := -1
	for _, line := range strings.Split(string(inst.Console().History()), "\n") {
		if m := heartbeatLine.FindStringSubmatch(strings.TrimRight(line, "\r")); m != nil {
			last, _ = strconv.Atoi(m[1])
		}
	}
	return last
}

// checkBeatsOn checks that the guest's heartbeat, last seen at beat,
// goes on in inst's console from where it was. On a destination
// (arrived), the console must show no older beat and no boot: the guest
// carried on rather than start again.
func checkBeatsOn(t *testing.T, inst *Instance, beat int, arrived bool) {
	t.Helper()
	con := inst.Console()
	ctx := ctxTimeout(t, time.Minute)
	n := -1
	for n <= beat {
		line, err := con.WaitForRegexp(ctx, heartbeatLine)
		if err != nil {
			t.Fatalf("no heartbeat after %d: %v; console:\n%s", beat, err, con.History())
		}
		n, _ = strconv.Atoi(heartbeatLine.FindStringSubmatch(line)[1])
		if arrived && n <= beat {
			t.Errorf("the destination shows beat %d, from before the last on the source (%d)", n, beat)
		}
	}
	if n > beat+5 {
		t.Errorf("first heartbeat after %d is %d", beat, n)
	}
	if next, err := con.WaitFor(ctx, fmt.Sprintf("HB %d", n+1)); err != nil || next != fmt.Sprintf("HB %d", n+1) {
		t.Errorf("the heartbeat stopped at %d: %q, %v", n, next, err)
	}
	if arrived && strings.Contains(string(con.History()), guestReadyLine) {
		t.Errorf("the guest booted again:\n%s", con.History())
	}
}

func checkStatus(t *testing.T, inst *Instance, want string) {
	t.Helper()
	st, err := inst.QMP().ExecuteQueryStatus(ctxTimeout(t, 10*time.Second))
	if err != nil || st.Status != want {
		t.Errorf("status %+v, %v; want %s", st, err, want)
	}
}

// guestDisk is a qcow2 disk of the test guest, as a -blockdev node and a
// virtio-blk device with a serial the guest finds it by.
type guestDisk struct {
	path, node, serial string
	dev                string // in the guest, once found: /dev/vdb, say
}

// newDisk makes a 32 MiB qcow2 image in dir with an optional backing
// file, and returns it with its command-line arguments.
func newDisk(t *testing.T, dir, name string) (guestDisk, []string) {
	t.Helper()
	d := guestDisk{path: filepath.Join(dir, name+".qcow2"), node: name, serial: "s-" + name}
	qemuImg(t, "create", "-q", "-f", "qcow2", d.path, "32M")
	return d, []string{
		"-blockdev", "driver=qcow2,node-name=" + name + ",file.driver=file,file.filename=" + d.path,
		"-device", "virtio-blk-pci,drive=" + name + ",id=vd-" + name + ",serial=" + d.serial,
	}
}

func qemuImg(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command("qemu-img", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("qemu-img %q: %v\n%s", args, err, out)
	}
	return string(out)
}

// findDisk finds the guest's device of d by its serial.
func findDisk(t *testing.T, inst *Instance, d *guestDisk) {
	t.Helper()
	name := guestAsk(t, inst, `for b in /sys/block/vd*; do [ "$(cat $b/serial)" = `+d.serial+` ] && echo ans=${b##*/}; done; true`)
	d.dev = "/dev/" + name
}

// pattern is 1 MiB of a line repeated, as the guest writes it with yes
// and head, and its SHA-256.
func pattern(word string) (data []byte, sum string) {
	data = bytes.Repeat([]byte(word+"\n"), 1<<20/(len(word)+1)+1)[:1<<20]
	h := sha256.Sum256(data)
	return data, hex.EncodeToString(h[:])
}

// guestWrite makes the guest write word's pattern at MiB offset off of
// its disk, through to the disk.
func guestWrite(t *testing.T, inst *Instance, d guestDisk, off int, word string) {
	t.Helper()
	guestAsk(t, inst, fmt.Sprintf("yes %s | head -c 1048576 | dd of=%s bs=1M seek=%d conv=fsync 2>/dev/null; echo ans=$?", word, d.dev, off))
}

// guestRead returns the SHA-256 of MiB off of the guest's disk, read
// from the disk rather than the guest's page cache.
func guestRead(t *testing.T, inst *Instance, d guestDisk, off int) string {
	t.Helper()
	return guestAsk(t, inst, fmt.Sprintf("echo 3 > /proc/sys/vm/drop_caches; echo ans=$(dd if=%s bs=1M skip=%d count=1 2>/dev/null | sha256sum | cut -c1-64)", d.dev, off))
}
