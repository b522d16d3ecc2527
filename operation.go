package qemu

import (
	"context"
	"errors"
	"time"
)

// Long operations: Migrate and the block job methods (snapshots
// included) run a QEMU operation to its end, bounded by their context, on
// the parts here.

// DefaultProgressInterval is how often Migrate and the block job methods
// query the progress they report, when their options say 0.
const DefaultProgressInterval = 200 * time.Millisecond

// DefaultCancelGrace is how long Migrate and the block job methods wait,
// once their context has ended, for QEMU to take their cancel and end
// what they cancelled, when their options say 0. QEMU ends a cancelled
// migration or job within milliseconds, unless it waits on a peer that
// does not answer (a migration's silent TCP or TLS peer, a mirror's hung
// target).
const DefaultCancelGrace = 30 * time.Second

// ErrCancelPending is wrapped, beside the context's error, by the error
// of a call whose context ended and whose cancel QEMU had not carried out
// within the grace: the migration or job is still being cancelled in
// QEMU, and the caller may wait for its end itself (MigrationFilter,
// JobStatusFilter).
var ErrCancelPending = errors.New("cancel still pending in QEMU")

// graceContext bounds what is done to undo or end something after ctx
// ended (Migrate's and the block jobs' cancels, the guest agent's thaw and
// file close): a context of its own, d long (DefaultCancelGrace when
// zero), with ctx's values.
func graceContext(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return withTimeout(context.WithoutCancel(ctx), d, DefaultCancelGrace)
}

// orDefault returns d, or def when d is zero.
func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

// errPoll is what waiter.next returns when it is time to poll.
var errPoll = errors.New("poll")

// waiter waits for the events of a long operation, and for the moments to
// poll its progress when it has a progress callback.
type waiter struct {
	sub      *Subscription
	interval time.Duration
	poll     bool
	held     []QMPEvent // taken by hold, for next to return first
}

// hold takes the events queued now, which next returns before any
// other, and returns every event held.
func (w *waiter) hold() []QMPEvent {
	done, cancel := context.WithCancel(context.Background())
	cancel()
	for {
		ev, err := w.sub.Receive(done)
		if err != nil {
			return w.held
		}
		w.held = append(w.held, ev)
	}
}

// drop takes the events queued now, as hold does, and returns them with
// those held before: next returns none of them.
func (w *waiter) drop() []QMPEvent {
	held := w.hold()
	w.held = nil
	return held
}

// next returns the next event, or errPoll when interval has passed
// without one and the operation reports progress.
func (w *waiter) next(ctx context.Context) (QMPEvent, error) {
	if len(w.held) > 0 {
		ev := w.held[0]
		w.held = w.held[1:]
		return ev, nil
	}
	if !w.poll {
		return w.sub.Receive(ctx)
	}
	tctx, cancel := withTimeout(ctx, w.interval, DefaultProgressInterval)
	defer cancel()
	ev, err := w.sub.Receive(tctx)
	if err != nil && ctx.Err() == nil && tctx.Err() != nil {
		return ev, errPoll
	}
	return ev, err
}
