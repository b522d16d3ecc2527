package qemu

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strings"
)

// The Config that describes a VM, its parts other than devices, and
// their validation: what LaunchQemu leaves out with a warning and
// StartInstance refuses.

// Config describes a VM for LaunchQemu. Its zero value renders no
// arguments.
type Config struct {
	// Path is the QEMU binary. Empty means qemu-system-x86_64 from PATH.
	Path string

	// Ctx bounds the launch: when it is done before QEMU exits, QEMU is
	// killed. Nil means context.Background().
	Ctx context.Context

	// Name is the guest's name (-name).
	Name string

	// UUID is the guest's UUID (-uuid).
	UUID string

	// CPUModel is the CPU model with its feature options (-cpu), written
	// as is.
	CPUModel string

	// Machine is the emulated machine.
	Machine Machine

	// QMPSockets are the sockets QEMU serves QMP on.
	QMPSockets []QMPSocket

	// Devices are the VM's devices, in command-line order.
	Devices []Device

	// RTC is the guest's real-time clock.
	RTC RTC

	// VGA is the VGA card type (-vga), written as is.
	VGA string

	// Kernel is a kernel to boot directly.
	Kernel Kernel

	// Memory is the guest's memory.
	Memory Memory

	// SMP is the guest's CPU topology.
	SMP SMP

	// GlobalParam is a default property of a device model (-global
	// driver.property=value), written as is.
	GlobalParam string

	// Knobs are QEMU's on/off switches.
	Knobs Knobs

	// Incoming makes QEMU wait for an incoming migration rather than
	// boot (-incoming): "defer" waits for the QMP command
	// migrate-incoming (ExecuteMigrateIncoming), which is what a
	// destination passed a file or given TLS credentials needs; a URI
	// ("unix:PATH", "tcp:HOST:PORT", "fd:N") listens at once. Written
	// as is.
	Incoming string

	// FirmwareDirs are directories QEMU searches for firmware and option
	// ROMs before its own (-L DIR each), for a QEMU installed outside
	// its default prefix.
	FirmwareDirs []string

	// ExtraParams are appended to the command line as they are, after
	// everything else, for options the Config has no field for. Nothing
	// in them is escaped.
	ExtraParams []string

	// Env holds KEY=VALUE pairs added to this process's environment for
	// QEMU (QEMU_MODULE_DIR, say), by LaunchQemu and StartInstance.
	Env []string

	// fds are the files devices registered for QEMU to inherit;
	// fds[i] becomes QEMU's file descriptor 3+i.
	fds []*os.File
}

// Machine is the machine QEMU emulates (-machine).
type Machine struct {
	// Type is the machine type, such as q35 or pc.
	Type string

	// Acceleration is the accelerator option list, written after
	// "accel=" as is, so it may carry further machine options: "kvm" or
	// "tcg,nvdimm=on".
	Acceleration string
}

// Memory is the guest's memory (-m).
type Memory struct {
	// Size is the memory at start, with the suffix M or G for MiB or
	// GiB: 512M, 2G. Empty leaves -m out.
	Size string

	// Slots is the number of slots for memory devices (DIMMs, NVDIMMs).
	Slots uint8

	// MaxMem is the most memory the guest can have, memory devices
	// included.
	MaxMem string
}

// SMP is the guest's CPU topology (-smp).
type SMP struct {
	// CPUs is the number of virtual CPUs at start. Zero leaves -smp out.
	CPUs uint32

	// Cores is the number of cores per socket.
	Cores uint32

	// Threads is the number of threads per core.
	Threads uint32

	// Sockets is the number of CPU sockets.
	Sockets uint32

	// MaxCPUs is the most virtual CPUs the guest can have, for CPU
	// hot-plug (maxcpus=); zero means CPUs.
	MaxCPUs uint32
}

// Kernel is a kernel QEMU loads directly, without a boot loader.
type Kernel struct {
	// Path is the kernel image on the host. Empty loads no kernel.
	Path string

	// InitrdPath is the initial ramdisk on the host. It is only used
	// with Path.
	InitrdPath string

	// Params is the kernel command line. It is only used with Path.
	Params string
}

// Knobs are QEMU's on/off switches.
type Knobs struct {
	// NoUserConfig keeps QEMU from reading its configuration files
	// (-no-user-config).
	NoUserConfig bool

	// NoDefaults keeps QEMU from adding its default devices
	// (-nodefaults).
	NoDefaults bool

	// NoGraphic runs QEMU with no display, its serial port and monitor
	// on standard I/O (-nographic).
	NoGraphic bool

	// Daemonize makes QEMU detach once the VM is set up (-daemonize), so
	// that a launch returns then.
	Daemonize bool

	// Paused starts the guest's CPUs stopped (-S): the VM runs on the QMP
	// command cont, once the caller has set up what it needs first.
	Paused bool
}

// RTCBaseType is the time the guest's real-time clock starts from.
type RTCBaseType string

// RTCClock is the clock that drives the guest's real-time clock.
type RTCClock string

// RTCDriftFix is how QEMU makes up for clock interrupts the guest missed.
type RTCDriftFix string

const (
	// UTC starts the clock at the host's time in UTC.
	UTC RTCBaseType = "utc"

	// LocalTime starts the clock at the host's local time.
	LocalTime = "localtime"
)

const (
	// Host runs the clock from the host's system time.
	Host RTCClock = "host"

	// VM runs the clock from QEMU's virtual clock, which stops while the
	// VM is stopped.
	VM = "vm"
)

const (
	// Slew delivers missed clock interrupts at a faster rate (for
	// Windows guests).
	Slew RTCDriftFix = "slew"

	// NoDriftFix makes up for nothing.
	NoDriftFix = "none"
)

// RTC is the guest's real-time clock (-rtc). The zero RTC renders nothing,
// leaving QEMU's defaults.
type RTC struct {
	// Base is the time the clock starts from: UTC, LocalTime or a date
	// such as 2006-06-17T16:01:21.
	Base RTCBaseType

	// Clock is the clock that drives it.
	Clock RTCClock

	// DriftFix is how missed interrupts are made up for.
	DriftFix RTCDriftFix
}

// Valid reports whether the clock can be rendered: Clock is empty, Host or
// VM, DriftFix is empty, Slew or NoDriftFix, and Base holds no newline or
// NUL.
func (rtc RTC) Valid() bool { return rtc.problem() == "" }

func (rtc RTC) problem() string {
	switch rtc.Clock {
	case "", Host, VM:
	default:
		return fmt.Sprintf("Clock is %q, not Host or VM", rtc.Clock)
	}
	switch rtc.DriftFix {
	case "", Slew, NoDriftFix:
	default:
		return fmt.Sprintf("DriftFix is %q, not Slew or NoDriftFix", rtc.DriftFix)
	}
	return cleanFields(string(rtc.Base))
}

// QMPSocketType is the kind of socket QEMU serves QMP on.
type QMPSocketType string

const (
	// Unix is a unix domain socket.
	Unix QMPSocketType = "unix"
)

// QMPSocket is a socket QEMU serves QMP on (-qmp).
type QMPSocket struct {
	// Type is the kind of socket; only Unix is supported.
	Type QMPSocketType

	// Name is the path of the socket.
	Name string

	// Server makes QEMU listen on the socket rather than connect to it.
	Server bool

	// NoWait lets QEMU go on starting without waiting for a client to
	// connect to its server socket.
	NoWait bool
}

// Valid reports whether the socket can be rendered: it is a Unix socket
// with a Name that holds no newline or NUL.
func (qmp QMPSocket) Valid() bool { return qmp.problem() == "" }

func (qmp QMPSocket) problem() string {
	if qmp.Type != Unix {
		return fmt.Sprintf("Type is %q, not Unix", qmp.Type)
	}
	return firstProblem(need("Name", qmp.Name), cleanFields(qmp.Name))
}

// params returns the -qmp argument of a Valid socket.
func (qmp QMPSocket) params() []string {
	return []string{"-qmp", options(string(qmp.Type)+":"+qmp.Name,
		"server", when(qmp.Server, "on"), "wait", when(qmp.Server && qmp.NoWait, "off"))}
}

// incomingProblem says why Incoming is not something -incoming takes, or
// "": "defer", or a URI with a scheme QEMU 7.2 to 10.0 know (file: only
// from 8.2 on, so QEMU 7.2 refuses it itself).
func incomingProblem(incoming string) string {
	if incoming == "" || incoming == "defer" {
		return ""
	}
	scheme, rest, ok := strings.Cut(incoming, ":")
	switch {
	case !ok || rest == "":
		return fmt.Sprintf("Incoming %q is neither defer nor SCHEME:ADDRESS", incoming)
	case !slices.Contains([]string{"tcp", "unix", "fd", "exec", "rdma", "file", "vsock"}, scheme):
		return fmt.Sprintf("Incoming %q: QEMU knows no scheme %s", incoming, scheme)
	}
	return ""
}

// checkConfig returns an error naming the first part of config, among
// those without a Valid method, that holds a newline or a NUL, or the first
// Env entry that is not KEY=VALUE. LaunchQemu refuses such a Config rather
// than start a VM without its kernel, memory size or machine type.
func checkConfig(config *Config) error {
	if problems := plainProblems(config); len(problems) > 0 {
		return fmt.Errorf("qemu: config %s", problems[0])
	}
	return nil
}

// plainProblems lists the parts of config without a Valid method that
// hold a newline or a NUL, and the Env entries that are not KEY=VALUE.
func plainProblems(config *Config) []string {
	var problems []string
	for _, part := range plainParts {
		if p := part(config); p.argv != nil && !clean(p.fields...) {
			problems = append(problems, p.name+": a field contains a newline or NUL")
		}
	}
	if p := envProblem(config.Env); p != "" {
		problems = append(problems, p)
	}
	return problems
}

// envProblem says what makes env not a list of KEY=VALUE, or "".
func envProblem(env []string) string {
	for i, kv := range env {
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" || strings.IndexByte(kv, 0) >= 0 {
			return fmt.Sprintf("Env[%d] %q is not KEY=VALUE", i, kv)
		}
	}
	return ""
}

// configProblems lists every part of config that is not valid, each named
// as the caller wrote it ("Devices[1] (BlockDevice): File is empty"), for
// StartInstance, which refuses to start another VM than the one described.
func configProblems(config *Config) []string {
	problems := plainProblems(config)
	if k := config.Kernel; k.Path == "" && (k.InitrdPath != "" || k.Params != "") {
		problems = append(problems, "Kernel: InitrdPath or Params is set, but Path is empty")
	}
	for i, s := range config.QMPSockets {
		if p := s.problem(); p != "" {
			problems = append(problems, fmt.Sprintf("QMPSockets[%d]: %s", i, p))
		}
	}
	for i, d := range config.Devices {
		if p := deviceProblem(d); p != "" {
			problems = append(problems, fmt.Sprintf("Devices[%d] (%s): %s", i, strings.TrimPrefix(fmt.Sprintf("%T", d), "qemu."), p))
		}
	}
	if config.RTC != (RTC{}) {
		if p := config.RTC.problem(); p != "" {
			problems = append(problems, "RTC: "+p)
		}
	}
	if p := incomingProblem(config.Incoming); p != "" {
		problems = append(problems, p)
	}
	return problems
}

// deviceProblem says why d is not valid, or "": in the words of the
// package's own devices, or Valid's false for others.
func deviceProblem(d Device) string {
	switch d := d.(type) {
	case nil:
		return "nil"
	case interface{ problem() string }:
		return d.problem()
	}
	return when(!d.Valid(), "Valid reports false")
}

// clean reports whether no field holds a newline or a NUL. QEMU would
// read a newline as the end of a config line or a kernel command line,
// and exec cannot pass a NUL at all, so such a field makes its part
// invalid.
func clean(fields ...string) bool {
	for _, f := range fields {
		if strings.ContainsAny(f, "\n\x00") {
			return false
		}
	}
	return true
}

// need returns the problem of a required field that is empty, or "".
func need(field, value string) string {
	if value != "" {
		return "" // before the concatenation: Valid runs on every render
	}
	return field + " is empty"
}

// cleanFields is clean as a problem: "" when every field is clean.
func cleanFields(fields ...string) string {
	return when(!clean(fields...), "a field contains a newline or NUL")
}

// firstProblem returns the first of problems that is not "".
func firstProblem(problems ...string) string {
	for _, p := range problems {
		if p != "" {
			return p
		}
	}
	return ""
}
