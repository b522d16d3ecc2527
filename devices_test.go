package qemu

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestAddedDeviceParams(t *testing.T) {
	for _, c := range []struct {
		name string
		dev  Device
		want string
	}{
		{"generic", GenericDevice{Driver: "virtio-rng-pci", ID: "rng0", Bus: "rp1", Addr: "0x0",
			Properties: []DeviceProperty{{"max-bytes", "1024"}, {"period", "1000"}}},
			"-device virtio-rng-pci,id=rng0,bus=rp1,addr=0x0,max-bytes=1024,period=1000"},
		{"generic escaped", GenericDevice{Driver: "x", Properties: []DeviceProperty{{"serial", "a,b=c"}}},
			"-device x,serial=a,,b=c"},
		{"generic driver only", GenericDevice{Driver: "virtio-balloon-pci"}, "-device virtio-balloon-pci"},
		{"root port", PCIeRootPort{ID: "rp1", Chassis: 1, Slot: 2}, "-device pcie-root-port,id=rp1,bus=pcie.0,chassis=1,slot=2"},
		{"root port bus", PCIeRootPort{ID: "rp2", Bus: "pcie.1"}, "-device pcie-root-port,id=rp2,bus=pcie.1,chassis=0,slot=0"},
		{"user network", UserNetwork{ID: "n0", MACAddress: "52:54:00:12:34:56", HostForwards: []HostForward{
			{HostPort: 2222, GuestPort: 22}, {Protocol: "udp", HostAddr: "127.0.0.1", HostPort: 5353, GuestAddr: "10.0.2.15", GuestPort: 53}}},
			"-device virtio-net-pci,netdev=n0,mac=52:54:00:12:34:56 -netdev user,id=n0,hostfwd=tcp::2222-:22,hostfwd=udp:127.0.0.1:5353-10.0.2.15:53"},
		{"user network nic", UserNetwork{ID: "n1", Driver: "e1000", DeviceID: "nic1", Bus: "rp1"},
			"-device e1000,netdev=n1,id=nic1,bus=rp1 -netdev user,id=n1"},
		{"disk", Disk{ID: "d0", File: "/var/lib/vm,1.img"},
			"-drive if=none,id=d0,file=/var/lib/vm,,1.img,format=raw -device virtio-blk-pci,drive=d0,id=d0"},
		{"disk read-only qcow2", Disk{ID: "d1", File: "/i.qcow2", Format: QCOW2, ReadOnly: true, Serial: "s1", Bus: "rp1"},
			"-drive if=none,id=d1,file=/i.qcow2,format=qcow2,readonly=on -device virtio-blk-pci,drive=d1,id=d1,bus=rp1,serial=s1"},
		{"cd-rom", Disk{ID: "seed", File: "/seed.iso", Interface: DiskIDE, CDROM: true},
			"-drive if=none,id=seed,file=/seed.iso,format=raw,readonly=on,media=cdrom -device ide-cd,drive=seed,id=seed"},
		{"ide disk", Disk{ID: "hd", File: "/hd.img", Interface: DiskIDE, Bus: "ide.2"},
			"-drive if=none,id=hd,file=/hd.img,format=raw -device ide-hd,drive=hd,id=hd,bus=ide.2"},
		{"scsi cd-rom", Disk{ID: "cd", File: "/a.iso", Interface: DiskSCSI, CDROM: true, Bus: "scsi0.0"},
			"-drive if=none,id=cd,file=/a.iso,format=raw,readonly=on,media=cdrom -device scsi-cd,drive=cd,id=cd,bus=scsi0.0"},
		{"scsi disk", Disk{ID: "sd", File: "/s.img", Interface: DiskSCSI},
			"-drive if=none,id=sd,file=/s.img,format=raw -device scsi-hd,drive=sd,id=sd"},
	} {
		if !c.dev.Valid() {
			t.Errorf("%s: not valid", c.name)
			continue
		}
		if got := strings.Join(c.dev.QemuParams(&Config{}), " "); got != c.want {
			t.Errorf("%s:\n got %s\nwant %s", c.name, got, c.want)
		}
	}
	for _, c := range []struct {
		dev  Device
		want string
	}{
		{GenericDevice{}, "Driver is empty"},
		{GenericDevice{Driver: "x", Properties: []DeviceProperty{{"a=b", "c"}}}, `Properties[0] has the name "a=b"`},
		{GenericDevice{Driver: "x", ID: "a\nb"}, "a field contains a newline or NUL"},
		{PCIeRootPort{}, "ID is empty"},
		{UserNetwork{}, "ID is empty"},
		{UserNetwork{ID: "n", HostForwards: []HostForward{{Protocol: "sctp", HostPort: 1, GuestPort: 1}}}, `HostForwards[0].Protocol is "sctp", not tcp or udp`},
		{UserNetwork{ID: "n", HostForwards: []HostForward{{GuestPort: 22}}}, "HostForwards[0] has a port 0"},
		{UserNetwork{ID: "n", HostForwards: []HostForward{{HostAddr: "::1", HostPort: 1, GuestPort: 1}}}, "HostForwards[0] has an address with ':' or '-'"},
		{Disk{File: "/x"}, "ID is empty"},
		{Disk{ID: "d"}, "File is empty"},
		{Disk{ID: "d", File: "/x", CDROM: true}, "CDROM on DiskVirtio, which has no CD-ROM (use DiskIDE or DiskSCSI)"},
		{Disk{ID: "d", File: "/x", Interface: "sata"}, `Interface is "sata", not DiskVirtio, DiskIDE or DiskSCSI`},
		{Disk{ID: "d", File: "/x\n"}, "a field contains a newline or NUL"},
	} {
		if c.dev.Valid() {
			t.Errorf("%+v: valid", c.dev)
		}
		if got := deviceProblem(c.dev); got != c.want {
			t.Errorf("%+v: problem %q, want %q", c.dev, got, c.want)
		}
	}
}

func TestAddedConfigParts(t *testing.T) {
	config := Config{
		SMP:          SMP{CPUs: 1, MaxCPUs: 4},
		Knobs:        Knobs{NoDefaults: true, Paused: true},
		Kernel:       Kernel{Path: "/k"},
		FirmwareDirs: []string{"/opt/qemu/share", "/opt/a,b"},
		ExtraParams:  []string{"-rtc", "base=utc,clock=host", "-no-reboot"},
	}
	params, _ := renderConfig(config, nil)
	want := "-smp 1,maxcpus=4 -nodefaults -S -kernel /k -L /opt/qemu/share -L /opt/a,b -rtc base=utc,clock=host -no-reboot"
	if got := strings.Join(params, " "); got != want {
		t.Errorf("argv:\n got %s\nwant %s", got, want)
	}
	for _, bad := range []Config{
		{FirmwareDirs: []string{"/a\nb"}},
		{ExtraParams: []string{"-x\x00"}},
		{Env: []string{"NOVALUE"}},
		{Env: []string{"=x"}},
	} {
		if err := checkConfig(&bad); err == nil {
			t.Errorf("%+v accepted", bad)
		}
	}
}

// StartInstance refuses a Config with invalid parts, naming each, where
// LaunchQemu would leave them out and start another VM.
func TestStartInstanceNamesInvalidParts(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	config := Config{
		Path: path,
		Name: "a\nb",
		Devices: []Device{
			SerialDevice{Driver: VirtioSerial, ID: "s0"},
			BlockDevice{Driver: VirtioBlock, ID: "hd0"},
			nil,
			UserNetwork{},
		},
		QMPSockets: []QMPSocket{{Type: "tcp", Name: "x"}},
		RTC:        RTC{Clock: "moon"},
		Kernel:     Kernel{Params: "console=ttyS0"},
		Env:        []string{"X"},
	}
	_, err := StartInstance(context.Background(), config, InstanceOptions{})
	if err == nil {
		t.Fatal("started")
	}
	for _, want := range []string{
		"Name: a field contains a newline or NUL",
		"Devices[1] (BlockDevice): File is empty",
		"Devices[2] (<nil>): nil",
		"Devices[3] (UserNetwork): ID is empty",
		`QMPSockets[0]: Type is "tcp", not Unix`,
		`RTC: Clock is "moon", not Host or VM`,
		"Kernel: InitrdPath or Params is set, but Path is empty",
		`Env[0] "X" is not KEY=VALUE`,
	} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "Devices[0]") {
		t.Errorf("error %q names a valid device", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran")
	}
	// LaunchQemu keeps its documented behaviour: the invalid device is
	// left out with a warning.
	log := &launchLog{}
	params, _ := renderConfig(Config{Devices: []Device{BlockDevice{Driver: VirtioBlock, ID: "hd0"}}}, log)
	if len(params) != 0 || len(log.Warnings()) != 1 {
		t.Errorf("LaunchQemu's rendering: %q, warnings %q", params, log.Warnings())
	}
}

// Config.Env and InstanceOptions.Env reach QEMU's environment.
func TestConfigEnv(t *testing.T) {
	path, dir := standIn(t, "qemu", qmpStandIn+`
echo "$QEMU_MODULE_DIR $EXTRA" > "$DIR/env"
qmp_greet
qmp_serve`)
	inst, err := StartInstance(context.Background(), Config{Path: path, Env: []string{"QEMU_MODULE_DIR=/opt/q"}},
		InstanceOptions{Env: []string{"EXTRA=yes"}})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	if b, err := os.ReadFile(filepath.Join(dir, "env")); err != nil || string(b) != "/opt/q yes\n" {
		t.Errorf("QEMU's environment: %q, %v", b, err)
	}
	lpath, ldir := standIn(t, "qemu", `echo "$QEMU_MODULE_DIR" > "$DIR/env"`)
	if _, err := LaunchQemu(Config{Path: lpath, Env: []string{"QEMU_MODULE_DIR=/opt/l"}}, nil); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(filepath.Join(ldir, "env")); err != nil || string(b) != "/opt/l\n" {
		t.Errorf("LaunchQemu's QEMU environment: %q, %v", b, err)
	}
}

// User-mode networking from a Config: a TCP host forward reaches a
// listener in the guest and its answer comes back.
func TestUserNetworkHostForward(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close() // QEMU listens on it now
	kernel, initrd := requireGuest(t)
	bin, _ := requireQEMU(t)
	accel, cpu := guestAccelCPU()
	var dirs []string
	for i := 1; i < len(realVM.firmware); i += 2 {
		dirs = append(dirs, realVM.firmware[i])
	}
	config := Config{
		Path:         bin,
		Machine:      Machine{Type: "q35", Acceleration: accel},
		CPUModel:     cpu,
		Memory:       Memory{Size: "256M"},
		Knobs:        Knobs{NoDefaults: true, NoUserConfig: true},
		Kernel:       Kernel{Path: kernel, InitrdPath: initrd, Params: guestKernelParams},
		FirmwareDirs: dirs,
		ExtraParams:  []string{"-display", "none"},
		Devices: []Device{
			PCIeRootPort{ID: "rp1", Chassis: 1, Slot: 1},
			UserNetwork{ID: "net0", Bus: "rp1", MACAddress: "52:54:00:aa:bb:01",
				HostForwards: []HostForward{{HostAddr: "127.0.0.1", HostPort: uint16(port), GuestPort: 7777}}},
		},
	}
	ctx := ctxTimeout(t, 2*time.Minute)
	inst, err := StartInstance(ctx, config, InstanceOptions{Console: ConsoleSerial})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	con := inst.Console()
	if _, err := con.WaitFor(ctx, guestReadyLine); err != nil {
		t.Fatal(err)
	}
	// The user network's DHCP would hand out 10.0.2.15; the guest sets it
	// by hand. nc answers one connection with what it reads, upper-cased.
	fmt.Fprintf(con, "ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && "+
		"(nc -l -p 7777 -e tr a-z A-Z &) && echo TESTGUEST: listening\n")
	if _, err := con.WaitFor(ctx, "TESTGUEST: listening"); err != nil {
		t.Fatalf("%v; console:\n%s", err, con.History())
	}
	var reply string
	for reply == "" && ctx.Err() == nil {
		reply = roundTripTCP(t, fmt.Sprintf("127.0.0.1:%d", port), "hello from the host\n")
	}
	if reply != "HELLO FROM THE HOST\n" {
		t.Errorf("through the host forward: %q; console:\n%s", reply, con.History())
	}
}

// roundTripTCP sends msg to addr, half-closes, and returns what comes
// back; "" when the connection gave nothing, as before the guest's
// listener is up (slirp accepts the host side first).
func roundTripTCP(t *testing.T, addr, msg string) string {
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		time.Sleep(100 * time.Millisecond)
		return ""
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(10 * time.Second))
	conn.Write([]byte(msg))
	conn.(*net.TCPConn).CloseWrite()
	buf := make([]byte, 256)
	n, _ := conn.Read(buf)
	if n == 0 {
		time.Sleep(100 * time.Millisecond)
	}
	return string(buf[:n])
}

// StartInstance runs QEMU headless unless the Config asks for a display;
// LaunchQemu renders the Config as the seed package did.
func TestStartInstanceHeadless(t *testing.T) {
	path, dir := standIn(t, "qemu", recordArgs+qmpStandIn+`
qmp_greet
qmp_serve`)
	for _, tc := range []struct {
		config   Config
		headless bool
	}{
		{Config{}, true},
		{Config{Knobs: Knobs{NoGraphic: true}}, false},
		{Config{ExtraParams: []string{"-vnc", "unix:/run/vm.vnc"}}, false},
		{Config{ExtraParams: []string{"--display", "gtk"}}, false},
		{Config{VGA: "std"}, true},
	} {
		tc.config.Path = path
		inst, err := StartInstance(ctxTimeout(t, 10*time.Second), tc.config, InstanceOptions{})
		if err != nil {
			t.Fatal(err)
		}
		inst.Close()
		args := strings.Join(readArgs(t, dir), " ")
		if got := strings.Contains(args, "-display none"); got != tc.headless {
			t.Errorf("%+v: argv %q; -display none %v, want %v", tc.config, args, got, tc.headless)
		}
	}
	lpath, ldir := standIn(t, "qemu", recordArgs)
	if _, err := LaunchQemu(Config{Path: lpath, Name: "vm"}, nil); err != nil {
		t.Fatal(err)
	}
	if args := strings.Join(readArgs(t, ldir), " "); args != "-name vm" {
		t.Errorf("LaunchQemu argv %q, want the seed's rendering", args)
	}
}

// A real QEMU started from a Config with no display option opens no VNC
// server (7.2 opens one on 127.0.0.1:5900 without -display none).
func TestStartInstanceRealQEMUHeadless(t *testing.T) {
	bin, firmware := requireQEMU(t)
	inst, err := StartInstance(ctxTimeout(t, 30*time.Second), Config{Path: bin, Machine: Machine{Type: "q35"},
		Knobs: Knobs{NoDefaults: true, Paused: true}, VGA: "std", FirmwareDirs: firmwareDirsOf(firmware)}, InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	var vnc struct {
		Enabled bool `json:"enabled"`
	}
	if err := inst.QMP().ExecuteCommand(ctxTimeout(t, 10*time.Second), "query-vnc", nil, &vnc); err != nil {
		var qerr *QMPError
		if !errors.As(err, &qerr) || qerr.Class != "CommandNotFound" { // a QEMU built without VNC
			t.Fatal(err)
		}
	}
	if vnc.Enabled {
		t.Error("QEMU serves VNC")
	}
}

// firmwareDirsOf turns -L DIR arguments into Config.FirmwareDirs.
func firmwareDirsOf(args []string) []string {
	var dirs []string
	for i := 1; i < len(args); i += 2 {
		dirs = append(dirs, args[i])
	}
	return dirs
}
