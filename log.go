package qemu

// QMPLog is a logging interface used by the qemu package to log various
// interesting pieces of information. Rather than introduce a dependency on a
// given logging package, qemu presents this interface that allows clients to
// provide their own logging type which they can use to seamlessly integrate
// qemu's logs into their own logs. A QMPLog implementation can be specified in
// the QMPConfig structure.
type QMPLog interface {
	// V returns true if the given argument is less than or equal
	// to the implementation's defined verbosity level.
	V(int32) bool

	// Infof writes informational output to the log. A newline will be
	// added to the output if one is not provided.
	Infof(string, ...interface{})

	// Warningf writes warning output to the log. A newline will be
	// added to the output if one is not provided.
	Warningf(string, ...interface{})

	// Errorf writes error output to the log. A newline will be
	// added to the output if one is not provided.
	Errorf(string, ...interface{})
}

// nullLogger discards everything, so that a nil QMPLog never needs a check
// at the call sites.
type nullLogger struct{}

func (nullLogger) V(int32) bool { return false }

func (nullLogger) Infof(string, ...interface{}) {}

func (nullLogger) Warningf(string, ...interface{}) {}

func (nullLogger) Errorf(string, ...interface{}) {}

// orNullLogger returns l, or a logger that discards everything when l is nil.
func orNullLogger(l QMPLog) QMPLog {
	if l == nil {
		return nullLogger{}
	}
	return l
}
