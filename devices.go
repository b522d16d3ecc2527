package qemu

import (
	"fmt"
	"strconv"
	"strings"
)

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
