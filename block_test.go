package qemu

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// FindBlockDevice finds a device's backend by the names QEMU gives it in
// query-block: its id, or its QOM path (and a virtio device's backend
// below it), never another device whose id only starts the same.
func TestFindBlockDevice(t *testing.T) {
	blocks := []BlockInfo{
		{Device: "ide0-cd0", QDev: "/machine/unattached/device[23]"},
		{QDev: "/machine/peripheral/vd10/virtio-backend", Inserted: &BlockNodeInfo{NodeName: "n10"}},
		{QDev: "/machine/peripheral/vd1/virtio-backend", Inserted: &BlockNodeInfo{NodeName: "n1"}},
		{QDev: "cd0", Inserted: &BlockNodeInfo{NodeName: "seed"}},
		{QDev: "/machine/peripheral/sd0", Inserted: &BlockNodeInfo{NodeName: "n2"}},
	}
	for id, want := range map[string]string{"vd1": "n1", "vd10": "n10", "cd0": "seed", "sd0": "n2", "vd": "", "ide0-cd0": ""} {
		got := ""
		if b := FindBlockDevice(blocks, id); b != nil {
			got = b.Inserted.NodeName
		}
		if got != want {
			t.Errorf("FindBlockDevice(%q) is on %q, want %q", id, got, want)
		}
	}
}

func TestBlockdevNodeArgs(t *testing.T) {
	for _, bad := range []BlockdevNode{
		{Driver: "raw", File: BlockdevFile{Filename: "/x"}},
		{NodeName: "n", File: BlockdevFile{Filename: "/x"}},
		{NodeName: "n", Driver: "raw"},
		{NodeName: "n", Driver: "qcow2", FileNode: "p", Backing: "b", NoBacking: true},
	} {
		if _, err := bad.args(); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// A qcow2 overlay on a raw backing image, hot-plugged with its format:
// the guest sees the overlay's virtual size, reads the backing data and
// writes its own; after the unplug qemu-img check finds the overlay clean
// and the backing image is unchanged. A read-only node refuses the guest's
// write.
func TestRealQEMUQcow2OverlayHotplug(t *testing.T) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		t.Skipf("no qemu-img: %v", err)
	}
	dir := t.TempDir()
	base, overlay := filepath.Join(dir, "base.raw"), filepath.Join(dir, "overlay.qcow2")
	baseData := make([]byte, 16<<20)
	copy(baseData, "BASE-DATA-0042")
	if err := os.WriteFile(base, baseData, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", overlay, "32M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v: %s", err, out)
	}
	inst := startGuestInstance(t, "", InstanceOptions{}, "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1",
		"-device", "pcie-root-port,id=rp2,bus=pcie.0,chassis=1,slot=2")
	ctx := ctxTimeout(t, 2*time.Minute)
	q, con := inst.QMP(), inst.Console()
	ask := func(cmd, want string) {
		t.Helper()
		if got := guestAsk(t, inst, cmd); got != want {
			t.Fatalf("%s: the guest answered %q, want %q", cmd, got, want)
		}
	}

	if err := q.ExecuteBlockdevAddNode(ctx, BlockdevNode{NodeName: "ov0", Driver: "qcow2", File: BlockdevFile{Filename: overlay}}); err != nil {
		t.Fatal(err)
	}
	nodes, err := q.ExecuteQueryNamedBlockNodes(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var top *BlockNodeInfo
	for i := range nodes {
		if nodes[i].NodeName == "ov0" {
			top = &nodes[i]
		}
	}
	if top == nil || top.Driver != "qcow2" || top.Image.VirtualSize != 32<<20 || top.Image.BackingImage == nil ||
		top.Image.BackingImage.Format != "raw" || top.Image.BackingImage.Filename != base {
		t.Fatalf("query-named-block-nodes: %+v", top)
	}
	if err := q.ExecuteDeviceAdd(ctx, "ov0", "vd0", "virtio-blk-pci", "rp1"); err != nil {
		t.Fatal(err)
	}
	if _, err := con.WaitFor(ctx, "TESTGUEST: block add vda"); err != nil {
		t.Fatal(err)
	}
	if got := guestAsk(t, inst, "echo ans=$(cat /sys/block/vda/size)"); got != fmt.Sprint((32<<20)/512) {
		t.Errorf("the guest sees %s sectors, want the overlay's 32 MiB", got)
	}
	ask("echo ans=$(head -c 14 /dev/vda)", "BASE-DATA-0042")
	ask("printf OVERLAY-WRITE-7 | dd of=/dev/vda bs=1M seek=1 conv=notrunc 2>/dev/null && sync && echo ans=written", "written")
	ask("echo ans=$(dd if=/dev/vda bs=1M skip=1 count=1 2>/dev/null | head -c 15)", "OVERLAY-WRITE-7")
	var blocks []BlockInfo
	if blocks, err = q.ExecuteQueryBlock(ctx); err != nil {
		t.Fatal(err)
	}
	if b := FindBlockDevice(blocks, "vd0"); b == nil || b.Inserted == nil || b.Inserted.NodeName != "ov0" {
		t.Errorf("query-block has no backend of vd0 on ov0: %+v", blocks)
	}
	if err := q.ExecuteDeviceDel(ctx, "vd0"); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteBlockdevDel(ctx, "ov0"); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "check", overlay).CombinedOutput(); err != nil || !strings.Contains(string(out), "No errors") {
		t.Errorf("qemu-img check: %v: %s", err, out)
	}
	if got, err := os.ReadFile(base); err != nil || !bytes.Equal(got, baseData) {
		t.Error("the backing image changed")
	}

	// Read-only: the guest sees a read-only disk and its write fails.
	if err := q.ExecuteBlockdevAddNode(ctx, BlockdevNode{NodeName: "ro0", Driver: "raw", ReadOnly: true, File: BlockdevFile{Filename: base}}); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteDeviceAdd(ctx, "ro0", "vd1", "virtio-blk-pci", "rp2"); err != nil {
		t.Fatal(err)
	}
	line, err := con.WaitFor(ctx, "TESTGUEST: block add")
	if err != nil {
		t.Fatal(err)
	}
	dev := line[strings.LastIndex(line, " ")+1:]
	ask("echo ans=$(cat /sys/block/"+dev+"/ro)", "1")
	if status := guestAsk(t, inst, "printf X | dd of=/dev/"+dev+" bs=1 conv=notrunc 2>/dev/null; echo ans=$?"); status == "0" {
		t.Errorf("a write to the read-only disk succeeded")
	}
}
