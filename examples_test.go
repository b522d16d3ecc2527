package qemu

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"time"
)

// The real-VM layer of the tests. The environment chooses what runs:
//
//	QEMU_BIN           qemu-system-x86_64 to test (default: from PATH)
//	QEMU_FIRMWARE      colon-separated firmware dirs, each passed as -L DIR
//	QEMU_TEST_ACCEL    kvm or tcg: force the guest accelerator (default: probe)
//	QEMU_TEST_GUEST    directory with the test guest's vmlinux and initrd.gz
//	QEMU_TEST_REQUIRE  1: fail instead of skipping when QEMU or the guest is missing

// Example is the original package's example, made to run: it boots the
// test guest with a hand-written command line and -daemonize, powers it
// down over QMP, falling back to quit, and waits for the session to end.
func Example() {
	dir, err := os.MkdirTemp("", "qemu-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	qmpSocket := filepath.Join(dir, "qmp.sock")
	consoleSocket := filepath.Join(dir, "console.sock")
	accel, cpu := guestAccelCPU()

	params := make([]string, 0, 32)
	// The guest: kernel, initramfs and a serial console on a socket
	params = append(params, "-kernel", realVM.kernel, "-initrd", realVM.initrd, "-append", guestKernelParams)
	params = append(params, "-chardev", "socket,id=console,path="+consoleSocket+",server=on,wait=off",
		"-serial", "chardev:console")
	// Machine and accelerator
	params = append(params, "-machine", "q35", "-accel", accel, "-cpu", cpu, "-nodefaults", "-display", "none")
	// qmp socket
	params = append(params, "-daemonize", "-qmp", "unix:"+qmpSocket+",server=on,wait=off")
	// resources
	params = append(params, "-m", "256", "-smp", "cpus=1")
	params = append(params, realVM.firmware...)

	// LaunchCustomQemu returns as soon as the instance has launched, as we
	// are using -daemonize. QEMU has then created the QMP socket.
	if _, err := LaunchCustomQemu(context.Background(), realVM.bin, params, nil, nil); err != nil {
		panic(err)
	}

	// Wait for the guest to be up, so that it has a power button to press.
	console, err := waitForGuest(consoleSocket)
	if err != nil {
		panic(err)
	}
	defer console.Close()
	fmt.Println("guest is up")

	// This channel will be closed when the instance dies.
	disconnectedCh := make(chan struct{})

	// Start monitoring the qemu instance. This function will block until we
	// have connected to the QMP socket and received the welcome message.
	q, _, err := QMPStart(context.Background(), qmpSocket, QMPConfig{}, disconnectedCh)
	if err != nil {
		panic(err)
	}

	// This has to be the first command executed in a QMP session.
	if err := q.ExecuteQMPCapabilities(context.Background()); err != nil {
		panic(err)
	}

	// Let's try to shutdown the VM. If it hasn't shutdown in 10 seconds
	// we'll send a quit message.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	err = q.ExecuteSystemPowerdown(ctx)
	cancel()
	if err != nil {
		fmt.Println("powerdown failed, quitting:", err)
		if err := q.ExecuteQuit(context.Background()); err != nil {
			panic(err)
		}
	} else {
		fmt.Println("guest powered down")
	}

	q.Shutdown()

	// disconnectedCh is closed when the session ends. This line blocks until
	// this happens.
	<-disconnectedCh
	fmt.Println("disconnected")
	// Output:
	// guest is up
	// guest powered down
	// disconnected
}

// ExampleLaunchQemu boots the test guest from a Config, reads its status
// with the generic ExecuteCommand and quits it.
func ExampleLaunchQemu() {
	dir, err := os.MkdirTemp("", "qemu-example")
	if err != nil {
		panic(err)
	}
	defer os.RemoveAll(dir)
	qmpSocket := filepath.Join(dir, "qmp.sock")
	consoleSocket := filepath.Join(dir, "console.sock")
	accel, cpu := guestAccelCPU()

	config := Config{
		Path:     realVM.bin,
		Name:     "example",
		Machine:  Machine{Type: "q35", Acceleration: accel},
		CPUModel: cpu,
		Memory:   Memory{Size: "256M"},
		SMP:      SMP{CPUs: 1},
		QMPSockets: []QMPSocket{
			{Type: Unix, Name: qmpSocket, Server: true, NoWait: true},
		},
		Devices: []Device{
			// isa-serial gives the guest its ttyS0, here on a socket.
			CharDevice{Backend: Socket, Driver: "isa-serial", ID: "console", DeviceID: "serial0", Path: consoleSocket},
		},
		Kernel: Kernel{Path: realVM.kernel, InitrdPath: realVM.initrd, Params: guestKernelParams},
		Knobs:  Knobs{NoUserConfig: true, NoDefaults: true, NoGraphic: true, Daemonize: true},
	}
	if _, err := LaunchQemu(config, nil); err != nil {
		panic(err)
	}

	console, err := waitForGuest(consoleSocket)
	if err != nil {
		panic(err)
	}
	defer console.Close()
	fmt.Println("guest is up")

	disconnectedCh := make(chan struct{})
	q, _, err := QMPStart(context.Background(), qmpSocket, QMPConfig{}, disconnectedCh)
	if err != nil {
		panic(err)
	}
	defer q.Shutdown()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := q.ExecuteQMPCapabilities(ctx); err != nil {
		panic(err)
	}

	var status struct {
		Status  string `json:"status"`
		Running bool   `json:"running"`
	}
	if err := q.ExecuteCommand(ctx, "query-status", nil, &status); err != nil {
		panic(err)
	}
	fmt.Println("status:", status.Status, "running:", status.Running)

	if err := q.ExecuteQuit(ctx); err != nil {
		panic(err)
	}
	<-disconnectedCh
	fmt.Println("quit")
	// Output:
	// guest is up
	// status: running running: true
	// quit
}

// ExampleInstance boots the test guest as an Instance, with its console on
// a socket pair QEMU inherits: QEMU runs in the foreground, its QMP session
// comes ready with it, the console sees the guest from its first byte, a
// disk hot-plugged into a PCIe root port shows up in the guest and is
// unplugged again, and Stop shuts the guest down with the power button and
// reaps QEMU. The log lines
// (on stderr) say how long each step took.
func ExampleInstance() {
	accel, cpu := guestAccelCPU() // "kvm" and "host", or "tcg" and "qemu64"
	config := Config{
		Path:         realVM.bin, // "" for qemu-system-x86_64 from PATH
		Name:         "example",
		Machine:      Machine{Type: "q35", Acceleration: accel},
		CPUModel:     cpu,
		Memory:       Memory{Size: "256M"},
		Kernel:       Kernel{Path: realVM.kernel, InitrdPath: realVM.initrd, Params: "console=ttyS0 panic=-1 quiet"},
		Knobs:        Knobs{NoUserConfig: true, NoDefaults: true},
		FirmwareDirs: filepath.SplitList(os.Getenv("QEMU_FIRMWARE")), // for a QEMU outside /usr
		// q35's root bus refuses hot-plug; a root port accepts it.
		Devices:     []Device{PCIeRootPort{ID: "rp1", Chassis: 1, Slot: 1}},
		ExtraParams: []string{"-display", "none"},
	}
	// The context bounds the start only; the VM outlives it.
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	start := time.Now()
	inst, err := StartInstance(ctx, config, InstanceOptions{Console: ConsoleSerial})
	if err != nil {
		panic(err)
	}
	defer inst.Close()
	v := inst.Version()
	log.Printf("QEMU %d.%d.%d (%s) answering QMP after %v", v.Major, v.Minor, v.Micro, accel, since(start))

	if _, err := inst.Console().WaitFor(ctx, "TESTGUEST: ready"); err != nil {
		panic(err)
	}
	log.Printf("guest ready after %v", since(start))
	fmt.Println("guest is up")

	disk, err := os.CreateTemp("", "disk")
	if err != nil {
		panic(err)
	}
	defer os.Remove(disk.Name())
	disk.Truncate(1 << 20)
	disk.Close()
	step := time.Now()
	q := inst.QMP()
	if err := q.ExecuteBlockdevAdd(ctx, disk.Name(), "drive0"); err != nil {
		panic(err)
	}
	if err := q.ExecuteDeviceAdd(ctx, "drive0", "disk0", "virtio-blk-pci", "rp1"); err != nil {
		panic(err)
	}
	line, err := inst.Console().WaitFor(ctx, "TESTGUEST: block add")
	if err != nil {
		panic(err)
	}
	log.Printf("the guest saw the disk %v after device_add: %q", since(step), line)
	fmt.Println("guest:", line)

	// Unplugged before the stop: device_del returns once QEMU reports
	// DEVICE_DELETED, when the guest has let go of the disk. (QEMU 10.0.2
	// here has crashed in aio_co_wake at exit, about one run in ten, when
	// the guest was still reading a disk hot-plugged a moment before.)
	if err := q.ExecuteDeviceDel(ctx, "disk0"); err != nil {
		panic(err)
	}
	if err := q.ExecuteXBlockdevDel(ctx, "drive0"); err != nil {
		panic(err)
	}
	line, err = inst.Console().WaitFor(ctx, "TESTGUEST: block remove")
	if err != nil {
		panic(err)
	}
	fmt.Println("guest:", line)

	step = time.Now()
	report, err := inst.StopWithReport(ctx)
	if err != nil {
		panic(err)
	}
	state, err := inst.Wait(ctx)
	if err != nil {
		panic(err)
	}
	log.Printf("stopped in %v: %v", since(step), report)
	fmt.Println("stopped by:", report.Step)
	fmt.Println("QEMU:", state)
	// Output:
	// guest is up
	// guest: TESTGUEST: block add vda
	// guest: TESTGUEST: block remove vda
	// stopped by: powerdown
	// QEMU: exit status 0
}

func since(t time.Time) time.Duration { return time.Since(t).Round(time.Millisecond) }

// ExampleSerialConsole runs a command in the test guest through its
// console, which the guest reads as a shell's input, and reads the answer.
func ExampleSerialConsole() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	inst, err := StartInstance(ctx, exampleGuest(), InstanceOptions{Console: ConsoleSerial})
	if err != nil {
		panic(err)
	}
	defer inst.Close()
	console := inst.Console()
	if _, err := console.WaitFor(ctx, "TESTGUEST: ready"); err != nil {
		panic(err)
	}
	// The guest's tty echoes the typed line, where $(...) is not yet
	// expanded: only the shell's own output has the kernel's name.
	fmt.Fprintln(console, "echo kernel=$(uname -s)")
	line, err := console.WaitFor(ctx, "kernel=Linux")
	if err != nil {
		panic(err)
	}
	fmt.Println(line)
	// Output:
	// kernel=Linux
}

// ExampleGuestAgent runs a command in the test guest through its guest
// agent, on a channel the Instance adds (InstanceOptions.GuestAgent). The
// first call waits for the agent to start in the booting guest: QEMU keeps
// the command until the guest opens its port.
func ExampleGuestAgent() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	inst, err := StartInstance(ctx, exampleGuest(), InstanceOptions{GuestAgent: true})
	if err != nil {
		panic(err)
	}
	defer inst.Close()
	agent := inst.GuestAgent()
	r, err := agent.Exec(ctx, GuestCommand{Path: "/bin/sh", Args: []string{"-c", "uname -s; exit 3"}})
	if err != nil {
		panic(err)
	}
	fmt.Printf("exit status %d, output %q\n", r.ExitCode, r.Stdout)
	host, err := agent.HostName(ctx)
	if err != nil {
		panic(err)
	}
	fmt.Println("host name:", host)
	// Output:
	// exit status 3, output "Linux\n"
	// host name: testguest
}

// exampleGuest is the test guest's Config of ExampleInstance, with a root
// port for hot-plug.
func exampleGuest() Config {
	accel, cpu := guestAccelCPU()
	return Config{
		Path:         realVM.bin,
		Machine:      Machine{Type: "q35", Acceleration: accel},
		CPUModel:     cpu,
		Memory:       Memory{Size: "256M"},
		Kernel:       Kernel{Path: realVM.kernel, InitrdPath: realVM.initrd, Params: guestKernelParams},
		Knobs:        Knobs{NoUserConfig: true, NoDefaults: true},
		FirmwareDirs: filepath.SplitList(os.Getenv("QEMU_FIRMWARE")),
		Devices:      []Device{PCIeRootPort{ID: "rp1", Chassis: 1, Slot: 1}},
		ExtraParams:  []string{"-display", "none"},
	}
}

// ExampleQMP_ExecuteDeviceAdd hot-plugs a disk into the running test guest
// and unplugs it again: blockdev-add, device_add on a PCIe root port, the
// guest sees the disk, device_del returns once QEMU reports DEVICE_DELETED,
// and the block node is deleted.
func ExampleQMP_ExecuteDeviceAdd() {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	inst, err := StartInstance(ctx, exampleGuest(), InstanceOptions{Console: ConsoleSerial})
	if err != nil {
		panic(err)
	}
	defer inst.Close()
	console := inst.Console()
	if _, err := console.WaitFor(ctx, "TESTGUEST: ready"); err != nil {
		panic(err)
	}
	disk, err := os.CreateTemp("", "disk")
	if err != nil {
		panic(err)
	}
	defer os.Remove(disk.Name())
	disk.Truncate(1 << 20)
	disk.Close()

	q := inst.QMP()
	if err := q.ExecuteBlockdevAdd(ctx, disk.Name(), "drive0"); err != nil {
		panic(err)
	}
	if err := q.ExecuteDeviceAdd(ctx, "drive0", "disk0", "virtio-blk-pci", "rp1"); err != nil {
		panic(err)
	}
	line, err := console.WaitFor(ctx, "TESTGUEST: block add")
	if err != nil {
		panic(err)
	}
	fmt.Println("guest:", line)

	if err := q.ExecuteDeviceDel(ctx, "disk0"); err != nil {
		panic(err)
	}
	fmt.Println("device_del returned after DEVICE_DELETED")
	if line, err = console.WaitFor(ctx, "TESTGUEST: block remove"); err != nil {
		panic(err)
	}
	fmt.Println("guest:", line)

	if err := q.ExecuteXBlockdevDel(ctx, "drive0"); err != nil {
		panic(err)
	}
	fmt.Println("block node deleted")
	// Output:
	// guest: TESTGUEST: block add vda
	// device_del returned after DEVICE_DELETED
	// guest: TESTGUEST: block remove vda
	// block node deleted
}

// ExampleQMPEvent starts a VM paused, resumes it, stops and resumes it
// again, and reads the events from InstanceOptions.EventCh.
func ExampleQMPEvent() {
	config := exampleGuest()
	config.Knobs.Paused = true
	events := make(chan QMPEvent, 16)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	inst, err := StartInstance(ctx, config, InstanceOptions{EventCh: events})
	if err != nil {
		panic(err)
	}
	defer inst.Close()
	q := inst.QMP()
	for _, run := range []func(context.Context) error{q.ExecuteCont, q.ExecuteStop, q.ExecuteCont} {
		if err := run(ctx); err != nil {
			panic(err)
		}
		ev := <-events
		fmt.Println(ev.Name, "recent:", time.Since(ev.Timestamp) < time.Minute)
	}
	// Output:
	// RESUME recent: true
	// STOP recent: true
	// RESUME recent: true
}

// ExampleQMP_Subscribe waits for a job's end with a subscription made
// before the command, so that none of the job's events can be missed:
// QEMU sends the first ones before its reply.
func ExampleQMP_Subscribe() {
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	config := Config{Path: realVM.bin, Machine: Machine{Type: "none"}, Knobs: Knobs{NoDefaults: true, Paused: true},
		FirmwareDirs: filepath.SplitList(os.Getenv("QEMU_FIRMWARE")), ExtraParams: []string{"-display", "none"}}
	inst, err := StartInstance(ctx, config, InstanceOptions{})
	if err != nil {
		panic(err)
	}
	defer inst.Close()
	q := inst.QMP()
	image, err := os.CreateTemp("", "image")
	if err != nil {
		panic(err)
	}
	defer os.Remove(image.Name())
	image.Close()
	if err := q.ExecuteCommand(ctx, "blockdev-add", map[string]string{"driver": "file", "node-name": "proto0", "filename": image.Name()}, nil); err != nil {
		panic(err)
	}

	sub := q.Subscribe(JobStatusFilter("create0"))
	defer sub.Close()
	create := map[string]interface{}{
		"job-id":  "create0",
		"options": map[string]interface{}{"driver": "qcow2", "file": "proto0", "size": 1 << 30},
	}
	if err := q.ExecuteCommand(ctx, "blockdev-create", create, nil); err != nil {
		panic(err)
	}
	for {
		ev, err := sub.Receive(ctx)
		if err != nil {
			panic(err)
		}
		fmt.Println("job create0:", ev.Data["status"])
		if ev.Data["status"] == "concluded" {
			break
		}
	}
	if err := q.ExecuteCommand(ctx, "job-dismiss", map[string]string{"id": "create0"}, nil); err != nil {
		panic(err)
	}
	// Output:
	// job create0: created
	// job create0: running
	// job create0: waiting
	// job create0: pending
	// job create0: concluded
}
