package qemu

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// Incoming is "defer" or a URI with a scheme QEMU knows; StartInstance
// refuses anything else before QEMU starts, and a newline fails
// LaunchQemu as in any plain part.
func TestIncomingProblem(t *testing.T) {
	for _, ok := range []string{"", "defer", "unix:/run/m.sock", "tcp:127.0.0.1:0", "fd:mig", "exec:cat /tmp/f", "file:/tmp/vm"} {
		if p := incomingProblem(ok); p != "" {
			t.Errorf("incomingProblem(%q) = %q", ok, p)
		}
	}
	for in, want := range map[string]string{
		"later":      `Incoming "later" is neither defer nor SCHEME:ADDRESS`,
		"unix:":      `Incoming "unix:" is neither defer nor SCHEME:ADDRESS`,
		"smoke:/dev": `Incoming "smoke:/dev": QEMU knows no scheme smoke`,
		"Defer":      `Incoming "Defer" is neither defer nor SCHEME:ADDRESS`,
		"tcp:1:2\nx": "",
	} {
		if got := incomingProblem(in); got != want {
			t.Errorf("incomingProblem(%q) = %q, want %q", in, got, want)
		}
	}
	_, err := StartInstance(context.Background(), Config{Path: "/nonexistent/qemu", Incoming: "later"}, InstanceOptions{})
	if err == nil || !strings.Contains(err.Error(), `Incoming "later" is neither defer nor SCHEME:ADDRESS`) {
		t.Errorf("StartInstance with Incoming later: %v", err)
	}
	if _, err := LaunchQemu(Config{Path: "/nonexistent/qemu", Incoming: "tcp:1:2\nx"}, nil); err == nil || !strings.Contains(err.Error(), "config Incoming: a field contains a newline or NUL") {
		t.Errorf("LaunchQemu with a newline in Incoming: %v", err)
	}
}

func TestValid(t *testing.T) {
	fds := openFiles(t, 1)
	object := Object{Driver: NVDIMM, Type: MemoryBackendFile, ID: "mem0", DeviceID: "nv0", MemPath: "/root", Size: 1}
	fsdev := FSDevice{Driver: Virtio9P, FSDriver: Local, ID: "fs0", Path: "/srv", MountTag: "rootfs", SecurityModel: None}
	cdev := CharDevice{Backend: Socket, Driver: Console, Bus: "serial0.0", DeviceID: "con0", ID: "c0", Path: "/tmp/c", Name: "n"}
	netdev := NetDevice{Type: TAP, Driver: VirtioNet, ID: "tap0", IFName: "tap0", DownScript: "no", Script: "no", MACAddress: "02:00:00:00:00:01"}
	serial := SerialDevice{Driver: VirtioSerial, ID: "serial0"}
	blk := BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/img", Interface: NoInterface, AIO: Threads, Format: QCOW2}
	type validator interface{ Valid() bool }
	with := func(v interface{}, f func(p interface{})) validator {
		p := reflect.New(reflect.TypeOf(v))
		p.Elem().Set(reflect.ValueOf(v))
		f(p.Interface())
		return p.Elem().Interface().(validator)
	}
	tests := []struct {
		name string
		v    validator
		want bool
	}{
		{"object", object, true},
		{"object without driver", with(object, func(p interface{}) { p.(*Object).Driver = "" }), true},
		{"object without type", with(object, func(p interface{}) { p.(*Object).Type = "" }), false},
		{"object of another type", with(object, func(p interface{}) { p.(*Object).Type = "memory-backend-ram" }), false},
		{"object without id", with(object, func(p interface{}) { p.(*Object).ID = "" }), false},
		{"object without mem path", with(object, func(p interface{}) { p.(*Object).MemPath = "" }), false},
		{"object without size", with(object, func(p interface{}) { p.(*Object).Size = 0 }), false},
		{"object newline", with(object, func(p interface{}) { p.(*Object).MemPath = "/a\nb" }), false},
		{"object nul", with(object, func(p interface{}) { p.(*Object).DeviceID = "a\x00" }), false},
		{"fsdev", fsdev, true},
		{"fsdev without driver", with(fsdev, func(p interface{}) { p.(*FSDevice).Driver = "" }), true},
		{"fsdev without fs driver", with(fsdev, func(p interface{}) { p.(*FSDevice).FSDriver = "" }), false},
		{"fsdev without id", with(fsdev, func(p interface{}) { p.(*FSDevice).ID = "" }), false},
		{"fsdev without path", with(fsdev, func(p interface{}) { p.(*FSDevice).Path = "" }), false},
		{"fsdev without mount tag", with(fsdev, func(p interface{}) { p.(*FSDevice).MountTag = "" }), false},
		{"fsdev newline", with(fsdev, func(p interface{}) { p.(*FSDevice).SecurityModel = "none\n" }), false},
		{"fsdev nul", with(fsdev, func(p interface{}) { p.(*FSDevice).Path = "/srv\x00" }), false},
		{"chardev", cdev, true},
		{"chardev without driver", with(cdev, func(p interface{}) { p.(*CharDevice).Driver = "" }), true},
		{"chardev without backend", with(cdev, func(p interface{}) { p.(*CharDevice).Backend = "" }), false},
		{"chardev without id", with(cdev, func(p interface{}) { p.(*CharDevice).ID = "" }), false},
		{"chardev without path", with(cdev, func(p interface{}) { p.(*CharDevice).Path = "" }), false},
		{"chardev newline", with(cdev, func(p interface{}) { p.(*CharDevice).Name = "a\nb" }), false},
		{"chardev nul", with(cdev, func(p interface{}) { p.(*CharDevice).Bus = "\x00" }), false},
		{"netdev", netdev, true},
		{"netdev fds", with(netdev, func(p interface{}) { p.(*NetDevice).FDs = fds }), true},
		{"netdev without driver", with(netdev, func(p interface{}) { p.(*NetDevice).Driver = "" }), true},
		{"netdev without id", with(netdev, func(p interface{}) { p.(*NetDevice).ID = "" }), false},
		{"netdev without ifname", with(netdev, func(p interface{}) { p.(*NetDevice).IFName = "" }), false},
		{"netdev without type", with(netdev, func(p interface{}) { p.(*NetDevice).Type = "" }), false},
		{"netdev user", with(netdev, func(p interface{}) { p.(*NetDevice).Type = "user" }), false},
		{"macvtap without fds", with(netdev, func(p interface{}) { p.(*NetDevice).Type = MACVTAP }), false},
		{"macvtap", with(netdev, func(p interface{}) { p.(*NetDevice).Type = MACVTAP; p.(*NetDevice).FDs = fds }), true},
		{"netdev nil fd", with(netdev, func(p interface{}) { p.(*NetDevice).FDs = []*os.File{nil} }), false},
		{"netdev newline", with(netdev, func(p interface{}) { p.(*NetDevice).Script = "/s\n" }), false},
		{"netdev nul", with(netdev, func(p interface{}) { p.(*NetDevice).MACAddress = "\x00" }), false},
		{"serial", serial, true},
		{"serial without driver", with(serial, func(p interface{}) { p.(*SerialDevice).Driver = "" }), false},
		{"serial without id", with(serial, func(p interface{}) { p.(*SerialDevice).ID = "" }), false},
		{"serial newline", with(serial, func(p interface{}) { p.(*SerialDevice).ID = "s\n" }), false},
		{"block", blk, true},
		{"block without driver", with(blk, func(p interface{}) { p.(*BlockDevice).Driver = "" }), false},
		{"block without id", with(blk, func(p interface{}) { p.(*BlockDevice).ID = "" }), false},
		{"block without file", with(blk, func(p interface{}) { p.(*BlockDevice).File = "" }), false},
		{"block newline", with(blk, func(p interface{}) { p.(*BlockDevice).File = "/a\n" }), false},
		{"block nul", with(blk, func(p interface{}) { p.(*BlockDevice).Format = "\x00" }), false},
		{"rtc zero", RTC{}, true},
		{"rtc", RTC{Base: UTC, Clock: Host, DriftFix: Slew}, true},
		{"rtc vm none", RTC{Base: LocalTime, Clock: VM, DriftFix: NoDriftFix}, true},
		{"rtc date", RTC{Base: "2006-06-17T16:01:21"}, true},
		{"rtc bad clock", RTC{Clock: "rt"}, false},
		{"rtc bad driftfix", RTC{DriftFix: "fast"}, false},
		{"rtc newline", RTC{Base: "utc\n"}, false},
		{"qmp", QMPSocket{Type: Unix, Name: "/q"}, true},
		{"qmp without type", QMPSocket{Name: "/q"}, false},
		{"qmp tcp", QMPSocket{Type: "tcp", Name: "localhost:4444"}, false},
		{"qmp without name", QMPSocket{Type: Unix}, false},
		{"qmp newline", QMPSocket{Type: Unix, Name: "/q\n"}, false},
		{"qmp nul", QMPSocket{Type: Unix, Name: "/q\x00"}, false},
	}
	for _, tt := range tests {
		if got := tt.v.Valid(); got != tt.want {
			t.Errorf("%s: Valid() = %v, want %v (%#v)", tt.name, got, tt.want, tt.v)
		}
		if d, ok := tt.v.(Device); ok && !tt.want {
			var config Config
			if got := d.QemuParams(&config); got != nil || config.fds != nil {
				t.Errorf("%s: QemuParams of an invalid device = %q, fds %v; want nothing", tt.name, got, config.fds)
			}
		}
	}
}

func TestNetDeviceFDsNeedConfig(t *testing.T) {
	dev := NetDevice{Type: TAP, ID: "tap0", IFName: "tap0", FDs: openFiles(t, 1)}
	if got := dev.QemuParams(nil); got != nil {
		t.Errorf("QemuParams(nil) with FDs = %q, want nil (nothing to number the files)", got)
	}
	dev.FDs = nil
	if got, want := dev.QemuParams(nil), argv("-netdev tap,id=tap0,ifname=tap0"); !reflect.DeepEqual(got, want) {
		t.Errorf("QemuParams(nil) without FDs = %q, want %q", got, want)
	}
}

func TestLaunchQemuRejectsControlCharacters(t *testing.T) {
	for _, config := range []Config{
		{Name: "a\nb"},
		{UUID: "\x00"},
		{Machine: Machine{Type: "q35", Acceleration: "kvm\n"}},
		{CPUModel: "host\n"},
		{Memory: Memory{Size: "1G", MaxMem: "2G\n"}},
		{GlobalParam: "a=b\n"},
		{VGA: "std\x00"},
		{Kernel: Kernel{Path: "/k", InitrdPath: "/i\n"}},
		{Kernel: Kernel{Path: "/k", Params: "quiet\ninit=/bin/sh"}},
	} {
		path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
		config.Path = path
		out, err := LaunchQemu(config, nil)
		if err == nil || !strings.Contains(err.Error(), "newline or NUL") {
			t.Errorf("LaunchQemu(%+v) = %q, %v; want an error about a newline or NUL", config, out, err)
		}
		if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
			t.Errorf("LaunchQemu(%+v) ran QEMU", config)
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
