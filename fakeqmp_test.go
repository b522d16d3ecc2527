package qemu

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The fake QMP server every test of the client uses: a scripted peer on a
// real unix socket, or on a socket pair, that greets as a chosen QEMU,
// reads the client's commands and sends what the test says.

// fakeServer is a scripted QMP server on a real unix socket.
type fakeServer struct {
	t    testing.TB
	path string
	ln   net.Listener
}

func newFakeServer(t *testing.T) *fakeServer {
	t.Helper()
	path := filepath.Join(shortTempDir(t), "qmp.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	return &fakeServer{t: t, path: path, ln: ln}
}

// peer is the server's side of one client connection.
type peer struct {
	t    testing.TB
	conn net.Conn
	r    *bufio.Reader
}

func (s *fakeServer) accept() *peer {
	c, err := s.ln.Accept()
	if err != nil {
		s.t.Errorf("fake server: accept: %v", err)
		return nil
	}
	s.t.Cleanup(func() { c.Close() })
	return &peer{t: s.t, conn: c, r: bufio.NewReader(c)}
}

// send writes each line as QEMU does, ended by CRLF. A client that has
// gone (its session shut down, the test over) takes nothing, which is no
// failure: QEMU's writes to a gone client fail the same way.
func (p *peer) send(lines ...string) {
	for _, l := range lines {
		if _, err := p.conn.Write([]byte(l + "\r\n")); err != nil {
			if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, net.ErrClosed) {
				p.t.Errorf("fake server: send: %v", err)
			}
			return
		}
	}
}

// expect reads the next command and fails the test unless it is want.
func (p *peer) expect(t testing.TB, want string) {
	t.Helper()
	if got := p.recv(); got != want {
		t.Fatalf("got command %q, want %q", got, want)
	}
}

// recv reads one command line; "" when the client has gone.
func (p *peer) recv() string {
	line, err := p.r.ReadString('\n')
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(line, "\n")
}

// serve answers every command with what answer returns, until the client
// goes. Commands are recorded in order. When the test ends, the
// connection is closed and serve's goroutine waited for, so that nothing
// it does (answer's own checks) comes after the test.
func (p *peer) serve(answer func(cmd string) []string) (done <-chan []string) {
	ch := make(chan []string, 1)
	exited := make(chan struct{})
	p.t.Cleanup(func() {
		p.conn.Close()
		<-exited
	})
	go func() {
		defer close(exited)
		var got []string
		for {
			cmd := p.recv()
			if cmd == "" {
				ch <- got
				return
			}
			got = append(got, cmd)
			p.send(answer(cmd)...)
		}
	}()
	return ch
}

func greeting(version string) string {
	var v [3]int
	for i, s := range strings.SplitN(version, ".", 3) {
		v[i], _ = strconv.Atoi(s)
	}
	return fmt.Sprintf(`{"QMP": {"version": {"qemu": {"micro": %d, "minor": %d, "major": %d}, "package": "test"}, "capabilities": ["oob"]}}`, v[2], v[1], v[0])
}

const okReply = `{"return": {}}`

func event(name, data string, sec, usec int64) string {
	if data == "" {
		return fmt.Sprintf(`{"timestamp": {"seconds": %d, "microseconds": %d}, "event": %q}`, sec, usec, name)
	}
	return fmt.Sprintf(`{"timestamp": {"seconds": %d, "microseconds": %d}, "event": %q, "data": %s}`, sec, usec, name, data)
}

// client is a client connected to a fake server.
type client struct {
	q    *QMP
	p    *peer
	gone chan struct{}
	log  *testLog
}

// connect starts a fake server speaking the given QEMU version and connects
// a client to it. The session is shut down when the test ends.
func connect(t *testing.T, version string, eventCh chan<- QMPEvent) *client {
	t.Helper()
	s := newFakeServer(t)
	peers := make(chan *peer, 1)
	go func() {
		p := s.accept()
		if p != nil {
			p.send(greeting(version))
		}
		peers <- p
	}()
	log := &testLog{}
	gone := make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	q, v, err := QMPStart(ctx, s.path, QMPConfig{EventCh: eventCh, Logger: log}, gone)
	if err != nil {
		t.Fatalf("QMPStart: %v", err)
	}
	if got := fmt.Sprintf("%d.%d", v.Major, v.Minor); !strings.HasPrefix(version, got) {
		t.Fatalf("version %s, want %s", got, version)
	}
	t.Cleanup(q.Shutdown)
	return &client{q: q, p: <-peers, gone: gone, log: log}
}

// pairPeer returns a client's end of a socket pair and a peer on the
// other, which the test closes when it ends: the fake server where there
// is no socket path, for benchmarks and Instance-like handles. The peer
// runs no goroutine of its own.
func pairPeer(tb testing.TB) (net.Conn, *peer) {
	tb.Helper()
	ours, theirs, err := socketPair()
	if err != nil {
		tb.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, f := range []*os.File{ours, theirs} {
		if conns[i], err = net.FileConn(f); err != nil {
			tb.Fatal(err)
		}
		f.Close()
	}
	tb.Cleanup(func() { conns[1].Close() })
	return conns[0], &peer{t: tb, conn: conns[1], r: bufio.NewReader(conns[1])}
}

// idleQMP is a QMP session on a peer that greets and then reads and
// answers nothing.
func idleQMP(tb testing.TB) *QMP {
	conn, p := pairPeer(tb)
	p.send(greeting("10.0.2"))
	go io.Copy(io.Discard, p.conn)
	q, _, err := qmpStartConn(context.Background(), conn, QMPConfig{}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(q.Shutdown)
	return q
}
