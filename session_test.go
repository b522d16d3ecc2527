package qemu

import (
	"bufio"
	"context"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A command whose write fails is not sent, so its error is the write's,
// and quit in particular does not pass for a quit that QEMU received.
func TestSessionWriteErrorIsTheCommandsError(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	// The server stops reading: the kernel refuses the client's writes
	// with EPIPE while the server can still send.
	if err := s.p.conn.(*net.UnixConn).CloseRead(); err != nil {
		t.Fatal(err)
	}
	err := returnsWithin(t, 5*time.Second, func() error { return s.q.ExecuteQuit(ctxTimeout(t, 5*time.Second)) })
	if err == nil || !errors.Is(err, syscall.EPIPE) || !strings.Contains(err.Error(), "quit: write") {
		t.Fatalf("quit that could not be written: %v, want the write's EPIPE", err)
	}
	// Nothing was written, so the session goes on: a reply still reaches
	// the next command.
	select {
	case <-s.q.Done():
		t.Fatalf("session ended by a write that sent nothing: %v", s.q.Err())
	default:
	}
}

// A command larger than the socket buffers, sent to a peer that does not
// read, returns when its context ends, and the session, which has half a
// command on the wire, ends with an error that says so.
func TestSessionWriteHonoursContext(t *testing.T) {
	for _, how := range []string{"deadline", "cancel"} {
		t.Run(how, func(t *testing.T) {
			s := connect(t, "7.2.22", nil) // the server never reads
			var ctx context.Context
			var cancel context.CancelFunc
			if how == "deadline" {
				ctx, cancel = context.WithTimeout(context.Background(), 500*time.Millisecond)
			} else {
				ctx, cancel = context.WithCancel(context.Background())
				time.AfterFunc(500*time.Millisecond, cancel)
			}
			defer cancel()
			// Four times what the kernel buffers for a unix socket.
			big := map[string]string{"data": strings.Repeat("x", 1<<20)}
			err := returnsWithin(t, 3*time.Second, func() error {
				return s.q.ExecuteCommand(ctx, "human-monitor-command", big, nil)
			})
			if !errors.Is(err, ctx.Err()) || ctx.Err() == nil || !strings.Contains(err.Error(), "write") {
				t.Fatalf("blocked write: %v, want the write's end by the context", err)
			}
			select {
			case <-s.q.Done():
			case <-time.After(5 * time.Second):
				t.Fatal("session not ended by a half-written command")
			}
			if err := s.q.Err(); !errors.Is(err, ErrDisconnected) || !strings.Contains(err.Error(), "bytes of a command written") {
				t.Errorf("session's end: %v", err)
			}
		})
	}
}

// A deadline that moved the connection's write deadline must not touch the
// next command's write.
func TestSessionLateDeadlineDoesNotReachNextWrite(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	s.p.serve(func(string) []string { return []string{okReply} })
	for i := 0; i < 300; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%20)*5*time.Microsecond)
		s.q.ExecuteCont(ctx)
		cancel()
		if err := s.q.ExecuteStop(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatalf("command %d after a timed-out one: %v", i, err)
		}
	}
}

// Ends can be told apart through every wrapping, and Done and Err say
// that and why a session ended.
func TestSessionEnds(t *testing.T) {
	t.Run("shutdown", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		if s.q.Err() != nil {
			t.Fatalf("Err of a running session: %v", s.q.Err())
		}
		pending := pendingCall(func() error { return s.q.ExecuteCont(ctxTimeout(t, 5*time.Second)) })
		s.p.recv()
		s.q.Shutdown()
		<-s.q.Done()
		for what, err := range map[string]error{
			"in flight": <-pending,
			"after":     s.q.ExecuteStop(context.Background()),
			"Err":       s.q.Err(),
		} {
			if !errors.Is(err, ErrShutdown) || errors.Is(err, ErrDisconnected) {
				t.Errorf("%s: %v, want ErrShutdown", what, err)
			}
		}
	})
	t.Run("disconnect", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		pending := pendingCall(func() error { return s.q.ExecuteCont(ctxTimeout(t, 5*time.Second)) })
		s.p.recv()
		s.p.conn.Close()
		<-s.q.Done()
		for what, err := range map[string]error{
			"in flight": <-pending,
			"after":     s.q.ExecuteStop(context.Background()),
			"Err":       s.q.Err(),
		} {
			if !errors.Is(err, ErrDisconnected) || errors.Is(err, ErrShutdown) {
				t.Errorf("%s: %v, want ErrDisconnected", what, err)
			}
		}
	})
}

func TestQMPStartSocketPathTooLong(t *testing.T) {
	path := "/tmp/" + strings.Repeat("d", 120) + "/qmp.sock"
	gone := make(chan struct{})
	q, _, err := QMPStart(ctxTimeout(t, 5*time.Second), path, QMPConfig{}, gone)
	checkStartFails(t, q, err, gone)
	if err == nil || !strings.Contains(err.Error(), "longer than the 107") {
		t.Errorf("error %v does not say the path is too long", err)
	}
}

// The engine sends files as SCM_RIGHTS on the command's own write: the
// peer receives them with the command's first byte.
func TestSessionSendsFilesWithTheCommand(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	dir := t.TempDir()
	var files []*os.File
	for _, name := range []string{"a", "b", "c"} {
		f, err := os.Create(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		f.WriteString("content of " + name)
		files = append(files, f)
	}
	type received struct {
		line string
		fds  []int
		err  error
	}
	got := make(chan received, 1)
	go func() {
		buf := make([]byte, 4096)
		oob := make([]byte, syscall.CmsgSpace(4*8))
		n, oobn, _, _, err := s.p.conn.(*net.UnixConn).ReadMsgUnix(buf, oob)
		r := received{line: string(buf[:n]), err: err}
		if err == nil {
			msgs, _ := syscall.ParseSocketControlMessage(oob[:oobn])
			for _, m := range msgs {
				fds, _ := syscall.ParseUnixRights(&m)
				r.fds = append(r.fds, fds...)
			}
		}
		got <- r
		s.p.send(okReply)
	}()
	if err := s.q.s.execute(ctxTimeout(t, 5*time.Second), "getfd", map[string]string{"fdname": "x"}, nil, files); err != nil {
		t.Fatal(err)
	}
	r := <-got
	if r.err != nil || r.line != `{"execute":"getfd","arguments":{"fdname":"x"}}`+"\n" {
		t.Fatalf("peer read %q, %v", r.line, r.err)
	}
	if len(r.fds) != 3 {
		t.Fatalf("peer received %d descriptors, want 3", len(r.fds))
	}
	for i, fd := range r.fds {
		f := os.NewFile(uintptr(fd), "received")
		b, err := io.ReadAll(io.NewSectionReader(f, 0, 100))
		f.Close()
		if want := "content of " + string(rune('a'+i)); err != nil || string(b) != want {
			t.Errorf("descriptor %d reads %q, %v; want %q", i, b, err, want)
		}
	}

	// A nil or closed file fails before anything is sent, and the session
	// goes on.
	closed, _ := os.Open(filepath.Join(dir, "a"))
	closed.Close()
	done := s.p.serve(func(string) []string { return []string{okReply} })
	for _, bad := range [][]*os.File{{nil}, {files[0], closed}} {
		if err := s.q.s.execute(ctxTimeout(t, 5*time.Second), "getfd", nil, nil, bad); err == nil {
			t.Errorf("files %v accepted", bad)
		}
	}
	if err := s.q.ExecuteStop(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatalf("command after refused files: %v", err)
	}
	s.q.Shutdown()
	if cmds := <-done; len(cmds) != 1 {
		t.Errorf("commands on the wire: %q, want only stop", cmds)
	}
}

// A session that is not on a unix socket says so when asked to send files.
func TestSessionFilesNeedUnixSocket(t *testing.T) {
	client, server := net.Pipe()
	defer server.Close()
	go server.Write([]byte(greeting("7.2.0") + "\n"))
	q, _, err := qmpStartConn(ctxTimeout(t, 5*time.Second), client, QMPConfig{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer q.Shutdown()
	err = q.s.execute(context.Background(), "getfd", nil, nil, []*os.File{os.Stdin})
	if err == nil || !strings.Contains(err.Error(), "not on a unix socket") {
		t.Errorf("files over a pipe: %v", err)
	}
}

// holdConn simulates the writer being preempted after its bytes are out
// (or a partial write whose tail is still pending): the first Write sends
// all but the last keep bytes, then waits for release before sending them
// from p. A mutex serialises Writes like net's fd write lock.
type holdConn struct {
	net.Conn
	wmu     sync.Mutex
	n       int
	keep    int
	sent    chan struct{}
	release chan struct{}
}

func (c *holdConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	c.n++
	if c.n != 1 || c.keep == 0 {
		first := c.n == 1
		n, err := c.Conn.Write(p)
		c.wmu.Unlock()
		if first {
			// Write has returned (fd lock released); the goroutine is
			// preempted before write's deferred cleanup.
			close(c.sent)
			<-c.release
		}
		return n, err
	}
	defer c.wmu.Unlock()
	n, err := c.Conn.Write(p[:len(p)-c.keep])
	if err != nil {
		return n, err
	}
	close(c.sent)
	<-c.release
	m, err := c.Conn.Write(p[len(p)-c.keep:])
	return n + m, err
}

func heldWritePair(t *testing.T, keep int) (*session, *holdConn, net.Conn) {
	ca, p := pairPeer(t)
	cb := p.conn
	hc := &holdConn{Conn: ca, keep: keep, sent: make(chan struct{}), release: make(chan struct{})}
	var dec qmpDecoder
	s := newSession(hc, bufio.NewReader(hc), protocol{name: "t", decode: dec.decode, event: func(QMPEvent) {}, end: func(error) {}}, nullLogger{})
	t.Cleanup(func() { s.shutdown(); cb.Close() })
	return s, hc, cb
}

// The context of a command whose write is over but not yet cleaned up
// ends after its reply: its deadline must not reach the next command's
// write, which has no deadline of its own.
func TestSessionLateDeadlineAfterReplyDoesNotReachNextWrite(t *testing.T) {
	s, hc, peer := heldWritePair(t, 0)
	pr := bufio.NewReader(peer)
	ctx1, cancel1 := context.WithCancel(context.Background())
	aDone := make(chan error, 1)
	go func() { _, err := s.do(ctx1, request{name: "stop"}); aDone <- err }()
	<-hc.sent
	pr.ReadString('\n')
	peer.Write([]byte(okReply + "\r\n")) // the reply gives the turn back
	time.Sleep(50 * time.Millisecond)
	cancel1() // A's write is over, but its cleanup has not run
	time.Sleep(50 * time.Millisecond)
	go func() { pr.ReadString('\n'); peer.Write([]byte(okReply + "\r\n")) }()
	bDone := make(chan error, 1)
	go func() { _, err := s.do(context.Background(), request{name: "cont"}); bDone <- err }()
	time.Sleep(50 * time.Millisecond) // B waits for A's write to be over
	close(hc.release)
	if err := <-aDone; err != nil {
		t.Errorf("the first command: %v", err)
	}
	if err := returnsWithin(t, 5*time.Second, func() error { return <-bDone }); err != nil {
		t.Fatalf("command with context.Background failed: %v", err)
	}
}

// The reply can come before the writer has sent its last bytes (QEMU
// answers at the closing brace): the next command must not overwrite the
// buffer under the pending write.
func TestSessionNextCommandWaitsForPreviousWrite(t *testing.T) {
	s, hc, peer := heldWritePair(t, 1) // the '\n' is still pending
	pr := bufio.NewReader(peer)
	aDone := make(chan error, 1)
	go func() { _, err := s.do(context.Background(), request{name: "stop"}); aDone <- err }()
	<-hc.sent
	want := `{"execute":"stop"}`
	got := make([]byte, len(want))
	if _, err := io.ReadFull(pr, got); err != nil || string(got) != want {
		t.Fatalf("%q %v", got, err)
	}
	peer.Write([]byte(okReply + "\r\n"))
	bDone := make(chan error, 1)
	go func() { _, err := s.do(context.Background(), request{name: "query-status"}); bDone <- err }()
	time.Sleep(100 * time.Millisecond) // B has built its command in wbuf
	close(hc.release)
	b, _ := pr.ReadByte()
	if b != '\n' {
		t.Errorf("byte after the first command is %q, want '\\n': the stream is corrupt", b)
	}
	<-aDone
}

// Every method that ends on its context reports the context's error and
// its cause (context.Cause), so that errors.Is finds either: the
// engine's commands and each long operation alike.
func TestContextCauseReached(t *testing.T) {
	cause := errors.New("the operator pulled the plug")
	// run calls op with a context cancelled with cause: once started
	// says op is under way, or before the call when started is nil. It
	// returns op's error.
	run := func(t *testing.T, op func(ctx context.Context) error, started <-chan struct{}) error {
		t.Helper()
		ctx, cancel := context.WithCancelCause(context.Background())
		defer cancel(nil)
		if started == nil {
			cancel(cause)
		}
		ch := pendingCall(func() error { return op(ctx) })
		if started != nil {
			select {
			case <-started:
			case err := <-ch:
				t.Fatalf("ended before it was under way: %v", err)
			case <-time.After(10 * time.Second):
				t.Fatal("not under way after 10s")
			}
			cancel(cause)
		}
		return returnsWithin(t, 10*time.Second, func() error { return <-ch })
	}
	check := func(t *testing.T, err error) {
		t.Helper()
		if !errors.Is(err, cause) || !errors.Is(err, context.Canceled) {
			t.Errorf("error %v, want one wrapping the cause and context.Canceled", err)
		}
	}
	// serveUntil answers with answer, closing started at the first
	// command for which answer says so.
	serveUntil := func(s *client, answer func(cmd string) (lines []string, underway bool)) <-chan struct{} {
		started := make(chan struct{})
		var once sync.Once
		s.p.serve(func(cmd string) []string {
			lines, underway := answer(cmd)
			if underway {
				once.Do(func() { close(started) })
			}
			return lines
		})
		return started
	}

	t.Run("command", func(t *testing.T) {
		s := connect(t, "10.0.2", nil)
		started := serveUntil(s, func(string) ([]string, bool) { return nil, true })
		check(t, run(t, func(ctx context.Context) error { return s.q.ExecuteCont(ctx) }, started))
	})
	t.Run("ExecuteCommandAndWait", func(t *testing.T) {
		s := connect(t, "10.0.2", nil)
		started := serveUntil(s, func(string) ([]string, bool) { return []string{okReply}, true })
		check(t, run(t, func(ctx context.Context) error {
			_, err := s.q.ExecuteCommandAndWait(ctx, "x", nil, nil, EventFilter{Names: []string{"NEVER"}})
			return err
		}, started))
	})
	t.Run("Subscription.Receive", func(t *testing.T) {
		s := connect(t, "10.0.2", nil)
		sub := s.q.Subscribe(EventFilter{})
		defer sub.Close()
		check(t, run(t, func(ctx context.Context) error { _, err := sub.Receive(ctx); return err }, nil))
	})
	t.Run("Migrate", func(t *testing.T) {
		s := connect(t, "10.0.2", nil)
		cancelled := false
		started := serveUntil(s, func(cmd string) ([]string, bool) {
			switch {
			case strings.Contains(cmd, `"execute":"migrate"`):
				return []string{okReply, event("MIGRATION", `{"status": "active"}`, 1, 0)}, true
			case cmd == `{"execute":"migrate_cancel"}`:
				cancelled = true
				return []string{okReply, event("MIGRATION", `{"status": "cancelled"}`, 2, 0)}, false
			case cmd == wireQueryMigrate && cancelled:
				return []string{migrateReply("cancelled", 1, 99)}, false
			case cmd == wireQueryMigrate:
				return []string{migrateReply("active", 1, 99)}, false
			}
			return []string{okReply}, false
		})
		check(t, run(t, func(ctx context.Context) error { _, err := s.q.Migrate(ctx, "unix:/x", MigrateOptions{}); return err }, started))
	})
	t.Run("Mirror", func(t *testing.T) {
		s := connect(t, "10.0.2", nil)
		cancelled := false
		started := serveUntil(s, func(cmd string) ([]string, bool) {
			switch {
			case strings.Contains(cmd, `"blockdev-mirror"`):
				return []string{jobEvent("job0", "created"), jobEvent("job0", "running"), okReply}, true
			case strings.Contains(cmd, `"job-cancel"`):
				cancelled = true
				return []string{okReply, jobEvent("job0", "aborting"), jobEvent("job0", "concluded")}, false
			case cmd == wireQueryJobs && cancelled:
				return []string{jobsReply("job0", "concluded", "Operation canceled", 1, 10)}, false
			case cmd == wireQueryJobs:
				return []string{jobsReply("job0", "running", "", 1, 10)}, false
			}
			return []string{okReply}, false
		})
		check(t, run(t, func(ctx context.Context) error {
			_, err := s.q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{})
			return err
		}, started))
	})
	t.Run("RemoveCPU", func(t *testing.T) {
		s := connect(t, "10.0.2", nil)
		started := serveUntil(s, func(cmd string) ([]string, bool) {
			if strings.Contains(cmd, "query-hotpluggable-cpus") {
				return []string{`{"return": [{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"core-id": 1}, "qom-path": "/machine/peripheral/cpu1"}]}`}, true
			}
			return []string{okReply}, false
		})
		check(t, run(t, func(ctx context.Context) error { return s.q.RemoveCPU(ctx, "cpu1") }, started))
	})
	t.Run("QMPStart", func(t *testing.T) {
		srv := newFakeServer(t)
		accepted := make(chan struct{})
		go func() { srv.accept(); close(accepted) }() // and say nothing
		check(t, run(t, func(ctx context.Context) error { _, _, err := QMPStart(ctx, srv.path, QMPConfig{}, nil); return err }, accepted))
	})
	t.Run("SerialConsole.WaitFor", func(t *testing.T) {
		c, _ := fakeConsole(t, 0, nil)
		check(t, run(t, func(ctx context.Context) error { _, err := c.WaitFor(ctx, "never"); return err }, nil))
	})
	t.Run("GuestAgent.Exec", func(t *testing.T) {
		a, p := agentPeer(t)
		started := make(chan struct{})
		var once sync.Once
		go serveAgent(p, func(cmd string) string {
			switch {
			case strings.Contains(cmd, "guest-info"):
				return agentOffering("guest-exec", "guest-exec-status")
			case strings.Contains(cmd, `"guest-exec"`):
				return `{"return": {"pid": 7}}`
			}
			once.Do(func() { close(started) })
			return `{"return": {"exited": false}}`
		})
		check(t, run(t, func(ctx context.Context) error { _, err := a.Exec(ctx, GuestCommand{Path: "sleep"}); return err }, started))
	})
	t.Run("GuestAgent.Shutdown", func(t *testing.T) {
		a, p := agentPeer(t)
		started := make(chan struct{})
		go serveAgent(p, func(cmd string) string {
			if strings.Contains(cmd, "guest-info") {
				return agentOffering("guest-shutdown")
			}
			close(started)
			return "" // as a guest still going down
		})
		check(t, run(t, func(ctx context.Context) error { return a.Shutdown(ctx, "") }, started))
	})
	t.Run("Instance", func(t *testing.T) {
		path, _ := standIn(t, "qemu", qmpStandIn+`
qmp_greet
qmp_serve`)
		inst := startStandIn(t, path, InstanceOptions{})
		check(t, run(t, func(ctx context.Context) error { _, err := inst.Wait(ctx); return err }, nil))
		check(t, run(t, func(ctx context.Context) error { _, err := inst.Stop(ctx); return err }, nil))
	})
	// The rest, each with a context that ended before the call, and one
	// that ends with the call under way.
	for _, underway := range []bool{false, true} {
		// started is, for a stand-in, the line that sets $STARTED, where
		// the stand-in writes once under way, and the channel closed then
		// (nil when the context ends before the call).
		started := func(t *testing.T) (line string, started <-chan struct{}) {
			if !underway {
				return "STARTED=", nil
			}
			path, ch := startedFIFO(t)
			return "STARTED='" + path + "'", ch
		}
		const sleeper = `
[ -n "$STARTED" ] && echo >"$STARTED"
exec sleep 60`
		name := map[bool]string{false: "/before", true: "/under way"}[underway]
		t.Run("Instance.Stop"+name, func(t *testing.T) {
			line, ch := started(t)
			path, _ := standIn(t, "qemu", line+qmpStandIn+`
qmp_greet
qmp_serve`)
			inst := startStandIn(t, path, InstanceOptions{Env: []string{"POWERBUTTON=ignore"}})
			check(t, run(t, func(ctx context.Context) error { _, err := inst.Stop(ctx); return err }, ch))
		})
		t.Run("StartCustomInstance"+name, func(t *testing.T) {
			line, ch := started(t)
			path, _ := standIn(t, "qemu", line+sleeper)
			check(t, run(t, func(ctx context.Context) error {
				_, err := StartCustomInstance(ctx, path, nil, nil, InstanceOptions{})
				return err
			}, ch))
		})
		t.Run("LaunchCustomQemu"+name, func(t *testing.T) {
			line, ch := started(t)
			path, _ := standIn(t, "qemu", line+sleeper)
			check(t, run(t, func(ctx context.Context) error {
				_, err := LaunchCustomQemu(ctx, path, nil, nil, nil)
				return err
			}, ch))
		})
		t.Run("QemuImg"+name, func(t *testing.T) {
			line, ch := started(t)
			img := fakeQemuImg(t, line+sleeper+"\n")
			check(t, run(t, func(ctx context.Context) error {
				_, err := img.Info(ctx, filepath.Join(t.TempDir(), "x.qcow2"), InfoImageOptions{Format: "qcow2"})
				return err
			}, ch))
		})
		t.Run("ISOImage.WriteFile"+name, func(t *testing.T) {
			var ch chan struct{}
			if underway {
				ch = make(chan struct{})
			}
			check(t, run(t, func(ctx context.Context) error {
				im := &ISOImage{Label: "x"}
				err := im.AddFileFrom("a", 1<<20, func() (io.ReadCloser, error) {
					return io.NopCloser(&stallingReader{ctx: ctx, started: ch}), nil
				})
				if err != nil {
					return err
				}
				return im.WriteFile(ctx, filepath.Join(t.TempDir(), "x.iso"))
			}, ch))
		})
	}
}

// stallingReader reads zeros: the first read closes started (unless nil),
// and the next wait for ctx to end.
type stallingReader struct {
	ctx     context.Context
	started chan struct{}
	reads   int
}

func (r *stallingReader) Read(p []byte) (int, error) {
	r.reads++
	if r.reads == 2 {
		if r.started != nil {
			close(r.started)
		}
		<-r.ctx.Done()
	}
	clear(p)
	return len(p), nil
}
