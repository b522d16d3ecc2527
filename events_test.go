package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

func TestEventFilter(t *testing.T) {
	decode := func(data string) map[string]interface{} {
		var m map[string]interface{}
		if err := json.Unmarshal([]byte(data), &m); err != nil {
			t.Fatal(err)
		}
		return m
	}
	job := QMPEvent{Name: "JOB_STATUS_CHANGE", Data: decode(`{"id": "job0", "status": "concluded"}`)}
	block := QMPEvent{Name: "BLOCK_IO_ERROR", Data: decode(`{"device": "", "node-name": "n0", "nospace": true, "reason": "x", "action": "stop", "info": {"device": "d0", "depth": 2}, "n": null}`)}
	bare := QMPEvent{Name: "STOP"}
	for _, c := range []struct {
		name   string
		filter EventFilter
		ev     QMPEvent
		want   bool
	}{
		{"zero selects all", EventFilter{}, bare, true},
		{"name", EventFilter{Names: []string{"STOP"}}, bare, true},
		{"other name", EventFilter{Names: []string{"RESUME"}}, bare, false},
		{"one of names", EventFilter{Names: []string{"RESUME", "STOP"}}, bare, true},
		{"field", EventFilter{Data: map[string]string{"id": "job0"}}, job, true},
		{"field differs", EventFilter{Data: map[string]string{"id": "job1"}}, job, false},
		{"all fields", EventFilter{Data: map[string]string{"id": "job0", "status": "concluded"}}, job, true},
		{"one field differs", EventFilter{Data: map[string]string{"id": "job0", "status": "running"}}, job, false},
		{"absent field", EventFilter{Data: map[string]string{"path": "/x"}}, job, false},
		{"no data", EventFilter{Data: map[string]string{"id": "job0"}}, bare, false},
		{"nested", EventFilter{Data: map[string]string{"info.device": "d0"}}, block, true},
		{"nested differs", EventFilter{Data: map[string]string{"info.device": "d1"}}, block, false},
		{"nested through a string", EventFilter{Data: map[string]string{"reason.x": "x"}}, block, false},
		{"number", EventFilter{Data: map[string]string{"info.depth": "2"}}, block, true},
		{"bool", EventFilter{Data: map[string]string{"nospace": "true"}}, block, true},
		{"null", EventFilter{Data: map[string]string{"n": "null"}}, block, true},
		{"empty string", EventFilter{Data: map[string]string{"device": ""}}, block, true},
		{"object is no value", EventFilter{Data: map[string]string{"info": "d0"}}, block, false},
		{"predicate", EventFilter{Match: func(ev QMPEvent) bool { return ev.Data["action"] == "stop" }}, block, true},
		{"predicate says no", EventFilter{Names: []string{"BLOCK_IO_ERROR"}, Match: func(QMPEvent) bool { return false }}, block, false},
		{"job status", JobStatusFilter("job0", "pending", "concluded"), job, true},
		{"job status differs", JobStatusFilter("job0", "running"), job, false},
		{"other job", JobStatusFilter("job1"), job, false},
		{"any job status", JobStatusFilter("job0"), job, true},
		{"migration", MigrationFilter("completed"), QMPEvent{Name: "MIGRATION", Data: decode(`{"status": "completed"}`)}, true},
		{"migration differs", MigrationFilter("completed", "failed"), QMPEvent{Name: "MIGRATION", Data: decode(`{"status": "active"}`)}, false},
		{"unplug", DeviceUnplugFilter("d0"), QMPEvent{Name: "DEVICE_DELETED", Data: decode(`{"device": "d0", "path": "/machine/peripheral/d0"}`)}, true},
		{"unplug refused", DeviceUnplugFilter("d0"), QMPEvent{Name: "DEVICE_UNPLUG_GUEST_ERROR", Data: decode(`{"device": "d0", "path": "/machine/peripheral/d0"}`)}, true},
		{"unplug of a part", DeviceUnplugFilter("d0"), QMPEvent{Name: "DEVICE_DELETED", Data: decode(`{"path": "/machine/peripheral/d0/virtio-backend"}`)}, false},
	} {
		if got := c.filter.matches(c.ev); got != c.want {
			t.Errorf("%s: matches = %v, want %v", c.name, got, c.want)
		}
	}
}

// A subscription made before a command receives the events QEMU sends
// before the command's reply, and the wait helper returns the first event
// that completes the command, wherever it falls.
func TestSubscriptionSeesEventsBeforeReply(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	jobEvent := func(status string) string {
		return event("JOB_STATUS_CHANGE", `{"id": "job0", "status": "`+status+`"}`, 1, 0)
	}
	s.p.serve(func(string) []string {
		return []string{jobEvent("created"), jobEvent("running"), okReply, jobEvent("waiting"), jobEvent("pending"), jobEvent("concluded")}
	})
	all := s.q.Subscribe(JobStatusFilter("job0"))
	defer all.Close()
	ev, err := s.q.ExecuteCommandAndWait(ctxTimeout(t, 5*time.Second), "blockdev-create",
		map[string]string{"job-id": "job0"}, nil, JobStatusFilter("job0", "concluded"))
	if err != nil || ev.Data["status"] != "concluded" {
		t.Fatalf("ExecuteCommandAndWait = %+v, %v", ev, err)
	}
	var got []string
	for range 5 {
		ev, err := all.Receive(ctxTimeout(t, 5*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		got = append(got, ev.Data["status"].(string))
	}
	if want := "created running waiting pending concluded"; strings.Join(got, " ") != want {
		t.Errorf("subscription got %q, want %q", got, want)
	}

	// The wait can also complete before the reply comes.
	s2 := connect(t, "7.2.22", nil)
	s2.p.serve(func(string) []string { return []string{jobEvent("concluded"), okReply} })
	if _, err := s2.q.ExecuteCommandAndWait(ctxTimeout(t, 5*time.Second), "x", nil, nil, JobStatusFilter("job0", "concluded")); err != nil {
		t.Fatal(err)
	}
}

func TestExecuteCommandAndWaitFailures(t *testing.T) {
	t.Run("error reply", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		s.p.serve(func(string) []string { return []string{`{"error": {"class": "GenericError", "desc": "no"}}`} })
		_, err := s.q.ExecuteCommandAndWait(ctxTimeout(t, 5*time.Second), "job-x", nil, nil, JobStatusFilter("j"))
		var qerr *QMPError
		if !errors.As(err, &qerr) || err.Error() != "qmp: job-x: GenericError: no" {
			t.Errorf("error %v", err)
		}
	})
	t.Run("context", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		s.p.serve(func(string) []string { return []string{okReply} })
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
		defer cancel()
		_, err := s.q.ExecuteCommandAndWait(ctx, "migrate", nil, nil, MigrationFilter("completed"))
		if !errors.Is(err, context.DeadlineExceeded) || !strings.Contains(err.Error(), "waiting for MIGRATION") {
			t.Errorf("error %v", err)
		}
	})
	t.Run("disconnect", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		go func() {
			s.p.recv()
			s.p.send(okReply)
			s.p.conn.Close()
		}()
		_, err := s.q.ExecuteCommandAndWait(ctxTimeout(t, 5*time.Second), "migrate", nil, nil, MigrationFilter("completed"))
		if !errors.Is(err, ErrDisconnected) {
			t.Errorf("error %v", err)
		}
	})
	t.Run("event then disconnect without reply", func(t *testing.T) {
		s := connect(t, "7.2.22", nil)
		go func() {
			s.p.recv()
			s.p.send(event("MIGRATION", `{"status": "completed"}`, 1, 0))
			s.p.conn.Close()
		}()
		ev, err := s.q.ExecuteCommandAndWait(ctxTimeout(t, 5*time.Second), "migrate", nil, nil, MigrationFilter("completed"))
		if err != nil || ev.Name != "MIGRATION" {
			t.Errorf("ExecuteCommandAndWait = %+v, %v", ev, err)
		}
	})
}

// ExecuteDeviceDel ends at once when the guest refuses the unplug of its
// device, and not for another device's refusal.
func TestQMPDeviceDelGuestRefused(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ch := pendingCall(func() error { return s.q.ExecuteDeviceDel(ctxTimeout(t, 30*time.Second), "dimm1") })
	s.p.recv()
	s.p.send(okReply, event("DEVICE_UNPLUG_GUEST_ERROR", `{"device": "dimm2", "path": "/machine/peripheral/dimm2"}`, 1, 0))
	stillPending(t, ch, "device_del on another device's refusal")
	s.p.send(event("DEVICE_UNPLUG_GUEST_ERROR", `{"device": "dimm1", "path": "/machine/peripheral/dimm1"}`, 1, 0))
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	if !errors.Is(err, ErrUnplugRefused) || err.Error() != "qmp: device_del dimm1: the guest refused the unplug" {
		t.Fatalf("error %v, want the guest's refusal", err)
	}
}

// A subscription that is never read holds every event in order while
// commands go on at full speed; reading it empty gives its memory back.
func TestSubscriptionBacklog(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	const perCommand, commands = 100, 1000
	n := 0
	s.p.serve(func(string) []string {
		lines := make([]string, 0, perCommand+1)
		for range perCommand {
			lines = append(lines, event("DEVICE_DELETED", fmt.Sprintf(`{"device": "d%d", "path": "/machine/peripheral/d%d"}`, n, n), 1, 0))
			n++
		}
		return append(lines, okReply)
	})
	unread := s.q.Subscribe(EventFilter{Names: []string{"DEVICE_DELETED"}})
	defer unread.Close()
	other := s.q.Subscribe(EventFilter{Data: map[string]string{"device": "d99999"}})
	defer other.Close()
	ctx := ctxTimeout(t, time.Minute)
	for i := range commands {
		if err := s.q.ExecuteCont(ctx); err != nil {
			t.Fatalf("command %d: %v", i, err)
		}
	}
	if ev, err := other.Receive(ctx); err != nil || ev.Data["device"] != "d99999" {
		t.Fatalf("filtered subscription: %+v, %v", ev, err)
	}
	for i := range perCommand * commands {
		ev, err := unread.Receive(ctx)
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		if want := "d" + strconv.Itoa(i); ev.Data["device"] != want {
			t.Fatalf("event %d is for %v, want %s", i, ev.Data["device"], want)
		}
	}
	unread.mu.Lock()
	held := cap(unread.queue.buf)
	unread.mu.Unlock()
	if held != 0 {
		t.Errorf("queue read empty still holds room for %d events", held)
	}
}

func TestSubscriptionCloseAndEnd(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	sub := s.q.Subscribe(EventFilter{})
	kept := s.q.Subscribe(EventFilter{})
	s.p.send(event("A", "", 1, 0))
	if ev, err := sub.Receive(ctxTimeout(t, 5*time.Second)); err != nil || ev.Name != "A" {
		t.Fatalf("Receive = %+v, %v", ev, err)
	}
	s.p.send(event("B", "", 1, 0))
	for _, want := range []string{"A", "B"} {
		if ev, err := kept.Receive(ctxTimeout(t, 5*time.Second)); err != nil || ev.Name != want {
			t.Fatalf("Receive = %+v, %v; want %s", ev, err, want)
		}
	}
	waitQueued(t, sub, 1) // B
	sub.Close()
	sub.Close()
	s.q.router.mu.Lock()
	left := len(s.q.router.subs)
	s.q.router.mu.Unlock()
	if left != 1 {
		t.Errorf("router holds %d subscriptions after one of two was closed", left)
	}
	if _, err := sub.Receive(context.Background()); !errors.Is(err, ErrSubscriptionClosed) {
		t.Errorf("Receive after Close: %v", err)
	}

	// A queued event is returned even with a done context; an empty
	// queue returns the context's error.
	s.p.send(event("C", "", 1, 0))
	waitQueued(t, kept, 1)
	done, cancel := context.WithCancel(context.Background())
	cancel()
	if ev, err := kept.Receive(done); err != nil || ev.Name != "C" {
		t.Errorf("Receive with a done context and an event queued = %+v, %v", ev, err)
	}
	if _, err := kept.Receive(done); !errors.Is(err, context.Canceled) {
		t.Errorf("Receive with a done context and nothing queued: %v", err)
	}

	// The session's end comes after what was queued before it.
	s.p.send(event("D", "", 1, 0))
	s.p.conn.Close()
	<-s.q.Done()
	if ev, err := kept.Receive(context.Background()); err != nil || ev.Name != "D" {
		t.Errorf("Receive after the end = %+v, %v; want the event queued before it", ev, err)
	}
	if _, err := kept.Receive(context.Background()); !errors.Is(err, ErrDisconnected) {
		t.Errorf("Receive after the queue: %v, want ErrDisconnected", err)
	}
	late := s.q.Subscribe(EventFilter{})
	if _, err := late.Receive(context.Background()); !errors.Is(err, ErrDisconnected) {
		t.Errorf("Receive on a subscription made after the end: %v", err)
	}
	kept.Close()
	late.Close()
}

// waitQueued waits until sub has n events queued.
func waitQueued(t *testing.T, sub *Subscription, n int) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		sub.mu.Lock()
		got := sub.queue.len()
		sub.mu.Unlock()
		if got >= n {
			return
		}
	}
	t.Fatalf("%d events never queued", n)
}

// Goroutines receiving from one subscription get every event once.
func TestSubscriptionConcurrentReceivers(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	sub := s.q.Subscribe(EventFilter{})
	defer sub.Close()
	const n = 2000
	go func() {
		for i := range n {
			s.p.send(event("E", `{"n": `+strconv.Itoa(i)+`}`, 1, 0))
		}
	}()
	var mu sync.Mutex
	seen := make(map[int]int)
	var wg sync.WaitGroup
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				ctx, cancel := context.WithTimeout(context.Background(), 500*time.Millisecond)
				ev, err := sub.Receive(ctx)
				cancel()
				if err != nil {
					return
				}
				mu.Lock()
				seen[int(ev.Data["n"].(float64))]++
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(seen) != n {
		t.Errorf("%d distinct events received, want %d", len(seen), n)
	}
	for i, c := range seen {
		if c != 1 {
			t.Errorf("event %d received %d times", i, c)
		}
	}
}

// Sessions with subscriptions and EventCh leave no goroutine behind,
// however they end.
func TestSubscriptionsLeaveNoGoroutines(t *testing.T) {
	before := runtime.NumGoroutine()
	for i := range 20 {
		t.Run(strconv.Itoa(i), func(t *testing.T) {
			s := connect(t, "7.2.22", make(chan QMPEvent))
			s.p.serve(func(string) []string { return []string{event("X", "", 1, 0), okReply} })
			read := s.q.Subscribe(EventFilter{Names: []string{"X"}})
			s.q.Subscribe(EventFilter{}) // never read, never closed
			waiting := pendingCall(func() error {
				_, err := s.q.Subscribe(EventFilter{Names: []string{"Y"}}).Receive(context.Background())
				return err
			})
			if _, err := s.q.ExecuteCommandAndWait(ctxTimeout(t, 5*time.Second), "cont", nil, nil, EventFilter{Names: []string{"X"}}); err != nil {
				t.Fatal(err)
			}
			if _, err := read.Receive(ctxTimeout(t, 5*time.Second)); err != nil {
				t.Fatal(err)
			}
			if i%2 == 0 {
				s.q.Shutdown()
			} else {
				s.p.conn.Close()
			}
			if err := returnsWithin(t, 5*time.Second, func() error { return <-waiting }); err == nil {
				t.Error("a Receive waiting at the end returned no error")
			}
			s.q.Shutdown()
		})
	}
	checkGoroutinesBackTo(t, before)
}

// TestRealQEMUJobAndSubscriptions drives a paused QEMU: a blockdev-create
// job run to "concluded" through the wait helper and dismissed, and stop
// and cont seen through two subscriptions at once.
func TestRealQEMUJobAndSubscriptions(t *testing.T) {
	q, _ := startPausedQEMU(t)
	ctx := ctxTimeout(t, 60*time.Second)
	dir := t.TempDir()
	image := filepath.Join(dir, "new.qcow2")
	if err := os.WriteFile(image, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteCommand(ctx, "blockdev-add", map[string]string{"driver": "file", "node-name": "proto0", "filename": image}, nil); err != nil {
		t.Fatal(err)
	}
	create := map[string]interface{}{
		"job-id":  "create0",
		"options": map[string]interface{}{"driver": "qcow2", "file": "proto0", "size": 64 << 20},
	}
	all := q.Subscribe(JobStatusFilter("create0"))
	defer all.Close()
	ev, err := q.ExecuteCommandAndWait(ctx, "blockdev-create", create, nil, JobStatusFilter("create0", "concluded"))
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("job event: %+v", ev.Data)
	var statuses []string
	for {
		ev, err := all.Receive(ctx)
		if err != nil {
			t.Fatal(err)
		}
		statuses = append(statuses, ev.Data["status"].(string))
		if ev.Data["status"] == "concluded" {
			break
		}
	}
	// QEMU sends "created" and "running" before its reply: a wait that
	// subscribed after the reply would never see them.
	if got := strings.Join(statuses, " "); !strings.HasPrefix(got, "created running") || !strings.HasSuffix(got, "concluded") {
		t.Errorf("job went through %q", got)
	}
	var jobs []struct {
		ID     string `json:"id"`
		Status string `json:"status"`
		Error  string `json:"error"`
	}
	if err := q.ExecuteCommand(ctx, "query-jobs", nil, &jobs); err != nil || len(jobs) != 1 || jobs[0].Status != "concluded" || jobs[0].Error != "" {
		t.Fatalf("query-jobs = %+v, %v", jobs, err)
	}
	if _, err := q.ExecuteCommandAndWait(ctx, "job-dismiss", map[string]string{"id": "create0"}, nil, JobStatusFilter("create0", "null")); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteCommand(ctx, "query-jobs", nil, &jobs); err != nil || len(jobs) != 0 {
		t.Fatalf("query-jobs after dismiss = %+v, %v", jobs, err)
	}
	if err := q.ExecuteCommand(ctx, "blockdev-del", map[string]string{"node-name": "proto0"}, nil); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "info", "--output=json", image).Output(); err != nil {
		t.Logf("qemu-img info: %v", err)
	} else if !strings.Contains(string(out), `"format": "qcow2"`) || !strings.Contains(string(out), `"virtual-size": 67108864`) {
		t.Errorf("the job made %s", out)
	}

	stops := q.Subscribe(EventFilter{Names: []string{"STOP"}})
	defer stops.Close()
	resumes := q.Subscribe(EventFilter{Names: []string{"RESUME"}})
	defer resumes.Close()
	for range 3 {
		if err := q.ExecuteCont(ctx); err != nil {
			t.Fatal(err)
		}
		if err := q.ExecuteStop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for name, sub := range map[string]*Subscription{"STOP": stops, "RESUME": resumes} {
		for i := range 3 {
			ev, err := sub.Receive(ctx)
			if err != nil || ev.Name != name {
				t.Fatalf("%s subscription, event %d: %+v, %v", name, i, ev, err)
			}
		}
	}
	quiet, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	if ev, err := stops.Receive(quiet); err == nil {
		t.Errorf("STOP subscription got a fourth event: %+v", ev)
	}
}

// Every goroutine blocked in Receive learns of the end or the Close.
func TestSubscriptionEndWakesAllReceivers(t *testing.T) {
	for _, how := range []string{"end", "close"} {
		t.Run(how, func(t *testing.T) {
			var r router
			sub := r.subscribe(EventFilter{})
			errs := make(chan error, 2)
			for i := 0; i < 2; i++ {
				go func() {
					ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
					defer cancel()
					_, err := sub.Receive(ctx)
					errs <- err
				}()
			}
			time.Sleep(100 * time.Millisecond)
			if how == "end" {
				r.end(ErrShutdown)
			} else {
				sub.Close()
			}
			for i := 0; i < 2; i++ {
				err := <-errs
				if errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("receiver %d stayed blocked after %s: %v", i, how, err)
				}
			}
		})
	}
}

// The queue against a slice: random pushes and pops, in order, none lost,
// and none popped before it is numbered published.
func TestEventQueueModel(t *testing.T) {
	r := rand.New(rand.NewSource(1))
	for round := 0; round < 200; round++ {
		var q eventQueue
		var model []uint64 // the numbers of the events queued, in order
		var pushed, published uint64
		for i := 0; i < 5000; i++ {
			switch r.Intn(4) {
			case 0, 1:
				pushed++
				q.push(QMPEvent{Name: strconv.FormatUint(pushed, 10)}, pushed)
				model = append(model, pushed)
			case 2:
				// Publishing catches up with pushing in steps.
				published = min(pushed, published+uint64(r.Intn(4)))
			case 3:
				ev, ok := q.pop(published)
				want := len(model) > 0 && model[0] <= published
				if ok != want || ok && ev.Name != strconv.FormatUint(model[0], 10) {
					t.Fatalf("pop(%d) = %q, %v; model %v", published, ev.Name, ok, model[:min(3, len(model))])
				}
				if ok {
					model = model[1:]
				}
			}
			if q.len() != len(model) {
				t.Fatalf("len %d, model %d", q.len(), len(model))
			}
		}
	}
}

// Delivery is atomic for readers: whoever has received an event from one
// subscription finds it queued on every other subscription that selects
// it, so "I saw X, so you hold X" holds (Migrate depends on it).
func TestDeliveryAtomicForReaders(t *testing.T) {
	var r router
	first := r.subscribe(EventFilter{})
	defer first.Close()
	others := make([]*Subscription, 8)
	for i := range others {
		others[i] = r.subscribe(EventFilter{})
		defer others[i].Close()
	}
	const events = 20000
	go func() {
		for i := range events {
			r.publish(QMPEvent{Name: strconv.Itoa(i)})
		}
	}()
	done, cancel := context.WithCancel(context.Background())
	cancel()
	ctx := ctxTimeout(t, time.Minute)
	for i := range events {
		ev, err := first.Receive(ctx)
		if err != nil {
			t.Fatalf("event %d: %v", i, err)
		}
		// The last subscription is the one published to last.
		last := others[len(others)-1]
		if got, err := last.Receive(done); err != nil || got.Name != ev.Name {
			t.Fatalf("event %s received from one subscription, but another holds %q, %v", ev.Name, got.Name, err)
		}
	}
}
