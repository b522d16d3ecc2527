package qemu

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
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

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"-machine":                "-machine",
		"q35,accel=kvm":           "q35,accel=kvm",
		"/tmp/a b":                "'/tmp/a b'",
		"":                        "''",
		"it's":                    `'it'\''s'`,
		"console=ttyS0 panic=-1":  "'console=ttyS0 panic=-1'",
		"$HOME":                   "'$HOME'",
		"socket,id=x,path=/a;b|c": "'socket,id=x,path=/a;b|c'",
	} {
		if got := shellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
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
