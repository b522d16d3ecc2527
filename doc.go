// Package qemu launches QEMU virtual machines and manages them over QMP,
// the QEMU Machine Protocol.
//
// # Where to start
//
// StartInstance runs a VM described by a Config as an Instance: a QEMU
// process in the foreground of this one, whose QMP session is negotiated
// when the start returns, whose stderr is always drained, whose console
// and guest agent are optional channels it inherits, and whose Stop ends
// it in bounded steps, from the power button to SIGKILL.
// StartCustomInstance does the same for a hand-written command line, and
// AttachInstance for a QEMU started by an earlier process.
//
// QMPStart connects to the QMP socket of a QEMU started some other way
// (LaunchQemu and LaunchCustomQemu, the original package's launchers, or
// anyone's). On a QMP session, ExecuteCommand runs any command, the typed
// methods run the common ones, and Subscribe receives the events a filter
// selects, in order, from the moment it returns: subscribe before sending
// the command whose events you wait for.
//
// OpenGuestAgent (or Instance.GuestAgent) talks to the guest agent in the
// guest; QemuImg runs qemu-img; ISOImage, NoCloudSeed and ConfigDriveSeed
// write seed images for cloud-init.
//
// # Names
//
// A method named Execute<Command> sends one QMP command, <command>, and
// returns its reply: ExecuteDeviceAdd sends device_add. A method named by
// a bare verb runs an operation to its end, however many commands and
// events that takes: AddCPU, RemoveCPU, Migrate, Mirror, Stream, Commit,
// Backup, SaveSnapshot. The long ones among them, which QEMU runs as a
// migration or a job, are cancelled in QEMU when their context ends;
// RemoveCPU stops waiting then, and leaves the guest's unplug to finish
// or not. Errors
// name the command or operation and what it was about ("qmp: device_del
// disk0: ...") and wrap QEMU's error (*QMPError), the session's end
// (ErrDisconnected, ErrShutdown) or the context's error and its cause.
//
// A few names come from the original package and mean less than they say.
// Console is the virtconsole device model and CharConsole a Windows-only
// chardev backend; an Instance's console is a SerialConsole (on
// ConsoleSerial, ttyS0, or ConsoleVirtio, hvc0), read through
// ConsoleCursor positions. QMP.Commit runs a block-commit job in a running
// VM, QemuImg.Commit commits an image with qemu-img. ImageInfo is what
// QMP's block queries say of an image, DiskImageInfo what qemu-img info
// says.
//
// # Command lines
//
// Command lines are built so that no field can change their meaning: every
// value placed in one of QEMU's comma-separated option lists has its commas
// doubled, which is QEMU's own escape.
package qemu
