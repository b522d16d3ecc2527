package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"
)

// startAgentGuest boots the test guest with the guest agent's channel and
// returns once the guest is ready; the agent starts at boot unless
// kernelParams has testguest.agent=off.
func startAgentGuest(t *testing.T, kernelParams string, extra ...string) (*Instance, *GuestAgent) {
	t.Helper()
	inst := startGuestInstance(t, kernelParams, InstanceOptions{GuestAgent: true}, extra...)
	a := inst.GuestAgent()
	if a == nil {
		t.Fatal("Instance.GuestAgent is nil with InstanceOptions.GuestAgent set")
	}
	return inst, a
}

func TestGuestAgentRealGuest(t *testing.T) {
	requireGuest(t)
	disk := filepath.Join(t.TempDir(), "freeze.img")
	if err := os.WriteFile(disk, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(disk, 16<<20); err != nil {
		t.Fatal(err)
	}
	inst, a := startAgentGuest(t, "",
		"-drive", "file="+disk+",if=virtio,format=raw",
		"-netdev", "user,id=n0", "-device", "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56")
	ctx := ctxTimeout(t, 2*time.Minute)

	t.Run("ping", func(t *testing.T) {
		if err := a.Ping(ctx); err != nil {
			t.Fatalf("%v; console:\n%s", err, inst.Console().History())
		}
	})
	t.Run("info", func(t *testing.T) {
		info, err := a.Info(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !strings.HasPrefix(info.Version, "7.2") {
			t.Errorf("version %q, want Debian 12's qemu-ga 7.2", info.Version)
		}
		found := map[string]bool{}
		for _, c := range info.SupportedCommands {
			found[c.Name] = c.Enabled
			if c.Name == "guest-shutdown" && c.SuccessResponse {
				t.Error("guest-shutdown listed with a success response")
			}
		}
		for _, name := range []string{"guest-exec", "guest-file-open", "guest-fsfreeze-freeze", "guest-ssh-add-authorized-keys"} {
			if !found[name] {
				t.Errorf("%s not listed as enabled in %d commands", name, len(info.SupportedCommands))
			}
		}
	})
	t.Run("osinfo", func(t *testing.T) {
		osi, err := a.OSInfo(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// From the guest's /etc/os-release and uname.
		if osi.ID != "testguest" || osi.PrettyName != "Test guest (busybox)" || osi.Machine != "x86_64" ||
			!strings.HasSuffix(osi.KernelRelease, "-amd64") {
			t.Errorf("osinfo %+v", osi)
		}
	})
	t.Run("host name", func(t *testing.T) {
		if name, err := a.HostName(ctx); err != nil || name != "testguest" {
			t.Errorf("host name %q, %v; want testguest", name, err)
		}
	})
	t.Run("interfaces", func(t *testing.T) {
		guestAsk(t, inst, "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && echo ans=up")
		ifaces, err := a.NetworkInterfaces(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, i := range ifaces {
			for _, ip := range i.IPAddresses {
				got = append(got, fmt.Sprintf("%s %s %s/%d", i.Name, i.HardwareAddress, ip.Address, ip.Prefix))
			}
		}
		want := "eth0 52:54:00:12:34:56 10.0.2.15/24"
		if !strings.Contains(strings.Join(got, "\n"), want) {
			t.Errorf("interfaces:\n%s\nwant a line %q", strings.Join(got, "\n"), want)
		}
	})
	t.Run("time", func(t *testing.T) {
		gt, err := a.Time(ctx)
		if err != nil {
			t.Fatal(err)
		}
		// The guest's clock comes from the RTC, which QEMU sets from the
		// host's: nanoseconds read as seconds, or the reverse, would be
		// decades away.
		if d := time.Since(gt); d < -time.Hour || d > time.Hour {
			t.Errorf("guest time %v, host time %v", gt, time.Now())
		}
		want := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
		if err := a.SetTime(ctx, want); err != nil {
			t.Fatal(err)
		}
		got := guestAsk(t, inst, "echo ans=$(date -u +%Y-%m-%dT%H:%M)")
		if got != "2030-01-02T03:04" {
			t.Errorf("guest date after SetTime(%v): %s", want, got)
		}
		if err := a.SetTime(ctx, time.Now()); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("exec", func(t *testing.T) { testGuestExec(t, ctx, a) })
	t.Run("files", func(t *testing.T) { testGuestFiles(t, ctx, a) })
	t.Run("ssh keys", func(t *testing.T) {
		key := "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOu0Ju3KMEpSCCqItrw9PTLUCmhrsBB5zL5V6mKPT2dT test@host"
		if err := a.AddAuthorizedKeys(ctx, "root", []string{key}, false); err != nil {
			t.Fatal(err)
		}
		keys := func() string {
			r, err := a.Exec(ctx, GuestCommand{Path: "/bin/cat", Args: []string{"/root/.ssh/authorized_keys"}})
			if err != nil {
				t.Fatal(err)
			}
			return string(r.Stdout)
		}
		if got := keys(); !strings.Contains(got, key) {
			t.Errorf("authorized_keys after add: %q", got)
		}
		if err := a.RemoveAuthorizedKeys(ctx, "root", []string{key}); err != nil {
			t.Fatal(err)
		}
		if got := keys(); strings.Contains(got, key) {
			t.Errorf("authorized_keys after remove: %q", got)
		}
		if err := a.AddAuthorizedKeys(ctx, "nobody-here", []string{key}, false); err == nil {
			t.Error("keys added for a user the guest does not have")
		}
	})
	t.Run("fsfreeze", func(t *testing.T) { testGuestFreeze(t, ctx, inst, a) })
	t.Run("unavailable command", func(t *testing.T) {
		// guest-get-devices is listed, but disabled: Windows only.
		err := a.call(ctx, "guest-get-devices", "", nil, nil)
		if !errors.Is(err, ErrAgentCommandUnavailable) || !strings.Contains(err.Error(), "disabled") {
			t.Errorf("guest-get-devices: %v, want ErrAgentCommandUnavailable saying disabled", err)
		}
		err = a.call(ctx, "guest-no-such-command", "", nil, nil)
		if !errors.Is(err, ErrAgentCommandUnavailable) || !strings.Contains(err.Error(), "has no guest-no-such-command") {
			t.Errorf("unknown command: %v", err)
		}
		var qerr *QMPError
		if err := a.Execute(ctx, "guest-no-such-command", nil, nil); !errors.As(err, &qerr) || qerr.Class != "CommandNotFound" {
			t.Errorf("Execute of an unknown command: %v, want the agent's CommandNotFound", err)
		}
	})
}

func testGuestExec(t *testing.T, ctx context.Context, a *GuestAgent) {
	for _, c := range []struct {
		name string
		cmd  GuestCommand
		want GuestExecResult
	}{
		{"echo", GuestCommand{Path: "/bin/echo", Args: []string{"hello", "guest"}}, GuestExecResult{Stdout: []byte("hello guest\n")}},
		{"stderr and exit", GuestCommand{Path: "/bin/sh", Args: []string{"-c", "echo oops >&2; exit 3"}},
			GuestExecResult{ExitCode: 3, Stderr: []byte("oops\n")}},
		{"input", GuestCommand{Path: "/bin/cat", Input: []byte("fed to cat\x00\xff")}, GuestExecResult{Stdout: []byte("fed to cat\x00\xff")}},
		{"env", GuestCommand{Path: "/bin/sh", Args: []string{"-c", "echo $GREETING"}, Env: []string{"GREETING=hi there"}},
			GuestExecResult{Stdout: []byte("hi there\n")}},
		{"signal", GuestCommand{Path: "/bin/sh", Args: []string{"-c", "kill -9 $$"}}, GuestExecResult{Signal: 9}},
	} {
		r, err := a.Exec(ctx, c.cmd)
		if err != nil {
			t.Errorf("%s: %v", c.name, err)
			continue
		}
		if r.ExitCode != c.want.ExitCode || r.Signal != c.want.Signal ||
			!bytes.Equal(r.Stdout, c.want.Stdout) || !bytes.Equal(r.Stderr, c.want.Stderr) {
			t.Errorf("%s: got exit %d signal %d stdout %q stderr %q, want %+v", c.name,
				r.ExitCode, r.Signal, r.Stdout, r.Stderr, c.want)
		}
	}
	// A command that outlives the context: Exec returns with the
	// context's error, and the session goes on.
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if _, err := a.Exec(short, GuestCommand{Path: "/bin/sleep", Args: []string{"30"}}); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("sleep 30 with a 500 ms context: %v, want context.DeadlineExceeded", err)
	}
	if err := a.Ping(ctx); err != nil {
		t.Errorf("ping after an Exec that outlived its context: %v", err)
	}
}

// testGuestFiles copies 64 MiB of random bytes into the guest and back.
func testGuestFiles(t *testing.T, ctx context.Context, a *GuestAgent) {
	const size = 64 << 20
	seed := [32]byte{1, 2, 3}
	src := rand.NewChaCha8(seed)
	want := sha256.New()
	path := "/tmp/agent-copy"

	f, err := a.OpenFile(ctx, path, "w")
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	n, err := io.Copy(f, io.TeeReader(io.LimitReader(src, size), want))
	if err != nil || n != size {
		t.Fatalf("copy in: %d bytes, %v", n, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	in := time.Since(start)

	r, err := a.Exec(ctx, GuestCommand{Path: "/bin/sha256sum", Args: []string{path}})
	if err != nil {
		t.Fatal(err)
	}
	wantSum := fmt.Sprintf("%x", want.Sum(nil))
	if got, _, _ := strings.Cut(string(r.Stdout), " "); got != wantSum {
		t.Fatalf("the guest's sha256sum of the copy is %s, want %s", got, wantSum)
	}

	f, err = a.OpenFile(ctx, path, "r")
	if err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	got := sha256.New()
	n, err = io.Copy(got, f)
	out := time.Since(start)
	if err != nil || n != size {
		t.Fatalf("copy out: %d bytes, %v", n, err)
	}
	if fmt.Sprintf("%x", got.Sum(nil)) != wantSum {
		t.Fatal("the bytes read back differ from those written")
	}
	t.Logf("64 MiB into the guest at %.1f MB/s, out at %.1f MB/s", size/in.Seconds()/1e6, size/out.Seconds()/1e6)

	// Seek and a short read.
	if pos, err := f.Seek(10, io.SeekStart); err != nil || pos != 10 {
		t.Fatalf("seek: %d, %v", pos, err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(f, buf); err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 15)
	io.ReadFull(io.LimitReader(rand.NewChaCha8(seed), 15), head)
	if !bytes.Equal(buf, head[10:]) {
		t.Errorf("bytes 10-14: %x, want %x", buf, head[10:])
	}
	if pos, err := f.Seek(0, io.SeekEnd); err != nil || pos != size {
		t.Errorf("seek to the end: %d, %v", pos, err)
	}
	if n, err := f.Read(buf); n != 0 || err != io.EOF {
		t.Errorf("read at the end: %d, %v; want io.EOF", n, err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Read(buf); err == nil {
		t.Error("read after Close succeeded")
	}
	if _, err := a.OpenFile(ctx, "/no/such/dir/file", "r"); err == nil {
		t.Error("opening a missing file succeeded")
	}
	a.Exec(ctx, GuestCommand{Path: "/bin/rm", Args: []string{path}})
}

// testGuestFreeze freezes an ext2 file system the guest mounts and checks
// that a write to it waits for the thaw.
func testGuestFreeze(t *testing.T, ctx context.Context, inst *Instance, a *GuestAgent) {
	guestAsk(t, inst, "mke2fs -q /dev/vda && mkdir -p /mnt/fz && mount /dev/vda /mnt/fz && echo ans=mounted")
	n, err := a.FSFreeze(ctx)
	if err != nil {
		t.Fatal(err)
	}
	thawed := false
	defer func() {
		if !thawed {
			a.FSThaw(ctx)
		}
	}()
	if n != 1 {
		t.Errorf("froze %d file systems, want 1 (/mnt/fz)", n)
	}
	if st, err := a.FSFreezeStatus(ctx); err != nil || st != GuestFSFrozen {
		t.Fatalf("status %q, %v; want frozen", st, err)
	}
	con := inst.Console()
	fmt.Fprintln(con, "echo data >/mnt/fz/file && sync && echo ans=written")
	// The write must still be waiting a second later: it is the thaw
	// that lets it through.
	written := regexp.MustCompile(`^ans=written`) // not the echo of the command
	wctx, cancel := context.WithTimeout(ctx, time.Second)
	_, err = con.WaitForRegexp(wctx, written)
	cancel()
	if err == nil {
		t.Fatal("a write to the frozen file system went through")
	}
	if n, err := a.FSThaw(ctx); err != nil || n != 1 {
		t.Fatalf("thaw: %d, %v", n, err)
	}
	thawed = true
	if _, err := con.WaitForRegexp(ctx, written); err != nil {
		t.Fatalf("the write did not finish after the thaw: %v", err)
	}
	if st, err := a.FSFreezeStatus(ctx); err != nil || st != GuestFSThawed {
		t.Errorf("status after thaw %q, %v", st, err)
	}
	// A freeze of a mount point that is not there freezes nothing.
	if n, err := a.FSFreeze(ctx, "/no/such/mount"); err != nil || n != 0 {
		t.Errorf("freeze of a missing mount point: %d, %v", n, err)
	}
}

func TestGuestAgentShutdownRealGuest(t *testing.T) {
	requireGuest(t)
	inst, a := startAgentGuest(t, "")
	ctx := ctxTimeout(t, time.Minute)
	if err := a.Shutdown(ctx, "powerdown"); err != nil {
		t.Fatalf("%v; console:\n%s", err, inst.Console().History())
	}
	if _, err := inst.Wait(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(inst.Console().History(), []byte("TESTGUEST: shutdown -h -P +0")) {
		t.Errorf("the guest did not run its shutdown; console:\n%s", inst.Console().History())
	}
}

// An agent that is not running answers nothing: a call ends with its
// context, and once the agent runs, the next call resynchronises and
// succeeds. Then the agent dies in the middle of an Exec's status loop and
// comes back: the next call gets its own reply.
func TestGuestAgentFaultsRealGuest(t *testing.T) {
	requireGuest(t)
	inst, a := startAgentGuest(t, "testguest.agent=off")
	ctx := ctxTimeout(t, 2*time.Minute)
	for i := 0; i < 2; i++ {
		short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
		err := a.Ping(short)
		cancel()
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("ping %d with no agent: %v, want context.DeadlineExceeded", i, err)
		}
	}
	start := func() {
		t.Helper()
		fmt.Fprintln(inst.Console(), "testguest-agent")
		if _, err := inst.Console().WaitFor(ctx, "TESTGUEST: agent started"); err != nil {
			t.Fatal(err)
		}
	}
	start()
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("ping once the agent runs: %v", err)
	}

	// The agent is killed while Exec polls a command that outlives it.
	execDone := make(chan error, 1)
	ectx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	go func() {
		_, err := a.Exec(ectx, GuestCommand{Path: "/bin/sleep", Args: []string{"60"}})
		execDone <- err
	}()
	time.Sleep(300 * time.Millisecond) // into the status loop
	fmt.Fprintln(inst.Console(), "killall -9 qemu-ga; echo ans=killed")
	if _, err := inst.Console().WaitForRegexp(ctx, regexp.MustCompile(`^ans=killed`)); err != nil {
		t.Fatal(err)
	}
	if err := <-execDone; !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("Exec with its agent killed: %v, want context.DeadlineExceeded", err)
	}
	inst.Console().WaitFor(ctx, "TESTGUEST: exit ")
	start()
	host, err := a.HostName(ctx)
	if err != nil || host != "testguest" {
		t.Errorf("host name after the agent came back: %q, %v", host, err)
	}
	r, err := a.Exec(ctx, GuestCommand{Path: "/bin/echo", Args: []string{"own reply"}})
	if err != nil || string(r.Stdout) != "own reply\n" {
		t.Errorf("exec after the agent came back: %q, %v", r.Stdout, err)
	}
}
