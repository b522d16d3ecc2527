package qemu

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

// CPUProperties place a vCPU in the topology: "socket-id", "core-id",
// "thread-id" and the others of the machine (QEMU 10.0 knows more than
// 7.2, so they are kept as QEMU names them).
type CPUProperties map[string]int64

// HotpluggableCPU is one vCPU slot, as query-hotpluggable-cpus lists it:
// the device type to plug into it and where it sits; QOMPath is set while a
// vCPU is in the slot.
type HotpluggableCPU struct {
	Type       string        `json:"type"`
	VCPUsCount int           `json:"vcpus-count"`
	Props      CPUProperties `json:"props"`
	QOMPath    string        `json:"qom-path,omitempty"`
}

// ExecuteQueryHotpluggableCPUs lists the vCPU slots
// (query-hotpluggable-cpus); the machine needs -smp maxcpus above cpus for
// free ones.
func (q *QMP) ExecuteQueryHotpluggableCPUs(ctx context.Context) ([]HotpluggableCPU, error) {
	return runFor[[]HotpluggableCPU](ctx, q, "query-hotpluggable-cpus", "", nil)
}

// CPUInfo is one vCPU, as query-cpus-fast lists it.
type CPUInfo struct {
	CPUIndex int           `json:"cpu-index"`
	QOMPath  string        `json:"qom-path"`
	ThreadID int           `json:"thread-id"`
	Props    CPUProperties `json:"props"`
	Target   string        `json:"target"`
}

// ExecuteQueryCPUsFast lists the vCPUs without interrupting them
// (query-cpus-fast).
func (q *QMP) ExecuteQueryCPUsFast(ctx context.Context) ([]CPUInfo, error) {
	return runFor[[]CPUInfo](ctx, q, "query-cpus-fast", "", nil)
}

// AddCPU plugs a vCPU with the given id into the free slot of
// query-hotpluggable-cpus with the lowest place in the topology (socket,
// then die, cluster, core and thread; QEMU lists the slots highest first),
// and returns the slot. The guest then brings it online (or not: Linux
// without udev leaves a hot-added CPU offline until something writes 1 to
// its online file).
func (q *QMP) AddCPU(ctx context.Context, id string) (HotpluggableCPU, error) {
	slots, err := q.ExecuteQueryHotpluggableCPUs(ctx)
	if err != nil {
		return HotpluggableCPU{}, err
	}
	var free []HotpluggableCPU
	for _, slot := range slots {
		if slot.QOMPath == "" {
			free = append(free, slot)
		}
	}
	if len(free) == 0 {
		return HotpluggableCPU{}, commandError("device_add", id, errors.New("no free vCPU slot (is -smp maxcpus above cpus?)"))
	}
	slot := slices.MinFunc(free, func(a, b HotpluggableCPU) int { return a.Props.compare(b.Props) })
	args := map[string]interface{}{"driver": slot.Type, "id": id}
	for k, v := range slot.Props {
		args[k] = v
	}
	if err := q.run(ctx, "device_add", id, args, nil); err != nil {
		return HotpluggableCPU{}, err
	}
	return slot, nil
}

// cpuTopology lists the topology ids from the widest to the narrowest, as
// QEMU's machines have them (each has a subset).
var cpuTopology = []string{"node-id", "drawer-id", "book-id", "socket-id", "die-id", "cluster-id", "module-id", "core-id", "thread-id"}

// compare orders places in the topology: by socket, then die, and so on.
func (p CPUProperties) compare(o CPUProperties) int {
	for _, k := range cpuTopology {
		if c := cmp.Compare(p[k], o[k]); c != 0 {
			return c
		}
	}
	return 0
}

// cpuUnplugPoll is how often RemoveCPU looks at the slots between events.
const cpuUnplugPoll = 250 * time.Millisecond

// RemoveCPU unplugs the vCPU id (device_del) and returns once its slot is
// empty. QEMU sends no DEVICE_DELETED naming a vCPU (7.2 and 10.0 name only
// its lapic's path), so completion is read from query-hotpluggable-cpus,
// each time QEMU reports progress (ACPI_DEVICE_OST, DEVICE_DELETED) and
// every 250 ms, until ctx ends. A guest that refuses
// (DEVICE_UNPLUG_GUEST_ERROR) fails it at once with ErrUnplugRefused.
func (q *QMP) RemoveCPU(ctx context.Context, id string) error {
	sub := q.Subscribe(EventFilter{Names: []string{"ACPI_DEVICE_OST", "DEVICE_DELETED", "DEVICE_UNPLUG_GUEST_ERROR"}})
	defer sub.Close()
	args := idArgs{id}
	if err := q.run(ctx, "device_del", id, args, nil); err != nil {
		return err
	}
	path := "/machine/peripheral/" + id
	for {
		slots, err := q.ExecuteQueryHotpluggableCPUs(ctx)
		if err != nil {
			return err
		}
		if !cpuInSlot(slots, path) {
			return nil
		}
		wctx, cancel := context.WithTimeout(ctx, cpuUnplugPoll)
		ev, err := sub.Receive(wctx)
		cancel()
		switch {
		case err == nil && ev.Name == "DEVICE_UNPLUG_GUEST_ERROR" && ev.Data["device"] == id:
			return commandError("device_del", id, ErrUnplugRefused)
		case ctx.Err() != nil:
			return commandError("device_del", id, fmt.Errorf("waiting for the vCPU's slot to empty: %w", contextError(ctx)))
		case err != nil && wctx.Err() == nil:
			return commandError("device_del", id, err) // the session ended
		}
	}
}

// cpuInSlot reports whether a slot holds the vCPU at path.
func cpuInSlot(slots []HotpluggableCPU, path string) bool {
	for _, s := range slots {
		if s.QOMPath == path {
			return true
		}
	}
	return false
}
