package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"
)

// expect reads the next command and fails the test unless it is want.
func (p *peer) expect(t *testing.T, want string) {
	t.Helper()
	if got := p.recv(); got != want {
		t.Fatalf("got command %q, want %q", got, want)
	}
}

const (
	wireEventsOn     = `{"execute":"migrate-set-capabilities","arguments":{"capabilities":[{"capability":"events","state":true}]}}`
	wireQueryMigrate = `{"execute":"query-migrate"}`
)

func migrateReply(status string, transferred, remaining int64) string {
	return fmt.Sprintf(`{"return": {"status": %q, "ram": {"transferred": %d, "remaining": %d, "total": %d}}}`,
		status, transferred, remaining, transferred+remaining)
}

// Migrate reports the progress it polls, ends on the MIGRATION event, and
// returns the final query-migrate.
func TestMigrateProgressAndEnd(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	var seen []float64
	ch := make(chan error, 1)
	var final MigrationInfo
	go func() {
		var err error
		final, err = s.q.Migrate(ctxTimeout(t, 10*time.Second), "unix:/tmp/m.sock", MigrateOptions{
			ProgressInterval: time.Millisecond,
			Progress:         func(m MigrationInfo) { seen = append(seen, m.Progress()) },
		})
		ch <- err
	}()
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
	rest := s.p.serve(func(cmd string) []string { return []string{migrateReply("completed", 100, 0)} })
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	s.q.Shutdown()
	for _, cmd := range <-rest {
		if cmd != wireQueryMigrate {
			t.Errorf("after the end: %q", cmd)
		}
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
			if !errors.Is(err, ErrMigrationFailed) || !strings.Contains(err.Error(), "known issuer") || !strings.Contains(err.Error(), status) {
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
	ch := make(chan error, 1)
	go func() { _, err := s.q.Migrate(ctx, "fd:mig", MigrateOptions{}); ch <- err }()
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	s.p.expect(t, `{"execute":"migrate","arguments":{"uri":"fd:mig"}}`)
	s.p.send(okReply, event("MIGRATION", `{"status": "active"}`, 1, 0))
	stillPending(t, ch, "Migrate")
	cancel()
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
// is success.
func TestMigrateCompletesAsContextEnds(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := make(chan error, 1)
	go func() { _, err := s.q.Migrate(ctx, "fd:mig", MigrateOptions{}); ch <- err }()
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
	s.p.recv()
	s.p.send(okReply)
	cancel()
	s.p.expect(t, `{"execute":"migrate_cancel"}`)
	s.p.send(okReply)
	s.p.expect(t, wireQueryMigrate)
	s.p.send(migrateReply("completed", 100, 0))
	if err := <-ch; err != nil {
		t.Errorf("error %v", err)
	}
}

// QEMU dying half-way ends Migrate with the session's end.
func TestMigrateQEMUDies(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ch := make(chan error, 1)
	go func() {
		_, err := s.q.Migrate(ctxTimeout(t, 10*time.Second), "unix:/tmp/m.sock", MigrateOptions{
			Progress: func(MigrationInfo) {}, ProgressInterval: time.Millisecond})
		ch <- err
	}()
	s.p.expect(t, wireEventsOn)
	s.p.send(okReply)
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
