package qemu

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"math"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

const (
	wireEventsOn     = `{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}`
	wireQueryMigrate = `{"execute":"query-migrate"}`
	wireQueryStat    = `{"execute":"query-status"}`
)

// migrateOnFake starts Migrate against the fake server and answers its
// first command, which turns the events capability on.
func migrateOnFake(t *testing.T, s *client, ctx context.Context, uri string, opts MigrateOptions) <-chan error {
	t.Helper()
	ch := pendingCall(func() error { _, err := s.q.Migrate(ctx, uri, opts); return err })
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	return ch
}

func migrateReply(status string, transferred, remaining int64) string {
	return fmt.Sprintf(`{"return": {"status": %q, "total-time": 600, "ram": {"transferred": %d, "remaining": %d, "total": %d}}}`,
		status, transferred, remaining, transferred+remaining)
}

// Migrate reports the progress it polls, ends on the MIGRATION event, and
// returns the final query-migrate.
func TestMigrateProgressAndEnd(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	var seen []float64
	var final MigrationInfo
	ch := pendingCall(func() error {
		var err error
		final, err = s.q.Migrate(ctxTimeout(t, 10*time.Second), "unix:/tmp/m.sock", MigrateOptions{
			ProgressInterval: time.Millisecond,
			Progress:         func(m MigrationInfo) { seen = append(seen, m.Progress()) },
		})
		return err
	})
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"unix:/tmp/m.sock"}}`)
	s.p.send(okReply, event("MIGRATION", `{"status": "setup"}`, 1, 0))
	for _, done := range []int64{0, 25, 50} {
		s.p.expect(t, wireQueryMigrate)
		s.p.send(migrateReply("active", done, 100-done))
	}
	s.p.send(event("MIGRATION", `{"status": "completed"}`, 2, 0))
	// A poll may have been sent before the event was read, so one or two
	// queries follow.
	// Then query-status, until the source has left finish-migrate.
	states := []string{"finish-migrate", "postmigrate"}
	rest := s.p.serve(func(cmd string) []string {
		if cmd == wireQueryStat {
			st := states[0]
			states = states[1:]
			return []string{fmt.Sprintf(`{"return": {"status": %q, "running": false}}`, st)}
		}
		return []string{migrateReply("completed", 100, 0)}
	})
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	s.q.Shutdown()
	var statuses int
	for _, cmd := range <-rest {
		if cmd == wireQueryStat {
			statuses++
		} else if cmd != wireQueryMigrate {
			t.Errorf("after the end: %q", cmd)
		}
	}
	if statuses != 2 {
		t.Errorf("%d query-status after the end, want 2 (finish-migrate, postmigrate)", statuses)
	}
	if final.Status != "completed" || final.RAM == nil || final.RAM.Transferred != 100 {
		t.Errorf("final %+v", final)
	}
	if len(seen) < 4 || seen[0] != 0 || seen[1] != 0.25 || seen[2] != 0.5 || seen[len(seen)-1] != 1 {
		t.Errorf("progress %v, want 0 0.25 0.5 ... 1", seen)
	}
}

// A failed or cancelled migration is an error with QEMU's reason.
func TestMigrateFails(t *testing.T) {
	for _, status := range []string{"failed", "cancelled"} {
		t.Run(status, func(t *testing.T) {
			s := connect(t, "7.2.22", nil)
			done := s.p.serve(func(cmd string) []string {
				switch {
				case strings.Contains(cmd, `"execute":"migrate"`):
					return []string{okReply, event("MIGRATION", fmt.Sprintf(`{"status": %q}`, status), 1, 0)}
				case cmd == wireQueryMigrate:
					return []string{fmt.Sprintf(`{"return": {"status": %q, "error-desc": "TLS handshake failed: The certificate hasn't got a known issuer"}}`, status)}
				}
				return []string{okReply}
			})
			info, err := s.q.Migrate(ctxTimeout(t, 10*time.Second), "tcp:127.0.0.1:4444", MigrateOptions{})
			if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "known issuer") || status == "cancelled" && !strings.Contains(err.Error(), status) {
				t.Errorf("error %v", err)
			}
			if info.Status != status {
				t.Errorf("info %+v", info)
			}
			s.q.Shutdown()
			<-done
		})
	}
}

// When the context ends, Migrate cancels the migration and waits until
// QEMU says it is over.
func TestMigrateContextEnds(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := migrateOnFake(t, s, ctx, "fd:mig", MigrateOptions{})
	s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"fd:mig"}}`)
	s.p.send(okReply, event("MIGRATION", `{"status": "active"}`, 1, 0))
	stillPending(t, ch, "Migrate")
	cancel()
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("active", 10, 90))
	s.p.expect(t, `{"execute":"migrate_cancel"}`)
	s.p.send(okReply)
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("cancelling", 10, 90))
	stillPending(t, ch, "Migrate while cancelling")
	s.p.send(event("MIGRATION", `{"status": "cancelled"}`, 2, 0))
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("cancelled", 10, 90))
	err := <-ch
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "cancelled") {
		t.Errorf("error %v", err)
	}
}

// A migration that completes as its context ends has moved the VM: that
// is success, whether the context ended before the migrate's reply was
// read or after.
func TestMigrateCompletesAsContextEnds(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	cancelSent := false
	done := s.p.serve(func(cmd string) []string {
		switch {
		case strings.Contains(cmd, `"execute":"migrate"`):
			cancel()
			time.Sleep(10 * time.Millisecond)
			return []string{event("MIGRATION", `{"status": "setup"}`, 1, 0), okReply}
		case cmd == `{"execute":"migrate_cancel"}`:
			cancelSent = true
		case cmd == wireQueryMigrate && !cancelSent:
			return []string{migrateReply("active", 90, 10)}
		case cmd == wireQueryMigrate:
			// It completed all the same.
			return []string{migrateReply("completed", 100, 0)}
		case cmd == wireQueryStat:
			return []string{`{"return": {"status": "postmigrate", "running": false}}`}
		}
		return []string{okReply}
	})
	_, err := s.q.Migrate(ctx, "fd:mig", MigrateOptions{})
	s.q.Shutdown()
	lines := <-done
	if err != nil {
		t.Errorf("error %v", err)
	}
	if !slices.Contains(lines, `{"execute":"migrate_cancel"}`) {
		t.Errorf("sent %q, want a migrate_cancel", lines)
	}
}

// A migrate whose context ends before its reply is cancelled only if
// QEMU started a migration for it (its "setup" came): never after QEMU
// refused it, whose query-migrate is then another migration's, and never
// when it was not sent at all.
func TestMigrateCancelsOnlyWhatItStarted(t *testing.T) {
	for _, started := range []bool{false, true} {
		t.Run(fmt.Sprintf("started=%v", started), func(t *testing.T) {
			s := connect(t, "10.0.2", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cancelSent := false
			done := s.p.serve(func(cmd string) []string {
				switch {
				case strings.Contains(cmd, `"execute":"migrate"`):
					cancel()
					time.Sleep(10 * time.Millisecond)
					if started {
						return []string{event("MIGRATION", `{"status": "setup"}`, 1, 0), okReply}
					}
					return []string{`{"error": {"class": "GenericError", "desc": "There's a migration process in progress"}}`}
				case cmd == `{"execute":"migrate_cancel"}`:
					cancelSent = true
					return []string{event("MIGRATION", `{"status": "cancelling"}`, 2, 0), okReply, event("MIGRATION", `{"status": "cancelled"}`, 3, 0)}
				case cmd == wireQueryMigrate && started && !cancelSent:
					return []string{migrateReply("setup", 0, 100)}
				case cmd == wireQueryMigrate && started:
					return []string{`{"return": {"status": "cancelled"}}`}
				case cmd == wireQueryMigrate:
					// Another migration's figures, or an earlier one's.
					return []string{migrateReply("completed", 100, 0)}
				}
				return []string{okReply}
			})
			err := returnsWithin(t, 5*time.Second, func() error {
				_, err := s.q.Migrate(ctx, "fd:mig", MigrateOptions{})
				return err
			})
			s.q.Shutdown()
			lines := <-done
			if cancelled := slices.Contains(lines, `{"execute":"migrate_cancel"}`); cancelled != started {
				t.Errorf("sent %q: migrate_cancel %v, want %v", lines, cancelled, started)
			}
			var qerr *QMPError
			if err == nil || !errors.Is(err, context.Canceled) && !errors.As(err, &qerr) {
				t.Errorf("error %v, want the context's or QEMU's refusal", err)
			}
		})
	}
	// Its context ended before the call: nothing is sent.
	s := connect(t, "10.0.2", nil)
	done := s.p.serve(func(string) []string { return []string{migrateReply("completed", 100, 0)} })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.q.Migrate(ctx, "fd:mig", MigrateOptions{})
	s.q.Shutdown()
	if lines := <-done; len(lines) != 0 || !errors.Is(err, context.Canceled) {
		t.Errorf("sent %q, error %v", lines, err)
	}
}

// A migration in postcopy is not cancelled when the context ends: the
// error says so, and the migration goes on.
func TestMigratePostcopyNotCancelled(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	postcopy := s.q.Subscribe(MigrationFilter("postcopy-active"))
	defer postcopy.Close()
	done := s.p.serve(func(cmd string) []string {
		switch {
		case strings.Contains(cmd, `"execute":"migrate"`):
			return []string{okReply, event("MIGRATION", `{"status": "setup"}`, 1, 0),
				event("MIGRATION", `{"status": "active"}`, 2, 0), event("MIGRATION", `{"status": "postcopy-active"}`, 3, 0)}
		case cmd == wireQueryMigrate:
			return []string{migrateReply("postcopy-active", 50, 50)}
		}
		return []string{okReply}
	})
	ch := pendingCall(func() error { _, err := s.q.Migrate(ctx, "unix:/tmp/m.sock", MigrateOptions{}); return err })
	if _, err := postcopy.Receive(ctxTimeout(t, 5*time.Second)); err != nil {
		t.Fatal(err)
	}
	cancel()
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	s.q.Shutdown()
	lines := <-done
	if !errors.Is(err, ErrMigrationInPostcopy) || !errors.Is(err, context.Canceled) {
		t.Errorf("error %v, want one wrapping ErrMigrationInPostcopy and the context's", err)
	}
	if slices.Contains(lines, `{"execute":"migrate_cancel"}`) {
		t.Errorf("sent %q: a migration in postcopy was cancelled", lines)
	}
}

// A migration that ends as the context ends is reported as it ended,
// with QEMU's reason, whether its event or a poll saw the end first.
func TestMigrateEndsAsContextEnds(t *testing.T) {
	for _, how := range []string{"event", "poll"} {
		t.Run(how, func(t *testing.T) {
			s := connect(t, "10.0.2", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			polls := 0
			done := s.p.serve(func(cmd string) []string {
				switch {
				case cmd == wireQueryMigrate && how == "event" && polls == 0:
					polls++
					return []string{event("MIGRATION", `{"status": "failed"}`, 1, 0), migrateReply("active", 1, 99)}
				case cmd == wireQueryMigrate:
					polls++
					return []string{`{"return": {"status": "failed", "error-desc": "TLS handshake failed"}}`}
				}
				return []string{okReply}
			})
			var last MigrationInfo
			_, err := s.q.Migrate(ctx, "unix:/x", MigrateOptions{ProgressInterval: time.Millisecond,
				Progress: func(m MigrationInfo) { last = m; cancel() }})
			s.q.Shutdown()
			lines := <-done
			if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "TLS handshake failed") {
				t.Errorf("error %v, want ErrMigrationFailed with QEMU's reason", err)
			}
			if slices.Contains(lines, `{"execute":"migrate_cancel"}`) {
				t.Errorf("sent %q: an ended migration was cancelled", lines)
			}
			if last.Status != "failed" {
				t.Errorf("the last progress was %+v, not the end", last)
			}
		})
	}
}

// A completed migration whose context ends while the source settles is
// success, and the final progress is reported.
func TestMigrateSettlesAsContextEnds(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := s.p.serve(func(cmd string) []string {
		switch {
		case strings.Contains(cmd, `"execute":"migrate"`):
			return []string{okReply, event("MIGRATION", `{"status": "completed"}`, 1, 0)}
		case cmd == wireQueryMigrate:
			return []string{migrateReply("completed", 100, 0)}
		case cmd == wireQueryStat:
			// The reply first, then the end of ctx.
			s.p.send(`{"return": {"status": "finish-migrate", "running": false}}`)
			cancel()
			return nil
		}
		return []string{okReply}
	})
	var last []MigrationInfo
	info, err := s.q.Migrate(ctx, "unix:/x", MigrateOptions{ProgressInterval: time.Hour,
		Progress: func(m MigrationInfo) { last = append(last, m) }})
	s.q.Shutdown()
	<-done
	if err != nil || info.Status != "completed" {
		t.Errorf("%+v, %v", info, err)
	}
	if len(last) != 1 || last[0].Status != "completed" {
		t.Errorf("progress %+v, want the final one", last)
	}
}

// A cancel QEMU does not carry out (a migration in setup waiting on a
// silent peer stays cancelling) ends the wait after the grace, with an
// error that says so.
func TestMigrateCancelPending(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := s.p.serve(func(cmd string) []string {
		switch {
		case strings.Contains(cmd, `"execute":"migrate"`):
			return []string{okReply, event("MIGRATION", `{"status": "setup"}`, 1, 0)}
		case cmd == wireQueryMigrate:
			return []string{`{"return": {"status": "cancelling"}}`}
		case cmd == `{"execute":"migrate_cancel"}`:
			return []string{event("MIGRATION", `{"status": "cancelling"}`, 2, 0), okReply}
		}
		return []string{okReply}
	})
	ch := pendingCall(func() error {
		_, err := s.q.Migrate(ctx, "tcp:192.0.2.1:4444", MigrateOptions{CancelGrace: 50 * time.Millisecond})
		return err
	})
	stillPending(t, ch, "Migrate")
	cancel()
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	s.q.Shutdown()
	<-done
	if !errors.Is(err, ErrCancelPending) || !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "cancelling") {
		t.Errorf("error %v, want one wrapping ErrCancelPending and the context's", err)
	}
}

// QEMU dying half-way ends Migrate with the session's end.
func TestMigrateQEMUDies(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ch := migrateOnFake(t, s, ctxTimeout(t, 10*time.Second), "unix:/tmp/m.sock", MigrateOptions{
		Progress: func(MigrationInfo) {}, ProgressInterval: time.Millisecond})
	s.p.recv()
	s.p.send(okReply)
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("active", 1, 99))
	s.p.conn.Close()
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	if !errors.Is(err, ErrDisconnected) {
		t.Errorf("error %v, want one wrapping ErrDisconnected", err)
	}
}

// A refused migrate, or events that cannot be turned on, fail at once.
func TestMigrateRefused(t *testing.T) {
	for _, refused := range []string{"migrate-set-capabilities", "migrate"} {
		s := connect(t, "7.2.22", nil)
		done := s.p.serve(func(cmd string) []string {
			if strings.Contains(cmd, `"execute":"`+refused+`"`) {
				return []string{`{"error": {"class": "GenericError", "desc": "There's a migration process in progress"}}`}
			}
			return []string{okReply}
		})
		_, err := s.q.Migrate(ctxTimeout(t, 5*time.Second), "unix:/tmp/m.sock", MigrateOptions{})
		var qerr *QMPError
		if !errors.As(err, &qerr) || !strings.Contains(err.Error(), refused) {
			t.Errorf("%s refused: %v", refused, err)
		}
		s.q.Shutdown()
		<-done
	}
}

func TestMigrationArgumentsRefused(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx := ctxTimeout(t, 5*time.Second)
	if err := s.q.ExecuteMigrateSetCapabilities(ctx, nil); err == nil || !strings.Contains(err.Error(), "no capability") {
		t.Errorf("no capabilities: %v", err)
	}
	if err := s.q.ExecuteObjectAddTLSCredsX509(ctx, TLSCredsX509{ID: "t", Dir: "/d", Endpoint: "both"}); err == nil || !strings.Contains(err.Error(), `Endpoint is "both"`) {
		t.Errorf("endpoint both: %v", err)
	}
}

// FuzzMigrationInfo decodes any query-migrate reply: Progress is always a
// fraction.
func FuzzMigrationInfo(f *testing.F) {
	f.Add([]byte(`{"status": "active", "ram": {"transferred": 5, "remaining": 5}}`))
	f.Add([]byte(`{"status": "completed"}`))
	f.Add([]byte(`{"status": "active", "ram": {"transferred": 9223372036854775807, "remaining": 9223372036854775807}}`))
	f.Add([]byte(`{"ram": {"transferred": -5, "remaining": 2}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		var m MigrationInfo
		if json.Unmarshal(b, &m) != nil {
			return
		}
		if p := m.Progress(); math.IsNaN(p) || p < 0 || p > 1 {
			t.Errorf("%s: Progress %v", b, p)
		}
	})
}

// The real-VM layer: the test guest with a heartbeat on its console,
// migrated between Instances on this machine.

// migrateTo migrates src to dst, which waits on uri, and checks the end:
// the destination runs on from where the source stopped, which is left
// in postmigrate, and the last progress reported had nothing remaining.
func migrateTo(t *testing.T, src, dst *Instance, uri string) MigrationInfo {
	t.Helper()
	ctx := ctxTimeout(t, 2*time.Minute)
	var last MigrationInfo
	polls := 0
	info, err := src.QMP().Migrate(ctx, uri, MigrateOptions{ProgressInterval: 50 * time.Millisecond,
		Progress: func(m MigrationInfo) { last = m; polls++ }})
	if err != nil {
		t.Fatalf("migrate %s: %v\nsource stderr: %s\ndestination stderr: %s", uri, err, src.Stderr(), dst.Stderr())
	}
	if info.Status != "completed" || info.RAM == nil || info.RAM.Total < 256<<20 || info.RAM.Remaining != 0 {
		t.Errorf("final %+v %+v", info, info.RAM)
	}
	// The last report is the final one, and its RAM figures, not its
	// status, say that nothing remained.
	if last.Status != "completed" || last.RAM == nil || last.RAM.Remaining != 0 || last.RAM.Transferred < 1<<20 {
		t.Errorf("the last progress reported was %+v %+v (%d polls)", last, last.RAM, polls)
	}
	t.Logf("%s: %d ms, downtime %d ms, %d MB sent, %d progress reports", uri, info.TotalTime, info.Downtime, info.RAM.Transferred>>20, polls)
	checkStatus(t, src, "postmigrate")
	checkBeatsOn(t, dst, lastBeat(src), true)
	checkStatus(t, dst, "running")
	return info
}

// socketPair returns the two ends of a unix stream socket pair.
func migrationSocketPair(t *testing.T) (a, b *os.File) {
	t.Helper()
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	a, b = os.NewFile(uintptr(fds[0]), "migration-a"), os.NewFile(uintptr(fds[1]), "migration-b")
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

// TestMigrationRealQEMU moves one running guest along a chain of
// Instances: over a socket pair passed by fd, over a unix socket path,
// and over TCP with TLS; on the way, a migration to a destination that
// trusts another CA fails with QEMU's reason, and one cancelled half-way
// by its context leaves the source running. Then the guest still
// answers, a migration switched to postcopy from its progress callback
// completes, and a migration whose source dies half-way fails with the
// session's end.
func TestMigrationRealQEMU(t *testing.T) {
	vm := testVM(t)
	cur := vm.start(t, "")
	startHeartbeat(t, cur)

	step(t, "fd", func() {
		dst := vm.start(t, "defer")
		checkStatus(t, dst, "inmigrate")
		a, b := migrationSocketPair(t)
		ctx := ctxTimeout(t, 30*time.Second)
		if err := cur.QMP().ExecuteGetFD(ctx, "mig", a); err != nil {
			t.Fatal(err)
		}
		if err := dst.QMP().ExecuteGetFD(ctx, "mig", b); err != nil {
			t.Fatal(err)
		}
		a.Close()
		b.Close()
		if err := dst.QMP().ExecuteMigrateIncoming(ctx, "fd:mig"); err != nil {
			t.Fatal(err)
		}
		migrateTo(t, cur, dst, "fd:mig")
		cur = dst
	})
	if t.Failed() {
		return
	}
	step(t, "unix", func() {
		sock := filepath.Join(shortTempDir(t), "mig.sock")
		dst := vm.start(t, "defer")
		if err := dst.QMP().ExecuteMigrateIncoming(ctxTimeout(t, 30*time.Second), "unix:"+sock); err != nil {
			t.Fatal(err)
		}
		migrateTo(t, cur, dst, "unix:"+sock)
		cur = dst
	})
	if t.Failed() {
		return
	}
	pki := makePKI(t)
	step(t, "tls wrong CA", func() {
		dst := vm.start(t, "defer")
		uri := listenTLS(t, dst, pki.server)
		setTLSClient(t, cur, pki.otherCA)
		beat := lastBeat(cur)
		_, err := cur.QMP().Migrate(ctxTimeout(t, time.Minute), uri, MigrateOptions{})
		if !errors.Is(err, ErrMigrationFailed) {
			t.Fatalf("migration to a destination of another CA: %v", err)
		}
		t.Logf("wrong CA: %v", err)
		info, _ := cur.QMP().ExecuteQueryMigrate(ctxTimeout(t, 10*time.Second))
		if info.ErrorDesc == "" || !strings.Contains(err.Error(), info.ErrorDesc) {
			t.Errorf("error %q does not carry QEMU's reason %q", err, info.ErrorDesc)
		}
		checkStatus(t, cur, "running")
		checkBeatsOn(t, cur, beat, false)
	})
	step(t, "cancelled half-way", func() {
		setTLSClient(t, cur, "")
		dst := vm.start(t, "defer")
		sock := filepath.Join(shortTempDir(t), "mig.sock")
		if err := dst.QMP().ExecuteMigrateIncoming(ctxTimeout(t, 30*time.Second), "unix:"+sock); err != nil {
			t.Fatal(err)
		}
		// 4 MB/s: the guest's RAM that is not zero takes some 5 s.
		slow, unlimited := int64(4<<20), int64(0)
		limit(t, cur, slow)
		defer limit(t, cur, unlimited)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var at float64
		info, err := cur.QMP().Migrate(ctx, "unix:"+sock, MigrateOptions{ProgressInterval: 50 * time.Millisecond,
			Progress: func(m MigrationInfo) {
				if m.Progress() > 0.2 && at == 0 {
					at = m.Progress()
					cancel()
				}
			}})
		if !errors.Is(err, context.Canceled) || info.Status != "cancelled" {
			t.Fatalf("cancelled migration: %+v, %v", info, err)
		}
		t.Logf("cancelled at %.0f%%: %v", at*100, err)
		checkStatus(t, cur, "running")
		checkBeatsOn(t, cur, lastBeat(cur), false)
	})
	if t.Failed() {
		return
	}
	step(t, "tls", func() {
		dst := vm.start(t, "defer")
		uri := listenTLS(t, dst, pki.server)
		setTLSClient(t, cur, pki.client)
		migrateTo(t, cur, dst, uri)
		cur = dst
	})
	if t.Failed() {
		return
	}
	if got := guestAsk(t, cur, `echo ans=$(cat /proc/uptime | cut -d. -f1)`); got == "" {
		t.Errorf("the guest's uptime after three migrations: %q", got)
	}
	step(t, "postcopy", func() {
		setTLSClient(t, cur, "") // it has the destination's credentials
		dst := vm.start(t, "defer")
		ctx := ctxTimeout(t, time.Minute)
		postcopy := map[MigrationCapability]bool{MigrationPostcopyRAM: true}
		for _, inst := range []*Instance{cur, dst} {
			if err := inst.QMP().ExecuteMigrateSetCapabilities(ctx, postcopy); err != nil {
				t.Fatal(err)
			}
		}
		sock := filepath.Join(shortTempDir(t), "mig.sock")
		if err := dst.QMP().ExecuteMigrateIncoming(ctx, "unix:"+sock); err != nil {
			t.Fatal(err)
		}
		// Slow enough for precopy never to finish on its own; the switch
		// to postcopy, with the limit lifted, is made from the progress
		// callback, on Migrate's goroutine, through the same session.
		limit(t, cur, 4<<20)
		// The statuses as QEMU reports them; the polls may miss one.
		events := cur.QMP().Subscribe(MigrationFilter())
		defer events.Close()
		var statuses []string
		info, err := cur.QMP().Migrate(ctx, "unix:"+sock, MigrateOptions{ProgressInterval: 50 * time.Millisecond,
			Progress: func(m MigrationInfo) {
				if len(statuses) == 0 || statuses[len(statuses)-1] != m.Status {
					statuses = append(statuses, m.Status)
				}
				if m.Status == "active" && m.RAM != nil && m.RAM.Transferred > 1<<20 && !slices.Contains(statuses, "postcopy") {
					statuses = append(statuses, "postcopy")
					unlimited := int64(0)
					if err := cur.QMP().ExecuteMigrateSetParameters(ctx, MigrationParameters{MaxBandwidth: &unlimited}); err != nil {
						t.Errorf("lifting the bandwidth limit: %v", err)
					}
					if err := cur.QMP().ExecuteMigrateStartPostcopy(ctx); err != nil {
						t.Errorf("migrate-start-postcopy: %v", err)
					}
				}
			}})
		if err != nil {
			t.Fatalf("postcopy migration: %v (statuses %q)\nsource stderr: %s\ndestination stderr: %s", err, statuses, cur.Stderr(), dst.Stderr())
		}
		var reported []string
		for {
			ev, err := events.Receive(ctxTimeout(t, 100*time.Millisecond))
			if err != nil {
				break
			}
			reported = append(reported, fmt.Sprint(ev.Data["status"]))
		}
		t.Logf("postcopy: %d ms, statuses %q polled, %q reported", info.TotalTime, statuses, reported)
		if !slices.Contains(reported, "postcopy-active") {
			t.Errorf("the migration went through %q, never postcopy-active", reported)
		}
		checkStatus(t, cur, "postmigrate")
		checkBeatsOn(t, dst, lastBeat(cur), true)
		cur = dst
	})
	step(t, "source dies half-way", func() {
		if err := cur.QMP().ExecuteMigrateSetCapabilities(ctxTimeout(t, 10*time.Second), map[MigrationCapability]bool{MigrationPostcopyRAM: false}); err != nil {
			t.Fatal(err)
		}
		dst := vm.start(t, "defer")
		sock := filepath.Join(shortTempDir(t), "mig.sock")
		if err := dst.QMP().ExecuteMigrateIncoming(ctxTimeout(t, 30*time.Second), "unix:"+sock); err != nil {
			t.Fatal(err)
		}
		limit(t, cur, 4<<20)
		killed := false
		_, err := cur.QMP().Migrate(ctxTimeout(t, time.Minute), "unix:"+sock, MigrateOptions{ProgressInterval: 50 * time.Millisecond,
			Progress: func(m MigrationInfo) {
				if m.Progress() > 0.2 && !killed {
					killed = true
					syscall.Kill(cur.Pid(), syscall.SIGKILL)
				}
			}})
		if !errors.Is(err, ErrDisconnected) {
			t.Errorf("migration whose source was killed: %v", err)
		}
	})
}

func limit(t *testing.T, inst *Instance, bytesPerSecond int64) {
	t.Helper()
	if err := inst.QMP().ExecuteMigrateSetParameters(ctxTimeout(t, 10*time.Second), MigrationParameters{MaxBandwidth: &bytesPerSecond}); err != nil {
		t.Fatal(err)
	}
}

// listenTLS gives dst the server credentials in dir and makes it wait on
// an ephemeral TCP port of 127.0.0.1, whose URI it returns.
func listenTLS(t *testing.T, dst *Instance, dir string) string {
	t.Helper()
	ctx := ctxTimeout(t, 30*time.Second)
	q := dst.QMP()
	if err := q.ExecuteObjectAddTLSCredsX509(ctx, TLSCredsX509{ID: "tls0", Dir: dir, Endpoint: "server"}); err != nil {
		t.Fatal(err)
	}
	creds := "tls0"
	if err := q.ExecuteMigrateSetParameters(ctx, MigrationParameters{TLSCreds: &creds}); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteMigrateIncoming(ctx, "tcp:127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	info, err := q.ExecuteQueryMigrate(ctx)
	if err != nil || len(info.SocketAddresses) != 1 || info.SocketAddresses[0].Port == "" || info.SocketAddresses[0].Port == "0" {
		t.Fatalf("the destination listens on %+v, %v", info.SocketAddresses, err)
	}
	return "tcp:127.0.0.1:" + info.SocketAddresses[0].Port
}

// setTLSClient gives the source the client credentials in dir, replacing
// any it had, or turns TLS off for dir "".
func setTLSClient(t *testing.T, src *Instance, dir string) {
	t.Helper()
	ctx := ctxTimeout(t, 30*time.Second)
	q := src.QMP()
	off := ""
	if err := q.ExecuteMigrateSetParameters(ctx, MigrationParameters{TLSCreds: &off}); err != nil {
		t.Fatal(err)
	}
	q.ExecuteObjectDel(ctx, "tls-client") // from an earlier call, if any
	if dir == "" {
		return
	}
	if err := q.ExecuteObjectAddTLSCredsX509(ctx, TLSCredsX509{ID: "tls-client", Dir: dir, Endpoint: "client"}); err != nil {
		t.Fatal(err)
	}
	creds, host := "tls-client", "localhost"
	if err := q.ExecuteMigrateSetParameters(ctx, MigrationParameters{TLSCreds: &creds, TLSHostname: &host}); err != nil {
		t.Fatal(err)
	}
}

// pki holds the certificate directories of a TLS migration: the
// destination's, a source's trusting the same CA, and a source's trusting
// another CA.
type pki struct{ server, client, otherCA string }

// makePKI makes a CA and a server and a client certificate it signs, for
// localhost and 127.0.0.1, and another CA, in the file names
// tls-creds-x509 reads.
func makePKI(t *testing.T) pki {
	t.Helper()
	root := t.TempDir()
	ca, caKey := makeCert(t, "test CA", nil, nil, true, 0)
	other, otherKey := makeCert(t, "other CA", nil, nil, true, 0)
	server, serverKey := makeCert(t, "localhost", ca, caKey, false, x509.ExtKeyUsageServerAuth)
	client, clientKey := makeCert(t, "client", ca, caKey, false, x509.ExtKeyUsageClientAuth)
	p := pki{filepath.Join(root, "server"), filepath.Join(root, "client"), filepath.Join(root, "other")}
	writePEM(t, p.server, map[string][]byte{"ca-cert.pem": ca, "server-cert.pem": server, "server-key.pem": serverKey})
	writePEM(t, p.client, map[string][]byte{"ca-cert.pem": ca, "client-cert.pem": client, "client-key.pem": clientKey})
	// QEMU checks its own certificate against its CA too.
	otherClient, otherClientKey := makeCert(t, "client", other, otherKey, false, x509.ExtKeyUsageClientAuth)
	writePEM(t, p.otherCA, map[string][]byte{"ca-cert.pem": other, "client-cert.pem": otherClient, "client-key.pem": otherClientKey})
	return p
}

// makeCert makes an ECDSA P-256 certificate, self-signed when parent is
// nil, and returns it and its key, each PEM-encoded.
func makeCert(t *testing.T, name string, parent []byte, parentKey []byte, isCA bool, usage x509.ExtKeyUsage) (certPEM, keyPEM []byte) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, _ := rand.Int(rand.Reader, big.NewInt(1<<62))
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{CommonName: name},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		BasicConstraintsValid: true,
		IsCA:                  isCA,
	}
	if isCA {
		tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign
	} else {
		// QEMU's sanity check wants key encipherment beside the signature.
		tmpl.KeyUsage = x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{usage}
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.IPv4(127, 0, 0, 1)}
	}
	signer, signerKey := tmpl, interface{}(key)
	if parent != nil {
		block, _ := pem.Decode(parent)
		if signer, err = x509.ParseCertificate(block.Bytes); err != nil {
			t.Fatal(err)
		}
		block, _ = pem.Decode(parentKey)
		if signerKey, err = x509.ParsePKCS8PrivateKey(block.Bytes); err != nil {
			t.Fatal(err)
		}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, signer, &key.PublicKey, signerKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
}

func writePEM(t *testing.T, dir string, files map[string][]byte) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestMigrationQEMU72To100 moves a running guest from QEMU 7.2 to QEMU
// 10.0 on the machine type both have, pc-q35-7.2: the guest carries on.
// It needs Debian's QEMU 7.2 and the QEMU 10.0 that make test unpacks.
func TestMigrationQEMU72To100(t *testing.T) {
	requireGuest(t)
	// It runs Debian's 7.2 and the unpacked 10.0 whatever QEMU_BIN is: in
	// the 7.2 pass of make test, not again in the others.
	if realVM.bin != "/usr/bin/qemu-system-x86_64" {
		t.Skip("runs QEMU 7.2 and 10.0 themselves, in the pass of the system's QEMU")
	}
	root, _ := filepath.Abs(filepath.Join("testdata", "qemu10"))
	old := vmSpec{bin: "/usr/bin/qemu-system-x86_64", machine: "pc-q35-7.2",
		env: []string{"QEMU_MODULE_DIR=/usr/lib/x86_64-linux-gnu/qemu"}}
	young := vmSpec{bin: filepath.Join(root, "usr/bin/qemu-system-x86_64"), machine: "pc-q35-7.2",
		firmware: []string{filepath.Join(root, "usr/share/qemu"), filepath.Join(root, "usr/share/seabios")},
		env:      []string{"QEMU_MODULE_DIR=" + filepath.Join(root, "usr/lib/x86_64-linux-gnu/qemu")}}
	for _, bin := range []string{old.bin, young.bin} {
		if _, err := os.Stat(bin); err != nil {
			t.Skipf("needs QEMU 7.2 and 10.0 (make qemu10): %v", err)
		}
	}
	src := old.start(t, "")
	if v := src.Version(); v.Major != 7 || v.Minor != 2 {
		t.Fatalf("%s is QEMU %d.%d", old.bin, v.Major, v.Minor)
	}
	startHeartbeat(t, src)
	dst := young.start(t, "defer")
	if v := dst.Version(); v.Major != 10 {
		t.Fatalf("%s is QEMU %d.%d", young.bin, v.Major, v.Minor)
	}
	sock := filepath.Join(shortTempDir(t), "mig.sock")
	if err := dst.QMP().ExecuteMigrateIncoming(ctxTimeout(t, 30*time.Second), "unix:"+sock); err != nil {
		t.Fatal(err)
	}
	migrateTo(t, src, dst, "unix:"+sock)
	if got := guestAsk(t, dst, "echo ans=alive"); got != "alive" {
		t.Errorf("the guest on QEMU 10.0 answers %q", got)
	}
}

// Whether Migrate cancels, once its context has ended, is decided from
// query-migrate asked then, not from the events it holds: a migration
// QEMU reports in postcopy is never cancelled even when no event said so,
// one that is failing already needs no cancel, and one in QEMU 10.2's
// postcopy-device (which QEMU refuses to cancel, and which the source
// takes back if it fails) is waited for until it goes one way or the
// other.
func TestMigrateDecidesFromQEMUsState(t *testing.T) {
	for _, tc := range []struct {
		first  string // the status query-migrate gives when ctx has ended
		cancel bool   // whether migrate_cancel is to be sent
		next   string // the status after the next event, if any
		want   error
	}{
		{"postcopy-active", false, "", ErrMigrationInPostcopy},
		{"postcopy-paused", false, "", ErrMigrationInPostcopy},
		{"postcopy-recover", false, "", ErrMigrationInPostcopy},
		{"failing", false, "failed", ErrMigrationFailed},
		{"postcopy-device", false, "postcopy-active", ErrMigrationInPostcopy},
		{"postcopy-device", false, "failed", ErrMigrationFailed},
		{"active", true, "cancelled", context.Canceled},
	} {
		t.Run(tc.first+"-"+tc.next, func(t *testing.T) {
			s := connect(t, "11.1.3", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			var info MigrationInfo
			ch := pendingCall(func() (err error) { info, err = s.q.Migrate(ctx, "fd:mig", MigrateOptions{}); return err })
			s.p.expect(t, wireEventsOn)
			s.p.send(okReply)
			s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"fd:mig"}}`)
			s.p.send(okReply, event("MIGRATION", `{"status": "active"}`, 1, 0))
			stillPending(t, ch, "Migrate")
			cancel()
			s.p.expect(t, wireQueryMigrate)
			s.p.send(migrateReply(tc.first, 50, 50))
			if tc.cancel {
				s.p.expect(t, `{"execute":"migrate_cancel"}`)
				s.p.send(okReply)
				s.p.expect(t, wireQueryMigrate)
				s.p.send(migrateReply("cancelling", 50, 50))
			}
			want := tc.first
			if tc.next != "" {
				want = tc.next
				s.p.send(event("MIGRATION", fmt.Sprintf(`{"status": %q}`, tc.next), 2, 0))
				s.p.expect(t, wireQueryMigrate)
				s.p.send(fmt.Sprintf(`{"return": {"status": %q, "error-desc": "by the test"}}`, tc.next))
			}
			err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
			if info.Status != want {
				t.Errorf("returned status %q, want %q", info.Status, want)
			}
			if !errors.Is(err, context.Canceled) || !errors.Is(err, tc.want) {
				t.Errorf("error %v, want one wrapping the context's and %v", err, tc.want)
			}
		})
	}
}

// A migrate_cancel QEMU refuses (QEMU 10.0 and later refuse one in
// postcopy) is followed by another look at QEMU's state, which says why:
// a migration found in postcopy then is reported so, not as active.
func TestMigrateCancelRefusedLooksAgain(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var info MigrationInfo
	ch := pendingCall(func() (err error) { info, err = s.q.Migrate(ctx, "fd:mig", MigrateOptions{}); return err })
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"fd:mig"}}`)
	s.p.send(okReply, event("MIGRATION", `{"status": "active"}`, 1, 0))
	stillPending(t, ch, "Migrate")
	cancel()
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("active", 50, 50))
	s.p.expect(t, `{"execute":"migrate_cancel"}`)
	s.p.send(`{"error": {"class": "GenericError", "desc": "Postcopy migration in progress, cannot cancel."}}`)
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("postcopy-active", 60, 40))
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	if !errors.Is(err, ErrMigrationInPostcopy) || !errors.Is(err, context.Canceled) || info.Status != "postcopy-active" {
		t.Errorf("%q, %v; want postcopy-active and an error wrapping ErrMigrationInPostcopy", info.Status, err)
	}
}

// QEMU gone while Migrate waits, under the grace, for the end of the
// migration it cancelled: the error still says why it was cancelled.
func TestMigrateSessionEndsDuringCancel(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	cause := errors.New("the operator pulled the plug")
	ctx, cancel := context.WithCancelCause(context.Background())
	defer cancel(nil)
	ch := pendingCall(func() error { _, err := s.q.Migrate(ctx, "fd:mig", MigrateOptions{}); return err })
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"fd:mig"}}`)
	s.p.send(okReply, event("MIGRATION", `{"status": "active"}`, 1, 0))
	stillPending(t, ch, "Migrate")
	cancel(cause)
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("active", 50, 50))
	s.p.expect(t, `{"execute":"migrate_cancel"}`)
	s.p.send(okReply)
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("cancelling", 50, 50))
	s.p.conn.Close()
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	if !errors.Is(err, cause) || !errors.Is(err, context.Canceled) || !errors.Is(err, ErrDisconnected) {
		t.Errorf("%v; want an error wrapping the cause, the context's error and ErrDisconnected", err)
	}
}

// What Migrate reads once QEMU said the migration is over is read whatever
// its context says, but bounded by the grace: a QEMU that never answers
// the final query does not hold it for ever.
func TestMigrateFinalQueryBounded(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ch := pendingCall(func() error {
		_, err := s.q.Migrate(context.Background(), "fd:mig", MigrateOptions{CancelGrace: 50 * time.Millisecond})
		return err
	})
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"fd:mig"}}`)
	s.p.send(okReply, event("MIGRATION", `{"status": "completed"}`, 1, 0))
	s.p.expect(t, wireQueryMigrate) // and no answer
	if err := returnsWithin(t, 5*time.Second, func() error { return <-ch }); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("%v; want the grace's end", err)
	}
}
