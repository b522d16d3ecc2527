package qemu

import (
	"errors"
	"fmt"
)

// The errors of a session, and how the package labels the errors it
// returns.

// ErrShutdown is the cause of a session ended by Shutdown: commands in
// flight then, and every command after, fail with an error that wraps it.
var ErrShutdown = errors.New("session was shut down")

// ErrDisconnected is the cause of a session whose connection ended without
// Shutdown: QEMU exited or closed the socket, a read or a write failed, or
// QEMU sent a line over the size limit. The errors that wrap it say which.
var ErrDisconnected = errors.New("connection to QEMU ended")

// QMPError is an error reply from QEMU: a command that QEMU received and
// refused. Class is QEMU's error class (e.g. "DeviceNotFound",
// "GenericError") and Desc its human-readable description.
type QMPError struct {
	Class string `json:"class"`
	Desc  string `json:"desc"`
}

// Error returns the class and the description.
func (e *QMPError) Error() string {
	return e.Class + ": " + e.Desc
}

// lostReplyError is the error of a command that was written but whose
// session ended before its reply came.
type lostReplyError struct{ err error }

func (e *lostReplyError) Error() string { return "no reply: " + e.err.Error() }

func (e *lostReplyError) Unwrap() error { return e.err }

// unansweredError is the error of a command whose context ended after it
// was written and before its reply: the peer may still act on it.
type unansweredError struct{ err error }

func (e *unansweredError) Error() string { return "gave up waiting for the reply: " + e.err.Error() }

func (e *unansweredError) Unwrap() error { return e.err }

// unanswered reports whether err says that the command was written and its
// caller stopped waiting for the reply, so that what it asked for may
// still happen (and may need undoing), as opposed to a command never sent.
func unanswered(err error) bool {
	var u *unansweredError
	return errors.As(err, &u)
}

// lostToPeer reports whether err says that the peer closed the connection
// after the command was written, as opposed to Shutdown, a context, an
// error reply or a session that had ended before.
func lostToPeer(err error) bool {
	var lost *lostReplyError
	return errors.As(err, &lost) && errors.Is(err, ErrDisconnected)
}

// labelError wraps err with the protocol, the command's name and the
// object it is about: "qmp: device_del nic0: ...".
func labelError(proto, name, about string, err error) error {
	if about != "" {
		name += " " + about
	}
	return fmt.Errorf("%s: %s: %w", proto, name, err)
}

// commandError wraps err with the command's name and the object it is
// about.
func commandError(name, about string, err error) error {
	return labelError("qmp", name, about, err)
}
