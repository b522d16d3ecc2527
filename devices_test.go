package qemu

import (
	"fmt"
	"net"
	"reflect"
	"strings"
	"testing"
	"time"
)

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
