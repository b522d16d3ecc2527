package qemu

import (
	"context"
	"errors"
)

// Snapshots: internal snapshots of the VM (its RAM and device state and
// its qcow2 disks) saved, loaded and deleted by job (QEMU 6.0 and later),
// and external snapshots, a new overlay made the active layer.

// Snapshot names an internal snapshot for SaveSnapshot, LoadSnapshot and
// DeleteSnapshot.
type Snapshot struct {
	// JobID names the job that saves, loads or deletes it.
	JobID string `json:"job-id"`
	// Tag is the snapshot's name in each image.
	Tag string `json:"tag"`
	// VMState is the node of the qcow2 image that holds the RAM and
	// device state; DeleteSnapshot does not use it.
	VMState string `json:"vmstate,omitempty"`
	// Devices are the nodes of the disks the snapshot covers; each must
	// be a qcow2 format node, and VMState one of them.
	Devices []string `json:"devices"`
}

func (s Snapshot) check(name string, vmstate bool) error {
	switch {
	case s.JobID == "":
		return commandError(name, s.Tag, errors.New("JobID is empty"))
	case s.Tag == "":
		return commandError(name, s.JobID, errors.New("Tag is empty"))
	case vmstate && s.VMState == "":
		return commandError(name, s.JobID, errors.New("VMState is empty"))
	case len(s.Devices) == 0:
		return commandError(name, s.JobID, errors.New("Devices is empty"))
	}
	return nil
}

// SaveSnapshot saves an internal snapshot of the running VM
// (snapshot-save) and waits for the job to end, as the block job methods
// do: the VM pauses while its state is written, then runs on.
//
// QEMU writes the snapshot in one step of its main loop, which a cancel
// does not stop: a save whose ctx ended, cancelled and reported as such,
// has most likely written the snapshot all the same. A caller that does
// not want it deletes Tag (DeleteSnapshot), which also succeeds when the
// tag is not there.
func (q *QMP) SaveSnapshot(ctx context.Context, s Snapshot, opts JobOptions) (JobInfo, error) {
	if err := s.check("snapshot-save", true); err != nil {
		return JobInfo{}, err
	}
	return q.runJob(ctx, "snapshot-save", s.JobID, s, opts)
}

// LoadSnapshot loads an internal snapshot (snapshot-load) and waits for
// the job to end: the VM is then as it was when the snapshot was saved,
// running if it was running. When the load fails, QEMU 7.2 and 10.0
// leave the VM stopped (status "restore-vm"), since its state may be
// half loaded.
func (q *QMP) LoadSnapshot(ctx context.Context, s Snapshot, opts JobOptions) (JobInfo, error) {
	if err := s.check("snapshot-load", true); err != nil {
		return JobInfo{}, err
	}
	return q.runJob(ctx, "snapshot-load", s.JobID, s, opts)
}

// DeleteSnapshot deletes an internal snapshot from its images
// (snapshot-delete) and waits for the job to end.
func (q *QMP) DeleteSnapshot(ctx context.Context, s Snapshot, opts JobOptions) (JobInfo, error) {
	if err := s.check("snapshot-delete", false); err != nil {
		return JobInfo{}, err
	}
	s.VMState = ""
	return q.runJob(ctx, "snapshot-delete", s.JobID, s, opts)
}

// ExecuteBlockdevSnapshot takes an external snapshot (blockdev-snapshot):
// overlay, a node added with NoBacking, gets node as its backing node and
// takes its place as the active layer, so that the guest's writes go to
// the overlay from then on.
func (q *QMP) ExecuteBlockdevSnapshot(ctx context.Context, node, overlay string) error {
	args := struct {
		Node    string `json:"node"`
		Overlay string `json:"overlay"`
	}{node, overlay}
	return q.run(ctx, "blockdev-snapshot", overlay, args, nil)
}
