package qemu

import (
	"bufio"
	"fmt"
	"net"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"
	"time"
)

func memTotalKiB(t *testing.T, inst *Instance) int {
	t.Helper()
	n, err := strconv.Atoi(guestAsk(t, inst, "echo ans=$(awk '/^MemTotal/ {print $2}' /proc/meminfo)"))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// A 128 MiB DIMM on a RAM backend: the guest's MemTotal grows by it once
// it onlines the new memory (as movable, which is what lets it go again),
// and the unplug succeeds: the guest gives the memory back (MemTotal as
// before), after which the backend is deleted.
func TestRealQEMUDIMMHotplug(t *testing.T) {
	inst := startGuestInstance(t, "", InstanceOptions{}, "-m", "256M,slots=2,maxmem=1G")
	ctx := ctxTimeout(t, 2*time.Minute)
	q := inst.QMP()
	before := memTotalKiB(t, inst)
	if err := q.ExecuteObjectAddMemoryBackend(ctx, MemoryBackend{Type: "memory-backend-ram", ID: "mem1", Size: 128 << 20}); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteDeviceAddSpec(ctx, DeviceSpec{Driver: "pc-dimm", ID: "dimm1", Properties: map[string]interface{}{"memdev": "mem1"}}); err != nil {
		t.Fatal(err)
	}
	devs, err := q.ExecuteQueryMemoryDevices(ctx)
	if err != nil || len(devs) != 1 || devs[0].Type != "dimm" || devs[0].Data.ID != "dimm1" || devs[0].Data.Size != 128<<20 || !devs[0].Data.Hotplugged {
		t.Fatalf("query-memory-devices = %+v, %v", devs, err)
	}
	if sum, err := q.ExecuteQueryMemorySizeSummary(ctx); err != nil || sum != (MemorySizeSummary{BaseMemory: 256 << 20, PluggedMemory: 128 << 20}) {
		t.Errorf("query-memory-size-summary = %+v, %v", sum, err)
	}
	guestAsk(t, inst, "sleep 1; for m in /sys/devices/system/memory/memory*/state; do "+
		"grep -q offline $m && echo online_movable > $m; done; echo ans=onlined")
	after := memTotalKiB(t, inst)
	if grew := after - before; grew != 128<<10 {
		t.Errorf("MemTotal grew by %d KiB, want 131072 (from %d to %d)", grew, before, after)
	}
	if err := q.ExecuteDeviceDel(ctx, "dimm1"); err != nil {
		t.Fatalf("unplug of the DIMM: %v", err)
	}
	if back := memTotalKiB(t, inst); back != before {
		t.Errorf("MemTotal after the unplug is %d KiB, want %d again", back, before)
	}
	if err := q.ExecuteObjectDel(ctx, "mem1"); err != nil {
		t.Fatal(err)
	}
}

// A virtserialport hot-plugged on a chardev added over QMP carries bytes
// both ways between the guest and the test; the chardev goes once the
// port has.
func TestRealQEMUVirtserialportHotplug(t *testing.T) {
	inst := startGuestInstance(t, "", InstanceOptions{}, "-device", "virtio-serial-pci,id=vser0")
	ctx := ctxTimeout(t, 2*time.Minute)
	q := inst.QMP()
	sock := filepath.Join(shortTempDir(t), "port.sock")
	if err := q.ExecuteChardevAddUnixSocket(ctx, "ch0", sock, true); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteDeviceAddSpec(ctx, DeviceSpec{Driver: "virtserialport", ID: "port0", Bus: "vser0.0",
		Properties: map[string]interface{}{"chardev": "ch0", "name": "org.test.port0"}}); err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	// The guest's driver makes the port a moment after device_add has
	// returned: the guest reports it first (waiting at most 30 s), then
	// finds it by name, writes a line into it, and prints the line the
	// test writes back.
	port := guestAsk(t, inst, `i=0; until p=$(grep -l org.test.port0 /sys/class/virtio-ports/*/name 2>/dev/null); `+
		`do [ $i -ge 600 ] && break; i=$((i+1)); sleep 0.05; done; echo ans=$p`)
	if port == "" {
		t.Fatalf("the guest has no port named org.test.port0; console:\n%s", inst.Console().History())
	}
	if deadline, ok := ctx.Deadline(); ok {
		conn.SetDeadline(deadline)
	}
	fmt.Fprintln(inst.Console(), `d=/dev/$(basename $(dirname `+port+`)); `+
		`exec 3<>$d; echo guest-to-host >&3; read -r l <&3; echo ans=$l; exec 3>&-`)
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil || line != "guest-to-host\n" {
		t.Fatalf("the test read %q, %v; console:\n%s", line, err, inst.Console().History())
	}
	fmt.Fprintln(conn, "host-to-guest")
	if got, err := inst.Console().WaitForRegexp(ctx, regexp.MustCompile(`^ans=`)); err != nil || got != "ans=host-to-guest" {
		t.Fatalf("the guest read %q, %v", got, err)
	}
	if err := q.ExecuteDeviceDel(ctx, "port0"); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteChardevRemove(ctx, "ch0"); err != nil {
		t.Fatal(err)
	}
}

// The balloon's target reaches the guest: its driver gives the memory back
// and query-balloon reports the new size.
func TestRealQEMUBalloon(t *testing.T) {
	inst := startGuestInstance(t, "", InstanceOptions{}, "-device", "virtio-balloon-pci,id=balloon0")
	ctx := ctxTimeout(t, 2*time.Minute)
	q := inst.QMP()
	if actual, err := q.ExecuteQueryBalloon(ctx); err != nil || actual != 256<<20 {
		t.Fatalf("query-balloon before = %d, %v", actual, err)
	}
	before := memTotalKiB(t, inst)
	if err := q.ExecuteBalloon(ctx, 192<<20); err != nil {
		t.Fatal(err)
	}
	var actual int64
	for actual != 192<<20 && ctx.Err() == nil {
		time.Sleep(100 * time.Millisecond)
		actual, _ = q.ExecuteQueryBalloon(ctx)
	}
	if actual != 192<<20 {
		t.Fatalf("query-balloon = %d, want 192 MiB", actual)
	}
	after := memTotalKiB(t, inst)
	if shrunk := before - after; shrunk != 64<<10 {
		t.Errorf("the guest's MemTotal shrank by %d KiB, want 65536 (from %d to %d)", shrunk, before, after)
	}
}
