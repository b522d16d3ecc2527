package qemu

import (
	"context"
	"errors"
)

// Typed device, network and character device commands for hot-plug:
// device_add (the seed package's and with any properties) and device_del,
// query-pci, netdev_add of user and tap backends, set_link,
// query-rx-filter, and chardev-add and chardev-remove.

// ExecuteDeviceAdd adds the guest portion of a device to a QEMU instance
// using the device_add command. blockdevID should match the blockdevID
// passed to a previous call to ExecuteBlockdevAdd. devID is the id of the
// device to add. Both strings must be valid QMP identifiers. driver is the
// name of the driver,e.g., virtio-blk-pci, and bus is the name of the bus.
// bus is optional.
func (q *QMP) ExecuteDeviceAdd(ctx context.Context, blockdevID, devID, driver, bus string) error {
	args := struct {
		ID     string `json:"id"`
		Driver string `json:"driver"`
		Drive  string `json:"drive"`
		Bus    string `json:"bus,omitempty"`
	}{devID, driver, blockdevID, bus}
	return q.run(ctx, "device_add", devID, args, nil)
}

// ExecuteDeviceDel deletes guest portion of a QEMU device by sending a
// device_del command. devID is the identifier of the device to delete.
// Typically it would match the devID parameter passed to an earlier call to
// ExecuteDeviceAdd. It must be a valid QMP identifier.
//
// This method blocks until the reply and a DEVICE_DELETED event whose
// data.device is devID have been received, in either order. When the guest
// refuses the unplug (QEMU sends DEVICE_UNPLUG_GUEST_ERROR for the device),
// it fails at once with an error that wraps ErrUnplugRefused.
func (q *QMP) ExecuteDeviceDel(ctx context.Context, devID string) error {
	args := idArgs{devID}
	ev, err := q.runAndWait(ctx, "device_del", devID, args, nil, DeviceUnplugFilter(devID))
	if err == nil && ev.Name == "DEVICE_UNPLUG_GUEST_ERROR" {
		err = commandError("device_del", devID, ErrUnplugRefused)
	}
	return err
}

// ErrUnplugRefused is wrapped by the error of an unplug that the guest
// refused: QEMU sent DEVICE_UNPLUG_GUEST_ERROR for the device (QEMU 6.2
// and later do).
var ErrUnplugRefused = errors.New("the guest refused the unplug")

// DeviceUnplugFilter selects the events that end the unplug of device id:
// its DEVICE_DELETED, or the DEVICE_UNPLUG_GUEST_ERROR of a guest that
// refused. Both name the device in data.device; the DEVICE_DELETED events
// of a device's parts, which carry only a path, are not selected.
func DeviceUnplugFilter(id string) EventFilter {
	return EventFilter{
		Names: []string{"DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"},
		Data:  map[string]string{"device": id},
	}
}

// DeviceSpec is device_add's arguments: the driver, its id, where it plugs
// in, and any further properties, with the JSON types the device's
// properties take (QEMU checks them: a number as a string is refused).
type DeviceSpec struct {
	Driver     string
	ID         string
	Bus        string
	Addr       string
	Properties map[string]interface{}
}

// ExecuteDeviceAddSpec adds a device (device_add) described by spec.
func (q *QMP) ExecuteDeviceAddSpec(ctx context.Context, spec DeviceSpec) error {
	if spec.Driver == "" {
		return commandError("device_add", spec.ID, errors.New("Driver is empty"))
	}
	args := make(map[string]interface{}, len(spec.Properties)+4)
	for k, v := range spec.Properties {
		args[k] = v
	}
	args["driver"] = spec.Driver
	for k, v := range map[string]string{"id": spec.ID, "bus": spec.Bus, "addr": spec.Addr} {
		if v != "" {
			args[k] = v
		}
	}
	return q.run(ctx, "device_add", spec.ID, args, nil)
}

// PCIBus is one PCI bus, as query-pci lists it, with its devices.
type PCIBus struct {
	Bus     int         `json:"bus"`
	Devices []PCIDevice `json:"devices"`
}

// PCIDevice is one PCI function; a bridge (a PCIe root port, say) has the
// bus behind it in Bridge.
type PCIDevice struct {
	Bus       int    `json:"bus"`
	Slot      int    `json:"slot"`
	Function  int    `json:"function"`
	QDevID    string `json:"qdev_id"`
	ClassInfo struct {
		Class int    `json:"class"`
		Desc  string `json:"desc,omitempty"`
	} `json:"class_info"`
	ID struct {
		Vendor int `json:"vendor"`
		Device int `json:"device"`
	} `json:"id"`
	Bridge *struct {
		Devices []PCIDevice `json:"devices"`
	} `json:"pci_bridge,omitempty"`
}

// ExecuteQueryPCI lists the PCI buses and their devices (query-pci).
func (q *QMP) ExecuteQueryPCI(ctx context.Context) ([]PCIBus, error) {
	return runFor[[]PCIBus](ctx, q, "query-pci", "", nil)
}

// FindPCIDevice returns the device with qdev id id among buses, behind
// bridges too, or nil.
func FindPCIDevice(buses []PCIBus, id string) *PCIDevice {
	var find func([]PCIDevice) *PCIDevice
	find = func(devs []PCIDevice) *PCIDevice {
		for i := range devs {
			if devs[i].QDevID == id {
				return &devs[i]
			}
			if b := devs[i].Bridge; b != nil {
				if d := find(b.Devices); d != nil {
					return d
				}
			}
		}
		return nil
	}
	for _, b := range buses {
		if d := find(b.Devices); d != nil {
			return d
		}
	}
	return nil
}

// ExecuteNetdevAddUser adds a user-mode (slirp) network backend with host
// forwards into the guest (netdev_add type user).
func (q *QMP) ExecuteNetdevAddUser(ctx context.Context, id string, forwards []HostForward) error {
	type str struct {
		Str string `json:"str"`
	}
	args := struct {
		Type    string `json:"type"`
		ID      string `json:"id"`
		HostFwd []str  `json:"hostfwd,omitempty"`
	}{Type: "user", ID: id}
	for _, f := range forwards {
		args.HostFwd = append(args.HostFwd, str{f.String()})
	}
	return q.run(ctx, "netdev_add", id, args, nil)
}

// TapNetdev is a tap network backend for netdev_add: a tap interface QEMU
// opens by name (IFName, which needs the privilege to), or one whose open
// file was sent with ExecuteGetFD (FDName).
type TapNetdev struct {
	ID     string
	IFName string
	FDName string
}

// ExecuteNetdevAddTap adds a tap network backend (netdev_add type tap),
// with no scripts run.
func (q *QMP) ExecuteNetdevAddTap(ctx context.Context, tap TapNetdev) error {
	args := map[string]interface{}{"type": "tap", "id": tap.ID}
	switch {
	case tap.FDName != "" && tap.IFName != "":
		return commandError("netdev_add", tap.ID, errors.New("both IFName and FDName are set"))
	case tap.FDName != "":
		args["fd"] = tap.FDName
	case tap.IFName != "":
		args["ifname"], args["script"], args["downscript"] = tap.IFName, "no", "no"
	default:
		return commandError("netdev_add", tap.ID, errors.New("neither IFName nor FDName is set"))
	}
	return q.run(ctx, "netdev_add", tap.ID, args, nil)
}

// ExecuteNetdevDel removes a network backend (netdev_del).
func (q *QMP) ExecuteNetdevDel(ctx context.Context, id string) error {
	args := idArgs{id}
	return q.run(ctx, "netdev_del", id, args, nil)
}

// ExecuteSetLink sets the link of a NIC or netdev up or down (set_link):
// the guest sees its carrier come and go.
func (q *QMP) ExecuteSetLink(ctx context.Context, name string, up bool) error {
	args := struct {
		Name string `json:"name"`
		Up   bool   `json:"up"`
	}{name, up}
	return q.run(ctx, "set_link", name, args, nil)
}

// RxFilterInfo is a NIC's receive filter, as query-rx-filter reports it.
type RxFilterInfo struct {
	Name      string `json:"name"`
	MainMAC   string `json:"main-mac"`
	Promisc   bool   `json:"promiscuous"`
	Unicast   string `json:"unicast"`
	Multicast string `json:"multicast"`
}

// ExecuteQueryRxFilter returns the receive filter of the NIC name, or of
// every NIC that supports it when name is "" (query-rx-filter).
func (q *QMP) ExecuteQueryRxFilter(ctx context.Context, name string) ([]RxFilterInfo, error) {
	var args interface{}
	if name != "" {
		args = struct {
			Name string `json:"name"`
		}{name}
	}
	return runFor[[]RxFilterInfo](ctx, q, "query-rx-filter", name, args)
}

// ExecuteChardevAddUnixSocket adds a character device backed by a unix
// socket at path (chardev-add), QEMU listening on it when server is true
// (without waiting for a client) and connecting to it otherwise.
func (q *QMP) ExecuteChardevAddUnixSocket(ctx context.Context, id, path string, server bool) error {
	type addr struct {
		Type string `json:"type"`
		Data struct {
			Path string `json:"path"`
		} `json:"data"`
	}
	a := addr{Type: "unix"}
	a.Data.Path = path
	sock := map[string]interface{}{"addr": a, "server": server}
	if server {
		sock["wait"] = false
	}
	args := map[string]interface{}{
		"id":      id,
		"backend": map[string]interface{}{"type": "socket", "data": sock},
	}
	return q.run(ctx, "chardev-add", id, args, nil)
}

// ExecuteChardevRemove removes a character device no device uses
// (chardev-remove).
func (q *QMP) ExecuteChardevRemove(ctx context.Context, id string) error {
	args := idArgs{id}
	return q.run(ctx, "chardev-remove", id, args, nil)
}
