package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// argv splits a command line written with single spaces, the way the
// tables below spell the expected arguments.
func argv(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, " ")
}

// launchLog is a QMPLog that records what it is told.
type launchLog struct {
	mu       sync.Mutex
	infos    []string
	warnings []string
}

func (l *launchLog) V(int32) bool { return true }
func (l *launchLog) Infof(f string, a ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.infos = append(l.infos, fmt.Sprintf(f, a...))
}
func (l *launchLog) Warningf(f string, a ...interface{}) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.warnings = append(l.warnings, fmt.Sprintf(f, a...))
}
func (l *launchLog) Errorf(f string, a ...interface{}) { l.Warningf("error: "+f, a...) }
func (l *launchLog) Warnings() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return append([]string(nil), l.warnings...)
}

// openFiles returns n open files for tests that pass files to QEMU.
func openFiles(t *testing.T, n int) []*os.File {
	t.Helper()
	var files []*os.File
	for i := 0; i < n; i++ {
		f, err := os.Open(os.DevNull)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		files = append(files, f)
	}
	return files
}

func TestConfigParts(t *testing.T) {
	tests := []struct {
		name   string
		config Config
		want   []string
	}{
		{"zero", Config{}, nil},
		{"path and ctx render nothing", Config{Path: "/usr/bin/qemu", Ctx: context.Background()}, nil},
		{"name", Config{Name: "cc-qemu"}, argv("-name cc-qemu")},
		{"name escaped", Config{Name: "vm,debug-threads=on"}, argv("-name vm,,debug-threads=on")},
		{"uuid", Config{UUID: "4cb19522-1e18-439a-883a-f9b2a3a95f5e"},
			argv("-uuid 4cb19522-1e18-439a-883a-f9b2a3a95f5e")},
		{"uuid verbatim", Config{UUID: "a,b"}, argv("-uuid a,b")},
		{"machine", Config{Machine: Machine{Type: "q35"}}, argv("-machine q35")},
		{"machine accel", Config{Machine: Machine{Type: "q35", Acceleration: "kvm"}},
			argv("-machine q35,accel=kvm")},
		{"machine accel is an option list", Config{Machine: Machine{Type: "q35", Acceleration: "tcg,nvdimm=on"}},
			argv("-machine q35,accel=tcg,nvdimm=on")},
		{"machine type escaped", Config{Machine: Machine{Type: "q35,accel=kvm"}},
			argv("-machine q35,,accel=kvm")},
		{"accel without type", Config{Machine: Machine{Acceleration: "kvm"}}, nil},
		{"cpu", Config{CPUModel: "host"}, argv("-cpu host")},
		{"cpu is an option list", Config{CPUModel: "host,-arch-capabilities"},
			argv("-cpu host,-arch-capabilities")},
		{"qmp server nowait", Config{QMPSockets: []QMPSocket{{Type: Unix, Name: "/run/q.sock", Server: true, NoWait: true}}},
			argv("-qmp unix:/run/q.sock,server=on,wait=off")},
		{"qmp client", Config{QMPSockets: []QMPSocket{{Type: Unix, Name: "/run/q.sock"}}},
			argv("-qmp unix:/run/q.sock")},
		{"qmp nowait without server", Config{QMPSockets: []QMPSocket{{Type: Unix, Name: "/run/q.sock", NoWait: true}}},
			argv("-qmp unix:/run/q.sock")},
		{"qmp server wait", Config{QMPSockets: []QMPSocket{{Type: Unix, Name: "/run/q.sock", Server: true}}},
			argv("-qmp unix:/run/q.sock,server=on")},
		{"qmp escaped", Config{QMPSockets: []QMPSocket{{Type: Unix, Name: "/run/a,server=off.sock", Server: true, NoWait: true}}},
			argv("-qmp unix:/run/a,,server=off.sock,server=on,wait=off")},
		{"qmp two, invalid skipped", Config{QMPSockets: []QMPSocket{
			{Type: Unix, Name: "/run/a"}, {Type: "tcp", Name: "localhost:4444"}, {Type: Unix, Name: "/run/b"}}},
			argv("-qmp unix:/run/a -qmp unix:/run/b")},
		{"memory", Config{Memory: Memory{Size: "2G", Slots: 2, MaxMem: "3G"}}, argv("-m 2G,slots=2,maxmem=3G")},
		{"memory size only", Config{Memory: Memory{Size: "512M"}}, argv("-m 512M")},
		{"memory maxmem only", Config{Memory: Memory{Size: "1G", MaxMem: "4G"}}, argv("-m 1G,maxmem=4G")},
		{"memory escaped", Config{Memory: Memory{Size: "1G,slots=9", MaxMem: "4G,x=y"}},
			argv("-m 1G,,slots=9,maxmem=4G,,x=y")},
		{"memory without size", Config{Memory: Memory{Slots: 2, MaxMem: "3G"}}, nil},
		{"smp", Config{SMP: SMP{CPUs: 2, Cores: 1, Threads: 2, Sockets: 2}}, argv("-smp 2,cores=1,threads=2,sockets=2")},
		{"smp cpus only", Config{SMP: SMP{CPUs: 4}}, argv("-smp 4")},
		{"smp sockets only", Config{SMP: SMP{CPUs: 4, Sockets: 4}}, argv("-smp 4,sockets=4")},
		{"smp without cpus", Config{SMP: SMP{Cores: 2}}, nil},
		{"rtc", Config{RTC: RTC{Base: UTC, DriftFix: Slew, Clock: Host}}, argv("-rtc base=utc,driftfix=slew,clock=host")},
		{"rtc base only", Config{RTC: RTC{Base: LocalTime}}, argv("-rtc base=localtime")},
		{"rtc clock only", Config{RTC: RTC{Clock: VM}}, argv("-rtc clock=vm")},
		{"rtc date escaped", Config{RTC: RTC{Base: "2006-06-17,clock=vm"}}, argv("-rtc base=2006-06-17,,clock=vm")},
		{"rtc invalid", Config{RTC: RTC{Base: UTC, Clock: "rt"}}, nil},
		{"global", Config{GlobalParam: "kvm-pit.lost_tick_policy=discard"}, argv("-global kvm-pit.lost_tick_policy=discard")},
		{"vga", Config{VGA: "none"}, argv("-vga none")},
		{"knobs", Config{Knobs: Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true}},
			argv("-no-user-config -nodefaults -nographic -daemonize")},
		{"knob nodefaults", Config{Knobs: Knobs{NoDefaults: true}}, argv("-nodefaults")},
		{"knob daemonize", Config{Knobs: Knobs{Daemonize: true}}, argv("-daemonize")},
		{"kernel", Config{Kernel: Kernel{Path: "/opt/vmlinuz", InitrdPath: "/opt/initrd.img", Params: "console=ttyS0 quiet"}},
			[]string{"-kernel", "/opt/vmlinuz", "-initrd", "/opt/initrd.img", "-append", "console=ttyS0 quiet"}},
		{"kernel only", Config{Kernel: Kernel{Path: "/opt/vmlinuz"}}, argv("-kernel /opt/vmlinuz")},
		{"kernel params", Config{Kernel: Kernel{Path: "/opt/vmlinuz", Params: "quiet"}}, argv("-kernel /opt/vmlinuz -append quiet")},
		{"kernel verbatim", Config{Kernel: Kernel{Path: "/opt/a,b", InitrdPath: "/opt/c,d", Params: "x=1,2"}},
			argv("-kernel /opt/a,b -initrd /opt/c,d -append x=1,2")},
		{"initrd without kernel", Config{Kernel: Kernel{InitrdPath: "/opt/initrd.img", Params: "quiet"}}, nil},
		{"incoming defer", Config{Incoming: "defer"}, argv("-incoming defer")},
		{"incoming uri verbatim", Config{Incoming: "unix:/run/a,b.sock"}, argv("-incoming unix:/run/a,b.sock")},
		{"incoming after kernel", Config{Kernel: Kernel{Path: "/opt/vmlinuz"}, Incoming: "tcp:127.0.0.1:4444", FirmwareDirs: []string{"/fw"}},
			argv("-kernel /opt/vmlinuz -incoming tcp:127.0.0.1:4444 -L /fw")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, fds := renderConfig(tt.config, nil)
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("got  %q\nwant %q", got, tt.want)
			}
			if len(fds) != 0 {
				t.Errorf("fds = %v, want none", fds)
			}
		})
	}
}

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

func TestDeviceParams(t *testing.T) {
	fds := openFiles(t, 2)
	tests := []struct {
		name   string
		device Device
		want   string
	}{
		{"nvdimm", Object{Driver: NVDIMM, Type: MemoryBackendFile, ID: "mem0", DeviceID: "nv0", MemPath: "/root", Size: 1 << 16},
			"-device nvdimm,id=nv0,memdev=mem0 -object memory-backend-file,id=mem0,mem-path=/root,size=65536"},
		{"object without device id", Object{Driver: NVDIMM, Type: MemoryBackendFile, ID: "mem0", MemPath: "/root", Size: 4096},
			"-device nvdimm,memdev=mem0 -object memory-backend-file,id=mem0,mem-path=/root,size=4096"},
		{"object alone", Object{Type: MemoryBackendFile, ID: "mem0", MemPath: "/dev/shm/m", Size: 1 << 20},
			"-object memory-backend-file,id=mem0,mem-path=/dev/shm/m,size=1048576"},
		{"9p", FSDevice{Driver: Virtio9P, FSDriver: Local, ID: "fs0", Path: "/srv", MountTag: "rootfs", SecurityModel: None},
			"-device virtio-9p-pci,fsdev=fs0,mount_tag=rootfs -fsdev local,id=fs0,path=/srv,security_model=none"},
		{"9p mapped", FSDevice{Driver: Virtio9P, FSDriver: Local, ID: "fs1", Path: "/srv", MountTag: "data", SecurityModel: MappedXattr},
			"-device virtio-9p-pci,fsdev=fs1,mount_tag=data -fsdev local,id=fs1,path=/srv,security_model=mapped-xattr"},
		{"9p no security model", FSDevice{Driver: Virtio9P, FSDriver: Local, ID: "fs0", Path: "/srv", MountTag: "rootfs"},
			"-device virtio-9p-pci,fsdev=fs0,mount_tag=rootfs -fsdev local,id=fs0,path=/srv"},
		{"fsdev alone", FSDevice{FSDriver: Local, ID: "fs0", Path: "/srv", MountTag: "rootfs", SecurityModel: PassThrough},
			"-fsdev local,id=fs0,path=/srv,security_model=passthrough"},
		{"virtserialport", CharDevice{Backend: Socket, Driver: VirtioSerialPort, DeviceID: "channel0", ID: "char0",
			Path: "/tmp/char.sock", Name: "channel.0"},
			"-device virtserialport,chardev=char0,id=channel0,name=channel.0 -chardev socket,id=char0,path=/tmp/char.sock,server=on,wait=off"},
		{"virtconsole", CharDevice{Backend: Socket, Driver: Console, Bus: "serial0.0", DeviceID: "console0", ID: "c0", Path: "/tmp/con.sock"},
			"-device virtconsole,bus=serial0.0,chardev=c0,id=console0 -chardev socket,id=c0,path=/tmp/con.sock,server=on,wait=off"},
		{"pipe", CharDevice{Backend: Pipe, Driver: "isa-serial", ID: "c0", Path: "/tmp/fifo"},
			"-device isa-serial,chardev=c0 -chardev pipe,id=c0,path=/tmp/fifo"},
		{"serial", CharDevice{Backend: Serial, Driver: "isa-serial", ID: "c0", Path: "/dev/ttyS0"},
			"-device isa-serial,chardev=c0 -chardev serial,id=c0,path=/dev/ttyS0"},
		{"tty is serial", CharDevice{Backend: TTY, Driver: "isa-serial", ID: "c0", Path: "/dev/ttyS0"},
			"-device isa-serial,chardev=c0 -chardev serial,id=c0,path=/dev/ttyS0"},
		{"pty", CharDevice{Backend: PTY, ID: "c0", Path: "/tmp/pty"}, "-chardev pty,id=c0,path=/tmp/pty"},
		{"tap", NetDevice{Type: TAP, Driver: VirtioNet, ID: "tap0", IFName: "ceth0", DownScript: "no", Script: "no",
			VHost: true, MACAddress: "01:02:de:ad:be:ef"},
			"-device virtio-net,netdev=tap0,mac=01:02:de:ad:be:ef -netdev tap,id=tap0,ifname=ceth0,downscript=no,script=no,vhost=on"},
		{"tap no vhost no mac", NetDevice{Type: TAP, Driver: VirtioNet, ID: "tap0", IFName: "ceth0"},
			"-device virtio-net,netdev=tap0 -netdev tap,id=tap0,ifname=ceth0"},
		{"tap fds", NetDevice{Type: TAP, Driver: VirtioNet, ID: "tap0", IFName: "ceth0", DownScript: "no", Script: "no",
			FDs: fds, VHost: true, MACAddress: "01:02:de:ad:be:ef"},
			"-device virtio-net,netdev=tap0,mac=01:02:de:ad:be:ef -netdev tap,id=tap0,fds=3:4,vhost=on"},
		{"macvtap", NetDevice{Type: MACVTAP, Driver: VirtioNet, ID: "mvt0", IFName: "macvtap0", FDs: fds[:1]},
			"-device virtio-net,netdev=mvt0 -netdev tap,id=mvt0,fds=3"},
		{"netdev alone", NetDevice{Type: TAP, ID: "tap0", IFName: "ceth0", Script: "no", DownScript: "no"},
			"-netdev tap,id=tap0,ifname=ceth0,downscript=no,script=no"},
		{"virtio-serial", SerialDevice{Driver: VirtioSerial, ID: "serial0"}, "-device virtio-serial-pci,id=serial0"},
		{"block", BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/var/lib/vm.img", AIO: Threads, Format: QCOW2, Interface: NoInterface},
			"-device virtio-blk,drive=hd0,config-wce=off -drive id=hd0,file=/var/lib/vm.img,aio=threads,format=qcow2,if=none"},
		{"block scsi wce", BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/var/lib/vm.img", AIO: Native, Format: QCOW2,
			Interface: NoInterface, SCSI: true, WCE: true},
			"-device virtio-blk,drive=hd0,scsi=on -drive id=hd0,file=/var/lib/vm.img,aio=native,format=qcow2,if=none"},
		{"block minimal", BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/img", WCE: true},
			"-device virtio-blk,drive=hd0 -drive id=hd0,file=/img"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if !tt.device.Valid() {
				t.Fatalf("%#v is not Valid", tt.device)
			}
			var config Config
			got := tt.device.QemuParams(&config)
			if want := argv(tt.want); !reflect.DeepEqual(got, want) {
				t.Errorf("got  %q\nwant %q", got, want)
			}
			// Rendering through a Config gives the same argv.
			got, _ = renderConfig(Config{Devices: []Device{tt.device}}, nil)
			if want := argv(tt.want); !reflect.DeepEqual(got, want) {
				t.Errorf("in a Config: got  %q\nwant %q", got, want)
			}
		})
	}
}

// TestEscaping puts a comma into every field that lands in an option list:
// each must come out doubled, so that it cannot start a new option.
func TestEscaping(t *testing.T) {
	fds := openFiles(t, 1)
	tests := []struct {
		name   string
		device Device
		want   string
	}{
		{"object", Object{Driver: "nvdimm,x=1", Type: MemoryBackendFile, ID: "m,x=1", DeviceID: "n,x=1", MemPath: "/a,share=on", Size: 1},
			"-device nvdimm,,x=1,id=n,,x=1,memdev=m,,x=1 -object memory-backend-file,id=m,,x=1,mem-path=/a,,share=on,size=1"},
		{"fsdevice", FSDevice{Driver: "virtio-9p-pci,x=1", FSDriver: "local,x=1", ID: "f,x=1", Path: "/srv,readonly=on",
			MountTag: "t,x=1", SecurityModel: "none,x=1"},
			"-device virtio-9p-pci,,x=1,fsdev=f,,x=1,mount_tag=t,,x=1 -fsdev local,,x=1,id=f,,x=1,path=/srv,,readonly=on,security_model=none,,x=1"},
		{"chardevice", CharDevice{Backend: "socket,x=1", Driver: "virtconsole,x=1", Bus: "b,x=1", DeviceID: "d,x=1",
			ID: "c,x=1", Path: "/tmp/a,server=off", Name: "n,x=1"},
			"-device virtconsole,,x=1,bus=b,,x=1,chardev=c,,x=1,id=d,,x=1,name=n,,x=1 -chardev socket,,x=1,id=c,,x=1,path=/tmp/a,,server=off"},
		{"chardevice socket", CharDevice{Backend: Socket, ID: "c0", Path: "/tmp/a,wait=on"},
			"-chardev socket,id=c0,path=/tmp/a,,wait=on,server=on,wait=off"},
		{"netdevice", NetDevice{Type: TAP, Driver: "virtio-net,x=1", ID: "t,x=1", IFName: "tap0,vhost=on",
			DownScript: "/d,x=1", Script: "/s,x=1", MACAddress: "m,x=1"},
			"-device virtio-net,,x=1,netdev=t,,x=1,mac=m,,x=1 -netdev tap,id=t,,x=1,ifname=tap0,,vhost=on,downscript=/d,,x=1,script=/s,,x=1"},
		{"netdevice fds", NetDevice{Type: TAP, ID: "t,x=1", IFName: "tap0", FDs: fds},
			"-netdev tap,id=t,,x=1,fds=3"},
		{"serialdevice", SerialDevice{Driver: "virtio-serial-pci,x=1", ID: "s,x=1"},
			"-device virtio-serial-pci,,x=1,id=s,,x=1"},
		{"blockdevice", BlockDevice{Driver: "virtio-blk,x=1", ID: "hd,x=1", File: "/tmp/a,format=raw",
			Interface: "none,x=1", AIO: "threads,x=1", Format: "qcow2,x=1", WCE: true},
			"-device virtio-blk,,x=1,drive=hd,,x=1 -drive id=hd,,x=1,file=/tmp/a,,format=raw,aio=threads,,x=1,format=qcow2,,x=1,if=none,,x=1"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, _ := renderConfig(Config{Devices: []Device{tt.device}}, nil)
			if want := argv(tt.want); !reflect.DeepEqual(got, want) {
				t.Errorf("got  %q\nwant %q", got, want)
			}
		})
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

func TestFDNumbering(t *testing.T) {
	files := openFiles(t, 3)
	config := Config{Devices: []Device{
		NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0", IFName: "tap0", FDs: files[:2]},
		SerialDevice{Driver: VirtioSerial, ID: "serial0"},
		NetDevice{Type: MACVTAP, Driver: VirtioNet, ID: "net1", IFName: "mvt0", FDs: files[2:]},
	}}
	// A caller that rendered a device by hand has files registered in
	// its Config; LaunchQemu must number from 3 all the same.
	config.Devices[0].QemuParams(&config)
	before := config
	want := argv("-device virtio-net,netdev=net0 -netdev tap,id=net0,fds=3:4 " +
		"-device virtio-serial-pci,id=serial0 " +
		"-device virtio-net,netdev=net1 -netdev tap,id=net1,fds=5")
	for i := 0; i < 2; i++ {
		params, fds := renderConfig(config, nil)
		if !reflect.DeepEqual(params, want) {
			t.Errorf("render %d: got  %q\nwant %q", i, params, want)
		}
		if !reflect.DeepEqual(fds, files) {
			t.Errorf("render %d: fds = %v, want %v", i, fds, files)
		}
	}
	if !reflect.DeepEqual(config, before) {
		t.Errorf("renderConfig changed the caller's Config")
	}
	if len(config.fds) != 2 {
		t.Errorf("caller's Config has %d files registered, want the 2 it registered itself", len(config.fds))
	}
}

// TestRenderConfigDoesNotWriteSharedArrays gives the Config spare capacity
// in its registered files, which a careless append would write into.
func TestRenderConfigDoesNotWriteSharedArrays(t *testing.T) {
	files := openFiles(t, 2)
	config := Config{Devices: []Device{NetDevice{Type: TAP, ID: "n", IFName: "t", FDs: files[1:]}}}
	config.fds = make([]*os.File, 0, 8)
	config.fds = append(config.fds, files[0])
	spare := config.fds[:cap(config.fds)]
	renderConfig(config, nil)
	for i, f := range spare[1:] {
		if f != nil {
			t.Fatalf("renderConfig wrote %v into the caller's array at %d", f, i+1)
		}
	}
}

func TestRenderConfigOrder(t *testing.T) {
	files := openFiles(t, 1)
	config := Config{
		Path:       "/usr/bin/qemu-system-x86_64",
		Name:       "cc-qemu",
		UUID:       "4cb19522-1e18-439a-883a-f9b2a3a95f5e",
		CPUModel:   "host",
		Machine:    Machine{Type: "q35", Acceleration: "kvm"},
		QMPSockets: []QMPSocket{{Type: Unix, Name: "/run/q.sock", Server: true, NoWait: true}},
		Devices: []Device{
			SerialDevice{Driver: VirtioSerial, ID: "serial0"},
			BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/img", Format: QCOW2, Interface: NoInterface},
			NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0", IFName: "tap0", FDs: files},
		},
		RTC:         RTC{Base: UTC, DriftFix: Slew, Clock: Host},
		VGA:         "none",
		Kernel:      Kernel{Path: "/opt/vmlinuz", InitrdPath: "/opt/initrd.img", Params: "console=ttyS0 quiet"},
		Memory:      Memory{Size: "2G", Slots: 2, MaxMem: "3G"},
		SMP:         SMP{CPUs: 2, Cores: 1, Threads: 2, Sockets: 2},
		GlobalParam: "kvm-pit.lost_tick_policy=discard",
		Knobs:       Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true},
	}
	want := append(argv("-name cc-qemu -uuid 4cb19522-1e18-439a-883a-f9b2a3a95f5e -machine q35,accel=kvm -cpu host "+
		"-qmp unix:/run/q.sock,server=on,wait=off -m 2G,slots=2,maxmem=3G -smp 2,cores=1,threads=2,sockets=2 "+
		"-device virtio-serial-pci,id=serial0 "+
		"-device virtio-blk,drive=hd0,config-wce=off -drive id=hd0,file=/img,format=qcow2,if=none "+
		"-device virtio-net,netdev=net0 -netdev tap,id=net0,fds=3 "+
		"-rtc base=utc,driftfix=slew,clock=host -global kvm-pit.lost_tick_policy=discard -vga none "+
		"-no-user-config -nodefaults -nographic -daemonize "+
		"-kernel /opt/vmlinuz -initrd /opt/initrd.img -append"), "console=ttyS0 quiet")
	log := &launchLog{}
	params, fds := renderConfig(config, log)
	if !reflect.DeepEqual(params, want) {
		t.Errorf("got  %q\nwant %q", params, want)
	}
	if !reflect.DeepEqual(fds, files) {
		t.Errorf("fds = %v, want %v", fds, files)
	}
	if w := log.Warnings(); len(w) != 0 {
		t.Errorf("warnings for a valid Config: %q", w)
	}
}

func TestRenderConfigSkipsInvalid(t *testing.T) {
	config := Config{
		Name:       "bad\nname",
		Machine:    Machine{Type: "q35", Acceleration: "kvm\x00"},
		CPUModel:   "qemu64",
		QMPSockets: []QMPSocket{{Type: "tcp", Name: "x"}, {Type: Unix, Name: "/q"}},
		Devices: []Device{
			nil,
			BlockDevice{Driver: VirtioBlock, ID: "hd0"},
			SerialDevice{Driver: VirtioSerial, ID: "serial0"},
			NetDevice{Type: MACVTAP, ID: "n", IFName: "m"},
		},
		RTC:    RTC{Clock: "rt"},
		Kernel: Kernel{Path: "/k", Params: "a\nb"},
	}
	want := argv("-cpu qemu64 -qmp unix:/q -device virtio-serial-pci,id=serial0")
	for _, logger := range []*launchLog{{}, nil} {
		var params []string
		if logger == nil {
			params, _ = renderConfig(config, nil)
		} else {
			params, _ = renderConfig(config, logger)
		}
		if !reflect.DeepEqual(params, want) {
			t.Errorf("got  %q\nwant %q", params, want)
		}
		if logger == nil {
			continue
		}
		warnings := strings.Join(logger.Warnings(), "\n")
		for _, part := range []string{"Name", "Machine", "QMPSockets[0]", "Devices[0]", "Devices[1]", "Devices[3]", "RTC", "Kernel"} {
			if !strings.Contains(warnings, part) {
				t.Errorf("no warning about %s in:\n%s", part, warnings)
			}
		}
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

// standIn writes a shell script standing in for QEMU into a fresh
// directory and returns its path and the directory, which the script
// knows as $DIR and can leave records in.
func standIn(t *testing.T, name, body string) (path, dir string) {
	t.Helper()
	dir = t.TempDir()
	path = filepath.Join(dir, name)
	script := "#!/bin/sh\nDIR='" + dir + "'\n" + body + "\n"
	if err := os.WriteFile(path, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	return path, dir
}

// recordArgs is a stand-in body that saves its arguments, NUL-separated,
// in $DIR/argv.
const recordArgs = `printf '%s\0' "$@" > "$DIR/argv"`

func readArgs(t *testing.T, dir string) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "argv"))
	if err != nil {
		t.Fatalf("the stand-in left no record of its arguments: %v", err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\x00"), "\x00")
}

// testCtx returns a context that only guards against a hang; no test
// depends on its length.
func testCtx(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestLaunchCustomQemuArgsAndFDs(t *testing.T) {
	path, dir := standIn(t, "qemu", recordArgs+`
cat <&3 > "$DIR/fd3" || exit 9
cat <&4 > "$DIR/fd4" || exit 9`)
	var fds []*os.File
	for _, content := range []string{"three", "four"} {
		name := filepath.Join(t.TempDir(), content)
		if err := os.WriteFile(name, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		f, err := os.Open(name)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		fds = append(fds, f)
	}
	params := []string{"-name", "a,,b", "-append", "console=ttyS0 quiet", "", "-x'\"$HOME"}
	log := &launchLog{}
	out, err := LaunchCustomQemu(testCtx(t), path, params, fds, log)
	if out != "" || err != nil {
		t.Fatalf("LaunchCustomQemu = %q, %v; want success", out, err)
	}
	if got := readArgs(t, dir); !reflect.DeepEqual(got, params) {
		t.Errorf("QEMU got arguments %q, want %q", got, params)
	}
	for n, want := range map[string]string{"fd3": "three", "fd4": "four"} {
		if got, _ := os.ReadFile(filepath.Join(dir, n)); string(got) != want {
			t.Errorf("QEMU read %q from %s, want %q", got, n, want)
		}
	}
	if len(log.Warnings()) != 0 {
		t.Errorf("warnings for a silent success: %q", log.Warnings())
	}
}

func TestLaunchCustomQemuFailure(t *testing.T) {
	path, _ := standIn(t, "qemu", `echo "qemu: some noise" >&2
echo "qemu: -device foo: 'foo' is not a valid device model name" >&2
exit 3`)
	out, err := LaunchCustomQemu(testCtx(t), path, nil, nil, nil)
	if err == nil {
		t.Fatal("a failing QEMU gave no error")
	}
	want := "qemu: some noise\nqemu: -device foo: 'foo' is not a valid device model name\n"
	if out != want {
		t.Errorf("stderr = %q, want %q", out, want)
	}
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
		t.Errorf("error %v does not carry exit status 3", err)
	}
	if !strings.Contains(err.Error(), "'foo' is not a valid device model name") {
		t.Errorf("error %q does not quote QEMU's last line", err)
	}
}

func TestLaunchCustomQemuSuccessLogsStderr(t *testing.T) {
	path, _ := standIn(t, "qemu", `echo "qemu: warning: short-form boolean option 'server' deprecated" >&2`)
	log := &launchLog{}
	out, err := LaunchCustomQemu(testCtx(t), path, nil, nil, log)
	if out != "" || err != nil {
		t.Fatalf("LaunchCustomQemu = %q, %v; want success", out, err)
	}
	if w := strings.Join(log.Warnings(), "\n"); !strings.Contains(w, "short-form boolean option") {
		t.Errorf("QEMU's stderr on success was not logged as a warning; warnings: %q", w)
	}
}

func TestLaunchCustomQemuStderrBounded(t *testing.T) {
	path, _ := standIn(t, "qemu", `head -c 3000000 /dev/zero | tr '\0' x >&2
echo >&2
echo "qemu: the real error" >&2
exit 1`)
	out, err := LaunchCustomQemu(testCtx(t), path, nil, nil, nil)
	if err == nil {
		t.Fatal("a failing QEMU gave no error")
	}
	if len(out) > maxStderr {
		t.Errorf("kept %d bytes of stderr, want at most %d", len(out), maxStderr)
	}
	if !strings.HasSuffix(out, "qemu: the real error\n") {
		t.Errorf("stderr does not end with QEMU's last line: ...%q", out[max(0, len(out)-40):])
	}
}

func TestTailBuffer(t *testing.T) {
	b := newTailBuffer(10)
	var all []byte
	for i := 0; i < 100; i++ {
		p := []byte(fmt.Sprintf("%d,", i))
		all = append(all, p...)
		if n, err := b.Write(p); n != len(p) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
		want := all
		if len(want) > 10 {
			want = want[len(want)-10:]
		}
		if got := b.String(); got != string(want) {
			t.Fatalf("after %q: String() = %q, want %q", all, got, want)
		}
	}
}

func TestLaunchCustomQemuContextCancel(t *testing.T) {
	// The pid file comes after the line on stderr, so that the test, which
	// cancels once it sees the file, cancels after the line was written.
	path, dir := standIn(t, "qemu", `echo "qemu: started" >&2
echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
exec sleep 600`)
	ctx, cancel := context.WithCancel(testCtx(t))
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := LaunchCustomQemu(ctx, path, nil, nil, nil)
		done <- result{out, err}
	}()
	pid := waitForPID(t, filepath.Join(dir, "pid"), done)
	cancel()
	r := <-done
	if !errors.Is(r.err, context.Canceled) {
		t.Errorf("error %v does not wrap context.Canceled", r.err)
	}
	if !strings.Contains(r.out, "qemu: started") {
		t.Errorf("stderr = %q, want what QEMU wrote before it was stopped", r.out)
	}
	// Reaped, not just killed: the process is gone from the table.
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("process %d still exists after LaunchCustomQemu returned (kill 0: %v)", pid, err)
	}
}

// waitForPID waits for a stand-in to write its process id to file, or
// fails the test if the launch ended first.
func waitForPID[T any](t *testing.T, file string, done <-chan T) int {
	t.Helper()
	for {
		if _, err := os.Stat(file); err == nil {
			return readPID(t, file)
		}
		select {
		case r := <-done:
			t.Fatalf("launch ended before the stand-in started: %+v", r)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// readPID returns the process id a stand-in wrote to file, and fails the
// test if there is none: a check of that process would otherwise look at
// no process at all, and pass.
func readPID(t *testing.T, file string) int {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var pid int
	if _, err := fmt.Sscan(string(b), &pid); err != nil || pid <= 0 {
		t.Fatalf("bad pid file %q: %v", b, err)
	}
	return pid
}

func TestLaunchCustomQemuContextDoneBeforeStart(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := LaunchCustomQemu(ctx, path, nil, nil, nil)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v does not wrap context.Canceled", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran under a context that was already done")
	}
}

// TestLaunchCustomQemuDaemonKeepsStderr stands in for a -daemonize QEMU
// whose daemon keeps stderr open: the launch must end when the launching
// process exits, not when the daemon does.
func TestLaunchCustomQemuDaemonKeepsStderr(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
	}{{"success", 0}, {"failure", 1}} {
		t.Run(tt.name, func(t *testing.T) {
			path, dir := standIn(t, "qemu", fmt.Sprintf(`sleep 600 &
echo $! > "$DIR/daemon"
echo "qemu: parent done" >&2
exit %d`, tt.status))
			t.Cleanup(func() {
				if b, err := os.ReadFile(filepath.Join(dir, "daemon")); err == nil {
					var pid int
					fmt.Sscan(string(b), &pid)
					syscall.Kill(pid, syscall.SIGKILL)
				}
			})
			ctx := testCtx(t)
			log := &launchLog{}
			out, err := LaunchCustomQemu(ctx, path, nil, nil, log)
			if ctx.Err() != nil {
				t.Fatal("LaunchCustomQemu waited for the daemon that holds stderr")
			}
			if tt.status == 0 {
				if out != "" || err != nil {
					t.Errorf("LaunchCustomQemu = %q, %v; want success", out, err)
				}
				if w := strings.Join(log.Warnings(), "\n"); !strings.Contains(w, "qemu: parent done") {
					t.Errorf("stderr not logged; warnings: %q", w)
				}
				return
			}
			if err == nil || out != "qemu: parent done\n" {
				t.Errorf("LaunchCustomQemu = %q, %v; want QEMU's stderr and an error", out, err)
			}
		})
	}
}

func TestLaunchCustomQemuMissingBinary(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "no-qemu")
	_, err := LaunchCustomQemu(testCtx(t), missing, nil, nil, nil)
	if !errors.Is(err, fs.ErrNotExist) || !strings.Contains(err.Error(), missing) {
		t.Errorf("missing binary: error %v, want one naming %s and wrapping fs.ErrNotExist", err, missing)
	}

	t.Setenv("PATH", t.TempDir())
	_, err = LaunchCustomQemu(testCtx(t), "", nil, nil, nil)
	if !errors.Is(err, exec.ErrNotFound) || !strings.Contains(err.Error(), "qemu-system-x86_64") {
		t.Errorf("no QEMU in PATH: error %v, want one naming qemu-system-x86_64 and wrapping exec.ErrNotFound", err)
	}
}

func TestLaunchCustomQemuDefaultPath(t *testing.T) {
	_, dir := standIn(t, "qemu-system-x86_64", recordArgs)
	t.Setenv("PATH", dir)
	if out, err := LaunchCustomQemu(nil, "", []string{"-version"}, nil, nil); out != "" || err != nil {
		t.Fatalf("LaunchCustomQemu = %q, %v; want success", out, err)
	}
	if got := readArgs(t, dir); !reflect.DeepEqual(got, []string{"-version"}) {
		t.Errorf("qemu-system-x86_64 from PATH got %q", got)
	}
}

func TestLaunchCustomQemuNilFile(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	_, err := LaunchCustomQemu(testCtx(t), path, nil, []*os.File{nil}, nil)
	if err == nil || !strings.Contains(err.Error(), "fds[0] is nil") {
		t.Errorf("error %v, want one about fds[0]", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran with a nil file")
	}
}

func TestLaunchQemuStandIn(t *testing.T) {
	path, dir := standIn(t, "qemu", recordArgs+`
cat <&3 > "$DIR/fd3" || exit 9
cat <&4 > "$DIR/fd4" || exit 9`)
	var files []*os.File
	for _, content := range []string{"first", "second"} {
		r, w, err := os.Pipe()
		if err != nil {
			t.Fatal(err)
		}
		w.WriteString(content)
		w.Close()
		defer r.Close()
		files = append(files, r)
	}
	config := Config{
		Path: path,
		Name: "vm,1",
		Devices: []Device{
			NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0", IFName: "tap0", FDs: files[:1]},
			NetDevice{Type: TAP, Driver: VirtioNet, ID: "net1", IFName: "tap1", FDs: files[1:]},
		},
		Kernel: Kernel{Path: "/k", Params: "a b"},
	}
	out, err := LaunchQemu(config, nil)
	if out != "" || err != nil {
		t.Fatalf("LaunchQemu = %q, %v; want success", out, err)
	}
	want := append(argv("-name vm,,1 -device virtio-net,netdev=net0 -netdev tap,id=net0,fds=3 "+
		"-device virtio-net,netdev=net1 -netdev tap,id=net1,fds=4 -kernel /k -append"), "a b")
	if got := readArgs(t, dir); !reflect.DeepEqual(got, want) {
		t.Errorf("QEMU got %q\nwant %q", got, want)
	}
	for n, want := range map[string]string{"fd3": "first", "fd4": "second"} {
		if got, _ := os.ReadFile(filepath.Join(dir, n)); string(got) != want {
			t.Errorf("QEMU read %q from %s, want %q", got, n, want)
		}
	}
}

func TestLaunchQemuUsesConfigCtx(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := LaunchQemu(Config{Path: path, Ctx: ctx}, nil)
	if !errors.Is(err, context.Canceled) {
		t.Errorf("error %v does not wrap the Config's context error", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("QEMU ran under a Config.Ctx that was already done")
	}
}

// realQEMUCase is one Config whose rendering real QEMU must accept.
type realQEMUCase struct {
	name   string
	config func(t *testing.T, dir string) Config
	check  func(t *testing.T, ctx context.Context, q *QMP) // optional
}

// TestRealQEMUAcceptsArgv starts the installed QEMU, paused, with the argv
// this package renders for each kind of device and each part of a Config,
// and checks that QEMU starts, answers QMP, and writes no error or warning.
func TestRealQEMUAcceptsArgv(t *testing.T) {
	requireQEMU(t)
	for _, tc := range realQEMUCases() {
		t.Run(tc.name, func(t *testing.T) { runRealQEMU(t, tc) })
	}
}

func realQEMUCases() []realQEMUCase {
	plain := func(c Config) func(*testing.T, string) Config {
		return func(*testing.T, string) Config { return c }
	}
	return []realQEMUCase{
		{"base", plain(Config{}), nil},
		{"name", plain(Config{Name: "vm,debug-threads=on"}), func(t *testing.T, ctx context.Context, q *QMP) {
			var r struct{ Name string }
			queryQMP(t, ctx, q, "query-name", &r)
			if r.Name != "vm,debug-threads=on" {
				t.Errorf("query-name: %q", r.Name)
			}
		}},
		{"uuid", plain(Config{UUID: "4cb19522-1e18-439a-883a-f9b2a3a95f5e"}), func(t *testing.T, ctx context.Context, q *QMP) {
			var r struct{ UUID string }
			queryQMP(t, ctx, q, "query-uuid", &r)
			if r.UUID != "4cb19522-1e18-439a-883a-f9b2a3a95f5e" {
				t.Errorf("query-uuid: %q", r.UUID)
			}
		}},
		{"cpu", plain(Config{CPUModel: "qemu64"}), nil},
		{"qmp wait", func(t *testing.T, dir string) Config {
			// wait=on: QEMU waits for a client before it goes on;
			// runRealQEMU connects to the first socket.
			return Config{QMPSockets: []QMPSocket{{Type: Unix, Name: filepath.Join(dir, "w,ait.sock"), Server: true}}}
		}, nil},
		{"memory", plain(Config{Memory: Memory{Size: "256M", Slots: 2, MaxMem: "1G"}}), func(t *testing.T, ctx context.Context, q *QMP) {
			var r struct {
				Base int64 `json:"base-memory"`
			}
			queryQMP(t, ctx, q, "query-memory-size-summary", &r)
			if r.Base != 256<<20 {
				t.Errorf("base memory %d, want 256 MiB", r.Base)
			}
		}},
		{"smp", plain(Config{SMP: SMP{CPUs: 2, Cores: 1, Threads: 1, Sockets: 2}}), func(t *testing.T, ctx context.Context, q *QMP) {
			var r []struct{}
			queryQMP(t, ctx, q, "query-cpus-fast", &r)
			if len(r) != 2 {
				t.Errorf("%d CPUs, want 2", len(r))
			}
		}},
		{"maxcpus and a CPU hot-plugged", plain(Config{SMP: SMP{CPUs: 1, MaxCPUs: 2}}), func(t *testing.T, ctx context.Context, q *QMP) {
			var slots []struct {
				Type    string                 `json:"type"`
				Props   map[string]interface{} `json:"props"`
				QOMPath string                 `json:"qom-path"`
			}
			queryQMP(t, ctx, q, "query-hotpluggable-cpus", &slots)
			var free map[string]interface{}
			for _, s := range slots {
				if s.QOMPath == "" {
					free = map[string]interface{}{"driver": s.Type, "id": "cpu1"}
					for k, v := range s.Props {
						free[k] = v
					}
				}
			}
			if len(slots) != 2 || free == nil {
				t.Fatalf("hot-pluggable CPUs %+v, want 2 slots, one free", slots)
			}
			if err := q.ExecuteCommand(ctx, "device_add", free, nil); err != nil {
				t.Fatal(err)
			}
			var cpus []struct{}
			queryQMP(t, ctx, q, "query-cpus-fast", &cpus)
			if len(cpus) != 2 {
				t.Errorf("%d CPUs after the hot-plug, want 2", len(cpus))
			}
		}},
		{"root port with a device plugged into it", plain(Config{Devices: []Device{
			PCIeRootPort{ID: "rp1", Chassis: 1, Slot: 1},
			GenericDevice{Driver: "virtio-rng-pci", ID: "rng0", Bus: "rp1", Properties: []DeviceProperty{{"max-bytes", "1024"}, {"period", "1000"}}},
		}}), func(t *testing.T, ctx context.Context, q *QMP) {
			var path string
			if err := q.ExecuteCommand(ctx, "qom-get", map[string]string{"path": "/machine/peripheral/rng0", "property": "parent_bus"}, &path); err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(path, "rp1") {
				t.Errorf("rng0's bus is %q, not the root port's", path)
			}
		}},
		{"paused knob", plain(Config{Knobs: Knobs{Paused: true}}), nil},
		{"firmware dirs and extra params", func(t *testing.T, dir string) Config {
			var dirs []string
			for i := 1; i < len(realVM.firmware); i += 2 {
				dirs = append(dirs, realVM.firmware[i])
			}
			return Config{FirmwareDirs: append(dirs, dir), ExtraParams: []string{"-device", "virtio-rng-pci,id=extra0"}}
		}, func(t *testing.T, ctx context.Context, q *QMP) {
			var typ string
			if err := q.ExecuteCommand(ctx, "qom-get", map[string]string{"path": "/machine/peripheral/extra0", "property": "type"}, &typ); err != nil || typ != "virtio-rng-pci" {
				t.Errorf("the device from ExtraParams: %q, %v", typ, err)
			}
		}},
		{"user network", plain(Config{Devices: []Device{UserNetwork{ID: "n0", DeviceID: "nic0", MACAddress: "52:54:00:12:34:56",
			HostForwards: []HostForward{{HostAddr: "127.0.0.1", HostPort: 0xfff0, GuestPort: 22}}}}}), func(t *testing.T, ctx context.Context, q *QMP) {
			var filters []struct {
				Name string `json:"name"`
				MAC  string `json:"main-mac"`
			}
			queryQMP(t, ctx, q, "query-rx-filter", &filters)
			if len(filters) != 1 || filters[0].MAC != "52:54:00:12:34:56" {
				t.Errorf("rx filters %+v", filters)
			}
		}},
		{"rtc", plain(Config{RTC: RTC{Base: UTC, DriftFix: Slew, Clock: Host}}), nil},
		{"rtc localtime vm", plain(Config{RTC: RTC{Base: LocalTime, DriftFix: NoDriftFix, Clock: VM}}), nil},
		{"global", plain(Config{GlobalParam: "kvm-pit.lost_tick_policy=discard"}), nil},
		{"vga", plain(Config{VGA: "std"}), nil},
		{"knobs", plain(Config{Knobs: Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true}}), nil},
		{"kernel", func(t *testing.T, dir string) Config {
			// Commas in the paths and the command line: QEMU reads all
			// three verbatim, so they must not be doubled.
			kernel, initrd := filepath.Join(dir, "vm,linuz"), filepath.Join(dir, "in,itrd")
			writeFakeKernel(t, kernel)
			if err := os.WriteFile(initrd, []byte("initrd"), 0o600); err != nil {
				t.Fatal(err)
			}
			return Config{Kernel: Kernel{Path: kernel, InitrdPath: initrd, Params: "console=ttyS0 quiet,x=1"}}
		}, nil},
		{"kernel guest", func(t *testing.T, dir string) Config {
			kernel, initrd := requireGuest(t)
			return Config{Kernel: Kernel{Path: kernel, InitrdPath: initrd, Params: guestKernelParams}}
		}, nil},
		{"nvdimm", func(t *testing.T, dir string) Config {
			return Config{
				Machine: Machine{Type: "q35", Acceleration: "tcg,nvdimm=on"},
				Memory:  Memory{Size: "256M", Slots: 2, MaxMem: "1G"},
				Devices: []Device{Object{Driver: NVDIMM, Type: MemoryBackendFile, ID: "mem0", DeviceID: "nv0",
					MemPath: filepath.Join(dir, "nv,dimm"), Size: 4 << 20}},
			}
		}, func(t *testing.T, ctx context.Context, q *QMP) {
			var r []struct{ Type string }
			queryQMP(t, ctx, q, "query-memory-devices", &r)
			if len(r) != 1 || r[0].Type != "nvdimm" {
				t.Errorf("memory devices %+v, want one nvdimm", r)
			}
		}},
		{"9p", func(t *testing.T, dir string) Config {
			share := filepath.Join(dir, "sh,are")
			if err := os.Mkdir(share, 0o755); err != nil {
				t.Fatal(err)
			}
			return Config{Devices: []Device{FSDevice{Driver: Virtio9P, FSDriver: Local, ID: "fs0", Path: share,
				MountTag: "rootfs", SecurityModel: None}}}
		}, nil},
		{"virtserialport", func(t *testing.T, dir string) Config {
			return Config{Devices: []Device{
				SerialDevice{Driver: VirtioSerial, ID: "serial0"},
				CharDevice{Backend: Socket, Driver: VirtioSerialPort, DeviceID: "channel0", ID: "char0",
					Path: filepath.Join(dir, "ch,ar.sock"), Name: "channel.0"},
			}}
		}, checkChardev("char0", "ch,ar.sock")},
		{"virtconsole", func(t *testing.T, dir string) Config {
			return Config{Devices: []Device{
				SerialDevice{Driver: VirtioSerial, ID: "serial0"},
				CharDevice{Backend: Socket, Driver: Console, Bus: "serial0.0", DeviceID: "console0", ID: "c0",
					Path: filepath.Join(dir, "con.sock")},
			}}
		}, checkChardev("c0", "con.sock")},
		{"isa-serial pipe", func(t *testing.T, dir string) Config {
			fifo := filepath.Join(dir, "fi,fo")
			if err := syscall.Mkfifo(fifo, 0o600); err != nil {
				t.Fatal(err)
			}
			return Config{Devices: []Device{CharDevice{Backend: Pipe, Driver: "isa-serial", DeviceID: "com1", ID: "c0", Path: fifo}}}
		}, checkChardev("c0", "")},
		{"isa-serial serial", plain(Config{Devices: []Device{
			CharDevice{Backend: Serial, Driver: "isa-serial", ID: "c0", Path: "/dev/ptmx"}}}), nil},
		{"isa-serial tty", plain(Config{Devices: []Device{
			CharDevice{Backend: TTY, Driver: "isa-serial", ID: "c0", Path: "/dev/ptmx"}}}), nil},
		{"pty", func(t *testing.T, dir string) Config {
			return Config{Devices: []Device{CharDevice{Backend: PTY, Driver: "isa-serial", ID: "c0", Path: filepath.Join(dir, "pty")}}}
		}, nil},
		{"tap by name", func(t *testing.T, dir string) Config {
			requireTun(t)
			return Config{Devices: []Device{NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0",
				IFName: fmt.Sprintf("qtn%d", os.Getpid()%100000), DownScript: "no", Script: "no", MACAddress: "02:02:de:ad:be:ef"}}}
		}, nil},
		{"tap fds", func(t *testing.T, dir string) Config {
			fds := openTap(t, fmt.Sprintf("qtq%d", os.Getpid()%100000), 2)
			return Config{Devices: []Device{NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0", IFName: "unused", FDs: fds}}}
		}, nil},
		{"macvtap fds", func(t *testing.T, dir string) Config {
			// From QEMU's side a macvtap's files are a tap's.
			fds := openTap(t, fmt.Sprintf("qtm%d", os.Getpid()%100000), 1)
			return Config{Devices: []Device{
				NetDevice{Type: MACVTAP, Driver: VirtioNet, ID: "net0", IFName: "unused", FDs: fds, MACAddress: "02:00:00:00:00:02"}}}
		}, nil},
		{"serial", plain(Config{Devices: []Device{SerialDevice{Driver: VirtioSerial, ID: "serial0"}}}), nil},
		{"block", func(t *testing.T, dir string) Config {
			img := filepath.Join(dir, "d,isk.img")
			if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			return Config{Devices: []Device{BlockDevice{Driver: VirtioBlock, ID: "hd0", File: img,
				Interface: NoInterface, AIO: Threads, Format: "raw"}}}
		}, func(t *testing.T, ctx context.Context, q *QMP) {
			var r []struct {
				Device   string
				Inserted struct{ File string }
			}
			queryQMP(t, ctx, q, "query-block", &r)
			if len(r) != 1 || r[0].Device != "hd0" || filepath.Base(r[0].Inserted.File) != "d,isk.img" {
				t.Errorf("query-block: %+v, want hd0 on d,isk.img", r)
			}
		}},
		{"block wce", func(t *testing.T, dir string) Config {
			img := filepath.Join(dir, "disk.img")
			if err := os.WriteFile(img, make([]byte, 1<<20), 0o600); err != nil {
				t.Fatal(err)
			}
			return Config{Devices: []Device{BlockDevice{Driver: VirtioBlock, ID: "hd0", File: img,
				Interface: NoInterface, Format: "raw", WCE: true}}}
		}, nil},
	}
}

// runRealQEMU launches QEMU paused with the case's Config plus a QMP
// socket (with a comma in its path), queries it, quits it and checks that
// LaunchCustomQemu saw a clean exit with nothing on stderr.
func runRealQEMU(t *testing.T, tc realQEMUCase) {
	bin, fw := requireQEMU(t)
	dir := shortTempDir(t)
	config := tc.config(t, dir)
	config.Path = bin
	if config.Machine.Type == "" {
		config.Machine = Machine{Type: "q35", Acceleration: "tcg"}
	}
	config.Knobs.NoDefaults = true
	sock := filepath.Join(dir, "q,mp.sock")
	config.QMPSockets = append(config.QMPSockets, QMPSocket{Type: Unix, Name: sock, Server: true, NoWait: true})
	if n := len(config.QMPSockets); n > 1 {
		sock = config.QMPSockets[0].Name // a wait=on socket is the one to connect to first
	}
	log := &launchLog{}
	params, fds := renderConfig(config, log)
	if w := log.Warnings(); len(w) != 0 {
		t.Fatalf("rendering warnings: %q", w)
	}
	params = append(params, "-S", "-display", "none")
	params = append(params, fw...)

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := LaunchCustomQemu(ctx, config.Path, params, fds, log)
		done <- result{out, err}
	}()
	var res *result
	wait := func() result {
		if res == nil {
			r := <-done
			res = &r
		}
		return *res
	}
	defer func() { cancel(); wait() }()

	var q *QMP
	gone := make(chan struct{})
	for q == nil {
		var err error
		q, _, err = QMPStart(ctx, sock, QMPConfig{}, gone)
		if err == nil {
			break
		}
		gone = make(chan struct{})
		select {
		case r := <-done:
			res = &r
			t.Fatalf("QEMU refused %q: %v\n%s", params, r.err, r.out)
		case <-ctx.Done():
			t.Fatalf("no QMP on %s: %v", sock, err)
		case <-time.After(20 * time.Millisecond):
		}
	}
	defer q.Shutdown()
	if err := q.ExecuteQMPCapabilities(ctx); err != nil {
		t.Fatalf("qmp_capabilities: %v", err)
	}
	var status struct{ Status string }
	queryQMP(t, ctx, q, "query-status", &status)
	if status.Status != "prelaunch" {
		t.Errorf("status %q, want prelaunch (started with -S)", status.Status)
	}
	if tc.check != nil {
		tc.check(t, ctx, q)
	}
	if err := q.ExecuteQuit(ctx); err != nil {
		t.Fatalf("quit: %v", err)
	}
	if r := wait(); r.err != nil {
		t.Fatalf("QEMU %q ended with %v\n%s", params, r.err, r.out)
	}
	// On success LaunchCustomQemu logs QEMU's stderr as a warning; only
	// QEMU's informational lines (wait=on announces its wait) may be there.
	for _, w := range log.Warnings() {
		for _, line := range strings.Split(w, "\n") {
			if !strings.Contains(line, ": info: ") {
				t.Errorf("QEMU %q wrote to stderr: %s", params, line)
			}
		}
	}
}

// writeFakeKernel writes the smallest file QEMU loads as a Linux kernel
// with an initrd: a boot-protocol 2.12 setup header and no code. The VM is
// started paused, so the kernel never runs.
func writeFakeKernel(t *testing.T, path string) {
	t.Helper()
	b := make([]byte, 8192)
	b[0x1f1] = 1                                         // setup_sects: the setup is 1+1 sectors
	binary.LittleEndian.PutUint16(b[0x1fe:], 0xaa55)     // boot_flag
	copy(b[0x202:], "HdrS")                              // header magic
	binary.LittleEndian.PutUint16(b[0x206:], 0x020c)     // boot protocol version
	b[0x211] = 0x01                                      // loadflags: LOADED_HIGH
	binary.LittleEndian.PutUint32(b[0x22c:], 0x7fffffff) // initrd_addr_max
	binary.LittleEndian.PutUint32(b[0x238:], 2048)       // cmdline_size
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func queryQMP(t *testing.T, ctx context.Context, q *QMP, name string, result interface{}) {
	t.Helper()
	if err := q.ExecuteCommand(ctx, name, nil, result); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

// checkChardev checks that QEMU has the character device label, on a file
// name containing path (when given).
func checkChardev(label, path string) func(*testing.T, context.Context, *QMP) {
	return func(t *testing.T, ctx context.Context, q *QMP) {
		var r []struct{ Label, Filename string }
		queryQMP(t, ctx, q, "query-chardev", &r)
		for _, c := range r {
			if c.Label == label {
				if !strings.Contains(c.Filename, path) {
					t.Errorf("chardev %s on %q, want %q in it", label, c.Filename, path)
				}
				return
			}
		}
		t.Errorf("no chardev %s in %+v", label, r)
	}
}

// requireTun skips the test when this host cannot create tap devices.
func requireTun(t *testing.T) {
	t.Helper()
	f, err := os.OpenFile("/dev/net/tun", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no tap devices here: %v", err)
	}
	f.Close()
}

// openTap creates the tap device name with the given number of queues and
// returns one open file per queue, as a tap or macvtap user hands them to
// QEMU.
func openTap(t *testing.T, name string, queues int) []*os.File {
	t.Helper()
	requireTun(t)
	var files []*os.File
	for i := 0; i < queues; i++ {
		f, err := createTap(name, iffMultiQueue)
		if errors.Is(err, syscall.EPERM) {
			t.Skipf("cannot create tap device %s: %v", name, err)
		} else if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		files = append(files, f)
	}
	return files
}

// TestRealQEMUDaemonize launches a real QEMU with -daemonize through
// LaunchQemu: it returns once the VM is up, and the VM answers QMP.
func TestRealQEMUDaemonize(t *testing.T) {
	bin, fw := requireQEMU(t)
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "qmp.sock")
	config := Config{
		Path:       bin,
		Machine:    Machine{Type: "q35", Acceleration: "tcg"},
		QMPSockets: []QMPSocket{{Type: Unix, Name: sock, Server: true, NoWait: true}},
		Knobs:      Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true},
	}
	log := &launchLog{}
	params, fds := renderConfig(config, log)
	params = append(append(params, "-S"), fw...)
	ctx := testCtx(t)
	if out, err := LaunchCustomQemu(ctx, bin, params, fds, log); err != nil {
		t.Fatalf("launch %q: %v\n%s", params, err, out)
	}
	if w := log.Warnings(); len(w) != 0 {
		t.Errorf("QEMU wrote to stderr: %q", w)
	}
	// The daemon is up: its QMP socket exists now, with no polling.
	gone := make(chan struct{})
	q, _, err := QMPStart(ctx, sock, QMPConfig{}, gone)
	if err != nil {
		t.Fatalf("QMP of the daemonized QEMU: %v", err)
	}
	defer q.Shutdown()
	if err := q.ExecuteQMPCapabilities(ctx); err != nil {
		t.Fatal(err)
	}
	if err := q.ExecuteQuit(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-gone:
	case <-ctx.Done():
		t.Fatal("the daemonized QEMU did not close QMP after quit")
	}
}

// TestRealQEMUDaemonizeCancelled cancels the launch of a -daemonize QEMU
// whose daemon is still starting (waiting for a client on its wait=on QMP
// socket): the launching process is killed, and the daemon exits by itself
// once it has started and finds no parent to report to.
func TestRealQEMUDaemonizeCancelled(t *testing.T) {
	bin, fw := requireQEMU(t)
	dir := shortTempDir(t)
	sock := filepath.Join(dir, "wait.sock")
	config := Config{
		Path:       bin,
		Machine:    Machine{Type: "q35", Acceleration: "tcg"},
		QMPSockets: []QMPSocket{{Type: Unix, Name: sock, Server: true}},
		Knobs:      Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true},
	}
	params, fds := renderConfig(config, nil)
	params = append(append(params, "-S"), fw...)
	t.Cleanup(func() {
		for _, pid := range processesWithArg(sock) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
	})
	ctx, cancel := context.WithCancel(testCtx(t))
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := LaunchCustomQemu(ctx, bin, params, fds, nil)
		done <- result{out, err}
	}()
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		select {
		case r := <-done:
			t.Fatalf("launch ended before the daemon listened: %v\n%s", r.err, r.out)
		case <-time.After(10 * time.Millisecond):
		}
	}
	cancel()
	if r := <-done; !errors.Is(r.err, context.Canceled) {
		t.Fatalf("launch error %v does not wrap context.Canceled", r.err)
	}
	// Let the daemon go on: it finishes starting, finds its parent gone
	// and exits.
	conn, err := net.Dial("unix", sock)
	if err != nil {
		t.Fatalf("connect to the daemon: %v", err)
	}
	defer conn.Close()
	waitCtx := testCtx(t)
	for len(processesWithArg(sock)) > 0 {
		select {
		case <-waitCtx.Done():
			t.Fatalf("the daemon of a cancelled launch is still running: %v", processesWithArg(sock))
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// processesWithArg returns the live processes one of whose arguments
// contains s.
func processesWithArg(s string) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		var pid int
		if _, err := fmt.Sscan(e.Name(), &pid); err != nil {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || !bytes.Contains(cmdline, []byte(s)) {
			continue
		}
		if stat, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat")); err == nil && zombie(stat) {
			continue
		}
		pids = append(pids, pid)
	}
	return pids
}

// TestRealQEMUFailure checks that QEMU's own message comes back from a
// launch it refuses.
func TestRealQEMUFailure(t *testing.T) {
	bin, fw := requireQEMU(t)
	config := Config{Path: bin, Machine: Machine{Type: "q35", Acceleration: "tcg"}, Knobs: Knobs{NoDefaults: true},
		Devices: []Device{SerialDevice{Driver: "no-such-device", ID: "x"}}}
	params, fds := renderConfig(config, nil)
	params = append(append(params, "-S", "-display", "none"), fw...)
	out, err := LaunchCustomQemu(testCtx(t), bin, params, fds, nil)
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || !strings.Contains(out, "no-such-device") ||
		!strings.Contains(err.Error(), "no-such-device") {
		t.Errorf("LaunchCustomQemu = %q, %v; want QEMU's complaint about no-such-device", out, err)
	}
}
