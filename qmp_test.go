package qemu

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

func TestQMPStartGreeting(t *testing.T) {
	for _, version := range []string{"2.7.0", "2.8.1", "2.9.0", "7.2.22", "10.0.2"} {
		t.Run(version, func(t *testing.T) {
			s := newFakeServer(t)
			go func() {
				if p := s.accept(); p != nil {
					p.send(event("RESET", "", 1, 2), greeting(version))
				}
			}()
			gone := make(chan struct{})
			q, v, err := QMPStart(ctxTimeout(t, 5*time.Second), s.path, QMPConfig{}, gone)
			if err != nil {
				t.Fatal(err)
			}
			defer q.Shutdown()
			got := fmt.Sprintf("%d.%d.%d %v", v.Major, v.Minor, v.Micro, v.Capabilities)
			if want := version + " [oob]"; got != want {
				t.Errorf("version %q, want %q", got, want)
			}
		})
	}
}

// checkStartFails checks that a failed QMPStart closed disconnectedCh and
// left no goroutine behind.
func checkStartFails(t *testing.T, q *QMP, err error, gone chan struct{}) {
	t.Helper()
	if err == nil {
		q.Shutdown()
		t.Fatal("QMPStart succeeded")
	}
	select {
	case <-gone:
	default:
		t.Error("disconnectedCh not closed after QMPStart failed")
	}
	if gs := lingeringSessionGoroutines(); gs != "" {
		t.Errorf("goroutines left:\n%s", gs)
	}
}

func TestQMPStartNotQMP(t *testing.T) {
	s := newFakeServer(t)
	go func() {
		if p := s.accept(); p != nil {
			p.send("SSH-2.0-OpenSSH_9.2")
			time.Sleep(time.Second) // keep the connection open: the client must not wait for more
		}
	}()
	gone := make(chan struct{})
	q, _, err := QMPStart(ctxTimeout(t, 30*time.Second), s.path, QMPConfig{}, gone)
	checkStartFails(t, q, err, gone)
	if err != nil && !strings.Contains(err.Error(), "not a QMP greeting") {
		t.Errorf("error %q does not say the socket doesn't speak QMP", err)
	}
}

func TestQMPStartMissingSocket(t *testing.T) {
	gone := make(chan struct{})
	q, _, err := QMPStart(ctxTimeout(t, 5*time.Second), filepath.Join(t.TempDir(), "none.sock"), QMPConfig{}, gone)
	checkStartFails(t, q, err, gone)
	if err != nil && !errors.Is(err, os.ErrNotExist) && !strings.Contains(err.Error(), "no such file") {
		t.Errorf("error %q does not say the socket is missing", err)
	}
}

func TestQMPStartSilentServer(t *testing.T) {
	s := newFakeServer(t)
	go s.accept() // accepts and says nothing
	gone := make(chan struct{})
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	q, _, err := QMPStart(ctx, s.path, QMPConfig{}, gone)
	checkStartFails(t, q, err, gone)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("error %v is not the context's", err)
	}
}

func TestQMPStartCancelled(t *testing.T) {
	s := newFakeServer(t)
	go s.accept()
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel)
	gone := make(chan struct{})
	q, _, err := QMPStart(ctx, s.path, QMPConfig{}, gone)
	checkStartFails(t, q, err, gone)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v is not context.Canceled", err)
	}
}

// TestQMPWireFormat checks the exact bytes of every Execute method, per
// QEMU version where the form depends on it.
func TestQMPWireFormat(t *testing.T) {
	file := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(file, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	type call func(ctx context.Context, q *QMP) error
	cases := []struct {
		name     string
		versions []string
		call     call
		want     string
	}{
		{"capabilities", nil, func(ctx context.Context, q *QMP) error { return q.ExecuteQMPCapabilities(ctx) },
			`{"execute":"qmp_capabilities"}`},
		{"stop", nil, func(ctx context.Context, q *QMP) error { return q.ExecuteStop(ctx) }, `{"execute":"stop"}`},
		{"cont", nil, func(ctx context.Context, q *QMP) error { return q.ExecuteCont(ctx) }, `{"execute":"cont"}`},
		{"quit", nil, func(ctx context.Context, q *QMP) error { return q.ExecuteQuit(ctx) }, `{"execute":"quit"}`},
		{"powerdown", nil, func(ctx context.Context, q *QMP) error { return q.ExecuteSystemPowerdown(ctx) },
			`{"execute":"system_powerdown"}`},
		{"device_add", nil, func(ctx context.Context, q *QMP) error {
			return q.ExecuteDeviceAdd(ctx, "drive0", "dev0", "virtio-blk-pci", "pci.0")
		}, `{"execute":"device_add","arguments":{"id":"dev0","driver":"virtio-blk-pci","drive":"drive0","bus":"pci.0"}}`},
		{"device_add no bus", nil, func(ctx context.Context, q *QMP) error {
			return q.ExecuteDeviceAdd(ctx, "drive0", "dev0", "virtio-blk-pci", "")
		}, `{"execute":"device_add","arguments":{"id":"dev0","driver":"virtio-blk-pci","drive":"drive0"}}`},
		{"device_del", nil, func(ctx context.Context, q *QMP) error { return q.ExecuteDeviceDel(ctx, "dev0") },
			`{"execute":"device_del","arguments":{"id":"dev0"}}`},
		{"blockdev-add file", []string{"2.7.0"}, func(ctx context.Context, q *QMP) error {
			return q.ExecuteBlockdevAdd(ctx, file, "drive0")
		}, `{"execute":"blockdev-add","arguments":{"options":{"driver":"raw","id":"drive0","file":{"driver":"file","filename":"` + file + `"}}}}`},
		{"blockdev-add file", []string{"2.8.0", "2.9.0", "7.2.22", "10.0.2"}, func(ctx context.Context, q *QMP) error {
			return q.ExecuteBlockdevAdd(ctx, file, "drive0")
		}, `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"drive0","file":{"driver":"file","filename":"` + file + `"}}}`},
		{"blockdev-add device", []string{"2.7.0"}, func(ctx context.Context, q *QMP) error {
			return q.ExecuteBlockdevAdd(ctx, "/dev/null", "drive0")
		}, `{"execute":"blockdev-add","arguments":{"options":{"driver":"raw","id":"drive0","file":{"driver":"host_device","filename":"/dev/null"}}}}`},
		{"blockdev-add device", []string{"2.8.0", "7.2.22", "10.0.2"}, func(ctx context.Context, q *QMP) error {
			return q.ExecuteBlockdevAdd(ctx, "/dev/null", "drive0")
		}, `{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"drive0","file":{"driver":"host_device","filename":"/dev/null"}}}`},
		{"blockdev-del", []string{"2.7.0"}, func(ctx context.Context, q *QMP) error { return q.ExecuteXBlockdevDel(ctx, "drive0") },
			`{"execute":"x-blockdev-del","arguments":{"id":"drive0"}}`},
		{"blockdev-del", []string{"2.8.0"}, func(ctx context.Context, q *QMP) error { return q.ExecuteXBlockdevDel(ctx, "drive0") },
			`{"execute":"x-blockdev-del","arguments":{"node-name":"drive0"}}`},
		{"blockdev-del", []string{"2.9.0", "7.2.22", "10.0.2"}, func(ctx context.Context, q *QMP) error {
			return q.ExecuteXBlockdevDel(ctx, "drive0")
		}, `{"execute":"blockdev-del","arguments":{"node-name":"drive0"}}`},
		{"generic", nil, func(ctx context.Context, q *QMP) error {
			return q.ExecuteCommand(ctx, "query-status", nil, nil)
		}, `{"execute":"query-status"}`},
		{"generic args", nil, func(ctx context.Context, q *QMP) error {
			return q.ExecuteCommand(ctx, "human-monitor-command", map[string]string{"command-line": "info \"x\""}, nil)
		}, `{"execute":"human-monitor-command","arguments":{"command-line":"info \"x\""}}`},
	}
	for _, c := range cases {
		versions := c.versions
		if versions == nil {
			versions = []string{"7.2.22"}
		}
		for _, v := range versions {
			t.Run(c.name+"/"+v, func(t *testing.T) {
				s := connect(t, v, nil)
				done := s.p.serve(func(cmd string) []string {
					switch {
					case strings.Contains(cmd, "system_powerdown"):
						return []string{okReply, event("SHUTDOWN", `{"guest": true}`, 1, 0)}
					case strings.Contains(cmd, "device_del"):
						return []string{okReply, event("DEVICE_DELETED", `{"device": "dev0", "path": "/machine/peripheral/dev0"}`, 1, 0)}
					}
					return []string{okReply}
				})
				if err := c.call(ctxTimeout(t, 5*time.Second), s.q); err != nil {
					t.Fatal(err)
				}
				s.q.Shutdown()
				got := <-done
				if len(got) != 1 || got[0] != c.want {
					t.Errorf("wire:\n got %q\nwant %q", got, c.want)
				}
			})
		}
	}
}

func TestQMPErrorReply(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	s.p.serve(func(string) []string {
		return []string{`{"error": {"class": "DeviceNotFound", "desc": "Device 'dev0' not found"}}`}
	})
	err := s.q.ExecuteCommand(ctxTimeout(t, 5*time.Second), "device_del", map[string]string{"id": "dev0"}, nil)
	var qerr *QMPError
	if !errors.As(err, &qerr) {
		t.Fatalf("error %v (%T) is not a *QMPError", err, err)
	}
	if qerr.Class != "DeviceNotFound" || qerr.Desc != "Device 'dev0' not found" {
		t.Errorf("QMPError %+v", qerr)
	}
	if want := "qmp: device_del: DeviceNotFound: Device 'dev0' not found"; err.Error() != want {
		t.Errorf("message %q, want %q", err, want)
	}
	// A documented method names the object too.
	err = s.q.ExecuteDeviceDel(ctxTimeout(t, 5*time.Second), "dev0")
	if want := "qmp: device_del dev0: DeviceNotFound: Device 'dev0' not found"; err == nil || err.Error() != want {
		t.Errorf("message %v, want %q", err, want)
	}
}

func TestQMPPowerdownWaitsForShutdown(t *testing.T) {
	t.Run("reply then event", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		ch := pendingCall(func() error { return s.q.ExecuteSystemPowerdown(ctxTimeout(t, 5*time.Second)) })
		if cmd := s.p.recv(); cmd != `{"execute":"system_powerdown"}` {
			t.Fatalf("got %q", cmd)
		}
		s.p.send(okReply, event("POWERDOWN", "", 1, 0))
		stillPending(t, ch, "powerdown before SHUTDOWN")
		s.p.send(event("SHUTDOWN", `{"guest": true, "reason": "guest-shutdown"}`, 1, 5))
		if err := returnsWithin(t, 5*time.Second, func() error { return <-ch }); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("event then reply", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		ch := pendingCall(func() error { return s.q.ExecuteSystemPowerdown(ctxTimeout(t, 5*time.Second)) })
		s.p.recv()
		s.p.send(event("SHUTDOWN", `{"guest": true}`, 1, 0))
		stillPending(t, ch, "powerdown before its reply")
		s.p.send(okReply)
		if err := returnsWithin(t, 5*time.Second, func() error { return <-ch }); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("event then close", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		ch := pendingCall(func() error { return s.q.ExecuteSystemPowerdown(ctxTimeout(t, 5*time.Second)) })
		s.p.recv()
		s.p.send(event("SHUTDOWN", `{"guest": true}`, 1, 0))
		s.p.conn.Close()
		if err := returnsWithin(t, 5*time.Second, func() error { return <-ch }); err != nil {
			t.Fatalf("SHUTDOWN then close: %v", err)
		}
	})
	t.Run("close without event", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		ch := pendingCall(func() error { return s.q.ExecuteSystemPowerdown(ctxTimeout(t, 5*time.Second)) })
		s.p.recv()
		s.p.send(okReply)
		stillPending(t, ch, "powerdown")
		s.p.conn.Close()
		err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
		if err == nil || !strings.Contains(err.Error(), "connection to QEMU ended") {
			t.Fatalf("error %v, want one saying the connection ended", err)
		}
	})
	t.Run("context", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		s.p.serve(func(string) []string { return []string{okReply} })
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		err := returnsWithin(t, 5*time.Second, func() error { return s.q.ExecuteSystemPowerdown(ctx) })
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("error %v is not the context's", err)
		}
		// The session is still usable.
		if err := s.q.ExecuteCont(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatal(err)
		}
	})
}

func TestQMPDeviceDelMatchesItsDevice(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ch := pendingCall(func() error { return s.q.ExecuteDeviceDel(ctxTimeout(t, 5*time.Second), "dev1") })
	s.p.recv()
	s.p.send(okReply,
		event("DEVICE_DELETED", `{"path": "/machine/peripheral/dev1/virtio-backend"}`, 1, 0),
		event("DEVICE_DELETED", `{"device": "dev2", "path": "/machine/peripheral/dev2"}`, 1, 0))
	stillPending(t, ch, "device_del on another device's event")
	s.p.send(event("DEVICE_DELETED", `{"device": "dev1", "path": "/machine/peripheral/dev1"}`, 1, 0))
	if err := returnsWithin(t, 5*time.Second, func() error { return <-ch }); err != nil {
		t.Fatal(err)
	}
}

func TestQMPEventBeforeReply(t *testing.T) {
	events := make(chan QMPEvent, 4)
	s := connect(t, "7.2.22", events)
	s.p.serve(func(string) []string { return []string{event("STOP", "", 10, 20), okReply} })
	if err := s.q.ExecuteStop(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	select {
	case ev := <-events:
		if ev.Name != "STOP" {
			t.Errorf("event %q", ev.Name)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("no STOP event")
	}
}

func TestQMPEventsInOrderWithTimestamps(t *testing.T) {
	events := make(chan QMPEvent) // unbuffered: order must come from the client's queue
	s := connect(t, "7.2.22", events)
	const n = 200
	go func() {
		for i := 0; i < n; i++ {
			s.p.send(event("E"+strconv.Itoa(i), fmt.Sprintf(`{"n": %d}`, i), 1700000000+int64(i), int64(i*4999)%1000000))
		}
	}()
	for i := 0; i < n; i++ {
		select {
		case ev := <-events:
			if ev.Name != "E"+strconv.Itoa(i) {
				t.Fatalf("event %d is %s", i, ev.Name)
			}
			if got, _ := ev.Data["n"].(float64); int(got) != i {
				t.Fatalf("event %d data %v", i, ev.Data)
			}
			want := time.Date(2023, 11, 14, 22, 13, 20, 0, time.UTC).Add(time.Duration(i)*time.Second +
				time.Duration(int64(i*4999)%1000000)*time.Microsecond)
			if !ev.Timestamp.Equal(want) {
				t.Fatalf("event %d timestamp %v, want %v", i, ev.Timestamp.UTC(), want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("event %d not delivered", i)
		}
	}
}

func TestQMPUnreadEventChDoesNotStall(t *testing.T) {
	events := make(chan QMPEvent) // never read
	s := connect(t, "7.2.22", events)
	s.p.serve(func(string) []string { return []string{event("RESUME", "", 1, 0), okReply} })
	ctx := ctxTimeout(t, 30*time.Second)
	for i := 0; i < 1000; i++ {
		if err := s.q.ExecuteCont(ctx); err != nil {
			t.Fatalf("command %d: %v", i, err)
		}
	}
}

// TestQMPConcurrentCommandsNeverOverlap has the server check, after each
// command, that nothing else arrives before it replies, and reply with the
// command's own payload so a caller can tell a reply that isn't its own.
func TestQMPConcurrentCommandsNeverOverlap(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	var overlaps int
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			cmd := s.p.recv()
			if cmd == "" {
				return
			}
			s.p.conn.SetReadDeadline(time.Now().Add(time.Millisecond))
			if _, err := s.p.r.Peek(1); err == nil {
				overlaps++
			}
			s.p.conn.SetReadDeadline(time.Time{})
			var c struct {
				Arguments json.RawMessage `json:"arguments"`
			}
			json.Unmarshal([]byte(cmd), &c)
			s.p.send(`{"return": ` + string(c.Arguments) + `}`)
		}
	}()
	var wg sync.WaitGroup
	errs := make(chan error, 400)
	for g := 0; g < 40; g++ {
		wg.Add(1)
		go func(g int) {
			defer wg.Done()
			for i := 0; i < 10; i++ {
				n := g*100 + i
				var got struct{ N int }
				err := s.q.ExecuteCommand(context.Background(), "echo", map[string]int{"n": n}, &got)
				if err == nil && got.N != n {
					err = fmt.Errorf("command %d got the reply of %d", n, got.N)
				}
				if err != nil {
					errs <- err
				}
			}
		}(g)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	s.q.Shutdown()
	<-done
	if overlaps > 0 {
		t.Errorf("%d commands were written before the previous reply", overlaps)
	}
}

func TestQMPLateReplyDoesNotReachNextCaller(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx, cancel := context.WithCancel(context.Background())
	first := pendingCall(func() error { return s.q.ExecuteCommand(ctx, "slow", nil, nil) })
	if cmd := s.p.recv(); cmd != `{"execute":"slow"}` {
		t.Fatalf("got %q", cmd)
	}
	cancel()
	if err := returnsWithin(t, time.Second, func() error { return <-first }); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled command: %v", err)
	}
	var got map[string]string
	second := pendingCall(func() error {
		return s.q.ExecuteCommand(ctxTimeout(t, 5*time.Second), "fast", nil, &got)
	})
	// The second command must wait for the first one's reply.
	s.p.conn.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	if line, err := s.p.r.ReadString('\n'); err == nil {
		t.Fatalf("second command %q written before the first one's reply", line)
	}
	s.p.conn.SetReadDeadline(time.Time{})
	s.p.send(`{"return": {"from": "slow"}}`)
	if cmd := s.p.recv(); cmd != `{"execute":"fast"}` {
		t.Fatalf("got %q", cmd)
	}
	s.p.send(`{"return": {"from": "fast"}}`)
	if err := returnsWithin(t, 5*time.Second, func() error { return <-second }); err != nil {
		t.Fatal(err)
	}
	if got["from"] != "fast" {
		t.Errorf("second caller got the reply from %q", got["from"])
	}
}

// A context cancelled with a cause ends a command with that cause, as
// context.Cause gives it, whether the command was written or waited for
// its turn.
func TestQMPContextCause(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	cause := errors.New("the orchestrator gave up")
	ctx, cancel := context.WithCancelCause(context.Background())
	written := pendingCall(func() error { return s.q.ExecuteCommand(ctx, "slow", nil, nil) })
	s.p.recv()
	waiting := pendingCall(func() error { return s.q.ExecuteCont(ctx) })
	cancel(cause)
	for _, ch := range []<-chan error{written, waiting} {
		if err := returnsWithin(t, time.Second, func() error { return <-ch }); !errors.Is(err, cause) {
			t.Errorf("%v, want the cause", err)
		}
	}
}

func TestQMPCancelWhileWaitingForTurn(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	first := pendingCall(func() error { return s.q.ExecuteStop(ctxTimeout(t, 5*time.Second)) })
	s.p.recv()
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := returnsWithin(t, 5*time.Second, func() error { return s.q.ExecuteCont(ctx) })
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("queued command: %v", err)
	}
	s.p.send(okReply)
	if err := <-first; err != nil {
		t.Fatal(err)
	}
	// The cancelled command was never sent: the next one is the next line.
	next := pendingCall(func() error { return s.q.ExecuteQMPCapabilities(ctxTimeout(t, 5*time.Second)) })
	if cmd := s.p.recv(); cmd != `{"execute":"qmp_capabilities"}` {
		t.Fatalf("next line %q", cmd)
	}
	s.p.send(okReply)
	if err := <-next; err != nil {
		t.Fatal(err)
	}
}

func TestQMPDisconnect(t *testing.T) {
	events := make(chan QMPEvent, 10)
	s := connect(t, "7.2.22", events)
	ch := pendingCall(func() error { return s.q.ExecuteCont(ctxTimeout(t, 30*time.Second)) })
	s.p.recv()
	s.p.send(event("A", "", 1, 0), event("B", "", 1, 0))
	s.p.conn.Close()
	err := returnsWithin(t, time.Second, func() error { return <-ch })
	if err == nil || !strings.Contains(err.Error(), "connection to QEMU ended") {
		t.Fatalf("pending command: %v", err)
	}
	select {
	case <-s.gone:
	case <-time.After(time.Second):
		t.Fatal("disconnectedCh not closed")
	}
	err = returnsWithin(t, time.Second, func() error { return s.q.ExecuteStop(context.Background()) })
	if err == nil {
		t.Fatal("command after disconnect succeeded")
	}
	var names []string
	for ev := range events {
		names = append(names, ev.Name)
	}
	if got := strings.Join(names, ","); got != "A,B" {
		t.Errorf("events delivered before EventCh closed: %q", got)
	}
}

func TestQMPQuit(t *testing.T) {
	t.Run("reply", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		s.p.serve(func(string) []string { return []string{okReply} })
		if err := s.q.ExecuteQuit(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("close without reply", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		go func() {
			s.p.recv()
			s.p.send(event("SHUTDOWN", `{"guest": false, "reason": "host-qmp-quit"}`, 1, 0))
			s.p.conn.Close()
		}()
		if err := s.q.ExecuteQuit(ctxTimeout(t, 5*time.Second)); err != nil {
			t.Fatalf("quit answered by QEMU exiting: %v", err)
		}
	})
	t.Run("after disconnect", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		s.p.conn.Close()
		<-s.gone
		if err := s.q.ExecuteQuit(ctxTimeout(t, 5*time.Second)); err == nil {
			t.Fatal("quit on an ended session succeeded")
		}
	})
}

func TestQMPShutdown(t *testing.T) {
	events := make(chan QMPEvent) // never read: Shutdown must not wait for it
	s := connect(t, "7.2.22", events)
	s.p.send(event("A", "", 1, 0))
	time.Sleep(20 * time.Millisecond)
	s.q.Shutdown()
	s.q.Shutdown()
	select {
	case <-s.gone:
	default:
		t.Error("disconnectedCh not closed by Shutdown")
	}
	if _, ok := <-events; ok {
		t.Error("EventCh delivered an event after Shutdown")
	}
	err := s.q.ExecuteCont(context.Background())
	if err == nil || !strings.Contains(err.Error(), "shut down") {
		t.Errorf("command after Shutdown: %v", err)
	}
	if gs := lingeringSessionGoroutines(); gs != "" {
		t.Errorf("goroutines left after Shutdown:\n%s", gs)
	}
}

func TestQMPShutdownAfterDisconnect(t *testing.T) {
	s := connect(t, "7.2.22", make(chan QMPEvent))
	s.p.conn.Close()
	<-s.gone
	returnsWithin(t, time.Second, func() error { s.q.Shutdown(); return nil })
}

func TestQMPNoGoroutinesLeft(t *testing.T) {
	before := runtime.NumGoroutine()
	for i := 0; i < 20; i++ {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			events := make(chan QMPEvent, 1)
			s := connect(t, "7.2.22", events)
			s.p.serve(func(string) []string { return []string{event("X", "", 1, 0), okReply} })
			if err := s.q.ExecuteCont(ctxTimeout(t, 5*time.Second)); err != nil {
				t.Fatal(err)
			}
			if i%2 == 0 {
				s.q.Shutdown()
			} else {
				s.p.conn.Close()
				<-s.gone
				for range events {
				}
			}
		})
	}
	checkGoroutinesBackTo(t, before)
}

func TestQMPLongLines(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	big := strings.Repeat("x", 4<<20)
	s.p.serve(func(cmd string) []string {
		if strings.Contains(cmd, "huge") {
			return []string{`{"return": {"data": "` + strings.Repeat("y", maxLineSize) + `"}}`}
		}
		return []string{`{"return": {"data": "` + big + `"}}`}
	})
	var got struct{ Data string }
	if err := s.q.ExecuteCommand(ctxTimeout(t, 10*time.Second), "query-qmp-schema", nil, &got); err != nil {
		t.Fatal(err)
	}
	if got.Data != big {
		t.Fatalf("4 MiB reply decoded to %d bytes", len(got.Data))
	}
	err := s.q.ExecuteCommand(ctxTimeout(t, 10*time.Second), "huge", nil, nil)
	if err == nil || !strings.Contains(err.Error(), "longer than") {
		t.Fatalf("line over the cap: %v", err)
	}
	select {
	case <-s.gone:
	case <-time.After(5 * time.Second):
		t.Fatal("session not ended by a line over the cap")
	}
}

func TestQMPGarbageLinesSkipped(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	s.p.serve(func(string) []string {
		return []string{"not json", `[1, 2]`, `{"unknown": 1}`, "", `{"return": {"ok": true}}`}
	})
	var got struct{ OK bool }
	if err := s.q.ExecuteCommand(ctxTimeout(t, 5*time.Second), "query-status", nil, &got); err != nil {
		t.Fatal(err)
	}
	if !got.OK {
		t.Error("reply after garbage lost")
	}
	if log := s.log.String(); !strings.Contains(log, "not json") {
		t.Errorf("garbage line not logged; log:\n%s", log)
	}
}

func TestQMPBadArguments(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	done := s.p.serve(func(string) []string { return []string{okReply} })
	for _, args := range []interface{}{42, []string{"a"}, "s", func() {}} {
		if err := s.q.ExecuteCommand(context.Background(), "x", args, nil); err == nil {
			t.Errorf("arguments %T accepted", args)
		}
	}
	// A result the reply cannot be decoded into is refused before the
	// command runs: a device_add must not add the device and then fail.
	var notPointer struct{}
	var nilPointer *struct{}
	for _, result := range []interface{}{notPointer, nilPointer, map[string]int{}} {
		err := s.q.ExecuteCommand(context.Background(), "device_add", map[string]string{"id": "d0"}, result)
		if err == nil || !strings.Contains(err.Error(), "not a non-nil pointer") {
			t.Errorf("result %T: %v, want an error saying it is not a pointer", result, err)
		}
	}
	s.q.Shutdown()
	if got := <-done; len(got) != 0 {
		t.Errorf("commands on the wire: %q; want none", got)
	}
}

func TestQMPCommandName(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	done := s.p.serve(func(string) []string { return []string{okReply} })
	s.q.ExecuteCommand(ctxTimeout(t, 5*time.Second), "a\"b\n", nil, nil)
	s.q.Shutdown()
	got := <-done
	if want := `{"execute":"a\"b\n"}`; len(got) != 1 || got[0] != want {
		t.Errorf("wire %q, want %q", got, want)
	}
}

// FuzzQMPLines feeds arbitrary lines from the server, after or before the
// greeting, and checks that the client neither panics nor hangs and, when
// the session survives, still matches the next reply to the next command.
func FuzzQMPLines(f *testing.F) {
	f.Add([]byte(`{"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 2}}`), false)
	f.Add([]byte("garbage\n{\"return\": 1}\n{\"error\": {}}\n[]\nnull"), false)
	f.Add([]byte(`{"QMP": {"version": {"qemu": {"major": "x"}}}}`), true)
	f.Add([]byte(`{"event": "DEVICE_DELETED", "data": {"device": 1}}`), false)
	f.Add([]byte(`{"error": null, "return": null, "event": ""}`), false)
	f.Fuzz(func(t *testing.T, data []byte, beforeGreeting bool) {
		if strings.Contains(string(data), "FUZZ_END") {
			return
		}
		client, server := net.Pipe()
		defer server.Close()
		go func() {
			if beforeGreeting {
				server.Write(append(append([]byte{}, data...), '\n'))
			}
			server.Write([]byte(greeting("7.2.0") + "\n"))
			if !beforeGreeting {
				server.Write(append(append([]byte{}, data...), '\n'))
			}
			server.Write([]byte(event("FUZZ_END", "", 1, 0) + "\n"))
			r := bufio.NewReader(server)
			for {
				if _, err := r.ReadString('\n'); err != nil {
					return
				}
				server.Write([]byte(`{"return": {"fuzz": 7}}` + "\n"))
			}
		}()
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		events := make(chan QMPEvent, 100)
		gone := make(chan struct{})
		q, _, err := qmpStartConn(ctx, client, QMPConfig{EventCh: events}, gone)
		if err != nil {
			if ctx.Err() != nil {
				t.Fatalf("QMPStart hung: %v", err)
			}
			return
		}
		defer q.Shutdown()
		for ev := range events {
			if ev.Name == "FUZZ_END" {
				break
			}
		}
		var got struct{ Fuzz int }
		err = q.ExecuteCommand(ctx, "query-status", nil, &got)
		if ctx.Err() != nil {
			t.Fatal("command hung")
		}
		select {
		case <-gone:
			return // the input ended the session; an error is right
		default:
		}
		if err != nil || got.Fuzz != 7 {
			t.Fatalf("command after fuzz lines: %v, %+v", err, got)
		}
	})
}

// TestQMPRealQEMU drives a paused QEMU with no guest: capabilities, events,
// the generic method, an error reply and quit.
func TestQMPRealQEMU(t *testing.T) {
	bin, fw := requireQEMU(t)
	sock := filepath.Join(shortTempDir(t), "qmp.sock")
	args := append([]string{"-S", "-machine", "q35", "-accel", "tcg", "-nodefaults", "-display", "none",
		"-qmp", "unix:" + sock + ",server=on,wait=off"}, fw...)
	cmd := exec.Command(bin, args...)
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	reaped := make(chan struct{})
	go func() { exited <- cmd.Wait(); close(reaped) }()
	defer func() {
		cmd.Process.Kill()
		<-reaped
	}()

	ctx := ctxTimeout(t, 30*time.Second)
	events := make(chan QMPEvent, 16)
	gone := make(chan struct{})
	var q *QMP
	var v *QMPVersion
	var err error
	for {
		q, v, err = QMPStart(ctx, sock, QMPConfig{EventCh: events}, gone)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			t.Fatalf("QMPStart: %v; stderr: %s", err, stderr.String())
		}
		gone = make(chan struct{})
		time.Sleep(10 * time.Millisecond)
	}
	defer q.Shutdown()
	t.Logf("QEMU %d.%d.%d", v.Major, v.Minor, v.Micro)
	if err := q.ExecuteQMPCapabilities(ctx); err != nil {
		t.Fatal(err)
	}
	var status struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := q.ExecuteCommand(ctx, "query-status", nil, &status); err != nil {
		t.Fatal(err)
	}
	if status.Status != "prelaunch" || status.Running {
		t.Errorf("status of a VM started with -S: %+v", status)
	}
	expectEvent := func(name string) {
		t.Helper()
		select {
		case ev := <-events:
			if ev.Name != name {
				t.Fatalf("event %s, want %s", ev.Name, name)
			}
			if d := time.Since(ev.Timestamp); d < 0 || d > time.Minute {
				t.Errorf("%s timestamp %v is %v from now", name, ev.Timestamp, d)
			}
		case <-time.After(10 * time.Second):
			t.Fatalf("no %s event", name)
		}
	}
	if err := q.ExecuteCont(ctx); err != nil {
		t.Fatal(err)
	}
	expectEvent("RESUME")
	if err := q.ExecuteStop(ctx); err != nil {
		t.Fatal(err)
	}
	expectEvent("STOP")
	err = q.ExecuteDeviceDel(ctx, "nosuchdev")
	var qerr *QMPError
	if !errors.As(err, &qerr) || qerr.Class != "DeviceNotFound" {
		t.Fatalf("device_del of a missing device: %v", err)
	}
	if err := q.ExecuteQuit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone:
	case <-time.After(10 * time.Second):
		t.Fatal("disconnectedCh not closed after quit")
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("QEMU exit: %v; stderr: %s", err, stderr.String())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("QEMU did not exit after quit")
	}
}

// TestQMPCancelRacingReply cancels commands at about the moment their
// replies arrive, so that either the reply or the cancellation wins, and
// checks that the next command always gets its own reply.
func TestQMPCancelRacingReply(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	done := s.p.serve(func(cmd string) []string {
		var c struct {
			Arguments json.RawMessage `json:"arguments"`
		}
		json.Unmarshal([]byte(cmd), &c)
		return []string{`{"return": ` + string(c.Arguments) + `}`}
	})
	cancelled := 0
	for i := 0; i < 300; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), time.Duration(i%30)*10*time.Microsecond)
		var got struct{ N int }
		err := s.q.ExecuteCommand(ctx, "echo", map[string]int{"n": -i}, &got)
		cancel()
		switch {
		case errors.Is(err, context.DeadlineExceeded):
			cancelled++
		case err != nil:
			t.Fatal(err)
		case got.N != -i:
			t.Fatalf("command %d got the reply of %d", -i, got.N)
		}
		if err := s.q.ExecuteCommand(context.Background(), "echo", map[string]int{"n": i}, &got); err != nil || got.N != i {
			t.Fatalf("command %d after a cancelled one: %d, %v", i, got.N, err)
		}
	}
	t.Logf("%d of 300 commands cancelled", cancelled)
	s.q.Shutdown()
	<-done
}

// TestRealQEMUKilledWhileCommandPending kills QEMU with SIGKILL while a
// command waits for its reply: the command fails within a second, the
// session ends and none of its goroutines remains.
func TestRealQEMUKilledWhileCommandPending(t *testing.T) {
	events := make(chan QMPEvent, 64)
	inst := startGuestInstance(t, "", InstanceOptions{EventCh: events})
	q := inst.QMP()
	// A stopped QEMU reads nothing, so the command stays pending.
	if err := syscall.Kill(inst.Pid(), syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	result := make(chan error, 1)
	go func() { result <- q.ExecuteCommand(context.Background(), "query-status", nil, nil) }()
	select {
	case err := <-result:
		t.Fatalf("command returned while QEMU was stopped: %v", err)
	case <-time.After(200 * time.Millisecond):
	}
	syscall.Kill(inst.Pid(), syscall.SIGKILL)
	select {
	case err := <-result:
		if !errors.Is(err, ErrDisconnected) {
			t.Errorf("pending command: %v", err)
		}
	case <-time.After(time.Second):
		t.Fatal("pending command did not fail within a second of SIGKILL")
	}
	select {
	case <-q.Done():
	case <-time.After(time.Second):
		t.Fatal("session not ended")
	}
	for range events {
	}
	inst.Close()
	if gs := lingeringSessionGoroutines(); gs != "" {
		t.Errorf("session goroutines left:\n%s", gs)
	}
}
