// Package qemu launches QEMU virtual machines and manages them over QMP,
// the QEMU Machine Protocol.
//
// A VM is described by a Config and started with LaunchQemu, or started
// from a hand-written command line with LaunchCustomQemu. To manage it
// afterwards, ask QEMU for a QMP socket when launching it (a QMPSocket in
// the Config, or -qmp unix:/tmp/qmp.sock,server=on,wait=off by hand) and
// connect to that socket with QMPStart; the returned QMP value runs
// commands on the VM and reports its events.
//
// StartInstance and StartCustomInstance run QEMU in the foreground
// instead, as an Instance: a process handle whose QMP session is ready
// when the start returns, whose stderr is always drained, and whose Stop
// ends the VM in bounded steps, from the power button to SIGKILL.
//
// Command lines are built so that no field can change their meaning: every
// value placed in one of QEMU's comma-separated option lists has its commas
// doubled, which is QEMU's own escape.
package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Machine is the machine QEMU emulates (-machine).
type Machine struct {
	// Type is the machine type, such as q35 or pc.
	Type string

	// Acceleration is the accelerator option list, written after
	// "accel=" as is, so it may carry further machine options: "kvm" or
	// "tcg,nvdimm=on".
	Acceleration string
}

// Device is anything that renders its own part of QEMU's command line.
type Device interface {
	// Valid reports whether the device is complete and can be rendered.
	Valid() bool

	// QemuParams returns the command-line arguments of the device. A
	// device that passes open files to QEMU registers them with config,
	// which numbers them.
	QemuParams(config *Config) []string
}

// DeviceDriver names a QEMU device model, as given to -device.
type DeviceDriver string

const (
	// NVDIMM is the non-volatile DIMM device model.
	NVDIMM DeviceDriver = "nvdimm"

	// Virtio9P is the virtio 9p file system device model.
	Virtio9P = "virtio-9p-pci"

	// VirtioNet is the virtio network card.
	VirtioNet = "virtio-net"

	// VirtioSerial is the virtio serial controller, the bus that virtio
	// serial ports and consoles plug into.
	VirtioSerial = "virtio-serial-pci"

	// VirtioBlock is the virtio disk.
	VirtioBlock = "virtio-blk"

	// Console is a virtio console port on a virtio serial controller.
	Console = "virtconsole"

	// VirtioSerialPort is a virtio serial port on a virtio serial
	// controller.
	VirtioSerialPort = "virtserialport"
)

// ObjectType names a QEMU object type, as given to -object.
type ObjectType string

const (
	// MemoryBackendFile is guest memory backed by a host file.
	MemoryBackendFile ObjectType = "memory-backend-file"
)

// Object is a QEMU object and, optionally, the device that uses it.
type Object struct {
	// Driver is the device that uses the object. When it is empty, only
	// the object is created (for use by another device or a later
	// device_add).
	Driver DeviceDriver

	// Type is the object type.
	Type ObjectType

	// ID identifies the object.
	ID string

	// DeviceID identifies the device.
	DeviceID string

	// MemPath is the host file that backs a memory object.
	MemPath string

	// Size is the size of the object in bytes.
	Size uint64
}

// Valid reports whether the object can be rendered: it is a
// MemoryBackendFile with an ID, a MemPath and a Size, and no field holds a
// newline or NUL.
func (object Object) Valid() bool { return object.problem() == "" }

func (object Object) problem() string {
	return firstProblem(
		when(object.Type != MemoryBackendFile, "Type is not MemoryBackendFile"),
		need("ID", object.ID), need("MemPath", object.MemPath),
		when(object.Size == 0, "Size is 0"),
		cleanFields(string(object.Driver), object.ID, object.DeviceID, object.MemPath))
}

// QemuParams returns the -device and -object arguments of the object, or
// nil if it is not Valid.
func (object Object) QemuParams(config *Config) []string {
	if !object.Valid() {
		return nil
	}
	params := make([]string, 0, 4)
	if object.Driver != "" {
		params = append(params, "-device",
			options(string(object.Driver), "id", object.DeviceID, "memdev", object.ID))
	}
	return append(params, "-object", options(string(object.Type), "id", object.ID,
		"mem-path", object.MemPath, "size", strconv.FormatUint(object.Size, 10)))
}

// FSDriver names a QEMU file system backend, as given to -fsdev.
type FSDriver string

// SecurityModelType is how a 9p file system backend maps the ownership and
// permissions the guest sets onto the host files.
type SecurityModelType string

const (
	// Local shares a host directory.
	Local FSDriver = "local"

	// Handle shares a host directory through file handles. QEMU no
	// longer has it (7.2 refuses it).
	Handle = "handle"

	// Proxy shares a host directory through virtfs-proxy-helper. It
	// takes a socket, not a path, so an FSDevice cannot describe it
	// (QEMU refuses path= with it).
	Proxy = "proxy"
)

const (
	// None is PassThrough that ignores failures to change ownership.
	None SecurityModelType = "none"

	// PassThrough gives the host files the ownership and permissions the
	// guest sets.
	PassThrough = "passthrough"

	// MappedXattr keeps the guest's ownership and permissions in
	// extended attributes of the host files.
	MappedXattr = "mapped-xattr"

	// MappedFile keeps the guest's ownership and permissions in hidden
	// metadata files beside the host files.
	MappedFile = "mapped-file"
)

// FSDevice is a host directory shared with the guest over 9p: an -fsdev
// backend and the device that shows it to the guest.
type FSDevice struct {
	// Driver is the device model, usually Virtio9P. When it is empty,
	// only the -fsdev backend is created.
	Driver DeviceDriver

	// FSDriver is the backend, usually Local.
	FSDriver FSDriver

	// ID identifies the backend.
	ID string

	// Path is the host directory to share.
	Path string

	// MountTag is the name the guest mounts the file system by.
	MountTag string

	// SecurityModel is how guest ownership and permissions map onto the
	// host.
	SecurityModel SecurityModelType
}

// Valid reports whether the file system device can be rendered: it has an
// FSDriver, an ID, a Path and a MountTag, and no field holds a newline or
// NUL.
func (fsdev FSDevice) Valid() bool { return fsdev.problem() == "" }

func (fsdev FSDevice) problem() string {
	return firstProblem(
		need("FSDriver", string(fsdev.FSDriver)), need("ID", fsdev.ID), need("Path", fsdev.Path),
		need("MountTag", fsdev.MountTag),
		cleanFields(string(fsdev.Driver), string(fsdev.FSDriver), fsdev.ID, fsdev.Path, fsdev.MountTag,
			string(fsdev.SecurityModel)))
}

// QemuParams returns the -device and -fsdev arguments of the file system
// device, or nil if it is not Valid.
func (fsdev FSDevice) QemuParams(config *Config) []string {
	if !fsdev.Valid() {
		return nil
	}
	params := make([]string, 0, 4)
	if fsdev.Driver != "" {
		params = append(params, "-device",
			options(string(fsdev.Driver), "fsdev", fsdev.ID, "mount_tag", fsdev.MountTag))
	}
	return append(params, "-fsdev", options(string(fsdev.FSDriver), "id", fsdev.ID,
		"path", fsdev.Path, "security_model", string(fsdev.SecurityModel)))
}

// CharDeviceBackend names a QEMU character device backend, as given to
// -chardev.
type CharDeviceBackend string

const (
	// Pipe connects to a host FIFO at Path (or to the pair Path.in and
	// Path.out).
	Pipe CharDeviceBackend = "pipe"

	// Socket listens on a unix socket at Path.
	Socket = "socket"

	// CharConsole is QEMU's console backend, which only Windows builds
	// of QEMU have.
	CharConsole = "console"

	// Serial connects to a host serial device or terminal at Path.
	Serial = "serial"

	// TTY is the old name of Serial. It is written as "serial", since
	// QEMU deprecated "tty".
	TTY = "tty"

	// PTY connects to a new host pseudo-terminal.
	PTY = "pty"
)

// CharDevice is a QEMU character device backend and, optionally, the
// device that shows it to the guest.
type CharDevice struct {
	// Backend is the kind of -chardev.
	Backend CharDeviceBackend

	// Driver is the device model: VirtioSerialPort, Console, isa-serial
	// and so on. When it is empty, only the -chardev backend is created.
	Driver DeviceDriver

	// Bus is the bus the device plugs into, such as serial0.0 for a
	// virtio serial controller with the ID serial0.
	Bus string

	// DeviceID identifies the device.
	DeviceID string

	// ID identifies the backend.
	ID string

	// Path is the host end of the backend: the unix socket QEMU listens
	// on for Socket, a FIFO for Pipe, a device for Serial.
	Path string

	// Name is the port name a virtserialport shows to the guest.
	Name string
}

// Valid reports whether the character device can be rendered: it has a
// Backend, an ID and a Path, and no field holds a newline or NUL.
func (cdev CharDevice) Valid() bool { return cdev.problem() == "" }

func (cdev CharDevice) problem() string {
	return firstProblem(
		need("Backend", string(cdev.Backend)), need("ID", cdev.ID), need("Path", cdev.Path),
		cleanFields(string(cdev.Backend), string(cdev.Driver), cdev.Bus, cdev.DeviceID, cdev.ID,
			cdev.Path, cdev.Name))
}

// QemuParams returns the -device and -chardev arguments of the character
// device, or nil if it is not Valid.
func (cdev CharDevice) QemuParams(config *Config) []string {
	if !cdev.Valid() {
		return nil
	}
	params := make([]string, 0, 4)
	if cdev.Driver != "" {
		params = append(params, "-device", options(string(cdev.Driver), "bus", cdev.Bus,
			"chardev", cdev.ID, "id", cdev.DeviceID, "name", cdev.Name))
	}
	backend := cdev.Backend
	if backend == TTY {
		backend = Serial
	}
	isSocket := backend == Socket
	return append(params, "-chardev", options(string(backend), "id", cdev.ID, "path", cdev.Path,
		"server", when(isSocket, "on"), "wait", when(isSocket, "off")))
}

// NetDeviceType is the kind of host network interface behind a NetDevice.
type NetDeviceType string

const (
	// TAP is a tap interface.
	TAP NetDeviceType = "tap"

	// MACVTAP is a macvtap interface. QEMU drives it through its tap
	// backend, given the macvtap's open files.
	MACVTAP = "macvtap"
)

// NetDevice is a guest network card and the host interface behind it.
type NetDevice struct {
	// Type is the kind of host interface.
	Type NetDeviceType

	// Driver is the network card model, such as VirtioNet. When it is
	// empty, only the -netdev backend is created.
	Driver DeviceDriver

	// ID identifies the backend.
	ID string

	// IFName is the name of the host interface.
	IFName string

	// DownScript is the script QEMU runs when it closes the interface.
	// When it is empty, QEMU runs its default script; "no" runs none.
	DownScript string

	// Script is the script QEMU runs once it has opened the interface.
	// When it is empty, QEMU runs its default script; "no" runs none.
	Script string

	// FDs are open files of the interface, one per queue. When it is
	// set, QEMU uses them instead of opening IFName, and runs no script.
	FDs []*os.File

	// VHost moves the virtio data path into the host kernel (vhost-net).
	VHost bool

	// MACAddress is the card's MAC address.
	MACAddress string
}

// Valid reports whether the network device can be rendered: it has an ID
// and an IFName, its Type is TAP or MACVTAP, a MACVTAP has FDs, no entry
// of FDs is nil, and no field holds a newline or NUL.
func (netdev NetDevice) Valid() bool { return netdev.problem() == "" }

func (netdev NetDevice) problem() string {
	if p := firstProblem(need("ID", netdev.ID), need("IFName", netdev.IFName)); p != "" {
		return p
	}
	switch netdev.Type {
	case TAP:
	case MACVTAP:
		if len(netdev.FDs) == 0 {
			return "FDs is empty, which MACVTAP needs"
		}
	default:
		return fmt.Sprintf("Type is %q, not TAP or MACVTAP", netdev.Type)
	}
	for i, f := range netdev.FDs {
		if f == nil {
			return fmt.Sprintf("FDs[%d] is nil", i)
		}
	}
	return cleanFields(string(netdev.Driver), netdev.ID, netdev.IFName, netdev.DownScript,
		netdev.Script, netdev.MACAddress)
}

// QemuParams returns the -device and -netdev arguments of the network
// device, or nil if it is not Valid. A device with FDs registers them with
// config, which numbers them, so it also returns nil when config is nil.
func (netdev NetDevice) QemuParams(config *Config) []string {
	if !netdev.Valid() || (len(netdev.FDs) > 0 && config == nil) {
		return nil
	}
	params := make([]string, 0, 4)
	if netdev.Driver != "" {
		params = append(params, "-device",
			options(string(netdev.Driver), "netdev", netdev.ID, "mac", netdev.MACAddress))
	}
	// A macvtap is driven through the tap backend; QEMU has no macvtap
	// netdev. Beside fds=, QEMU refuses ifname, script and downscript.
	var backend string
	if len(netdev.FDs) > 0 {
		backend = options("tap", "id", netdev.ID, "fds", config.appendFDs(netdev.FDs))
	} else {
		backend = options("tap", "id", netdev.ID, "ifname", netdev.IFName,
			"downscript", netdev.DownScript, "script", netdev.Script)
	}
	if netdev.VHost {
		backend += ",vhost=on"
	}
	return append(params, "-netdev", backend)
}

// SerialDevice is a device with nothing but a model and an ID, such as a
// virtio serial controller.
type SerialDevice struct {
	// Driver is the device model.
	Driver DeviceDriver

	// ID identifies the device.
	ID string
}

// Valid reports whether the device can be rendered: it has a Driver and an
// ID, and neither holds a newline or NUL.
func (dev SerialDevice) Valid() bool { return dev.problem() == "" }

func (dev SerialDevice) problem() string {
	return firstProblem(need("Driver", string(dev.Driver)), need("ID", dev.ID),
		cleanFields(string(dev.Driver), dev.ID))
}

// QemuParams returns the -device arguments of the device, or nil if it is
// not Valid.
func (dev SerialDevice) QemuParams(config *Config) []string {
	if !dev.Valid() {
		return nil
	}
	return []string{"-device", options(string(dev.Driver), "id", dev.ID)}
}

// BlockDeviceInterface is the if= of a -drive: what QEMU attaches the
// drive to by itself.
type BlockDeviceInterface string

// BlockDeviceAIO is how QEMU performs asynchronous I/O on an image.
type BlockDeviceAIO string

// BlockDeviceFormat is the format of an image.
type BlockDeviceFormat string

const (
	// NoInterface attaches the drive to nothing, leaving it to a -device.
	NoInterface BlockDeviceInterface = "none"

	// SCSI attaches the drive to a SCSI controller QEMU adds for it.
	SCSI = "scsi"
)

const (
	// Threads performs I/O on a pool of threads.
	Threads BlockDeviceAIO = "threads"

	// Native uses Linux native asynchronous I/O; QEMU requires
	// cache.direct=on with it.
	Native = "native"
)

const (
	// QCOW2 is QEMU's copy-on-write image format, version 2.
	QCOW2 BlockDeviceFormat = "qcow2"
)

// BlockDevice is a disk: a -drive and the -device that shows it to the
// guest. Interface should be NoInterface, since the -device is the drive's
// front end.
type BlockDevice struct {
	// Driver is the device model, such as VirtioBlock.
	Driver DeviceDriver

	// ID identifies the drive.
	ID string

	// File is the image.
	File string

	// Interface is what QEMU attaches the drive to by itself.
	Interface BlockDeviceInterface

	// AIO is how QEMU performs asynchronous I/O on the image.
	AIO BlockDeviceAIO

	// Format is the format of the image. Empty lets QEMU guess, which
	// it warns about for raw images.
	Format BlockDeviceFormat

	// SCSI adds scsi=on to the device. QEMU refuses it on virtio 1.0
	// devices and 9.1 removed the property, so leave it false.
	SCSI bool

	// WCE false adds config-wce=off to the device, so the guest cannot
	// turn the disk's write cache on or off.
	WCE bool
}

// Valid reports whether the block device can be rendered: it has a
// Driver, an ID and a File, and no field holds a newline or NUL.
func (blkdev BlockDevice) Valid() bool { return blkdev.problem() == "" }

func (blkdev BlockDevice) problem() string {
	return firstProblem(
		need("Driver", string(blkdev.Driver)), need("ID", blkdev.ID), need("File", blkdev.File),
		cleanFields(string(blkdev.Driver), blkdev.ID, blkdev.File, string(blkdev.Interface),
			string(blkdev.AIO), string(blkdev.Format)))
}

// QemuParams returns the -device and -drive arguments of the block device,
// or nil if it is not Valid.
func (blkdev BlockDevice) QemuParams(config *Config) []string {
	if !blkdev.Valid() {
		return nil
	}
	// scsi=off is QEMU's default, and QEMU 9.1 removed the property, so
	// only scsi=on is ever written.
	return []string{
		"-device", options(string(blkdev.Driver), "drive", blkdev.ID,
			"scsi", when(blkdev.SCSI, "on"), "config-wce", when(!blkdev.WCE, "off")),
		"-drive", options("", "id", blkdev.ID, "file", blkdev.File, "aio", string(blkdev.AIO),
			"format", string(blkdev.Format), "if", string(blkdev.Interface)),
	}
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

// appendFDs registers files for QEMU to inherit and returns the
// descriptor numbers QEMU will see them as, joined with ':'. os/exec gives
// ExtraFiles[i] the number 3+i, after stdin, stdout and stderr.
func (config *Config) appendFDs(files []*os.File) string {
	nums := make([]string, len(files))
	for i := range files {
		nums[i] = strconv.Itoa(3 + len(config.fds) + i)
	}
	config.fds = append(config.fds, files...)
	return strings.Join(nums, ":")
}

// options renders one of QEMU's comma-separated option lists, such as
// "virtio-blk,drive=hd0,config-wce=off". first is the leading value (a
// driver, backend or size; "" for none) and kv holds key, value pairs; a
// pair whose value is empty is left out. Every value has its commas
// doubled, QEMU's own escape, so that no field can add an option.
func options(first string, kv ...string) string {
	n := len(first)
	for i := 0; i+1 < len(kv); i += 2 {
		n += len(kv[i]) + len(kv[i+1]) + 2
	}
	var b strings.Builder
	b.Grow(n)
	writeEscaped(&b, first)
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(kv[i])
		b.WriteByte('=')
		writeEscaped(&b, kv[i+1])
	}
	return b.String()
}

func writeEscaped(b *strings.Builder, value string) {
	for {
		i := strings.IndexByte(value, ',')
		if i < 0 {
			b.WriteString(value)
			return
		}
		b.WriteString(value[:i+1])
		b.WriteByte(',')
		value = value[i+1:]
	}
}

// when returns value if cond holds, and "" (which options leaves out)
// otherwise.
func when(cond bool, value string) string {
	if cond {
		return value
	}
	return ""
}

// count returns n in decimal, or "" (which options leaves out) for 0.
func count(n uint32) string {
	if n == 0 {
		return ""
	}
	return strconv.FormatUint(uint64(n), 10)
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

// plainPart is a part of the command line made from Config fields that
// have no Valid method of their own.
type plainPart struct {
	name   string   // the Config field, for errors and warnings
	fields []string // the values it renders, which must be clean
	argv   []string // nil when the part is not set
}

func namePart(c *Config) plainPart {
	if c.Name == "" {
		return plainPart{}
	}
	return plainPart{"Name", []string{c.Name}, []string{"-name", options(c.Name)}}
}

// uuidPart passes the UUID verbatim: QEMU parses it as a whole, with no
// option syntax.
func uuidPart(c *Config) plainPart {
	if c.UUID == "" {
		return plainPart{}
	}
	return plainPart{"UUID", []string{c.UUID}, []string{"-uuid", c.UUID}}
}

// machinePart escapes the type but not Acceleration, which is documented
// as an option list of its own.
func machinePart(c *Config) plainPart {
	m := c.Machine
	if m.Type == "" {
		return plainPart{}
	}
	arg := options(m.Type)
	if m.Acceleration != "" {
		arg += ",accel=" + m.Acceleration
	}
	return plainPart{"Machine", []string{m.Type, m.Acceleration}, []string{"-machine", arg}}
}

func cpuPart(c *Config) plainPart {
	if c.CPUModel == "" {
		return plainPart{}
	}
	return plainPart{"CPUModel", []string{c.CPUModel}, []string{"-cpu", c.CPUModel}}
}

func memoryPart(c *Config) plainPart {
	m := c.Memory
	if m.Size == "" {
		return plainPart{}
	}
	return plainPart{"Memory", []string{m.Size, m.MaxMem}, []string{"-m",
		options(m.Size, "slots", count(uint32(m.Slots)), "maxmem", m.MaxMem)}}
}

func smpPart(c *Config) plainPart {
	s := c.SMP
	if s.CPUs == 0 {
		return plainPart{}
	}
	return plainPart{"SMP", nil, []string{"-smp", options(count(s.CPUs),
		"cores", count(s.Cores), "threads", count(s.Threads), "sockets", count(s.Sockets),
		"maxcpus", count(s.MaxCPUs))}}
}

func globalPart(c *Config) plainPart {
	if c.GlobalParam == "" {
		return plainPart{}
	}
	return plainPart{"GlobalParam", []string{c.GlobalParam}, []string{"-global", c.GlobalParam}}
}

func vgaPart(c *Config) plainPart {
	if c.VGA == "" {
		return plainPart{}
	}
	return plainPart{"VGA", []string{c.VGA}, []string{"-vga", c.VGA}}
}

func knobsPart(c *Config) plainPart {
	var argv []string
	if c.Knobs.NoUserConfig {
		argv = append(argv, "-no-user-config")
	}
	if c.Knobs.NoDefaults {
		argv = append(argv, "-nodefaults")
	}
	if c.Knobs.NoGraphic {
		argv = append(argv, "-nographic")
	}
	if c.Knobs.Daemonize {
		argv = append(argv, "-daemonize")
	}
	if c.Knobs.Paused {
		argv = append(argv, "-S")
	}
	return plainPart{"Knobs", nil, argv}
}

// kernelPart passes the paths and the command line verbatim: QEMU reads
// -kernel, -initrd and -append as they are, so a doubled comma would
// break them.
func kernelPart(c *Config) plainPart {
	k := c.Kernel
	if k.Path == "" {
		return plainPart{}
	}
	argv := []string{"-kernel", k.Path}
	if k.InitrdPath != "" {
		argv = append(argv, "-initrd", k.InitrdPath)
	}
	if k.Params != "" {
		argv = append(argv, "-append", k.Params)
	}
	return plainPart{"Kernel", []string{k.Path, k.InitrdPath, k.Params}, argv}
}

// incomingPart passes the value verbatim: QEMU parses a URI, not an
// option list.
func incomingPart(c *Config) plainPart {
	if c.Incoming == "" {
		return plainPart{}
	}
	return plainPart{"Incoming", []string{c.Incoming}, []string{"-incoming", c.Incoming}}
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

// firmwarePart passes each directory verbatim: -L takes a path.
func firmwarePart(c *Config) plainPart {
	if len(c.FirmwareDirs) == 0 {
		return plainPart{}
	}
	var argv []string
	for _, dir := range c.FirmwareDirs {
		argv = append(argv, "-L", dir)
	}
	return plainPart{"FirmwareDirs", c.FirmwareDirs, argv}
}

func extraPart(c *Config) plainPart {
	if len(c.ExtraParams) == 0 {
		return plainPart{}
	}
	return plainPart{"ExtraParams", c.ExtraParams, append([]string(nil), c.ExtraParams...)}
}

// plainParts lists every plainPart, for checkConfig.
var plainParts = []func(*Config) plainPart{
	namePart, uuidPart, machinePart, cpuPart, memoryPart, smpPart,
	globalPart, vgaPart, knobsPart, kernelPart, incomingPart, firmwarePart, extraPart,
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

// renderer accumulates the argv of one Config.
type renderer struct {
	config *Config
	log    QMPLog
	params []string
}

func (r *renderer) plain(p plainPart) {
	if p.argv == nil {
		return
	}
	if !clean(p.fields...) {
		r.log.Warningf("qemu: config %s left out: it contains a newline or NUL", p.name)
		return
	}
	r.params = append(r.params, p.argv...)
}

func (r *renderer) qmpSockets() {
	for i, s := range r.config.QMPSockets {
		if !s.Valid() {
			r.log.Warningf("qemu: QMPSockets[%d] left out: not valid", i)
			continue
		}
		r.params = append(r.params, s.params()...)
	}
}

func (r *renderer) devices() {
	for i, d := range r.config.Devices {
		if d == nil || !d.Valid() {
			r.log.Warningf("qemu: Devices[%d] (%T) left out: not valid", i, d)
			continue
		}
		r.params = append(r.params, d.QemuParams(r.config)...)
	}
}

func (r *renderer) rtc() {
	rtc := r.config.RTC
	if rtc == (RTC{}) {
		return
	}
	if !rtc.Valid() {
		r.log.Warningf("qemu: RTC left out: not valid")
		return
	}
	r.params = append(r.params, "-rtc", options("", "base", string(rtc.Base),
		"driftfix", string(rtc.DriftFix), "clock", string(rtc.Clock)))
}

// renderConfig returns the command line of config in the documented order
// and the files its devices registered, fds[i] being QEMU's descriptor
// 3+i. Devices, QMP sockets and an RTC that are not Valid, and plain parts
// holding a newline or NUL, are left out with a warning to logger (which
// may be nil). config is a copy, and renderConfig writes into none of the
// slices it shares with the caller's Config, so rendering the same Config
// twice gives the same result.
func renderConfig(config Config, logger QMPLog) (params []string, fds []*os.File) {
	// Number the files from 3 whatever QemuParams calls the caller made
	// on its own Config, and never append into the caller's array.
	config.fds = nil
	r := renderer{config: &config, log: orNullLogger(logger),
		params: make([]string, 0, 24+2*len(config.QMPSockets)+4*len(config.Devices))}
	r.plain(namePart(&config))
	r.plain(uuidPart(&config))
	r.plain(machinePart(&config))
	r.plain(cpuPart(&config))
	r.qmpSockets()
	r.plain(memoryPart(&config))
	r.plain(smpPart(&config))
	r.devices()
	r.rtc()
	r.plain(globalPart(&config))
	r.plain(vgaPart(&config))
	r.plain(knobsPart(&config))
	if k := config.Kernel; k.Path == "" && (k.InitrdPath != "" || k.Params != "") {
		r.log.Warningf("qemu: Kernel.InitrdPath and Kernel.Params left out: Kernel.Path is empty")
	}
	r.plain(kernelPart(&config))
	r.plain(incomingPart(&config))
	r.plain(firmwarePart(&config))
	r.plain(extraPart(&config))
	if len(r.params) == 0 {
		return nil, config.fds
	}
	return r.params, config.fds
}

// LaunchQemu starts QEMU with the command line config describes, passing
// it the files config's devices registered, and waits for it as
// LaunchCustomQemu does, under config.Ctx and with config.Path.
//
// Devices, QMP sockets and an RTC that are not Valid are left out, with a
// warning to logger (which may be nil). A newline or NUL in any other
// field (Name, UUID, Machine, CPUModel, Memory, GlobalParam, VGA, Kernel)
// fails the launch before QEMU starts, since leaving such a part out would
// start another VM than the one asked for. The caller's Config is not
// changed, so launching it again gives the same command line.
//
// It returns ("", nil) when QEMU succeeds, and QEMU's stderr with an error
// otherwise.
func LaunchQemu(config Config, logger QMPLog) (string, error) {
	if err := checkConfig(&config); err != nil {
		return "", err
	}
	params, fds := renderConfig(config, logger)
	return launch(config.Ctx, config.Path, params, fds, config.Env, logger)
}

// defaultQEMU is the binary LaunchCustomQemu runs when given no path.
const defaultQEMU = "qemu-system-x86_64"

// maxStderr bounds how much of QEMU's stderr is kept: the last bytes,
// which hold the error that made it exit.
const maxStderr = 1 << 20

// stderrGrace is how long LaunchCustomQemu waits, once QEMU has exited,
// for the end of its stderr. It only matters when a process left behind
// still holds stderr open (a wrapper script's background child, a daemon
// that did not redirect it); QEMU's own output is in the pipe by then.
const stderrGrace = 200 * time.Millisecond

// LaunchCustomQemu runs the QEMU binary at path (qemu-system-x86_64 from
// PATH when path is "") with params, and waits for it to exit. QEMU
// inherits fds, fds[i] as its file descriptor 3+i. With -daemonize, QEMU
// exits once the VM is up, leaving its daemon running the VM, so
// LaunchCustomQemu returns then.
//
// It returns ("", nil) when QEMU exits with status 0, logging as a warning
// anything QEMU wrote to stderr (deprecation warnings, say). Otherwise it
// returns QEMU's stderr (its last MiB at most) and an error that wraps the
// cause and quotes QEMU's last line.
//
// If ctx is done before QEMU exits, QEMU is killed and reaped and the
// error wraps ctx.Err(). With -daemonize that kills the launching
// process; QEMU's daemon exits by itself once it has finished starting and
// finds no parent to report to. A nil ctx means context.Background(), and
// logger may be nil.
func LaunchCustomQemu(ctx context.Context, path string, params []string, fds []*os.File, logger QMPLog) (string, error) {
	return launch(ctx, path, params, fds, nil, logger)
}

// launch is LaunchCustomQemu with env added to QEMU's environment.
func launch(ctx context.Context, path string, params []string, fds []*os.File, env []string, logger QMPLog) (string, error) {
	log := orNullLogger(logger)
	if ctx == nil {
		ctx = context.Background()
	}
	if path == "" {
		path = defaultQEMU
	}
	for i, f := range fds {
		if f == nil {
			return "", fmt.Errorf("qemu: launch %s: fds[%d] is nil", path, i)
		}
	}
	cmd := exec.CommandContext(ctx, path, params...)
	cmd.ExtraFiles = fds
	if len(env) > 0 {
		cmd.Env = append(os.Environ(), env...)
	}
	stderr := &tailBuffer{max: maxStderr}
	cmd.Stderr = stderr
	cmd.WaitDelay = stderrGrace
	log.Infof("qemu: launching %s %q", path, params)

	err := cmd.Run()
	if errors.Is(err, exec.ErrWaitDelay) {
		// QEMU succeeded; something it left running holds stderr.
		err = nil
	}
	output := stderr.String()
	switch {
	case err == nil:
		if output != "" {
			log.Warningf("qemu: %s wrote to stderr: %s", path, strings.TrimSpace(output))
		}
		return "", nil
	case ctx.Err() != nil && errors.Is(err, ctx.Err()):
		// The context was done before QEMU started.
		return output, fmt.Errorf("qemu: launch %s: %w", path, contextError(ctx))
	case ctx.Err() != nil:
		return output, fmt.Errorf("qemu: launch %s: stopped: %w (%w)", path, contextError(ctx), err)
	case errors.Is(err, exec.ErrNotFound) && path == defaultQEMU:
		return output, fmt.Errorf("qemu: launch: %w (Debian and Ubuntu ship it in qemu-system-x86)", err)
	case cmd.ProcessState == nil:
		return output, fmt.Errorf("qemu: launch %s: %w", path, err)
	}
	if line := lastLine(output); line != "" {
		return output, fmt.Errorf("qemu: launch %s: %w: %s", path, err, line)
	}
	return output, fmt.Errorf("qemu: launch %s: %w", path, err)
}

// lastLine returns the last non-empty line of s, which is where QEMU puts
// the error it exits with, shortened to a size fit for an error message.
func lastLine(s string) string {
	s = strings.TrimRight(s, "\r\n\t ")
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	const max = 512
	if len(s) > max {
		s = s[:max] + "..."
	}
	return s
}

// tailBuffer is an io.Writer that keeps the last max bytes written to it,
// so that a QEMU writing without end cannot make the launcher hold
// unbounded memory. It may be read while it is written.
type tailBuffer struct {
	max int
	mu  sync.Mutex
	buf []byte
}

func (b *tailBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	// Trim only once twice the limit is reached, so that each byte is
	// moved a bounded number of times.
	if len(b.buf) > 2*b.max {
		b.buf = append(b.buf[:0], b.buf[len(b.buf)-b.max:]...)
	}
	return len(p), nil
}

func (b *tailBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.buf) > b.max {
		return string(b.buf[len(b.buf)-b.max:])
	}
	return string(b.buf)
}
