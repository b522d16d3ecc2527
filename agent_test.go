package qemu

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
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
	// Each part has a budget of its own, so that one that runs long on a
	// loaded machine fails alone, not every part after it.
	t.Run("ping", func(t *testing.T) {
		ctx := ctxTimeout(t, time.Minute)
		if err := a.Ping(ctx); err != nil {
			t.Fatalf("%v; console:\n%s", err, inst.Console().History())
		}
	})
	t.Run("info", func(t *testing.T) {
		ctx := ctxTimeout(t, time.Minute)
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
		ctx := ctxTimeout(t, time.Minute)
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
		ctx := ctxTimeout(t, time.Minute)
		if name, err := a.HostName(ctx); err != nil || name != "testguest" {
			t.Errorf("host name %q, %v; want testguest", name, err)
		}
	})
	t.Run("interfaces", func(t *testing.T) {
		ctx := ctxTimeout(t, time.Minute)
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
		ctx := ctxTimeout(t, time.Minute)
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
	t.Run("exec", func(t *testing.T) { testGuestExec(t, ctxTimeout(t, time.Minute), a) })
	// 64 MiB each way: about a minute under -race on a quiet machine.
	t.Run("files", func(t *testing.T) { testGuestFiles(t, ctxTimeout(t, 5*time.Minute), a) })
	t.Run("ssh keys", func(t *testing.T) {
		ctx := ctxTimeout(t, time.Minute)
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
	t.Run("fsfreeze", func(t *testing.T) { testGuestFreeze(t, ctxTimeout(t, time.Minute), inst, a) })
	t.Run("unavailable command", func(t *testing.T) {
		ctx := ctxTimeout(t, time.Minute)
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
		{"signal", GuestCommand{Path: "/bin/sh", Args: []string{"-c", "kill -9 $$"}}, GuestExecResult{ExitCode: -1, Signal: 9}},
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
	// Size seeks to the end and back to where the file was.
	if n, err := f.Size(); err != nil || n != size {
		t.Errorf("Size() = %d, %v; want %d", n, err, size)
	}
	if pos, err := f.Seek(0, io.SeekCurrent); err != nil || pos != 15 {
		t.Errorf("position after Size: %d, %v; want 15", pos, err)
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
	// A file's calls are bounded by OpenFile's context until SetContext
	// gives another.
	octx, cancel := context.WithCancel(ctx)
	g, err := a.OpenFile(octx, path, "r")
	if err != nil {
		t.Fatal(err)
	}
	cancel()
	if _, err := g.Read(buf); !errors.Is(err, context.Canceled) {
		t.Errorf("read after OpenFile's context ended: %v, want context.Canceled", err)
	}
	g.SetContext(ctx)
	if _, err := io.ReadFull(g, buf); err != nil || !bytes.Equal(buf, head[:5]) {
		t.Errorf("read with SetContext's context: %x, %v; want %x", buf, err, head[:5])
	}
	if err := g.Close(); err != nil {
		t.Error(err)
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
// succeeds. Then the agent dies in the middle of an Exec's status loop,
// which fails with ErrAgentPortClosed, and comes back: the next call gets
// its own reply.
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

	// The agent is killed while Exec polls a command that outlives it:
	// the guest closes the port, and Exec fails then, long before its
	// context ends.
	execDone := make(chan error, 1)
	ectx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	go func() {
		_, err := a.Exec(ectx, GuestCommand{Path: "/bin/sleep", Args: []string{"60"}})
		execDone <- err
	}()
	// Once the command runs, Exec is in its status loop.
	fmt.Fprintln(inst.Console(), "while ! pidof sleep >/dev/null; do sleep 0.1; done; killall -9 qemu-ga; echo ans=killed")
	if _, err := inst.Console().WaitForRegexp(ctx, regexp.MustCompile(`^ans=killed`)); err != nil {
		t.Fatal(err)
	}
	if err := <-execDone; !errors.Is(err, ErrAgentPortClosed) {
		t.Errorf("Exec with its agent killed: %v, want ErrAgentPortClosed", err)
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

	// A copy whose context ends half-way stops there, and the session
	// goes on.
	fctx, fcancel := context.WithTimeout(ctx, time.Second)
	defer fcancel()
	f, err := a.OpenFile(fctx, "/tmp/cut-short", "w")
	if err != nil {
		t.Fatal(err)
	}
	if n, err := io.Copy(f, io.LimitReader(rand.NewChaCha8([32]byte{}), 64<<20)); !errors.Is(err, context.DeadlineExceeded) || n >= 64<<20 {
		t.Errorf("copy with a 1 s context: %d bytes, %v; want it cut short by the context", n, err)
	}
	if err := a.Ping(ctx); err != nil {
		t.Errorf("ping after a copy cut short: %v", err)
	}

	// QEMU dies under an Exec: the call fails at once with the channel's
	// end, not with its context.
	go func() {
		_, err := a.Exec(ctx, GuestCommand{Path: "/bin/sleep", Args: []string{"60"}})
		execDone <- err
	}()
	time.Sleep(300 * time.Millisecond)
	syscall.Kill(inst.Pid(), syscall.SIGKILL)
	if err := <-execDone; !errors.Is(err, ErrDisconnected) {
		t.Errorf("Exec as QEMU dies: %v, want ErrDisconnected", err)
	}
	if err := a.Ping(ctx); !errors.Is(err, ErrDisconnected) {
		t.Errorf("ping after QEMU died: %v", err)
	}
}

// Stale output before and around the sync's reply is skipped: a reply to
// an earlier client, half a line, a delimited reply with another id, the
// agent's parse error for the 0xFF.
func TestGuestAgentSyncSkipsStaleOutput(t *testing.T) {
	a, p := agentPeer(t)
	p.send(`{"return": {"pid": 1}}`, `not json at all`)
	p.conn.Write([]byte(`{"return": {"count": 3, "buf-b6`)) // cut short
	done := make(chan error, 1)
	go func() { done <- a.Ping(ctxTimeout(t, 5*time.Second)) }()
	id := syncID(t, p.recv())
	p.send(`{"error": {"class": "GenericError", "desc": "JSON parse error, stray '\uFFFD'"}}`,
		"\xff{\"return\": 12345}", "garbage\xff{\"return\": "+id+"}")
	if got := p.recv(); got != `{"execute":"guest-ping"}` {
		t.Fatalf("after the sync: %q", got)
	}
	p.send(`{"return": {}}`)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	// Synchronised: the next command goes alone.
	go func() { done <- a.Ping(ctxTimeout(t, 5*time.Second)) }()
	if got := p.recv(); got != `{"execute":"guest-ping"}` {
		t.Fatalf("second command: %q", got)
	}
	p.send(`garbage before the reply {"return": {}}`)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
}

// A call given up on leaves a reply owed; the next call resynchronises
// with a new id, and the late reply never reaches it.
func TestGuestAgentGiveUpResynchronises(t *testing.T) {
	a, p := agentPeer(t)
	short, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { _, err := a.HostName(short); errc <- err }()
	first := syncID(t, p.recv())
	p.send("\xff{\"return\": " + first + "}")
	// guest-info first (the capability check), answered; then the
	// command, which is not.
	if got := p.recv(); got != `{"execute":"guest-info"}` {
		t.Fatalf("got %q", got)
	}
	p.send(`{"return": {"version": "7.2.0", "supported_commands": [{"name": "guest-get-host-name", "enabled": true, "success-response": true}]}}`)
	if got := p.recv(); got != `{"execute":"guest-get-host-name"}` {
		t.Fatalf("got %q", got)
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("unanswered call: %v", err)
	}
	go func() { _, err := a.HostName(context.Background()); errc <- err }()
	line := p.recv()
	second := syncID(t, line)
	if second == first {
		t.Fatal("the resync reused an id")
	}
	// The late reply to the call given up on, then the sync's.
	p.send(`{"return": {"host-name": "stale"}}`, "\xff{\"return\": "+second+"}")
	if got := p.recv(); got != `{"execute":"guest-get-host-name"}` {
		t.Fatalf("got %q", got)
	}
	p.send(`{"return": {"host-name": "fresh"}}`)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	if _, err := a.HostName(ctxTimeout(t, time.Second)); err == nil {
		t.Fatal("a third call got a reply nobody sent")
	}
}

// A call whose context ends while its resync waits for the agent was never
// sent, and does not say it was: FSFreeze would thaw after it.
func TestGuestAgentGiveUpDuringResync(t *testing.T) {
	a, p := agentPeer(t)
	short, cancel := context.WithCancel(context.Background())
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- a.Execute(short, "guest-ping", nil, nil) }()
	syncID(t, p.recv()) // left unanswered
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) || unanswered(err) {
		t.Errorf("a call given up during its resync: %v (unanswered %v), want context.Canceled, not unanswered", err, unanswered(err))
	}
}

// An agent that stops reading: the write is bounded by the context too.
// Half a command is on the channel then, and the session goes on: the next
// call's 0xFF makes the agent drop it.
func TestGuestAgentWriteBoundedByContext(t *testing.T) {
	a, p := agentPeer(t)
	go func() {
		id := syncID(t, p.recv())
		p.send("\xff{\"return\": " + id + "}")
		p.recv()
		p.send(`{"return": {}}`)
	}()
	ctx := ctxTimeout(t, 5*time.Second)
	if err := a.Ping(ctx); err != nil {
		t.Fatal(err)
	}
	// The context ends once the write has begun (the peer has its first
	// bytes) and stalled (the peer reads no more): a context that ends
	// before the write begins sends nothing.
	short, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		p.r.Peek(1)
		cancel()
	}()
	err := a.Execute(short, "guest-file-write", map[string]interface{}{"handle": 1, "buf-b64": strings.Repeat("A", 8<<20)}, nil)
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "guest-file-write: write: ") {
		t.Fatalf("a write nobody reads: %v, want guest-file-write's write error with context.Canceled", err)
	}
	// The peer reads again: the half command, then on the same line the
	// resync.
	go func() {
		line := p.recv()
		i := strings.LastIndexByte(line, 0xff)
		if i <= 0 {
			t.Errorf("no half command before the resync: %.80q", line)
			p.conn.Close()
			return
		}
		p.send("\xff{\"return\": " + syncID(t, line[i:]) + "}")
		p.recv()
		p.send(`{"return": {}}`)
	}()
	if err := a.Ping(ctx); err != nil {
		t.Fatalf("ping after a write cut short: %v", err)
	}
}

// FSFreeze thaws only a freeze whose fate it does not know: the context
// ended after the command went out. A refused freeze (a frozen agent
// disables guest-fsfreeze-freeze) gets no thaw, which would undo the
// freeze already there.
func TestGuestAgentFreezeThawsOnlyWhatItBegan(t *testing.T) {
	a, p := agentPeer(t)
	answers := make(chan string)
	done := p.serve(func(cmd string) []string {
		switch {
		case syncLine(cmd) != "":
			return []string{"\xff{\"return\": " + syncLine(cmd) + "}"}
		case cmd == `{"execute":"guest-info"}`:
			return []string{`{"return": {"version": "7.2.0", "supported_commands": [` +
				`{"name": "guest-fsfreeze-freeze", "enabled": true, "success-response": true}, ` +
				`{"name": "guest-fsfreeze-thaw", "enabled": true, "success-response": true}]}}`}
		}
		answers <- cmd
		return nil
	})
	ctx := ctxTimeout(t, 5*time.Second)
	errc := make(chan error, 1)
	go func() { _, err := a.FSFreeze(ctx); errc <- err }()
	<-answers // the freeze
	p.send(`{"error": {"class": "CommandNotFound", "desc": "Command guest-fsfreeze-freeze has been disabled: the agent is in frozen state"}}`)
	if err := <-errc; !errors.Is(err, ErrAgentCommandUnavailable) {
		t.Errorf("refused freeze: %v, want ErrAgentCommandUnavailable", err)
	}

	short, cancel := context.WithCancel(ctx)
	go func() { _, err := a.FSFreeze(short); errc <- err }()
	<-answers // the freeze, unanswered
	cancel()
	if got := <-answers; got != `{"execute":"guest-fsfreeze-thaw"}` {
		t.Errorf("after a freeze given up on: %q, want the thaw", got)
	}
	p.send(`{"return": 1}`)
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Errorf("freeze given up on: %v", err)
	}
	a.Close()
	sent := <-done
	thaws := 0
	for _, cmd := range sent {
		if strings.Contains(cmd, "thaw") {
			thaws++
		}
	}
	if thaws != 1 {
		t.Errorf("%d thaws sent, want 1: %q", thaws, sent)
	}
}

// A typed call of a command guest-info lacks, or lists as disabled, fails
// before anything is sent; error replies are *QMPError.
func TestGuestAgentChecksCommandsAndErrors(t *testing.T) {
	a, p := agentPeer(t)
	done := p.serve(func(cmd string) []string {
		if id := syncLine(cmd); id != "" {
			return []string{"\xff{\"return\": " + id + "}"}
		}
		switch cmd {
		case `{"execute":"guest-info"}`:
			return []string{`{"return": {"version": "9.9.9", "supported_commands": [` +
				`{"name": "guest-exec", "enabled": false, "success-response": true}, ` +
				`{"name": "guest-file-open", "enabled": true, "success-response": true}]}}`}
		}
		return []string{`{"error": {"class": "GenericError", "desc": "failed to open file '/x' (mode: 'r'): No such file or directory"}}`}
	})
	ctx := ctxTimeout(t, 5*time.Second)
	if _, err := a.Exec(ctx, GuestCommand{Path: "/bin/true"}); !errors.Is(err, ErrAgentCommandUnavailable) ||
		!strings.Contains(err.Error(), "qemu-ga 9.9.9 has guest-exec disabled") {
		t.Errorf("disabled command: %v", err)
	}
	if _, err := a.FSFreezeStatus(ctx); !errors.Is(err, ErrAgentCommandUnavailable) ||
		!strings.Contains(err.Error(), "has no guest-fsfreeze-status") {
		t.Errorf("missing command: %v", err)
	}
	_, err := a.OpenFile(ctx, "/x", "")
	var qerr *QMPError
	if !errors.As(err, &qerr) || qerr.Class != "GenericError" || !strings.HasPrefix(err.Error(), "qga: guest-file-open /x: GenericError: failed to open") {
		t.Errorf("error reply: %v", err)
	}
	a.Close()
	for _, cmd := range <-done {
		if strings.Contains(cmd, "guest-exec") || strings.Contains(cmd, "fsfreeze") {
			t.Errorf("%s was sent", cmd)
		}
	}
}

// guest-shutdown never replies on success: the channel closing after it
// was written is success; an error reply is not.
func TestGuestAgentShutdownCompletion(t *testing.T) {
	serve := func(p *peer, reply string) {
		p.serve(func(cmd string) []string {
			if id := syncLine(cmd); id != "" {
				return []string{"\xff{\"return\": " + id + "}"}
			}
			if cmd == `{"execute":"guest-info"}` {
				return []string{`{"return": {"version": "7.2.0", "supported_commands": [{"name": "guest-shutdown", "enabled": true, "success-response": false}]}}`}
			}
			if reply == "" {
				p.conn.Close()
				return nil
			}
			return []string{reply}
		})
	}
	a, p := agentPeer(t)
	serve(p, "")
	if err := a.Shutdown(ctxTimeout(t, 5*time.Second), "halt"); err != nil {
		t.Errorf("channel closed after guest-shutdown: %v", err)
	}
	a, p = agentPeer(t)
	serve(p, `{"error": {"class": "GenericError", "desc": "child process has failed to shutdown"}}`)
	if err := a.Shutdown(ctxTimeout(t, 5*time.Second), ""); err == nil || !strings.Contains(err.Error(), "failed to shutdown") {
		t.Errorf("error reply to guest-shutdown: %v", err)
	}
}

// The agent's channel closing fails the call in flight and every call
// after it.
func TestGuestAgentChannelEnds(t *testing.T) {
	a, p := agentPeer(t)
	go func() {
		p.recv()
		p.conn.Close()
	}()
	if err := a.Ping(ctxTimeout(t, 5*time.Second)); !errors.Is(err, ErrDisconnected) {
		t.Errorf("ping as the channel closes: %v", err)
	}
	<-a.Done()
	if err := a.Ping(ctxTimeout(t, 5*time.Second)); !errors.Is(err, ErrDisconnected) || !errors.Is(a.Err(), ErrDisconnected) {
		t.Errorf("ping after: %v (Err %v)", err, a.Err())
	}
	a.Close()
	a.Close()
}

// The guest closing the agent's port (VSERPORT_CHANGE, open false) fails
// the calls under way: the one whose command was written, as unanswered,
// and one waiting for its turn. Events of another port, or of the port
// opening, fail nothing. The next call resynchronises.
func TestGuestAgentPortClosedFailsCallsUnderWay(t *testing.T) {
	c := connect(t, "10.0.2", nil)
	a, p := agentPeerWith(t, GuestAgentConfig{QMP: c.q, Port: "qga0"})
	ctx := ctxTimeout(t, 10*time.Second)
	errc := make(chan error, 2)
	ping := func() { errc <- a.Execute(ctx, "guest-ping", nil, nil) }
	go ping()
	p.send("\xff{\"return\": " + syncID(t, p.recv()) + "}")
	if got := p.recv(); got != `{"execute":"guest-ping"}` {
		t.Fatalf("got %q", got)
	}
	c.p.send(event("VSERPORT_CHANGE", `{"id": "other", "open": false}`, 1, 0),
		event("VSERPORT_CHANGE", `{"id": "qga0", "open": true}`, 1, 1))
	// Once QMP has answered, the reader has handed both events out.
	go func() { c.p.recv(); c.p.send(okReply) }()
	if err := c.q.ExecuteCommand(ctx, "query-status", nil, nil); err != nil {
		t.Fatal(err)
	}
	p.send(`{"return": {}}`)
	if err := <-errc; err != nil {
		t.Fatalf("a ping while other ports changed: %v", err)
	}
	// The ping's reply may have come before the watch would have acted:
	// the watch's filter itself takes only this port's closing.
	for data, want := range map[string]bool{`{"id": "other", "open": false}`: false,
		`{"id": "qga0", "open": true}`: false, `{"id": "qga0", "open": false}`: true} {
		var ev QMPEvent
		ev.Name = "VSERPORT_CHANGE"
		if err := json.Unmarshal([]byte(data), &ev.Data); err != nil {
			t.Fatal(err)
		}
		if got := a.portSub.filter.matches(ev); got != want {
			t.Errorf("the watch takes VSERPORT_CHANGE %s: %v, want %v", data, got, want)
		}
	}

	go ping()
	if got := p.recv(); got != `{"execute":"guest-ping"}` {
		t.Fatalf("got %q", got)
	}
	go ping()
	for underway := 0; underway < 2; {
		time.Sleep(time.Millisecond) // until the second is waiting too
		a.mu.Lock()
		underway = len(a.underway)
		a.mu.Unlock()
	}
	c.p.send(event("VSERPORT_CHANGE", `{"id": "qga0", "open": false}`, 2, 0))
	var written int
	for range 2 {
		err := <-errc
		if !errors.Is(err, ErrAgentPortClosed) || errors.Is(err, context.Canceled) {
			t.Errorf("a call under way as the port closed: %v, want ErrAgentPortClosed alone", err)
		}
		if unanswered(err) {
			written++
		}
	}
	if written != 1 {
		t.Errorf("%d calls said they were written, want 1", written)
	}
	// The call that waited may have sent a sync before its context
	// ended: answered as an agent would, it is skipped.
	go ping()
	for {
		line := p.recv()
		if id := syncLine(line); id != "" {
			p.send("\xff{\"return\": " + id + "}")
			continue
		}
		if line != `{"execute":"guest-ping"}` {
			t.Fatalf("got %q", line)
		}
		break
	}
	p.send(`{"return": {}}`)
	if err := <-errc; err != nil {
		t.Errorf("a ping after the port closed: %v", err)
	}
	a.mu.Lock()
	left := len(a.underway)
	a.mu.Unlock()
	if left != 0 {
		t.Errorf("%d calls left registered", left)
	}
	a.Close()
	checkWatchEnded(t, a)
}

// The port's watch ends with the agent's session, also with one that had
// ended before the watch began.
func TestGuestAgentPortWatchEnds(t *testing.T) {
	c := connect(t, "10.0.2", nil)
	conn, p := pairPeer(t)
	p.conn.Close()
	a := newGuestAgent(conn, GuestAgentConfig{})
	<-a.Done()
	a.useQMP(c.q, "qga0")
	checkWatchEnded(t, a)
}

// checkWatchEnded fails the test unless a's port watch has ended: its
// subscription closed (which a closed ctx shows at once, since Receive
// looks at the subscription first), and no watch goroutine left.
func checkWatchEnded(t *testing.T, a *GuestAgent) {
	t.Helper()
	a.mu.Lock()
	sub := a.portSub
	a.mu.Unlock()
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := sub.Receive(done); !errors.Is(err, ErrSubscriptionClosed) {
		t.Errorf("the port's subscription: %v, want it closed", err)
	}
	watching := func(gs string) bool { return strings.Contains(gs, "(*GuestAgent).watchPort") }
	if gs := lingering(watching); watching(gs) {
		t.Errorf("the port's watch is left:\n%s", gs)
	}
}

func TestGuestAgentParams(t *testing.T) {
	got := strings.Join(agentParams(5), " ")
	want := "-chardev socket,id=instance-agent,fd=5 -device virtio-serial-pci,id=instance-agent-bus " +
		"-device virtserialport,id=instance-agent-port,bus=instance-agent-bus.0,chardev=instance-agent,name=org.qemu.guest_agent.0"
	if got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
}

// FuzzGuestAgentOutput feeds arbitrary agent output to a client, as stale
// output before a well-behaved agent's: nothing panics or hangs, none of
// it satisfies a call (none can carry the id of the client's
// guest-sync-delimited), and all of it is skipped, so that the ping that
// follows gets the agent's reply.
func FuzzGuestAgentOutput(f *testing.F) {
	f.Add([]byte("\xff{\"return\": 1}\n{\"return\": {}}\n"))
	f.Add([]byte("{\"error\": {\"class\": \"X\", \"desc\": \"y\"}}\n\xff\xff{"))
	f.Add([]byte(strings.Repeat("{", 100) + "\n"))
	f.Add([]byte("garbage\xff{\"return\": 2}\r\n\n"))
	f.Fuzz(func(t *testing.T, out []byte) {
		for _, line := range bytes.Split(out, []byte("\n")) {
			if fr, err := decodeAgentLine(line); err == nil && fr.kind == frameReply && fr.ret == nil && fr.err == nil {
				t.Fatalf("%q: a reply with neither a value nor an error", line)
			}
		}
		conn, p := pairPeer(t)
		a := newGuestAgent(conn, GuestAgentConfig{})
		defer a.Close()
		agent := func() {
			p.conn.Write(out)
			answerAgent(p.conn)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Millisecond)
		defer cancel()
		if err := a.Ping(ctx); err == nil {
			t.Fatalf("a ping succeeded on output %q", out)
		}
		go agent()
		ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := a.Ping(ctx); err != nil {
			t.Fatalf("the ping after output %q: %v", out, err)
		}
	})
}
