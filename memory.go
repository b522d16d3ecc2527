package qemu

import (
	"context"
	"errors"
)

// Typed memory and balloon commands: memory backends and the devices on
// them, and the balloon.

// MemoryBackend is a memory backend object for object-add: RAM
// ("memory-backend-ram") or a file ("memory-backend-file", with MemPath),
// for a pc-dimm's memdev.
type MemoryBackend struct {
	Type    string // "memory-backend-ram" or "memory-backend-file"
	ID      string
	Size    uint64
	MemPath string // for memory-backend-file
	Share   bool
}

// ExecuteObjectAddMemoryBackend adds a memory backend (object-add).
func (q *QMP) ExecuteObjectAddMemoryBackend(ctx context.Context, m MemoryBackend) error {
	args := map[string]interface{}{"qom-type": m.Type, "id": m.ID, "size": m.Size}
	switch m.Type {
	case "memory-backend-ram":
	case "memory-backend-file":
		if m.MemPath == "" {
			return commandError("object-add", m.ID, errors.New("memory-backend-file needs MemPath"))
		}
		args["mem-path"] = m.MemPath
	default:
		return commandError("object-add", m.ID, errors.New("Type is not memory-backend-ram or memory-backend-file"))
	}
	if m.Share {
		args["share"] = true
	}
	return q.run(ctx, "object-add", m.ID, args, nil)
}

// ExecuteObjectDel deletes an object (object-del), such as a memory backend
// no device uses any more.
func (q *QMP) ExecuteObjectDel(ctx context.Context, id string) error {
	args := idArgs{id}
	return q.run(ctx, "object-del", id, args, nil)
}

// MemoryDevice is one memory device, as query-memory-devices lists it;
// Data holds a DIMM's details (id, addr, size, slot, node, memdev,
// hotplugged, hotpluggable).
type MemoryDevice struct {
	Type string `json:"type"`
	Data struct {
		ID           string `json:"id"`
		Addr         uint64 `json:"addr"`
		Size         uint64 `json:"size"`
		Slot         int    `json:"slot"`
		Node         int    `json:"node"`
		Memdev       string `json:"memdev"`
		Hotplugged   bool   `json:"hotplugged"`
		Hotpluggable bool   `json:"hotpluggable"`
	} `json:"data"`
}

// ExecuteQueryMemoryDevices lists the memory devices (query-memory-devices).
func (q *QMP) ExecuteQueryMemoryDevices(ctx context.Context) ([]MemoryDevice, error) {
	return runFor[[]MemoryDevice](ctx, q, "query-memory-devices", "", nil)
}

// MemorySizeSummary is the guest's memory at start and in memory devices
// (query-memory-size-summary).
type MemorySizeSummary struct {
	BaseMemory    uint64 `json:"base-memory"`
	PluggedMemory uint64 `json:"plugged-memory"`
}

// ExecuteQueryMemorySizeSummary returns the guest's memory sizes.
func (q *QMP) ExecuteQueryMemorySizeSummary(ctx context.Context) (MemorySizeSummary, error) {
	return runFor[MemorySizeSummary](ctx, q, "query-memory-size-summary", "", nil)
}

// ExecuteBalloon asks the guest's balloon driver to bring the guest's
// memory to size bytes (balloon); query-balloon says how far it got.
func (q *QMP) ExecuteBalloon(ctx context.Context, size int64) error {
	args := struct {
		Value int64 `json:"value"`
	}{size}
	return q.run(ctx, "balloon", "", args, nil)
}

// ExecuteQueryBalloon returns the guest's memory as the balloon leaves it,
// in bytes (query-balloon).
func (q *QMP) ExecuteQueryBalloon(ctx context.Context) (int64, error) {
	var info struct {
		Actual int64 `json:"actual"`
	}
	err := q.run(ctx, "query-balloon", "", nil, &info)
	return info.Actual, err
}
