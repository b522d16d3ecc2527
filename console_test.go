package qemu

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func TestConsoleParams(t *testing.T) {
	for port, want := range map[ConsolePort]string{
		ConsoleSerial: "-chardev socket,id=instance-console,fd=5 -serial chardev:instance-console",
		ConsoleVirtio: "-chardev socket,id=instance-console,fd=5 -device virtio-serial-pci,id=instance-console-bus " +
			"-device virtconsole,chardev=instance-console,bus=instance-console-bus.0",
	} {
		got, err := consoleParams(port, 5)
		if err != nil || strings.Join(got, " ") != want {
			t.Errorf("%s: %q, %v; want %q", port, got, err, want)
		}
	}
	if _, err := consoleParams("ttyS1", 5); err == nil {
		t.Error("an unknown port accepted")
	}
}

// fakeConsole is a SerialConsole whose guest side is the returned file.
func fakeConsole(t *testing.T, history int, log io.Writer) (*SerialConsole, *os.File) {
	t.Helper()
	ours, guest, err := socketPair()
	if err != nil {
		t.Fatal(err)
	}
	c, err := newSerialConsole(ours, history, log)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { guest.Close(); c.close() })
	return c, guest
}

func TestConsoleWaits(t *testing.T) {
	var log lockedBuffer
	c, guest := fakeConsole(t, 0, &log)
	guest.WriteString("Linux version 6.1\r\nfirst line\r\nready\r\nlogin: ")
	ctx := ctxTimeout(t, 5*time.Second)
	// Lines written before the wait are seen.
	if line, err := c.WaitFor(ctx, "first"); err != nil || line != "first line" {
		t.Fatalf("WaitFor(first) = %q, %v", line, err)
	}
	if line, err := c.WaitForRegexp(ctx, regexp.MustCompile(`^rea`)); err != nil || line != "ready" {
		t.Fatalf("WaitForRegexp(^rea) = %q, %v", line, err)
	}
	// A line not yet ended is not matched: it may still grow.
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if line, err := c.WaitFor(short, "login"); err == nil {
		t.Fatalf("an unended line matched: %q", line)
	}
	guest.WriteString("\r\n")
	if line, err := c.WaitFor(ctx, "login"); err != nil || line != "login: " {
		t.Errorf("the prompt, once its line ended: %q, %v", line, err)
	}
	// A wait starts after the previous match: "ready" was passed, so it
	// must come again.
	pending := pendingCall(func() error {
		line, err := c.WaitFor(ctx, "ready")
		if err == nil && line != "ready again" {
			t.Errorf("second ready: %q", line)
		}
		return err
	})
	stillPending(t, pending, "a wait for a line already matched past")
	guest.WriteString("ready again\n")
	if err := <-pending; err != nil {
		t.Fatal(err)
	}
	short, cancel = context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.WaitFor(short, "never"); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), `"never"`) {
		t.Errorf("wait for a line that never comes: %v", err)
	}
	want := "Linux version 6.1\r\nfirst line\r\nready\r\nlogin: \r\nready again\n"
	if got := string(c.History()); got != want {
		t.Errorf("History() = %q, want %q", got, want)
	}
	r := c.NewReader()
	guest.Close()
	all, err := io.ReadAll(r)
	if err != nil || string(all) != want {
		t.Errorf("reader read %q, %v", all, err)
	}
	<-c.Done()
	if _, err := c.WaitFor(context.Background(), "never"); err == nil || !strings.Contains(err.Error(), "console ended") {
		t.Errorf("wait on an ended console: %v", err)
	}
	for deadline := time.Now().Add(5 * time.Second); log.String() != want && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}
	if got := log.String(); got != want {
		t.Errorf("ConsoleLog got %q, want %q", got, want)
	}
}

// The history is bounded; a reader that falls behind skips what was
// dropped; input written to the console reaches the guest.
func TestConsoleHistoryBoundAndInput(t *testing.T) {
	c, guest := fakeConsole(t, 1000, nil)
	r := c.NewReader()
	line := bytes.Repeat([]byte("x"), 99)
	for i := 0; i < 100; i++ {
		guest.Write(append(line, '\n'))
	}
	guest.WriteString("END\n")
	if _, err := c.WaitFor(ctxTimeout(t, 5*time.Second), "END"); err != nil {
		t.Fatal(err)
	}
	if n := len(c.History()); n != 1000 || !bytes.HasSuffix(c.History(), []byte("END\n")) {
		t.Errorf("history of %d bytes, want the last 1000, ending with END", n)
	}
	// Made before the first byte, the reader fell more than the history
	// behind: it skips what was dropped and reads exactly what is kept.
	buf := make([]byte, 20000)
	n, _ := r.Read(buf)
	if n > 1000 {
		t.Errorf("a reader that fell behind read %d bytes, more than the history holds", n)
	}
	if h := c.History(); !bytes.Equal(buf[:n], h) {
		t.Errorf("a reader that fell behind read %d bytes, not the %d the history holds", n, len(h))
	}
	if _, err := c.Write([]byte("typed\n")); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 6)
	if _, err := io.ReadFull(guest, got); err != nil || string(got) != "typed\n" {
		t.Errorf("guest read %q, %v", got, err)
	}
}

// The guest's console from its first byte: the history holds the kernel's
// first line and the ready line when the wait returns; a command typed on
// the console runs and its answer is read back.
func TestConsoleRealGuest(t *testing.T) {
	var log lockedBuffer
	// loglevel=7 undoes the guest's quiet, so the kernel's first line,
	// "Linux version", is the console's first.
	inst := startGuest(t, "loglevel=7", InstanceOptions{ConsoleLog: &log}, "-S")
	// Paused: the guest has written nothing yet, and nothing can be
	// missed once it runs, since QEMU holds the console from its start.
	time.Sleep(100 * time.Millisecond)
	if h := inst.Console().History(); len(h) != 0 {
		t.Fatalf("a paused guest wrote %q", h)
	}
	ctx := ctxTimeout(t, 2*time.Minute)
	if err := inst.QMP().ExecuteCont(ctx); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	if _, err := inst.Console().WaitFor(ctx, guestReadyLine); err != nil {
		t.Fatalf("%v; QEMU's stderr: %s", err, inst.Stderr())
	}
	t.Logf("guest ready %v after cont", time.Since(start).Round(time.Millisecond))
	history := string(inst.Console().History())
	first, _, _ := strings.Cut(history, "\n")
	if !strings.Contains(first, "Linux version") {
		t.Errorf("the console's first line is %q, not the kernel's first", first)
	}
	if !strings.Contains(history, guestReadyLine) {
		t.Errorf("history has no ready line")
	}
	if _, err := inst.Console().Write([]byte("echo answer=$((6*7))\n")); err != nil {
		t.Fatal(err)
	}
	// The tty echoes the typed line with $((6*7)) as is: only the shell's
	// output has 42.
	if line, err := inst.Console().WaitFor(ctx, "answer=42"); err != nil || strings.Contains(line, "echo") {
		t.Fatalf("answer: %q, %v", line, err)
	}
	if _, err := inst.Console().WaitFor(ctx, "TESTGUEST: exit 0"); err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(log.String(), first) {
		t.Errorf("ConsoleLog starts %q, not with the first line", lastLines(log.String(), 1))
	}
}

// The virtio console carries the guest's console (hvc0) as well.
func TestConsoleRealGuestVirtio(t *testing.T) {
	inst := startGuestInstance(t, "console=hvc0", InstanceOptions{Console: ConsoleVirtio})
	ctx := ctxTimeout(t, time.Minute)
	if _, err := inst.Console().Write([]byte("cat /sys/class/tty/console/active\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := inst.Console().WaitForRegexp(ctx, regexp.MustCompile(`^(\S+ )*hvc0\s*$`)); err != nil {
		t.Fatalf("active consoles: %q, %v; console:\n%s", line, err, inst.Console().History())
	}
}

// Cursors wait at positions of their own: two goroutines waiting for
// different lines at once each get theirs, and neither moves the
// console's own position.
func TestConsoleCursors(t *testing.T) {
	c, guest := fakeConsole(t, 0, nil)
	guest.WriteString("before\n")
	ctx := ctxTimeout(t, 5*time.Second)
	heartbeat, answer := c.Cursor(), c.Cursor()
	beats := pendingCall(func() error {
		for i := range 3 {
			line, err := heartbeat.WaitFor(ctx, "beat")
			if err != nil {
				return err
			}
			if want := fmt.Sprintf("beat %d", i); line != want {
				return fmt.Errorf("heartbeat %d: %q, want %q", i, line, want)
			}
		}
		return nil
	})
	answered := pendingCall(func() error {
		line, err := answer.WaitFor(ctx, "ans=")
		if err == nil && line != "ans=42" {
			err = fmt.Errorf("answer %q", line)
		}
		return err
	})
	stillPending(t, answered, "a wait for a line not yet written")
	guest.WriteString("beat 0\nans=42\nbeat 1\nbeat 2\n")
	for _, ch := range []<-chan error{beats, answered} {
		if err := <-ch; err != nil {
			t.Error(err)
		}
	}
	// A cursor sees only what came after it was taken; the console's own
	// waits still start at the history's start.
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if line, err := c.Cursor().WaitFor(short, "before"); err == nil {
		t.Errorf("a new cursor saw %q, written before it", line)
	}
	if line, err := c.WaitFor(ctx, "before"); err != nil || line != "before" {
		t.Errorf("the console's own wait: %q, %v", line, err)
	}
	if line, err := c.WaitFor(ctx, "beat"); err != nil || line != "beat 0" {
		t.Errorf("the console's own position was moved by a cursor: %q, %v", line, err)
	}
}

// WaitForPrompt sees a prompt that no newline ends, also one that comes
// in pieces, and returns its line so far; the next wait starts after it.
func TestConsoleWaitForPrompt(t *testing.T) {
	c, guest := fakeConsole(t, 0, nil)
	ctx := ctxTimeout(t, 5*time.Second)
	guest.WriteString("Debian GNU/Linux 12 vm ttyS0\r\n\r\nvm lo")
	pending := pendingCall(func() error {
		line, err := c.WaitForPrompt(ctx, "login: ")
		if err == nil && line != "vm login: " {
			err = fmt.Errorf("prompt line %q", line)
		}
		return err
	})
	stillPending(t, pending, "a wait for half a prompt")
	guest.WriteString("gin")
	stillPending(t, pending, "a wait for most of a prompt")
	guest.WriteString(": ")
	if err := <-pending; err != nil {
		t.Fatal(err)
	}
	guest.WriteString("root\r\nPassword: ")
	if line, err := c.WaitForPrompt(ctx, ": "); err != nil || line != "Password: " {
		t.Errorf("the next prompt: %q, %v", line, err)
	}
	short, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.WaitForPrompt(short, "login: "); !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), `prompt "login: "`) {
		t.Errorf("a prompt passed over came back: %v", err)
	}
}

// Nothing the guest writes to the serial console is lost while this
// process does not read, and none of it on the virtio console either
// while the socket buffer QEMU writes into is the 8 MiB a process with
// CAP_NET_ADMIN gets: the guest writes numbered lines as fast as it can
// while this process runs on one thread with a goroutine computing, a
// wait pending (which scans what comes), and the console's reader held
// up for a second (it waits for the console's lock, as it would for a
// busy program's turn to run).
func TestConsoleUnderLoad(t *testing.T) {
	for _, port := range []ConsolePort{ConsoleSerial, ConsoleVirtio} {
		t.Run(string(port), func(t *testing.T) {
			params := "console=ttyS0"
			if port == ConsoleVirtio {
				params = "console=hvc0"
			}
			inst := startGuestInstance(t, params, InstanceOptions{Console: port, ConsoleHistory: 4 << 20})
			con := inst.Console()
			const lines = 20000
			defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(1))
			stop := make(chan struct{})
			defer close(stop)
			go func() {
				for x := 0; ; x++ {
					select {
					case <-stop:
						return
					default:
					}
					for i := range 1 << 20 {
						x ^= i
					}
				}
			}()
			ctx := ctxTimeout(t, 3*time.Minute)
			go con.Cursor().WaitFor(ctx, "never written")
			cur := con.Cursor()
			// The tty echoes the command as typed: only its output has
			// the count.
			fmt.Fprintf(con, "i=0; while [ $i -lt %d ]; do echo line$i; i=$((i+1)); done; echo done=$i\n", lines)
			if _, err := cur.WaitFor(ctx, "line100"); err != nil {
				t.Fatal(err)
			}
			con.mu.Lock()
			time.Sleep(time.Second)
			con.mu.Unlock()
			if _, err := cur.WaitFor(ctx, fmt.Sprintf("done=%d", lines)); err != nil {
				t.Fatal(err)
			}
			seen := make([]bool, lines)
			for _, l := range strings.Split(string(con.History()), "\n") {
				if n, err := strconv.Atoi(strings.TrimSpace(strings.TrimPrefix(l, "line"))); err == nil && strings.HasPrefix(l, "line") && n < lines {
					seen[n] = true
				}
			}
			lost := 0
			for _, ok := range seen {
				if !ok {
					lost++
				}
			}
			buf := consoleBufferGiven(t)
			t.Logf("%s: %d of %d lines lost (QEMU's socket buffer %d bytes)", port, lost, lines, buf)
			if lost > 0 && (port == ConsoleSerial || buf >= 8<<20) {
				t.Errorf("%d of %d lines lost", lost, lines)
			}
		})
	}
}

// consoleBufferGiven returns the send buffer consoleChannel gets here.
func consoleBufferGiven(t *testing.T) int {
	ours, theirs, err := consoleChannel()
	if err != nil {
		t.Fatal(err)
	}
	defer ours.Close()
	defer theirs.Close()
	rc, err := theirs.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var n int
	rc.Control(func(fd uintptr) { n, _ = syscall.GetsockoptInt(int(fd), syscall.SOL_SOCKET, syscall.SO_SNDBUF) })
	return n
}

// A position that fell out of the history starts at the first whole line
// kept: the line at the history's start when the byte before it ended a
// line, the next one when its head was dropped. A cursor a prompt left
// mid-line sees that line whole once it ends, and an empty prompt is an
// error, not a wait for ever.
func TestConsolePositionsAndLines(t *testing.T) {
	ctx := ctxTimeout(t, 5*time.Second)
	short := func() context.Context {
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		t.Cleanup(cancel)
		return ctx
	}
	c, guest := fakeConsole(t, 14, nil)
	guest.WriteString("line-1\nline-2\nline-3\n")
	if _, err := c.WaitFor(ctx, "line-3"); err != nil {
		t.Fatal(err)
	}
	if got := string(c.History()); got != "line-2\nline-3\n" {
		t.Fatalf("History() = %q", got)
	}
	if line, err := c.Cursor().WaitFor(short(), "line"); err == nil {
		t.Errorf("a new cursor matched %q, written before it", line)
	}
	c2, guest2 := fakeConsole(t, 14, nil)
	guest2.WriteString("line-1\nline-2\nline-3\n")
	if line, err := c2.WaitFor(ctx, "line-2"); err != nil || line != "line-2" {
		t.Errorf("a line the history holds whole: %q, %v", line, err)
	}
	c3, guest3 := fakeConsole(t, 4, nil)
	guest3.WriteString("abcdefgXYZ\nQ\n")
	if line, err := c3.WaitForRegexp(short(), regexp.MustCompile(`^XYZ`)); err == nil {
		t.Errorf("the tail of a line whose head was dropped matched as a line: %q", line)
	}

	c4, guest4 := fakeConsole(t, 0, nil)
	guest4.WriteString("vm login: ")
	if _, err := c4.WaitForPrompt(ctx, "login: "); err != nil {
		t.Fatal(err)
	}
	guest4.WriteString("root\r\n")
	if line, err := c4.WaitFor(ctx, "root"); err != nil || line != "vm login: root" {
		t.Errorf("the line after a prompt: %q, %v", line, err)
	}
	if _, err := c4.WaitForPrompt(ctx, ""); err == nil {
		t.Error("an empty prompt was waited for")
	}
}

// Waits from several goroutines on the console's own position move it
// forward only: a wait that matched an earlier line after another matched
// a later one does not take it back, so no line comes back to a later
// wait. (One of the two may pass over the other's line, as WaitFor says.)
func TestConsoleSharedPositionOnlyForward(t *testing.T) {
	for i := range 40 {
		c, guest := fakeConsole(t, 0, nil)
		wait := func(substr string, d time.Duration) <-chan error {
			return pendingCall(func() error {
				ctx, cancel := context.WithTimeout(context.Background(), d)
				defer cancel()
				_, err := c.WaitFor(ctx, substr)
				return err
			})
		}
		a, b := wait("A", 200*time.Millisecond), wait("B", 200*time.Millisecond)
		guest.WriteString("B\nA\n")
		<-a
		<-b
		for _, substr := range []string{"A", "B"} {
			if err := <-wait(substr, 20*time.Millisecond); err == nil {
				t.Fatalf("run %d: the line %s came back", i, substr)
			}
		}
	}
}
