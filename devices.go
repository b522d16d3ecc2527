package qemu

import (
	"fmt"
	"os"
	"strconv"
	"strings"
)

// Every Device: the seed package's devices, and those added since, each
// rendering its own -device and backend arguments.

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
	// devices and 9.1 removed the property, so leave it false:
	// StartInstance refuses it, naming the version, on a QEMU 9.1 or
	// later (it runs QEMU with -version first, for a Config that has
	// it).
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

// DiskInterface is the controller through which a Disk reaches the guest.
type DiskInterface string

const (
	// DiskVirtio is a virtio disk (virtio-blk-pci), the guest's vdX. It
	// has no CD-ROM form.
	DiskVirtio DiskInterface = "virtio"

	// DiskIDE is a disk or CD-ROM (ide-hd, ide-cd) on the machine's IDE
	// controller: PIIX on pc, the AHCI controller q35 has built in. The
	// guest's sdX or srN.
	DiskIDE DiskInterface = "ide"

	// DiskSCSI is a disk or CD-ROM (scsi-hd, scsi-cd) on a SCSI
	// controller the Config adds, such as virtio-scsi-pci, named by Bus.
	DiskSCSI DiskInterface = "scsi"
)

// Disk is an image shown to the guest as a disk or a CD-ROM: a -drive with
// no interface of its own and the -device that shows it, every value
// escaped, so a path with a comma needs nothing of the caller:
//
//	-drive if=none,id=ID,file=FILE,format=raw,readonly=on,media=cdrom
//	-device ide-cd,drive=ID,id=ID,bus=ide.1
//
// It is the form for a read-only disk and for a cloud-init seed
// (CreateNoCloudISO, CreateCloudInitISO), which BlockDevice, the seed
// package's virtio disk, cannot give: it has no read-only form, and its
// config-wce is a virtio-only property. QEMU names the drive's backend ID
// in query-block (BlockInfo.Device), and the device ID too.
type Disk struct {
	// ID names the drive and the device.
	ID string

	// File is the image.
	File string

	// Format is the image's format, "raw" when empty (QEMU would guess
	// it otherwise, from bytes the guest may write).
	Format BlockDeviceFormat

	// Interface is the controller; empty means DiskVirtio.
	Interface DiskInterface

	// CDROM shows the image as a CD-ROM, always read-only; DiskVirtio
	// has none.
	CDROM bool

	// ReadOnly opens the image read-only: the guest's writes fail.
	ReadOnly bool

	// Bus is the bus the device plugs into ("ide.1", "scsi0.0", a root
	// port); empty lets QEMU choose a free one.
	Bus string

	// Serial is the disk's serial number, which the guest sees (Linux:
	// /dev/disk/by-id); optional.
	Serial string
}

// Valid reports whether the disk can be rendered: it has an ID and a File,
// a known Interface, no CD-ROM on virtio, and no field holds a newline or
// NUL.
func (d Disk) Valid() bool { return d.problem() == "" }

func (d Disk) problem() string {
	if p := firstProblem(need("ID", d.ID), need("File", d.File)); p != "" {
		return p
	}
	switch d.Interface {
	case "", DiskVirtio:
		if d.CDROM {
			return "CDROM on DiskVirtio, which has no CD-ROM (use DiskIDE or DiskSCSI)"
		}
	case DiskIDE, DiskSCSI:
	default:
		return fmt.Sprintf("Interface is %q, not DiskVirtio, DiskIDE or DiskSCSI", d.Interface)
	}
	return cleanFields(d.ID, d.File, string(d.Format), d.Bus, d.Serial)
}

// driver is the device model that shows the disk.
func (d Disk) driver() string {
	switch {
	case d.Interface == DiskIDE && d.CDROM:
		return "ide-cd"
	case d.Interface == DiskIDE:
		return "ide-hd"
	case d.Interface == DiskSCSI && d.CDROM:
		return "scsi-cd"
	case d.Interface == DiskSCSI:
		return "scsi-hd"
	}
	return "virtio-blk-pci"
}

// QemuParams returns the -drive and -device arguments, or nil if the disk
// is not Valid.
func (d Disk) QemuParams(config *Config) []string {
	if !d.Valid() {
		return nil
	}
	format := string(d.Format)
	if format == "" {
		format = "raw"
	}
	return []string{
		"-drive", options("", "if", "none", "id", d.ID, "file", d.File, "format", format,
			"readonly", when(d.ReadOnly || d.CDROM, "on"), "media", when(d.CDROM, "cdrom")),
		"-device", options(d.driver(), "drive", d.ID, "id", d.ID, "bus", d.Bus, "serial", d.Serial),
	}
}

// DeviceProperty is one property of a GenericDevice, name=value.
type DeviceProperty struct {
	Name  string
	Value string
}

// GenericDevice is any QEMU device model, for what the typed devices do not
// cover:
//
//	-device DRIVER,id=ID,bus=BUS,addr=ADDR,NAME=VALUE,...
//
// with the properties in their order. Every value has its commas doubled.
type GenericDevice struct {
	// Driver is the device model, such as "virtio-rng-pci".
	Driver string

	// ID is the device's id, for device_del and QOM paths; optional.
	ID string

	// Bus is the bus to plug into, such as "pcie.0" or a root port's
	// id; optional.
	Bus string

	// Addr is the address on the bus, such as "0x5"; optional.
	Addr string

	// Properties are further properties, rendered in order.
	Properties []DeviceProperty
}

// Valid reports whether the device can be rendered: Driver is set, and
// every property has a name with no comma or '='.
func (dev GenericDevice) Valid() bool { return dev.problem() == "" }

func (dev GenericDevice) problem() string {
	if p := need("Driver", dev.Driver); p != "" {
		return p
	}
	fields := []string{dev.Driver, dev.ID, dev.Bus, dev.Addr}
	for i, p := range dev.Properties {
		if p.Name == "" || strings.ContainsAny(p.Name, ",=") {
			return fmt.Sprintf("Properties[%d] has the name %q", i, p.Name)
		}
		fields = append(fields, p.Name, p.Value)
	}
	return cleanFields(fields...)
}

// QemuParams returns the -device argument.
func (dev GenericDevice) QemuParams(config *Config) []string {
	kv := []string{"id", dev.ID, "bus", dev.Bus, "addr", dev.Addr}
	for _, p := range dev.Properties {
		kv = append(kv, p.Name, p.Value)
	}
	return []string{"-device", options(dev.Driver, kv...)}
}

// PCIeRootPort is a PCI Express root port, the place a q35 machine can
// hot-plug a device into (its root bus pcie.0 cannot):
//
//	-device pcie-root-port,id=ID,bus=BUS,chassis=N,slot=M
//
// Each root port of a machine needs its own chassis and slot pair.
type PCIeRootPort struct {
	// ID is the port's id, the bus a device plugged into it names.
	ID string

	// Bus is the bus the port sits on; empty means pcie.0.
	Bus string

	// Chassis and Slot number the port for hot-plug.
	Chassis uint8
	Slot    uint16
}

// Valid reports whether the port can be rendered: ID is set.
func (port PCIeRootPort) Valid() bool { return port.problem() == "" }

func (port PCIeRootPort) problem() string {
	return firstProblem(need("ID", port.ID), cleanFields(port.ID, port.Bus))
}

// QemuParams returns the -device argument.
func (port PCIeRootPort) QemuParams(config *Config) []string {
	bus := port.Bus
	if bus == "" {
		bus = "pcie.0"
	}
	return []string{"-device", options("pcie-root-port", "id", port.ID, "bus", bus,
		"chassis", strconv.Itoa(int(port.Chassis)), "slot", strconv.Itoa(int(port.Slot)))}
}

// HostForward forwards connections to a host address to the guest, for
// UserNetwork: hostfwd=PROTOCOL:HOSTADDR:HOSTPORT-GUESTADDR:GUESTPORT.
type HostForward struct {
	// Protocol is "tcp" or "udp"; empty means tcp.
	Protocol string

	// HostAddr is the host address to listen on; empty means every
	// address. HostPort is the host's port.
	HostAddr string
	HostPort uint16

	// GuestAddr is the guest's address; empty means the first address
	// the user network's DHCP server hands out (10.0.2.15 by default).
	// GuestPort is the guest's port.
	GuestAddr string
	GuestPort uint16
}

// String returns the forward as QEMU's hostfwd option writes it:
// tcp:127.0.0.1:2222-:22.
func (f HostForward) String() string {
	proto := f.Protocol
	if proto == "" {
		proto = "tcp"
	}
	return fmt.Sprintf("%s:%s:%d-%s:%d", proto, f.HostAddr, f.HostPort, f.GuestAddr, f.GuestPort)
}

// UserNetwork is a NIC on QEMU's user-mode network stack (slirp), which
// needs no privilege and no host device, with host forwards into the guest:
//
//	-device DRIVER,netdev=ID,id=DEVICEID,bus=BUS,mac=MAC
//	-netdev user,id=ID,hostfwd=tcp::2222-:22,...
type UserNetwork struct {
	// ID is the netdev's id.
	ID string

	// Driver is the NIC's model; empty means virtio-net-pci.
	Driver DeviceDriver

	// DeviceID is the NIC's id, and Bus the bus it plugs into; both
	// optional.
	DeviceID string
	Bus      string

	// MACAddress is the NIC's MAC address; empty lets QEMU choose.
	MACAddress string

	// HostForwards are the forwards from the host into the guest.
	HostForwards []HostForward
}

// Valid reports whether the network can be rendered: ID is set, and each
// forward has a protocol of tcp or udp and both ports.
func (n UserNetwork) Valid() bool { return n.problem() == "" }

func (n UserNetwork) problem() string {
	if p := need("ID", n.ID); p != "" {
		return p
	}
	fields := []string{n.ID, string(n.Driver), n.DeviceID, n.Bus, n.MACAddress}
	for i, f := range n.HostForwards {
		switch {
		case f.Protocol != "" && f.Protocol != "tcp" && f.Protocol != "udp":
			return fmt.Sprintf("HostForwards[%d].Protocol is %q, not tcp or udp", i, f.Protocol)
		case f.HostPort == 0 || f.GuestPort == 0:
			return fmt.Sprintf("HostForwards[%d] has a port 0", i)
		case strings.ContainsAny(f.HostAddr+f.GuestAddr, ":-"):
			return fmt.Sprintf("HostForwards[%d] has an address with ':' or '-'", i)
		}
		fields = append(fields, f.HostAddr, f.GuestAddr)
	}
	return cleanFields(fields...)
}

// QemuParams returns the -device and -netdev arguments.
func (n UserNetwork) QemuParams(config *Config) []string {
	driver := string(n.Driver)
	if driver == "" {
		driver = "virtio-net-pci"
	}
	kv := []string{"id", n.ID}
	for _, f := range n.HostForwards {
		kv = append(kv, "hostfwd", f.String())
	}
	return []string{
		"-device", options(driver, "netdev", n.ID, "id", n.DeviceID, "bus", n.Bus, "mac", n.MACAddress),
		"-netdev", options("user", kv...),
	}
}

// FDSetFile puts an open file into an fd set on QEMU's command line, for
// a VM that boots from a disk it cannot open by path:
//
//	-add-fd fd=N,set=SET,opaque=OPAQUE
//
// where N is the number QEMU inherits the file as (from 3, in the order
// devices register files). A BlockDevice then names it as /dev/fdset/SET.
type FDSetFile struct {
	// Set is the fd set's id.
	Set int
	// File is the open file; the caller keeps it open until QEMU has
	// started.
	File *os.File
	// Opaque is a free-form string, optional.
	Opaque string
}

// Valid reports whether the file can be passed: File is set and Set is
// not negative.
func (f FDSetFile) Valid() bool { return f.problem() == "" }

func (f FDSetFile) problem() string {
	if f.Set < 0 {
		return fmt.Sprintf("Set is %d", f.Set)
	}
	return firstProblem(when(f.File == nil, "File is nil"), cleanFields(f.Opaque))
}

// QemuParams registers the file with config and returns the -add-fd
// argument; it returns nil without a config, which numbers the files.
func (f FDSetFile) QemuParams(config *Config) []string {
	if config == nil || !f.Valid() {
		return nil
	}
	fd := config.appendFDs([]*os.File{f.File})
	return []string{"-add-fd", options("", "fd", fd, "set", strconv.Itoa(f.Set), "opaque", f.Opaque)}
}
