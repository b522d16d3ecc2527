package qemu

import (
	"context"
	"fmt"
	"time"
)

// GuestCommand is a program for GuestAgent.Exec to run in the guest.
type GuestCommand struct {
	// Path is the program; the guest's PATH finds it if it has no slash.
	Path string
	// Args are its arguments, after the program's name.
	Args []string
	// Env, if set, is its whole environment, as KEY=VALUE.
	Env []string
	// Input is fed to its standard input, which is then closed.
	Input []byte
}

// GuestExecResult is how a guest command ended: its exit status, or the
// signal that killed it.
type GuestExecResult struct {
	// ExitCode is the command's exit status, or -1 when a signal killed
	// it (as os.ProcessState.ExitCode says), so that 0 always means
	// success.
	ExitCode int
	// Signal is the signal that killed the command, or 0.
	Signal int
	// Stdout and Stderr are what it wrote; the agent keeps at most
	// 16 MiB of each, and the Truncated flags say it dropped the rest.
	Stdout, Stderr                   []byte
	StdoutTruncated, StderrTruncated bool
}

// guestExecArgs are guest-exec's arguments.
type guestExecArgs struct {
	Path          string   `json:"path"`
	Args          []string `json:"arg,omitempty"`
	Env           []string `json:"env,omitempty"`
	Input         []byte   `json:"input-data,omitempty"` // base64, as []byte encodes
	CaptureOutput bool     `json:"capture-output"`
}

// GuestExecStatus is the reply of guest-exec-status.
type GuestExecStatus struct {
	Exited          bool   `json:"exited"`
	ExitCode        *int   `json:"exitcode"`
	Signal          *int   `json:"signal"`
	Stdout          []byte `json:"out-data"` // base64 on the wire
	Stderr          []byte `json:"err-data"`
	StdoutTruncated bool   `json:"out-truncated"`
	StderrTruncated bool   `json:"err-truncated"`
}

// ExecStart runs guest-exec: the command starts in the guest, its output
// captured, and ExecStart returns its pid for ExecStatus.
func (a *GuestAgent) ExecStart(ctx context.Context, cmd GuestCommand) (int, error) {
	r, err := callFor[struct {
		PID int `json:"pid"`
	}](ctx, a, "guest-exec", cmd.Path, guestExecArgs{cmd.Path, cmd.Args, cmd.Env, cmd.Input, true})
	return r.PID, err
}

// ExecStatus runs guest-exec-status for a command ExecStart started. Once
// it reports the command exited, the agent forgets the pid.
func (a *GuestAgent) ExecStatus(ctx context.Context, pid int) (GuestExecStatus, error) {
	return callFor[GuestExecStatus](ctx, a, "guest-exec-status", "pid "+fmt.Sprint(pid), struct {
		PID int `json:"pid"`
	}{pid})
}

// Poll intervals of Exec: a short command is seen to end within a few
// milliseconds, and a long one costs the agent a status call a quarter
// second.
const (
	execPollFirst = 2 * time.Millisecond
	execPollMax   = 250 * time.Millisecond
)

// Exec runs a command in the guest to its end (guest-exec, then
// guest-exec-status until it has exited) and returns how it ended. A
// non-zero exit is not an error. When ctx ends first, Exec returns ctx's
// error and the command runs on in the guest.
func (a *GuestAgent) Exec(ctx context.Context, cmd GuestCommand) (GuestExecResult, error) {
	// The whole run, waits included: a port closed between two status
	// calls ends it too.
	gctx, release := a.guard(ctx)
	defer release()
	pid, err := a.ExecStart(gctx, cmd)
	if portClosed(ctx, gctx) {
		return GuestExecResult{}, fmt.Errorf("qga: exec %s: %w", cmd.Path, ErrAgentPortClosed)
	}
	if err != nil {
		return GuestExecResult{}, err
	}
	ended := func(err error) (GuestExecResult, error) {
		if portClosed(ctx, gctx) {
			err = ErrAgentPortClosed
		}
		return GuestExecResult{}, fmt.Errorf("qga: exec %s (pid %d): %w", cmd.Path, pid, err)
	}
	wait := time.NewTimer(execPollFirst)
	defer wait.Stop()
	for interval := execPollFirst; ; interval = min(2*interval, execPollMax) {
		select {
		case <-wait.C:
		case <-gctx.Done():
			return ended(contextError(gctx))
		}
		st, err := a.ExecStatus(gctx, pid)
		if portClosed(ctx, gctx) {
			return ended(err)
		}
		if err != nil {
			return GuestExecResult{}, err
		}
		if st.Exited {
			r := GuestExecResult{Stdout: st.Stdout, Stderr: st.Stderr,
				StdoutTruncated: st.StdoutTruncated, StderrTruncated: st.StderrTruncated}
			if st.Signal != nil {
				r.Signal, r.ExitCode = *st.Signal, -1
			} else if st.ExitCode != nil {
				r.ExitCode = *st.ExitCode
			}
			return r, nil
		}
		wait.Reset(interval)
	}
}
