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
