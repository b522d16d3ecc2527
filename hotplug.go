package qemu

import (
	"context"
	"errors"
)

// Typed device and network commands for hot-plug: device_add with any
// properties, query-pci, netdev_add of user and tap backends, set_link and
// query-rx-filter.

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
