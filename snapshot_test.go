package qemu

import (
	"context"
	"errors"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestSnapshotsRealQEMU saves an internal snapshot of a running guest
// with a qcow2 disk, lets the guest write over what it had written, and
// loads the snapshot: the guest reads what it wrote before, and its
// heartbeat goes back to where it was. The snapshot is deleted after. A
// save whose context ends half-way is cancelled and dismissed, and the
// snapshot it may have left is deleted.
func TestSnapshotsRealQEMU(t *testing.T) {
	vm := testVM(t)
	dir := t.TempDir()
	d, args := newDisk(t, dir, "snap0")
	inst := vm.start(t, "", args...)
	q := inst.QMP()
	findDisk(t, inst, &d)
	snap := Snapshot{JobID: "save0", Tag: "before", VMState: "snap0", Devices: []string{"snap0"}}

	_, sumA := pattern("AAAA")
	_, sumB := pattern("BBBB")
	guestWrite(t, inst, d, 0, "AAAA")
	startHeartbeat(t, inst)
	var last JobInfo
	info, err := q.SaveSnapshot(ctxTimeout(t, 2*time.Minute), snap, JobOptions{Progress: func(j JobInfo) { last = j }})
	if err != nil {
		t.Fatal(err)
	}
	if info.Type != "snapshot-save" || last.Status != "concluded" {
		t.Errorf("save: %+v, last progress %+v", info, last)
	}
	beat := lastBeat(inst)
	checkStatus(t, inst, "running")
	if out := qemuImg(t, "snapshot", "-U", "-l", d.path); !strings.Contains(out, "before") {
		t.Errorf("qemu-img snapshot -l after the save:\n%s", out)
	}
	guestWrite(t, inst, d, 0, "BBBB")
	if got := guestRead(t, inst, d, 0); got != sumB {
		t.Fatalf("the guest reads %s after writing B (%s)", got, sumB)
	}
	checkBeatsOn(t, inst, beat+2, false) // time passes on

	snap.JobID = "load0"
	if _, err := q.LoadSnapshot(ctxTimeout(t, 2*time.Minute), snap, JobOptions{}); err != nil {
		t.Fatal(err)
	}
	checkStatus(t, inst, "running")
	// The guest's clock went back with it: its counter starts again
	// from the beat of the save.
	ctx := ctxTimeout(t, 30*time.Second)
	for back := false; !back; {
		line, err := inst.Console().WaitForRegexp(ctx, heartbeatLine)
		if err != nil {
			t.Fatalf("the heartbeat did not go back to %d after the load: %v; console:\n%s", beat, err, inst.Console().History())
		}
		n, _ := strconv.Atoi(heartbeatLine.FindStringSubmatch(line)[1])
		back = n <= beat+1
	}
	if got := guestRead(t, inst, d, 0); got != sumA {
		t.Errorf("the guest reads %s after the load, wrote A (%s) before the save", got, sumA)
	}

	snap.JobID = "delete0"
	if _, err := q.DeleteSnapshot(ctxTimeout(t, time.Minute), snap, JobOptions{}); err != nil {
		t.Fatal(err)
	}
	if out := qemuImg(t, "snapshot", "-U", "-l", d.path); strings.Contains(out, "before") {
		t.Errorf("qemu-img snapshot -l after the delete:\n%s", out)
	}
	noJobs(t, q)

	// A save whose context ends as soon as QEMU has started it is
	// cancelled, or, when QEMU had finished it first, reported as it
	// ended: either way no job is left and the VM runs on.
	cctx, cancel := context.WithCancel(context.Background())
	snap.JobID, snap.Tag = "save1", "cancelled"
	_, err = q.SaveSnapshot(cctx, snap, JobOptions{ProgressInterval: time.Millisecond, Progress: func(JobInfo) { cancel() }})
	t.Logf("save cancelled by its context: %v", err)
	if err != nil && !errors.Is(err, context.Canceled) {
		t.Errorf("save cancelled by its context: %v", err)
	}
	noJobs(t, q)
	checkStatus(t, inst, "running")
	// QEMU writes the snapshot in one step a cancel does not stop: the
	// tag is most likely there. A delete removes it, and succeeds when it
	// is not there.
	left := strings.Contains(qemuImg(t, "snapshot", "-U", "-l", d.path), "cancelled")
	t.Logf("the cancelled save left its snapshot: %v", left)
	snap.JobID = "delete1"
	if _, err := q.DeleteSnapshot(ctxTimeout(t, time.Minute), snap, JobOptions{}); err != nil {
		t.Errorf("delete of the cancelled save's tag: %v", err)
	}
	if out := qemuImg(t, "snapshot", "-U", "-l", d.path); strings.Contains(out, "cancelled") {
		t.Errorf("qemu-img snapshot -l after deleting the cancelled save's tag:\n%s", out)
	}

	// A load of a snapshot that is not there fails with QEMU's reason;
	// QEMU leaves the VM stopped.
	snap.JobID, snap.Tag = "load1", "before"
	_, err = q.LoadSnapshot(ctxTimeout(t, time.Minute), snap, JobOptions{})
	var jerr *JobError
	if !errors.As(err, &jerr) || !strings.Contains(jerr.Desc, "before") {
		t.Errorf("load of a deleted snapshot: %v", err)
	}
	t.Logf("load of a deleted snapshot: %v", err)
	noJobs(t, q)
	checkStatus(t, inst, "restore-vm")
}
