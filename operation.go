package qemu

// Long operations: Migrate and the block job methods (snapshots included)
// run a QEMU operation to its end, bounded by their context, on one
// mechanism, run here. It subscribes before the start is sent; learns,
// when the start's reply was lost to the context, whether QEMU started
// anything; waits for the operation's events, polling its progress;
// cancels it under a grace once the context has ended; and leaves the end
// to the operation. Each operation supplies only what is its own (steps).

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

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
// of a call whose context ended and whose migration or job QEMU had not
// ended within the grace: it is still being cancelled (or, for a
// migration that could not be cancelled, still running) in QEMU, and the
// caller may wait for its end itself (MigrationFilter, JobStatusFilter).
var ErrCancelPending = errors.New("cancel still pending in QEMU")

// steps is what a long operation supplies to operation.run. Each step that
// reports done has set the operation's result.
type steps interface {
	// query asks QEMU for the operation's state (query-migrate,
	// query-jobs); after a start whose reply was lost, it is the round
	// trip after which every event QEMU sent before that reply has been
	// handed out.
	query(ctx context.Context) error
	// startedBy reports whether ev says that QEMU started the operation.
	startedBy(ev QMPEvent) bool
	// poll reports progress, every ProgressInterval without an event.
	poll(ctx context.Context) (done bool)
	// event handles one of the operation's events.
	event(ctx context.Context, ev QMPEvent) (done bool)
	// cancel decides from QEMU's state, asked now, whether and how to
	// cancel, and does it; it is called once, bounded by the grace.
	cancel(gctx context.Context) (done bool)
	// pending returns the error of an operation the grace ran out on.
	pending() error
	// error labels err with the operation's command and object.
	error(err error) error
}

// operation is one run of a long operation.
type operation struct {
	w     waiter
	grace time.Duration // CancelGrace, or DefaultCancelGrace

	// Once the operation is to be cancelled: why, and the grace that
	// bounds the cancel and the wait for its end, which ctx no longer
	// does.
	cause     error
	gctx      context.Context
	stopGrace context.CancelFunc
}

// newOperation returns an operation that receives sub's events, polling
// every interval when poll is set, and cancels under grace (0 means
// DefaultCancelGrace).
func newOperation(sub *Subscription, interval time.Duration, poll bool, grace time.Duration) *operation {
	return &operation{w: waiter{sub: sub, interval: interval, poll: poll}, grace: orDefault(grace, DefaultCancelGrace)}
}

// run starts the operation with start, which sends its command, and runs
// it to its end. It returns the error of a start QEMU refused or never
// received; every other end is s's to report, in its result.
func (o *operation) run(ctx context.Context, s steps, start func(context.Context) error) error {
	defer o.endGrace()
	err := start(ctx)
	switch {
	case err == nil:
		return o.wait(ctx, s)
	case !unanswered(err):
		return err // refused, never sent, or QEMU gone
	}
	// QEMU sends the event that says it started (a migration's setup, a
	// job's created) before its reply: once another command has had the
	// turn, which comes after that reply, the subscription holds it.
	o.beginCancel(ctx, contextError(ctx))
	if qerr := s.query(o.gctx); qerr != nil {
		return s.error(fmt.Errorf("%w; and whether QEMU started it is unknown: %w", o.cause, qerr))
	}
	if !slices.ContainsFunc(o.w.hold(), s.startedBy) {
		return err
	}
	if s.cancel(o.gctx) {
		return nil
	}
	return o.wait(ctx, s)
}

// wait hands the operation's events and polls to s until a step says the
// operation is over. When ctx ends, the operation is cancelled, and the
// wait goes on under the grace.
func (o *operation) wait(ctx context.Context, s steps) error {
	for {
		wctx := ctx
		if o.cause != nil {
			wctx = o.gctx
		}
		ev, err := o.w.next(wctx)
		switch {
		case errors.Is(err, errPoll):
			if s.poll(wctx) {
				return nil
			}
			continue
		case err != nil && o.cause != nil && o.gctx.Err() != nil:
			return s.pending()
		case err != nil && o.cause == nil && ctx.Err() != nil:
			if o.cancel(ctx, contextError(ctx), s) {
				return nil
			}
			continue
		case err != nil && o.cause != nil:
			return s.error(fmt.Errorf("%w; and waiting for its end: %w", o.cause, err))
		case err != nil:
			return s.error(fmt.Errorf("waiting for its end: %w", err))
		}
		if s.event(wctx, ev) {
			return nil
		}
	}
}

// cancel begins the cancel of the operation, for cause: s decides, under
// the grace, what to send. It reports the operation over.
func (o *operation) cancel(ctx context.Context, cause error, s steps) bool {
	o.beginCancel(ctx, cause)
	return s.cancel(o.gctx)
}

// beginCancel records why the operation is to be cancelled and starts the
// grace that bounds the cancel and the wait for its end.
func (o *operation) beginCancel(ctx context.Context, cause error) {
	o.cause = cause
	o.gctx, o.stopGrace = graceContext(ctx, o.grace)
}

// ending returns the context to read the operation's end with, once QEMU
// has said it is over: its figures and reason are read, and a job
// dismissed, whatever ctx says, bounded by the grace (the cancel's, once
// there is one). The caller calls done.
func (o *operation) ending(ctx context.Context) (ectx context.Context, done context.CancelFunc) {
	if o.cause != nil {
		return o.gctx, func() {}
	}
	return graceContext(ctx, o.grace)
}

func (o *operation) endGrace() {
	if o.stopGrace != nil {
		o.stopGrace()
	}
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
	tctx, cancel := context.WithTimeout(ctx, orDefault(w.interval, DefaultProgressInterval))
	defer cancel()
	ev, err := w.sub.Receive(tctx)
	if err != nil && ctx.Err() == nil && tctx.Err() != nil {
		return ev, errPoll
	}
	return ev, err
}
