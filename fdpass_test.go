package qemu

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"
)

// recvWithFiles reads one command and the descriptors sent with it.
func recvWithFiles(t *testing.T, p *peer) (string, []*os.File) {
	t.Helper()
	buf := make([]byte, 4096)
	oob := make([]byte, syscall.CmsgSpace(4*4))
	n, oobn, _, _, err := p.conn.(*net.UnixConn).ReadMsgUnix(buf, oob)
	if err != nil {
		t.Fatal(err)
	}
	var files []*os.File
	msgs, _ := syscall.ParseSocketControlMessage(oob[:oobn])
	for _, m := range msgs {
		fds, _ := syscall.ParseUnixRights(&m)
		for _, fd := range fds {
			f := os.NewFile(uintptr(fd), "received")
			t.Cleanup(func() { f.Close() })
			files = append(files, f)
		}
	}
	return strings.TrimSuffix(string(buf[:n]), "\n"), files
}

func TestFDPassingWire(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	f, err := os.CreateTemp(t.TempDir(), "f")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("passed")
	ctx := ctxTimeout(t, 5*time.Second)
	set := 7
	for _, c := range []struct {
		name  string
		call  func() error
		wire  string
		reply string
		files int
	}{
		{"getfd", func() error { return s.q.ExecuteGetFD(ctx, "tap0", f) },
			`{"execute":"getfd","arguments":{"fdname":"tap0"}}`, okReply, 1},
		{"add-fd", func() error {
			info, err := s.q.ExecuteAddFD(ctx, f, AddFDOptions{FDSetID: &set, Opaque: "disk"})
			if err == nil && info != (AddFDInfo{FDSetID: 7, FD: 25}) {
				err = fmt.Errorf("info %+v", info)
			}
			return err
		}, `{"execute":"add-fd","arguments":{"fdset-id":7,"opaque":"disk"}}`, `{"return": {"fdset-id": 7, "fd": 25}}`, 1},
		{"add-fd new set", func() error { _, err := s.q.ExecuteAddFD(ctx, f, AddFDOptions{}); return err },
			`{"execute":"add-fd","arguments":{}}`, `{"return": {"fdset-id": 0, "fd": 26}}`, 1},
		{"closefd", func() error { return s.q.ExecuteCloseFD(ctx, "tap0") },
			`{"execute":"closefd","arguments":{"fdname":"tap0"}}`, okReply, 0},
		{"remove-fd", func() error { fd := 25; return s.q.ExecuteRemoveFD(ctx, 7, &fd) },
			`{"execute":"remove-fd","arguments":{"fdset-id":7,"fd":25}}`, okReply, 0},
		{"remove-fd set", func() error { return s.q.ExecuteRemoveFD(ctx, 7, nil) },
			`{"execute":"remove-fd","arguments":{"fdset-id":7}}`, okReply, 0},
		{"query-fdsets", func() error {
			sets, err := s.q.ExecuteQueryFDSets(ctx)
			if err == nil && (len(sets) != 1 || sets[0].FDSetID != 0 || len(sets[0].FDs) != 1 || sets[0].FDs[0] != (FDSetEntry{FD: 26, Opaque: "x"})) {
				err = fmt.Errorf("sets %+v", sets)
			}
			return err
		}, `{"execute":"query-fdsets"}`, `{"return": [{"fdset-id": 0, "fds": [{"fd": 26, "opaque": "x"}]}]}`, 0},
	} {
		done := pendingCall(c.call)
		line, files := recvWithFiles(t, s.p)
		s.p.send(c.reply)
		if err := <-done; err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
		if line != c.wire || len(files) != c.files {
			t.Errorf("%s: wire %s with %d files, want %s with %d", c.name, line, len(files), c.wire, c.files)
		}
		for _, got := range files {
			b := make([]byte, 6)
			if _, err := got.ReadAt(b, 0); err != nil || string(b) != "passed" {
				t.Errorf("%s: the received file reads %q, %v", c.name, b, err)
			}
		}
	}
	// Files that cannot be sent fail before anything is written.
	closed, _ := os.Open(f.Name())
	closed.Close()
	if err := s.q.ExecuteGetFD(ctx, "x", nil); err == nil || err.Error() != "qmp: getfd x: the file is nil" {
		t.Errorf("nil file: %v", err)
	}
	if _, err := s.q.ExecuteAddFD(ctx, closed, AddFDOptions{}); err == nil || !strings.Contains(err.Error(), "closed") {
		t.Errorf("closed file: %v", err)
	}
	// QEMU's refusal is a *QMPError.
	done := pendingCall(func() error { return s.q.ExecuteGetFD(ctx, "x", f) })
	recvWithFiles(t, s.p)
	s.p.send(`{"error": {"class": "GenericError", "desc": "No file descriptor supplied via SCM_RIGHTS"}}`)
	var qerr *QMPError
	if err := <-done; !errors.As(err, &qerr) {
		t.Errorf("refusal: %v", err)
	}
}

func TestFDSetFileParams(t *testing.T) {
	f, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	config := Config{Devices: []Device{
		FDSetFile{Set: 2, File: f, Opaque: "disk,a"},
		BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/dev/fdset/2", Format: "raw", Interface: NoInterface},
		FDSetFile{Set: 3, File: f},
	}}
	params, fds := renderConfig(config, nil)
	want := "-add-fd fd=3,set=2,opaque=disk,,a -device virtio-blk,drive=hd0,config-wce=off -drive id=hd0,file=/dev/fdset/2,format=raw,if=none -add-fd fd=4,set=3"
	if got := strings.Join(params, " "); got != want || len(fds) != 2 {
		t.Errorf("argv %s with %d files\nwant %s", got, len(fds), want)
	}
	if (FDSetFile{Set: 1}).Valid() || (FDSetFile{Set: -1, File: f}).Valid() {
		t.Error("an FDSetFile with no file or a negative set is valid")
	}
}

// writeDiskWithData writes a 1 MiB raw image starting with data, opens it
// for reading and writing and for reading only, and removes its name: QEMU
// can then reach it only through the open files. An fd set should hold
// both: QEMU opens /dev/fdset/N with the access mode it needs at that
// moment (read-only for a -drive while it probes, say) and takes the
// descriptor of that mode.
func writeDiskWithData(t *testing.T, data string) (rw, ro *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.img")
	img := make([]byte, 1<<20)
	copy(img, data)
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	rw, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { rw.Close() })
	ro, err = os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ro.Close() })
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	return rw, ro
}

// guestReads has the guest print the first bytes of its disk dev and checks
// they are want.
func guestReads(t *testing.T, inst *Instance, dev, want string) {
	t.Helper()
	if got := guestAsk(t, inst, fmt.Sprintf("echo ans=$(head -c %d /dev/%s)", len(want), dev)); got != want {
		t.Fatalf("the guest read %q from %s, want %q", got, dev, want)
	}
}

// A disk QEMU cannot open by path (its name is gone), passed with add-fd
// and hot-plugged with blockdev-add on /dev/fdset/N: the guest reads what
// the test wrote; query-fdsets lists the file and remove-fd removes it.
func TestRealQEMUAddFDHotplugDisk(t *testing.T) {
	inst := startGuestInstance(t, "", InstanceOptions{}, "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1")
	ctx := ctxTimeout(t, 2*time.Minute)
	q := inst.QMP()
	disk, _ := writeDiskWithData(t, "FDSET-HOTPLUG-42")
	info, err := q.ExecuteAddFD(ctx, disk, AddFDOptions{Opaque: "hotplug disk"})
	if err != nil {
		t.Fatal(err)
	}
	disk.Close() // QEMU has its own descriptor
	node := fmt.Sprintf("/dev/fdset/%d", info.FDSetID)
	if err := q.ExecuteBlockdevAdd(ctx, node, "fdisk0"); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteDeviceAdd(ctx, "fdisk0", "vdisk0", "virtio-blk-pci", "rp1"); err != nil {
		t.Fatal(err)
	}
	if _, err := inst.Console().WaitFor(ctx, "TESTGUEST: block add vda"); err != nil {
		t.Fatal(err)
	}
	guestReads(t, inst, "vda", "FDSET-HOTPLUG-42")
	sets, err := q.ExecuteQueryFDSets(ctx)
	if err != nil || len(sets) != 1 || sets[0].FDSetID != info.FDSetID || len(sets[0].FDs) != 1 ||
		sets[0].FDs[0] != (FDSetEntry{FD: info.FD, Opaque: "hotplug disk"}) {
		t.Fatalf("query-fdsets = %+v, %v; add-fd said %+v", sets, err, info)
	}
	if err := q.ExecuteDeviceDel(ctx, "vdisk0"); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteXBlockdevDel(ctx, "fdisk0"); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteRemoveFD(ctx, info.FDSetID, &info.FD); err != nil {
		t.Fatal(err)
	}
	if sets, err := q.ExecuteQueryFDSets(ctx); err != nil || len(sets) != 0 {
		t.Errorf("query-fdsets after remove-fd = %+v, %v", sets, err)
	}
}

// The same disk at boot, put into an fd set on the command line.
func TestRealQEMUAddFDAtBoot(t *testing.T) {
	kernel, initrd := requireGuest(t)
	rw, ro := writeDiskWithData(t, "FDSET-AT-BOOT-7")
	config := exampleGuest()
	config.Kernel = Kernel{Path: kernel, InitrdPath: initrd, Params: guestKernelParams}
	config.Devices = append(config.Devices,
		FDSetFile{Set: 1, File: rw}, FDSetFile{Set: 1, File: ro},
		BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/dev/fdset/1", Format: "raw", Interface: NoInterface})
	ctx := ctxTimeout(t, 2*time.Minute)
	inst, err := StartInstance(ctx, config, InstanceOptions{Console: ConsoleSerial})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	rw.Close()
	ro.Close()
	if _, err := inst.Console().WaitFor(ctx, guestReadyLine); err != nil {
		t.Fatal(err)
	}
	guestReads(t, inst, "vda", "FDSET-AT-BOOT-7")
}

// openFDs counts the descriptors of a process.
func openFDs(t *testing.T, pid string) int {
	t.Helper()
	entries, err := os.ReadDir("/proc/" + pid + "/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(entries)
}

// 64 files passed in a row, with add-fd and with getfd, leave no
// descriptor behind in this process or, once removed, in QEMU.
func TestRealQEMUPassingFilesLeaksNothing(t *testing.T) {
	q, inst := startPausedQEMU(t)
	ctx := ctxTimeout(t, time.Minute)
	qemuPid := fmt.Sprint(inst.Pid())
	oursBefore, qemuBefore := openFDs(t, "self"), openFDs(t, qemuPid)
	var sets []int
	for i := range 64 {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		info, err := q.ExecuteAddFD(ctx, f, AddFDOptions{})
		f.Close()
		if err != nil {
			t.Fatalf("add-fd %d: %v", i, err)
		}
		sets = append(sets, info.FDSetID)
		g, _ := os.Open(os.DevNull)
		err = q.ExecuteGetFD(ctx, fmt.Sprint("f", i), g)
		g.Close()
		if err != nil {
			t.Fatalf("getfd %d: %v", i, err)
		}
	}
	if got := openFDs(t, "self"); got != oursBefore {
		t.Errorf("this process holds %d descriptors, %d before", got, oursBefore)
	}
	if got := openFDs(t, qemuPid); got != qemuBefore+128 {
		t.Errorf("QEMU holds %d descriptors, want %d + 128", got, qemuBefore)
	}
	listed, err := q.ExecuteQueryFDSets(ctx)
	if err != nil || len(listed) != 64 {
		t.Fatalf("query-fdsets lists %d sets, %v", len(listed), err)
	}
	// QEMU closes a removed descriptor only while the VM runs (its
	// fd set cleanup checks runstate_is_running): a paused QEMU keeps
	// them until cont.
	if err := q.ExecuteCont(ctx); err != nil {
		t.Fatal(err)
	}
	for i, set := range sets {
		if err := q.ExecuteRemoveFD(ctx, set, nil); err != nil {
			t.Fatal(err)
		}
		if err := q.ExecuteCloseFD(ctx, fmt.Sprint("f", i)); err != nil {
			t.Fatal(err)
		}
	}
	if got := openFDs(t, qemuPid); got != qemuBefore {
		t.Errorf("QEMU holds %d descriptors after remove-fd and closefd, %d before", got, qemuBefore)
	}
}

// A tap device created by the test in a network namespace of its own, its
// descriptor sent with getfd and hot-plugged as a netdev and a virtio-net
// NIC: the guest pings the namespace's end of the tap and gets replies.
// QEMU stays in the host's namespace; only the tap lives in the private
// one, which is simpler and is what an orchestrator that hands QEMU a tap
// does.
func TestRealQEMUTapFromGetFD(t *testing.T) {
	requireGuest(t)
	requireTun(t)
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skipf("no ip command: %v", err)
	}
	ns := fmt.Sprintf("qt%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", ns).CombinedOutput(); err != nil {
		t.Skipf("cannot make a network namespace here: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
	tap := tapInNamespace(t, ns, "tap0")
	for _, args := range [][]string{
		{"addr", "add", "10.9.0.1/24", "dev", "tap0"},
		{"link", "set", "tap0", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", ns}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %q: %v: %s", args, err, out)
		}
	}

	inst := startGuestInstance(t, "", InstanceOptions{}, "-device", "pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=1")
	ctx := ctxTimeout(t, 2*time.Minute)
	q := inst.QMP()
	if err := q.ExecuteGetFD(ctx, "tapfd", tap); err != nil {
		t.Fatal(err)
	}
	tap.Close()
	if err := q.ExecuteNetdevAddTap(ctx, TapNetdev{ID: "net0", FDName: "tapfd"}); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteDeviceAddSpec(ctx, DeviceSpec{Driver: "virtio-net-pci", ID: "nic0", Bus: "rp1",
		Properties: map[string]interface{}{"netdev": "net0", "mac": "52:54:00:00:09:02"}}); err != nil {
		t.Fatal(err)
	}
	con := inst.Console()
	fmt.Fprintln(con, "until ip link set eth0 up 2>/dev/null; do sleep 0.1; done; ip addr add 10.9.0.2/24 dev eth0 && ping -c 3 -W 3 10.9.0.1")
	line, err := con.WaitFor(ctx, "bytes from 10.9.0.1")
	if err != nil {
		t.Fatalf("%v; console:\n%s", err, con.History())
	}
	t.Logf("guest: %s", line)
	if _, err := con.WaitFor(ctx, "TESTGUEST: exit 0"); err != nil {
		t.Fatalf("ping failed: %v; console:\n%s", err, con.History())
	}
}

// tapInNamespace creates a tap device in network namespace ns and returns
// its open file. The device is made by a thread that joins the namespace
// and then ends with it, so no other goroutine ever runs in it.
func tapInNamespace(t *testing.T, ns, name string) *os.File {
	t.Helper()
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// Never unlocked: the thread ends with the goroutine, taking the
		// namespace it joined with it.
		runtime.LockOSThread()
		nsf, err := os.Open("/run/netns/" + ns)
		if err != nil {
			ch <- result{err: err}
			return
		}
		defer nsf.Close()
		const sysSetns = 308 // linux/amd64
		if _, _, e := syscall.Syscall(sysSetns, nsf.Fd(), syscall.CLONE_NEWNET, 0); e != 0 {
			ch <- result{err: fmt.Errorf("setns: %w", e)}
			return
		}
		f, err := createTap(name, 0)
		ch <- result{f, err}
	}()
	r := <-ch
	if r.err != nil {
		t.Skipf("cannot create a tap in namespace %s: %v", ns, r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

// iffMultiQueue, for createTap, makes the device one of a multi-queue tap.
const iffMultiQueue = 0x0100

// createTap makes (or, with iffMultiQueue, adds a queue to) the tap device
// name in the calling thread's namespace, with a virtio-net header.
func createTap(name string, flags uint16) (*os.File, error) {
	const (
		tunSetIff  = 0x400454ca
		iffTap     = 0x0002
		iffNoPI    = 0x1000
		iffVnetHdr = 0x4000
	)
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	var req [40]byte // struct ifreq: the name, then the flags
	copy(req[:15], name)
	binary.NativeEndian.PutUint16(req[16:], iffTap|iffNoPI|iffVnetHdr|flags)
	raw, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return nil, err
	}
	var errno syscall.Errno
	raw.Control(func(fd uintptr) {
		_, _, errno = syscall.Syscall(syscall.SYS_IOCTL, fd, tunSetIff, uintptr(unsafe.Pointer(&req[0])))
	})
	if errno != 0 {
		f.Close()
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, errno)
	}
	return f, nil
}
