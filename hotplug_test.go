package qemu

import (
	"testing"
	"time"
)

// A NIC hot-plugged with a chosen MAC on a user-mode backend: the guest
// sees an interface with that MAC, set_link off and on is seen as its
// carrier, query-pci and query-rx-filter describe it, and the unplug
// removes it from the guest.
func TestRealQEMUNICHotplug(t *testing.T) {
	for _, m := range hotplugMachines {
		t.Run(m.name, func(t *testing.T) { testNICHotplug(t, m.args, m.bus) })
	}
}

// hotplugMachines are the machines the hot-plug tests run on: q35, whose
// root bus refuses hot-plug, with a root port, and pc, which plugs into
// pci.0 (ACPI hot-plug).
var hotplugMachines = []struct {
	name, bus string
	args      []string
}{
	{"q35", "rp1", []string{"-machine", "q35", "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1"}},
	{"pc", "pci.0", []string{"-machine", "pc"}},
}

func testNICHotplug(t *testing.T, machine []string, bus string) {
	inst := startGuestInstance(t, "", InstanceOptions{}, machine...)
	ctx := ctxTimeout(t, 2*time.Minute)
	q := inst.QMP()
	ask := func(cmd, want string) {
		t.Helper()
		if got := guestAsk(t, inst, cmd); got != want {
			t.Fatalf("%s: the guest answered %q, want %q", cmd, got, want)
		}
	}
	const mac = "52:54:00:ab:cd:01"
	if err := q.ExecuteNetdevAddUser(ctx, "net0", nil); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteDeviceAddSpec(ctx, DeviceSpec{Driver: "virtio-net-pci", ID: "nic0", Bus: bus,
		Properties: map[string]interface{}{"netdev": "net0", "mac": mac}}); err != nil {
		t.Fatal(err)
	}
	buses, err := q.ExecuteQueryPCI(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if d := FindPCIDevice(buses, "nic0"); d == nil || d.ID.Vendor != 0x1af4 {
		t.Errorf("query-pci: nic0 is %+v", d)
	}
	filters, err := q.ExecuteQueryRxFilter(ctx, "nic0")
	if err != nil || len(filters) != 1 || filters[0].MainMAC != mac {
		t.Errorf("query-rx-filter = %+v, %v", filters, err)
	}
	ask("until [ -e /sys/class/net/eth0 ]; do sleep 0.1; done; ip link set eth0 up; echo ans=$(cat /sys/class/net/eth0/address)", mac)
	ask("sleep 0.5; echo ans=$(cat /sys/class/net/eth0/carrier)", "1")
	if err := q.ExecuteSetLink(ctx, "nic0", false); err != nil {
		t.Fatal(err)
	}
	ask("sleep 0.5; echo ans=$(cat /sys/class/net/eth0/carrier)", "0")
	if err := q.ExecuteSetLink(ctx, "nic0", true); err != nil {
		t.Fatal(err)
	}
	ask("sleep 0.5; echo ans=$(cat /sys/class/net/eth0/carrier)", "1")
	if err := q.ExecuteDeviceDel(ctx, "nic0"); err != nil {
		t.Fatal(err)
	}
	ask("echo ans=$(ls /sys/class/net | grep -c eth)", "0")
	if err := q.ExecuteNetdevDel(ctx, "net0"); err != nil {
		t.Fatal(err)
	}
}
