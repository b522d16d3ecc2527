package qemu

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestStartInstanceRefusesBadInput(t *testing.T) {
	path, dir := standIn(t, "qemu", `touch "$DIR/ran"`)
	ctx := context.Background()
	cancelled, cancel := context.WithCancel(ctx)
	cancel()
	cases := map[string]func(InstanceOptions) (*Instance, error){
		"daemonize knob": func(o InstanceOptions) (*Instance, error) {
			return StartInstance(ctx, Config{Path: path, Knobs: Knobs{Daemonize: true}}, o)
		},
		"daemonize param": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(ctx, path, []string{"-S", "-daemonize"}, nil, o)
		},
		"nil fd": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(ctx, path, nil, []*os.File{nil}, o)
		},
		"newline in name": func(o InstanceOptions) (*Instance, error) {
			return StartInstance(ctx, Config{Path: path, Name: "a\nb"}, o)
		},
		"missing binary": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(ctx, filepath.Join(dir, "nope"), nil, nil, o)
		},
		"cancelled context": func(o InstanceOptions) (*Instance, error) {
			return StartCustomInstance(cancelled, path, nil, nil, o)
		},
	}
	for name, start := range cases {
		events := make(chan QMPEvent)
		inst, err := start(InstanceOptions{EventCh: events})
		if err == nil {
			inst.Close()
			t.Errorf("%s: started", name)
			continue
		}
		t.Logf("%s: %v", name, err)
		if name == "cancelled context" && !errors.Is(err, context.Canceled) {
			t.Errorf("%s: error does not wrap context.Canceled", name)
		}
		select {
		case _, ok := <-events:
			if ok {
				t.Errorf("%s: EventCh got an event", name)
			}
		default:
			t.Errorf("%s: EventCh left open", name)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "ran")); err == nil {
		t.Error("a refused start ran the stand-in")
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

func TestInstanceExitBeforeQMP(t *testing.T) {
	path, _ := standIn(t, "qemu", "exit 0")
	if _, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{}); err == nil ||
		!strings.Contains(err.Error(), "exited before QMP was ready (exit status 0): (nothing on stderr)") {
		t.Errorf("start of a stand-in that exits at once: %v", err)
	}
	for name, body := range map[string]string{
		"before the greeting": "",
		"after the greeting":  qmpStandIn + "qmp_greet",
	} {
		t.Run(name, func(t *testing.T) {
			path, _ := standIn(t, "qemu", body+`
echo "qemu: warming up" >&2
echo "qemu: -frobnicate: invalid option" >&2
exit 3`)
			events := make(chan QMPEvent)
			_, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{EventCh: events})
			if err == nil {
				t.Fatal("started")
			}
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 {
				t.Errorf("error %v does not carry exit status 3", err)
			}
			if !strings.Contains(err.Error(), "qemu: warming up | qemu: -frobnicate: invalid option") {
				t.Errorf("error %q does not carry QEMU's last lines", err)
			}
			if _, ok := <-events; ok {
				t.Error("EventCh got an event")
			}
			checkNoGoroutines(t)
		})
	}
}

func TestInstanceExitLeavingAChild(t *testing.T) {
	for name, body := range map[string]string{
		"before the greeting": "",
		"after the greeting":  qmpStandIn + "qmp_greet",
	} {
		t.Run(name, func(t *testing.T) {
			// The child holds the QMP channel and stderr open.
			path, dir := standIn(t, "qemu", body+`
sleep 600 &
echo $! > "$DIR/child"
echo "qemu: leaving a child" >&2
exit 3`)
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			_, err := StartCustomInstance(ctx, path, nil, nil, InstanceOptions{})
			var exitErr *exec.ExitError
			if !errors.As(err, &exitErr) || exitErr.ExitCode() != 3 || !strings.Contains(err.Error(), "leaving a child") {
				t.Errorf("start: %v; want exit status 3 and the stand-in's message", err)
			}
			waitGone(t, readPID(t, filepath.Join(dir, "child")))
			checkNoGoroutines(t)
		})
	}
}

func TestInstanceNotQMP(t *testing.T) {
	path, dir := standIn(t, "qemu", `echo $$ > "$DIR/pid"
echo "this is not QMP" >&3
exec sleep 600`)
	_, err := StartCustomInstance(context.Background(), path, nil, nil, InstanceOptions{})
	if err == nil || !strings.Contains(err.Error(), "not a QMP greeting") {
		t.Fatalf("start: %v", err)
	}
	checkReaped(t, readPID(t, filepath.Join(dir, "pid")))
	checkNoGoroutines(t)
}

func TestInstanceStartCancelledKillsQEMU(t *testing.T) {
	path, dir := standIn(t, "qemu", `echo $$ > "$DIR/pid.tmp" && mv "$DIR/pid.tmp" "$DIR/pid"
exec sleep 600`)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type result struct {
		inst *Instance
		err  error
	}
	done := make(chan result, 1)
	go func() {
		inst, err := StartCustomInstance(ctx, path, nil, nil, InstanceOptions{})
		done <- result{inst, err}
	}()
	pid := waitForPID(t, filepath.Join(dir, "pid"), done)
	cancel()
	r := <-done
	if r.err == nil {
		r.inst.Close()
		t.Fatal("started")
	}
	if !errors.Is(r.err, context.Canceled) || !strings.Contains(r.err.Error(), "QEMU killed") {
		t.Errorf("start: %v", r.err)
	}
	checkReaped(t, pid)
	checkNoGoroutines(t)
}

func TestInstanceRealQEMUBadOption(t *testing.T) {
	bin, firmware := requireQEMU(t)
	params := append([]string{"-machine", "none", "-nodefaults", "-display", "none",
		"-device", "no-such-driver"}, firmware...)
	_, err := StartCustomInstance(context.Background(), bin, params, nil, InstanceOptions{})
	if err == nil {
		t.Fatal("started")
	}
	var exitErr *exec.ExitError
	if !errors.As(err, &exitErr) || exitErr.ExitCode() != 1 {
		t.Errorf("error %v does not carry exit status 1", err)
	}
	if !strings.Contains(err.Error(), "'no-such-driver' is not a valid device model name") {
		t.Errorf("error %q does not carry QEMU's message", err)
	}
	checkNoGoroutines(t)
}

func TestInstanceRealQEMUStartContextEndsWithStart(t *testing.T) {
	bin, firmware := requireQEMU(t)
	ctx, cancel := context.WithCancel(context.Background())
	params := append([]string{"-S", "-machine", "none", "-nodefaults", "-display", "none"}, firmware...)
	inst, err := StartCustomInstance(ctx, bin, params, nil, InstanceOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	cancel()
	var status struct {
		Status string `json:"status"`
	}
	qctx, qcancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer qcancel()
	if err := inst.QMP().ExecuteCommand(qctx, "query-status", nil, &status); err != nil || status.Status != "prelaunch" {
		t.Errorf("query-status after the start context ended: %q, %v", status.Status, err)
	}
	select {
	case <-inst.Done():
		t.Fatal("QEMU exited when the start context ended")
	default:
	}
	// The guest has not started (-S), so Stop skips the power button and
	// its 30 s PowerdownTimeout: a bound of 20 s fails if it does not.
	if step := stopWithin(t, inst, 20*time.Second); step != StopQuit {
		t.Errorf("Stop ended at %v, want quit", step)
	}
	checkReaped(t, inst.Pid())
}

// A property the package renders that a QEMU no longer has is refused
// before the start, with an error that names the version: BlockDevice's
// scsi=on on a QEMU 9.1 or later. QEMU is asked its version only for a
// Config with one.
func TestStartInstanceRefusesPropertyOfAnotherVersion(t *testing.T) {
	scsi := BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/x.img", SCSI: true}
	for _, tc := range []struct {
		version string
		devices []Device
		refused bool
	}{
		{"10.0.2", []Device{scsi}, true},
		{"7.2.22", []Device{scsi}, false},
		{"11.1.3", []Device{BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/x.img"}}, false},
	} {
		path, dir := standIn(t, "qemu", `case "$1" in -version) echo "QEMU emulator version `+tc.version+` (test)"; echo -version >>"$DIR/asked"; exit 0;; esac
`+qmpStandIn+`
qmp_greet
qmp_serve`)
		inst, err := StartInstance(ctxTimeout(t, 10*time.Second), Config{Path: path, Devices: tc.devices}, InstanceOptions{})
		if err == nil {
			inst.Close()
		}
		_, askErr := os.Stat(filepath.Join(dir, "asked"))
		asked := askErr == nil
		switch {
		case tc.refused && (err == nil || !strings.Contains(err.Error(), "QEMU "+tc.version+" has no scsi property")):
			t.Errorf("QEMU %s: %v, want a refusal naming the version", tc.version, err)
		case !tc.refused && err != nil:
			t.Errorf("QEMU %s: %v", tc.version, err)
		case asked != (tc.devices[0].(BlockDevice)).SCSI:
			t.Errorf("QEMU %s asked its version: %v", tc.version, asked)
		}
	}
}
