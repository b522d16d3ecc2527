package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
	"unsafe"
)

// AttachInstance returns a handle on a QEMU that this process did not
// start, or started before a restart: one started with
// InstanceOptions.KeepRunning, PIDFile and QMPSocket, found by its pid
// file and the QMP socket it serves. The handle has an Instance's QMP,
// Stop, Close, Wait and Done; QEMU is not a child of this process, so Wait
// learns of the exit through the pid (a pidfd) and cannot know the exit
// status: it returns a nil *os.ProcessState. Signals go to QEMU's process
// alone, through its pidfd, so a pid reused by another process is never
// signalled. There is no stderr and no console. opts gives the Stop
// bounds, Logger and EventCh; the options about starting are ignored.
//
// The pid must belong to a running process whose command line holds
// qmpSocket, so that a stale pid file is not taken for the VM.
func AttachInstance(ctx context.Context, pidFile, qmpSocket string, opts InstanceOptions) (*Instance, error) {
	ctx = orBackground(ctx)
	inst, err := attachProcess(pidFile, qmpSocket, opts)
	if err != nil {
		return nil, abandonEvents(opts, err)
	}
	q, version, err := QMPStart(ctx, qmpSocket, QMPConfig{Logger: opts.Logger, EventCh: opts.EventCh}, nil)
	if err != nil {
		// A failed QMPStart leaves EventCh open.
		abandonEvents(opts, nil)
	} else {
		inst.watchShutdown(q) // before the first event can come
		if err = q.ExecuteQMPCapabilities(ctx); err != nil {
			q.Shutdown() // which closes EventCh
		}
	}
	if err != nil {
		syscall.Close(inst.pidfd)
		return nil, fmt.Errorf("qemu: attach to pid %d: %w", inst.pid, err)
	}
	inst.qmp, inst.version = q, *version
	go inst.watchExit()
	return inst, nil
}

// attachProcess finds QEMU's process and opens a pidfd on it.
func attachProcess(pidFile, qmpSocket string, opts InstanceOptions) (*Instance, error) {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return nil, fmt.Errorf("qemu: attach: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return nil, fmt.Errorf("qemu: attach: %s holds %q, not a pid", pidFile, bytes.TrimSpace(b))
	}
	pidfd, err := pidfdOpen(pid)
	if err != nil {
		return nil, fmt.Errorf("qemu: attach to pid %d from %s: %w", pid, pidFile, err)
	}
	// Read after the pidfd is open: if the pid was reused before, the
	// command line is the other process's and the check fails; after, the
	// pidfd keeps naming the process checked.
	cmdline, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cmdline")
	args := strings.Split(strings.TrimSuffix(string(cmdline), "\x00"), "\x00")
	if err != nil || !bytes.Contains(cmdline, []byte(qmpSocket)) {
		syscall.Close(pidfd)
		return nil, fmt.Errorf("qemu: attach to pid %d from %s: its command line does not serve %s: %q", pid, pidFile, qmpSocket, args)
	}
	inst := newInstance(args, opts)
	inst.pid, inst.pidfd = pid, pidfd
	return inst, nil
}

// watchExit is an attached Instance's reap: it waits until the pidfd says
// QEMU has exited.
func (inst *Instance) watchExit() {
	pfd := struct {
		fd      int32
		events  int16
		revents int16
	}{fd: int32(inst.pidfd), events: 0x1} // POLLIN: the process has exited
	for {
		_, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, 0, 0, 0, 0)
		if e != syscall.EINTR {
			break
		}
	}
	inst.sigMu.Lock()
	syscall.Close(inst.pidfd)
	inst.pidfd = -1
	close(inst.exited)
	inst.sigMu.Unlock()
	inst.log.Infof("qemu: attached pid %d ended", inst.pid)
	close(inst.drained)
}

func pidfdOpen(pid int) (int, error) {
	const sysPidfdOpen = 434 // the same number on every Linux architecture
	fd, _, e := syscall.Syscall(sysPidfdOpen, uintptr(pid), 0, 0)
	if e != 0 {
		return -1, os.NewSyscallError("pidfd_open", e)
	}
	syscall.CloseOnExec(int(fd))
	return int(fd), nil
}

// signalPidfd sends sig to the process pidfd names.
func signalPidfd(pidfd int, sig syscall.Signal) error {
	const sysPidfdSendSignal = 424 // the same number on every Linux architecture
	if pidfd < 0 {
		return errors.New("no pidfd")
	}
	if _, _, e := syscall.Syscall6(sysPidfdSendSignal, uintptr(pidfd), uintptr(sig), 0, 0, 0, 0); e != 0 {
		return os.NewSyscallError("pidfd_send_signal", e)
	}
	return nil
}
