package qemu

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"
	"syscall"
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
