package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// Launching QEMU the seed package's way: a process run to its end (with
// -daemonize, until the VM is up), its stderr kept for the error.

// LaunchQemu starts QEMU with the command line config describes, passing
// it the files config's devices registered, and waits for it as
// LaunchCustomQemu does, under config.Ctx and with config.Path.
//
// Devices, QMP sockets and an RTC that are not Valid are left out, with a
// warning to logger (which may be nil). A newline or NUL in any other
// field (Name, UUID, Machine, CPUModel, Memory, GlobalParam, VGA, Kernel)
// fails the launch before QEMU starts, since leaving such a part out would
// start another VM than the one asked for. The caller's Config is not
// changed, so launching it again gives the same command line.
//
// It returns ("", nil) when QEMU succeeds, and QEMU's stderr with an error
// otherwise.
func LaunchQemu(config Config, logger QMPLog) (string, error) {
	if err := checkConfig(&config); err != nil {
		return "", err
	}
	params, fds := renderConfig(config, logger)
	return launch(config.Ctx, config.Path, params, fds, config.Env, logger)
}

// defaultQEMU is the binary LaunchCustomQemu runs when given no path.
const defaultQEMU = "qemu-system-x86_64"

// stderrGrace is how long LaunchCustomQemu waits, once QEMU has exited,
// for the end of its stderr. It only matters when a process left behind
// still holds stderr open (a wrapper script's background child, a daemon
// that did not redirect it); QEMU's own output is in the pipe by then.
const stderrGrace = 200 * time.Millisecond

// LaunchCustomQemu runs the QEMU binary at path (qemu-system-x86_64 from
// PATH when path is "") with params, and waits for it to exit. QEMU
// inherits fds, fds[i] as its file descriptor 3+i. With -daemonize, QEMU
// exits once the VM is up, leaving its daemon running the VM, so
// LaunchCustomQemu returns then.
//
// It returns ("", nil) when QEMU exits with status 0, logging as a warning
// anything QEMU wrote to stderr (deprecation warnings, say). Otherwise it
// returns QEMU's stderr (its last MiB at most) and an error that wraps the
// cause and quotes QEMU's last line.
//
// If ctx is done before QEMU exits, QEMU is killed and reaped and the
// error wraps ctx.Err(). With -daemonize that kills the launching
// process; QEMU's daemon exits by itself once it has finished starting and
// finds no parent to report to. A nil ctx means context.Background(), and
// logger may be nil.
func LaunchCustomQemu(ctx context.Context, path string, params []string, fds []*os.File, logger QMPLog) (string, error) {
	return launch(ctx, path, params, fds, nil, logger)
}

// launch is LaunchCustomQemu with env added to QEMU's environment.
func launch(ctx context.Context, path string, params []string, fds []*os.File, env []string, logger QMPLog) (string, error) {
	log := orNullLogger(logger)
	if ctx == nil {
		ctx = context.Background()
	}
	if path == "" {
		path = defaultQEMU
	}
	for i, f := range fds {
		if f == nil {
			return "", fmt.Errorf("qemu: launch %s: fds[%d] is nil", path, i)
		}
	}
	cmd := exec.CommandContext(ctx, path, params...)
	cmd.ExtraFiles = fds
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	stderr := newTailBuffer(maxStderr)
	cmd.Stderr = stderr
	cmd.WaitDelay = stderrGrace
	log.Infof("qemu: launching %s %q", path, params)

	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) {
		// QEMU succeeded; something it left running holds stderr.
		err = nil
	}
	output := stderr.String()
	switch {
	case err == nil:
		if output != "" {
			log.Warningf("qemu: %s wrote to stderr: %s", path, strings.TrimSpace(output))
		}
		return "", nil
	case ctx.Err() != nil && errors.Is(err, ctx.Err()):
		// The context was done before QEMU started.
		return output, fmt.Errorf("qemu: launch %s: %w", path, contextError(ctx))
	case ctx.Err() != nil:
		return output, fmt.Errorf("qemu: launch %s: stopped: %w (%w)", path, contextError(ctx), err)
	case errors.Is(err, exec.ErrNotFound) && path == defaultQEMU:
		return output, fmt.Errorf("qemu: launch: %w (Debian and Ubuntu ship it in qemu-system-x86)", err)
	case cmd.ProcessState == nil:
		return output, fmt.Errorf("qemu: launch %s: %w", path, err)
	}
	if line := lastLine(output); line != "" {
		return output, fmt.Errorf("qemu: launch %s: %w: %s", path, err, line)
	}
	return output, fmt.Errorf("qemu: launch %s: %w", path, err)
}

// lastLine returns the last non-empty line of s, which is where QEMU puts
// the error it exits with, shortened to a size fit for an error message.
func lastLine(s string) string {
	s = strings.TrimRight(s, "\r\n\t ")
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	const max = 512
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}
