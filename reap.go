package qemu

import (
	"errors"
	"os"
	"syscall"
	"time"
	"unsafe"
)

// Learning of QEMU's exit and reaping it exactly once: waitid with WNOWAIT
// for a child, so what it left in its group can be killed while its pid
// still names the group, and a pidfd for a QEMU this process did not
// start.

// reap waits for QEMU to exit and reaps it, exactly once, then waits for
// the end of its stderr.
func (inst *Instance) reap() {
	pid := inst.cmd.Process.Pid
	// Until QEMU is reaped, its pid, which is its group's id, cannot be
	// reused: learn of the exit without reaping, so that whatever QEMU
	// started and left in its group can be killed without any risk of
	// signalling another group.
	waited := waitExitNoReap(pid)
	inst.sigMu.Lock()
	if waited {
		// Only for a zombie we know of: if waitid failed, the pid may
		// already be reaped and reused.
		syscall.Kill(-pid, syscall.SIGKILL)
	}
	err := inst.cmd.Wait()
	inst.state, inst.waitErr = inst.cmd.ProcessState, err
	close(inst.exited)
	inst.sigMu.Unlock()
	inst.log.Infof("qemu: pid %d ended: %s", pid, inst.state)
	select {
	case <-inst.stderrRead:
	case <-time.After(stderrGrace):
		// Something QEMU started still holds stderr open; what QEMU
		// wrote is in the pipe by now.
		inst.stderrR.SetReadDeadline(time.Now())
		<-inst.stderrRead
	}
	close(inst.drained)
}

// waitExitNoReap waits until the child pid has exited, leaving it a
// zombie for cmd.Wait to reap, and reports whether it learnt so; on any
// error it leaves cmd.Wait to report. Until QEMU is reaped its pid cannot
// be reused, so the pidfd opened now names QEMU.
func waitExitNoReap(pid int) bool {
	if pidfd, err := pidfdOpen(pid); err == nil && waitPidfd(pidfd) == nil {
		return true
	}
	// A kernel without pidfds (before 5.3), or a pidfd the poller would
	// not take, costs a thread.
	var info siginfo
	for {
		err := waitid(pid, &info, syscall.WEXITED|wNoWait)
		if err != syscall.EINTR {
			return err == nil
		}
	}
}

// waitPidfd waits until the process pidfd names has exited, and closes
// pidfd. It waits on the runtime's poller, which parks the goroutine: a
// blocking waitid or poll holds a thread for each QEMU (400 of them in
// BenchmarkManyInstances, with a stack of their own each).
func waitPidfd(pidfd int) error {
	// Non-blocking, so that os.NewFile puts it on the poller; nothing
	// else blocks on a pidfd.
	if err := syscall.SetNonblock(pidfd, true); err != nil {
		syscall.Close(pidfd)
		return os.NewSyscallError("fcntl", err)
	}
	f := os.NewFile(uintptr(pidfd), "pidfd")
	defer f.Close()
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	// A pidfd reads as ready once its process has exited.
	return rc.Read(func(fd uintptr) bool { return pidfdExited(int(fd)) })
}

// dupPidfd returns a descriptor of its own on the process pidfd names,
// which waitPidfd can own.
func dupPidfd(pidfd int) (int, error) {
	syscall.ForkLock.RLock()
	defer syscall.ForkLock.RUnlock()
	fd, err := syscall.Dup(pidfd)
	if err != nil {
		return -1, os.NewSyscallError("dup", err)
	}
	syscall.CloseOnExec(fd)
	return fd, nil
}

// pidfdExited reports whether the process pidfd names has exited, without
// waiting.
func pidfdExited(pidfd int) bool {
	pfd := struct {
		fd      int32
		events  int16
		revents int16
	}{fd: int32(pidfd), events: 0x1} // POLLIN: the process has exited
	var ts syscall.Timespec // zero: do not wait
	n, _, e := syscall.Syscall6(syscall.SYS_PPOLL, uintptr(unsafe.Pointer(&pfd)), 1, uintptr(unsafe.Pointer(&ts)), 0, 0, 0)
	return e == 0 && n == 1 && pfd.revents != 0
}

// exitedNoReap reports whether the child pid has exited, without reaping it.
func exitedNoReap(pid int) bool {
	var info siginfo
	err := waitid(pid, &info, syscall.WEXITED|syscall.WNOHANG|wNoWait)
	return err == nil && info.pid != 0
}

// wNoWait is Linux's WNOWAIT, which package syscall lacks: waitid leaves
// the child waitable.
const wNoWait = 0x01000000

// siginfo is the start of Linux's siginfo_t as waitid fills it for a
// child (64-bit layout), padded to the kernel's 128 bytes.
type siginfo struct {
	signo, errno, code, _ int32
	pid                   int32
	uid                   uint32
	status                int32
	_                     [100]byte
}

func waitid(pid int, info *siginfo, options int) error {
	const pPID = 1 // P_PID: wait for the child whose pid is given
	_, _, e := syscall.Syscall6(syscall.SYS_WAITID, pPID, uintptr(pid), uintptr(unsafe.Pointer(info)), uintptr(options), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// watchExit is an attached Instance's reap: it waits until the pidfd says
// QEMU has exited.
func (inst *Instance) watchExit() {
	fd, err := dupPidfd(inst.pidfd)
	if err == nil {
		err = waitPidfd(fd)
	}
	if err != nil {
		inst.log.Errorf("qemu: attached pid %d: waiting for its exit: %v", inst.pid, err)
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
