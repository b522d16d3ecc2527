package qemu

import (
	"context"
	"fmt"
	"time"
)

// Contexts: the error of a method its context ended, the grace that
// bounds what is sent after a context ended, and the defaults of the
// durations and contexts a caller may leave zero.

// contextError is the error of something cut short by ctx's end: ctx.Err(),
// and the cause ctx was cancelled with when it has one, so that errors.Is
// finds either ("context canceled: the operator gave up"). Every method
// that ends on its context reports it this way.
func contextError(ctx context.Context) error {
	err := ctx.Err()
	if cause := context.Cause(ctx); cause != nil && cause != err {
		return fmt.Errorf("%w: %w", err, cause)
	}
	return err
}

// graceContext bounds what is done to undo or end something after ctx
// ended (a long operation's cancel, the guest agent's thaw and file
// close): a context of its own, d long (DefaultCancelGrace when zero),
// with ctx's values.
func graceContext(ctx context.Context, d time.Duration) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), orDefault(d, DefaultCancelGrace))
}

// orDefault returns d, or def when d is zero.
func orDefault(d, def time.Duration) time.Duration {
	if d <= 0 {
		return def
	}
	return d
}

func orBackground(ctx context.Context) context.Context {
	if ctx == nil {
		return context.Background()
	}
	return ctx
}
