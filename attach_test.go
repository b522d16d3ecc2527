package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// startHelper, in the environment of this test binary, makes it start a
// paused QEMU as an Instance and sleep: a stand-in for an orchestrator,
// which the tests kill with SIGKILL. Its value is a directory for the pid
// file and the QMP socket, then ",keep" for InstanceOptions.KeepRunning.
const startHelper = "QEMU_TEST_START_HELPER"

func startAndSleep(spec string) {
	dir, keep := strings.CutSuffix(spec, ",keep")
	params := append([]string{"-S", "-machine", "none", "-nodefaults", "-display", "none"}, realVM.firmware...)
	if realVM.bin == "" {
		findRealVM()
		params = append(params, realVM.firmware...)
	}
	inst, err := StartCustomInstance(context.Background(), realVM.bin, params, nil, InstanceOptions{
		KeepRunning: keep,
		PIDFile:     filepath.Join(dir, "qemu.pid"),
		QMPSocket:   filepath.Join(dir, "qmp.sock"),
	})
	if err != nil {
		fmt.Println("error:", err)
		os.Exit(2)
	}
	fmt.Println("started", inst.Pid())
	time.Sleep(time.Hour)
	os.Exit(0)
}

// runOrchestrator starts this binary as startHelper and returns it with the
// pid of the QEMU it started.
func runOrchestrator(t *testing.T, dir string, keep bool) (*exec.Cmd, int) {
	t.Helper()
	requireQEMU(t)
	spec := dir
	if keep {
		spec += ",keep"
	}
	helper := exec.Command(os.Args[0], "-test.run=^$")
	helper.Env = append(os.Environ(), startHelper+"="+spec)
	out, err := helper.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		helper.Process.Kill()
		helper.Wait()
	})
	line, _ := bufio.NewReader(out).ReadString('\n')
	pid, err := strconv.Atoi(strings.TrimPrefix(strings.TrimSpace(line), "started "))
	if err != nil {
		t.Fatalf("the orchestrator said %q", line)
	}
	return helper, pid
}

// By default QEMU dies with the process that started it, even when that
// process is killed with SIGKILL.
func TestInstanceDiesWithItsOrchestrator(t *testing.T) {
	dir := shortTempDir(t)
	helper, pid := runOrchestrator(t, dir, false)
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("QEMU %d not running: %v", pid, err)
	}
	helper.Process.Signal(syscall.SIGKILL)
	helper.Wait()
	waitGone(t, pid)
}

// With KeepRunning, QEMU outlives its orchestrator's SIGKILL, and a new
// process attaches to it by its pid file and QMP socket, with the same
// QMP, Stop and Wait.
func TestInstanceKeepRunningAndAttach(t *testing.T) {
	dir := shortTempDir(t)
	helper, pid := runOrchestrator(t, dir, true)
	helper.Process.Signal(syscall.SIGKILL)
	helper.Wait()
	defer syscall.Kill(pid, syscall.SIGKILL) // should the test fail half-way
	time.Sleep(200 * time.Millisecond)
	if err := syscall.Kill(pid, 0); err != nil {
		t.Fatalf("QEMU %d did not outlive its orchestrator: %v", pid, err)
	}

	ctx := ctxTimeout(t, 30*time.Second)
	pidFile, sock := filepath.Join(dir, "qemu.pid"), filepath.Join(dir, "qmp.sock")
	if _, err := AttachInstance(ctx, pidFile, filepath.Join(dir, "other.sock"), InstanceOptions{}); err == nil ||
		!strings.Contains(err.Error(), "does not serve") {
		t.Errorf("attach with the wrong socket: %v", err)
	}
	events := make(chan QMPEvent, 16)
	inst, err := AttachInstance(ctx, pidFile, sock, InstanceOptions{EventCh: events})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	if inst.Pid() != pid {
		t.Errorf("attached to pid %d, want %d", inst.Pid(), pid)
	}
	if !strings.Contains(inst.CommandLine(), sock) {
		t.Errorf("command line %q", inst.CommandLine())
	}
	var status struct{ Status string }
	if err := inst.QMP().ExecuteCommand(ctx, "query-status", nil, &status); err != nil || status.Status != "prelaunch" {
		t.Fatalf("query-status = %+v, %v", status, err)
	}
	r, err := inst.StopWithReport(ctx)
	if err != nil || r.Step != StopQuit {
		t.Fatalf("Stop = %v, %v; want quit", r, err)
	}
	if state, err := inst.Wait(ctx); err != nil || state != nil {
		t.Errorf("Wait = %v, %v; want nil, nil for a QEMU that is not a child", state, err)
	}
	waitGone(t, pid)
	if ev, ok := <-events; !ok || ev.Name != "SHUTDOWN" {
		t.Errorf("first event %+v, %v", ev, ok)
	}
	if _, err := AttachInstance(ctx, pidFile, sock, InstanceOptions{}); err == nil {
		t.Error("attached to a QEMU that has exited")
	}
	if _, err := AttachInstance(ctx, filepath.Join(dir, "none.pid"), sock, InstanceOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("attach with no pid file: %v", err)
	}
}

// Close of an attached QEMU kills it through its pidfd.
func TestAttachedInstanceClose(t *testing.T) {
	dir := shortTempDir(t)
	helper, pid := runOrchestrator(t, dir, true)
	helper.Process.Signal(syscall.SIGKILL)
	helper.Wait()
	defer syscall.Kill(pid, syscall.SIGKILL)
	inst, err := AttachInstance(ctxTimeout(t, 30*time.Second), filepath.Join(dir, "qemu.pid"), filepath.Join(dir, "qmp.sock"), InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := returnsWithin(t, 10*time.Second, inst.Close); err != nil {
		t.Fatal(err)
	}
	waitGone(t, pid)
	if step, err := inst.Stop(context.Background()); step != StopExited || err != nil {
		t.Errorf("Stop after Close = %v, %v", step, err)
	}
	checkNoGoroutines(t)
}
