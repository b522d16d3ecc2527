package qemu

// Events: the router that hands each event QEMU sends to the subscriptions
// whose filter selects it, each with a queue of its own.

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// QMPEvent contains a single QMP event, sent on the QMPConfig.EventCh channel.
type QMPEvent struct {
	// The name of the event, e.g., DEVICE_DELETED
	Name string

	// The data associated with the event. The contents of this map are
	// unprocessed by the qemu package. It is simply the result of
	// unmarshalling the QMP json event. Here's an example map
	// map[string]interface{}{
	//	"driver": "virtio-blk-pci",
	//	"drive":  "drive_3437843748734873483",
	// }
	Data map[string]interface{}

	// The event's timestamp converted to a time.Time object.
	Timestamp time.Time
}

// ErrSubscriptionClosed is what Subscription.Receive returns once the
// subscription has been closed.
var ErrSubscriptionClosed = errors.New("qmp: subscription closed")

// EventFilter selects the events a Subscription receives. An event is
// selected when it passes every part that is set; the zero EventFilter
// selects every event.
type EventFilter struct {
	// Names, if not empty, lists the event names selected, such as
	// "JOB_STATUS_CHANGE".
	Names []string

	// Data, if not empty, maps members of the event's data to the value
	// each must have. A key names a member of data, or a nested one with
	// dots ("info.device"); a string member matches its value as is, a
	// number or a boolean matches the way JSON writes it ("3", "true"),
	// and null matches "null". A member that is absent matches nothing.
	Data map[string]string

	// Match, if not nil, must return true too. It runs on the session's
	// reader goroutine while the session hands the event out, so it
	// must be quick and must not call the session.
	Match func(QMPEvent) bool
}

// matches reports whether f selects ev.
func (f *EventFilter) matches(ev QMPEvent) bool {
	if len(f.Names) > 0 && !slices.Contains(f.Names, ev.Name) {
		return false
	}
	for path, want := range f.Data {
		v, ok := dataMember(ev.Data, path)
		if !ok || !valueIs(v, want) {
			return false
		}
	}
	return f.Match == nil || f.Match(ev)
}

// label names what f waits for, for error messages.
func (f *EventFilter) label() string {
	if len(f.Names) == 0 {
		return "the event"
	}
	return strings.Join(f.Names, " or ")
}

// dataMember finds the member that a dotted path names in data.
func dataMember(data map[string]interface{}, path string) (interface{}, bool) {
	for {
		key, rest, nested := strings.Cut(path, ".")
		v, ok := data[key]
		if !ok || !nested {
			return v, ok
		}
		if data, ok = v.(map[string]interface{}); !ok {
			return nil, false
		}
		path = rest
	}
}

// valueIs reports whether a decoded JSON value is written want.
func valueIs(v interface{}, want string) bool {
	switch v := v.(type) {
	case string:
		return v == want
	case float64:
		return strconv.FormatFloat(v, 'g', -1, 64) == want
	case bool:
		return strconv.FormatBool(v) == want
	case nil:
		return want == "null"
	}
	return false
}

// statusIn returns a Match for events whose data.status is one of
// statuses, or nil for none.
func statusIn(statuses []string) func(QMPEvent) bool {
	if len(statuses) == 0 {
		return nil
	}
	statuses = slices.Clone(statuses)
	return func(ev QMPEvent) bool {
		s, _ := ev.Data["status"].(string)
		return slices.Contains(statuses, s)
	}
}

// router hands every event to the subscriptions whose filter selects it.
//
// Delivery is atomic for readers: an event is queued on every subscription
// that selects it before any of them can hand it out. Each event gets a
// sequence number; a subscription hands out only events numbered up to
// published, which publish raises once the event is queued everywhere. So
// whoever has received an event knows that every other subscription
// selecting it holds it too: a caller who ends a context on seeing an
// event knows the operation under that context was handed the event as
// well. (Before an irreversible step the operations still ask QEMU: the
// events held say where QEMU was, not where it is.)
type router struct {
	mu       sync.Mutex // guards the fields below, and is taken before a Subscription's
	subs     []*Subscription
	err      error             // why the session ended, once it has
	observer func(ev QMPEvent) // sees each event before any subscription does; nil for none
	seq      uint64            // the number of the last event published
	matched  []*Subscription   // publish's scratch: the subscriptions to wake

	// published is the number of the last event queued on every
	// subscription that selects it; Receive reads it without the lock.
	published atomic.Uint64
}

// observe makes f see each event before any subscription is offered it,
// so that what f records is there before anyone can act on the event. f
// runs on the session's reader with the router locked: it must be quick.
func (r *router) observe(f func(QMPEvent)) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.observer = f
}

// subscribe adds a subscription with a copy of f.
func (r *router) subscribe(f EventFilter) *Subscription {
	f.Names = slices.Clone(f.Names)
	f.Data = maps.Clone(f.Data)
	s := &Subscription{router: r, filter: f, ready: make(chan struct{}, 1)}
	r.mu.Lock()
	if r.err != nil {
		s.err = r.err
	} else {
		r.subs = append(r.subs, s)
	}
	r.mu.Unlock()
	return s
}

// publish queues ev on every subscription that selects it, then makes it
// visible to all of them at once, then wakes them.
func (r *router) publish(ev QMPEvent) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.observer != nil {
		r.observer(ev)
	}
	r.seq++
	for _, s := range r.subs {
		if s.filter.matches(ev) {
			s.add(ev, r.seq)
			r.matched = append(r.matched, s)
		}
	}
	r.published.Store(r.seq)
	for i, s := range r.matched {
		s.wake()
		r.matched[i] = nil
	}
	r.matched = r.matched[:0]
}

// end tells every subscription that no more events will come, and why.
func (r *router) end(err error) {
	r.mu.Lock()
	subs := r.subs
	r.subs, r.err = nil, err
	r.mu.Unlock()
	for _, s := range subs {
		s.finish(err)
	}
}

func (r *router) remove(s *Subscription) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if i := slices.Index(r.subs, s); i >= 0 {
		r.subs = slices.Delete(r.subs, i, i+1)
	}
}

// Subscription receives the events of a QMP session that its filter
// selects, in the order QEMU sent them, from the moment Subscribe returned.
// Each subscription has a queue of its own, so one that is read slowly or
// never does not stall commands, other subscriptions or EventCh, and loses
// no event; the price is memory. A queued event costs its decoded data
// and 48 bytes of queue: about 490 bytes in all for a DEVICE_DELETED
// (BenchmarkSubscriptionBacklog, 100,000 of them). The queue's memory is
// given back when it has been read empty, or when the subscription is
// closed (1.3 KB stayed held after those 100,000 were read). The events' Data maps are shared by
// every subscription that receives them: treat them as read-only.
//
// A Subscription's methods may be called from any number of goroutines.
type Subscription struct {
	router *router
	filter EventFilter
	ready  chan struct{} // holds a token when an event or the end may be there

	mu    sync.Mutex // guards the fields below
	queue eventQueue
	err   error // after the queue: why no more events come
}

// Receive returns the next event, waiting for it until ctx ends. Events
// queued before the session ended are still returned; after them, Receive
// returns the session's end, an error that wraps ErrShutdown or
// ErrDisconnected, and after Close, ErrSubscriptionClosed. A queued event
// is returned even when ctx is already done.
func (s *Subscription) Receive(ctx context.Context) (QMPEvent, error) {
	for {
		s.mu.Lock()
		ev, ok := s.queue.pop(s.router.published.Load())
		more := s.queue.len() > 0
		err := s.err
		s.mu.Unlock()
		if ok {
			if more {
				s.wake() // for another goroutine receiving too
			}
			return ev, nil
		}
		if err != nil {
			s.wake() // the end is for every goroutine receiving
			return QMPEvent{}, err
		}
		select {
		case <-s.ready:
		case <-ctx.Done():
			return QMPEvent{}, contextError(ctx)
		}
	}
}

// Close ends the subscription: it receives nothing more, and what it had
// queued is dropped. Close may be called more than once.
func (s *Subscription) Close() {
	s.router.remove(s)
	s.mu.Lock()
	s.err = ErrSubscriptionClosed
	s.queue = eventQueue{}
	s.mu.Unlock()
	s.wake()
}

// add queues ev, numbered seq; the router calls it with its mutex held,
// and wakes the subscription once ev is published.
func (s *Subscription) add(ev QMPEvent, seq uint64) {
	s.mu.Lock()
	if s.err == nil {
		s.queue.push(ev, seq)
	}
	s.mu.Unlock()
}

// finish records that no more events will come, and why.
func (s *Subscription) finish(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.wake()
}

func (s *Subscription) wake() {
	select {
	case s.ready <- struct{}{}:
	default:
	}
}

// eventQueue is a FIFO of numbered events that gives its memory back once
// empty.
type eventQueue struct {
	buf  []queuedEvent
	head int // buf[:head] has been read
}

type queuedEvent struct {
	ev  QMPEvent
	seq uint64
}

func (q *eventQueue) len() int { return len(q.buf) - q.head }

func (q *eventQueue) push(ev QMPEvent, seq uint64) {
	if len(q.buf) == cap(q.buf) && q.head > 0 && q.head >= len(q.buf)/2 {
		// Reuse the room of the events read rather than grow; at least
		// half of it, so each event is moved a bounded number of times.
		n := copy(q.buf, q.buf[q.head:])
		clear(q.buf[n:])
		q.buf, q.head = q.buf[:n], 0
	}
	q.buf = append(q.buf, queuedEvent{ev, seq})
}

// pop takes the first event, if it is numbered published or less.
func (q *eventQueue) pop(published uint64) (QMPEvent, bool) {
	if q.head == len(q.buf) || q.buf[q.head].seq > published {
		return QMPEvent{}, false
	}
	ev := q.buf[q.head].ev
	q.buf[q.head] = queuedEvent{}
	q.head++
	if q.head == len(q.buf) {
		q.head = 0
		if cap(q.buf) > 64 {
			q.buf = nil // read empty: give a large queue's memory back
		} else {
			q.buf = q.buf[:0]
		}
	}
	return ev, true
}
