package qemu

import (
	"context"
	"encoding/binary"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
)

// Stand-ins: shell scripts run in QEMU's place, which record their
// arguments and environment, speak QMP on an inherited descriptor, and
// misbehave on purpose (exit, flood stderr, ignore signals).

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

// qmpStandIn is a shell fragment that makes a stand-in speak QMP on its
// descriptor $QMP (3 unless set): qmp_greet sends the greeting, qmp_serve
// answers every command with an empty return, exits on quit, and on
// system_powerdown touches $DIR/powerdown (and writes a line to $STARTED,
// if set: see startedFIFO), then sends SHUTDOWN and exits unless
// $POWERBUTTON is "ignore". After SHUTDOWN, $AFTER "stay" makes it
// send STOP and stay, as -no-shutdown does, and "linger" makes it take a
// second to exit and save in $DIR/after-shutdown a command sent meanwhile
// (qmp_linger, which checkQuietAfterShutdown reads); "stopfirst" is linger
// with a STOP and a RESUME before the SHUTDOWN.
// With $RUNNING set, query-status answers that the guest's running is
// $RUNNING.
const qmpStandIn = `
QMP=${QMP:-3}
qmp_greet() {
	printf '%s\n' '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}' >&$QMP
}
qmp_event() {
	printf '{"event": "%s", "timestamp": {"seconds": 1, "microseconds": 2}}\n' "$1" >&$QMP
}
qmp_linger() {
	sleep 0.5
	timeout 0.5 sh -c 'read -r line; printf "%s\n" "$line" >"$1"' - "$DIR/after-shutdown" <&$QMP
	exit 0
}
qmp_serve() {
	while read -r line <&$QMP; do
		case $line in
		*query-status*)
			if [ -n "$RUNNING" ]; then
				printf '{"return": {"status": "paused", "running": %s}}\n' "$RUNNING" >&$QMP
				continue
			fi;;
		esac
		printf '{"return": {}}\n' >&$QMP
		case $line in
		*'"quit"'*) exit 0;;
		*system_powerdown*)
			touch "$DIR/powerdown"
			[ -n "$STARTED" ] && echo >"$STARTED"
			[ "$POWERBUTTON" = ignore ] && continue
			if [ "$AFTER" = stopfirst ]; then
				qmp_event STOP
				qmp_event RESUME
			fi
			qmp_event SHUTDOWN
			case $AFTER in
			stay) qmp_event STOP;;
			linger|stopfirst) qmp_linger;;
			*) exit 0;;
			esac;;
		esac
	done
}
`

// startedFIFO makes a FIFO for a stand-in to write a line to once it is
// under way, and returns its path and a channel closed when the line has
// come. The FIFO is closed when the test ends.
func startedFIFO(t *testing.T) (string, <-chan struct{}) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "started")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	// Read and write, so that neither this open nor the stand-in's waits
	// for the other end.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	exited := make(chan struct{})
	go func() {
		defer close(exited)
		var b [1]byte
		if _, err := f.Read(b[:]); err == nil {
			close(started)
		}
	}()
	t.Cleanup(func() {
		f.Close()
		<-exited
	})
	return path, started
}

// startStandIn starts the stand-in at path as QEMU, closed when the test
// ends.
func startStandIn(t *testing.T, path string, opts InstanceOptions) *Instance {
	t.Helper()
	inst, err := StartCustomInstance(context.Background(), path, nil, nil, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { inst.Close() })
	return inst
}

// checkQuietAfterShutdown fails the test if the stand-in in dir saved a
// command that came while it was exiting after SHUTDOWN (qmp_linger).
func checkQuietAfterShutdown(t *testing.T, dir string) {
	t.Helper()
	if b, err := os.ReadFile(filepath.Join(dir, "after-shutdown")); err == nil && strings.TrimSpace(string(b)) != "" {
		t.Errorf("sent to an exiting QEMU after SHUTDOWN: %s", b)
	}
}

// floodStandIn writes 5 MB to stderr before it speaks QMP.
const floodStandIn = qmpStandIn + `
head -c 5000000 /dev/zero | tr '\0' x >&2
echo >&2
echo "qemu: last words" >&2
qmp_greet
qmp_serve`

// exitingStandIn negotiates QMP, then exits 0 at its next command.
const exitingStandIn = qmpStandIn + `
qmp_greet
read -r line <&3
printf '{"return": {}}\n' >&3
read -r line <&3
exit 0`

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
