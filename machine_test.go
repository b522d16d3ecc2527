package qemu

import (
	"strings"
	"testing"
	"time"
)

// The typed machine queries against a real QEMU, paused, with no guest.
func TestRealQEMUMachineQueries(t *testing.T) {
	bin, fw := requireQEMU(t)
	config := Config{Path: bin, Name: "typed", UUID: "4cb19522-1e18-439a-883a-f9b2a3a95f5e",
		Machine: Machine{Type: "q35", Acceleration: "tcg"}, Knobs: Knobs{NoDefaults: true, Paused: true},
		ExtraParams: append([]string{"-display", "none"}, fw...)}
	ctx := ctxTimeout(t, 30*time.Second)
	inst, err := StartInstance(ctx, config, InstanceOptions{NoPowerdown: true})
	if err != nil {
		t.Fatal(err)
	}
	defer inst.Close()
	q := inst.QMP()
	if st, err := q.ExecuteQueryStatus(ctx); err != nil || st != (StatusInfo{Running: false, Status: "prelaunch"}) {
		t.Errorf("query-status = %+v, %v", st, err)
	}
	v, err := q.ExecuteQueryVersion(ctx)
	if got := inst.Version(); err != nil || v.QEMU.Major != got.Major || v.QEMU.Minor != got.Minor || v.QEMU.Micro != got.Micro {
		t.Errorf("query-version = %+v, %v; the greeting said %+v", v, err, got)
	}
	if kvm, err := q.ExecuteQueryKVM(ctx); err != nil || kvm.Enabled {
		t.Errorf("query-kvm under TCG = %+v, %v", kvm, err)
	}
	if name, err := q.ExecuteQueryName(ctx); err != nil || name != "typed" {
		t.Errorf("query-name = %q, %v", name, err)
	}
	if uuid, err := q.ExecuteQueryUUID(ctx); err != nil || uuid != config.UUID {
		t.Errorf("query-uuid = %q, %v", uuid, err)
	}
	props, err := q.ExecuteQOMList(ctx, "/machine")
	if err != nil || len(props) == 0 {
		t.Fatalf("qom-list = %v, %v", props, err)
	}
	var typ string
	if err := q.ExecuteQOMGet(ctx, "/machine", "type", &typ); err != nil || !strings.HasPrefix(typ, "pc-q35") {
		t.Errorf("qom-get type = %q, %v", typ, err)
	}
	if err := q.ExecuteQOMSet(ctx, "/machine", "dump-guest-core", false); err != nil {
		t.Errorf("qom-set: %v", err)
	}
	var core bool
	if err := q.ExecuteQOMGet(ctx, "/machine", "dump-guest-core", &core); err != nil || core {
		t.Errorf("qom-get after qom-set = %v, %v", core, err)
	}
	out, err := q.ExecuteHumanMonitorCommand(ctx, "info status")
	if err != nil || !strings.Contains(out, "prelaunch") {
		t.Errorf("HMP info status = %q, %v", out, err)
	}
	cmds, err := q.ExecuteQueryCommands(ctx)
	if err != nil || !strings.Contains(" "+strings.Join(cmds, " ")+" ", " query-hotpluggable-cpus ") {
		t.Errorf("query-commands: %d names, %v", len(cmds), err)
	}
	if err := q.ExecuteSystemReset(ctx); err != nil {
		t.Errorf("system_reset: %v", err)
	}
}

// A vCPU added to a free slot and removed: the guest's online CPUs go 1, 2,
// 1, and the removal completes though QEMU sends no DEVICE_DELETED naming
// the vCPU.
func TestRealQEMUCPUHotplug(t *testing.T) {
	for _, m := range hotplugMachines {
		t.Run(m.name, func(t *testing.T) { testCPUHotplug(t, m.args) })
	}
}

func testCPUHotplug(t *testing.T, machine []string) {
	inst := startGuestInstance(t, "", InstanceOptions{}, append([]string{"-smp", "1,maxcpus=2"}, machine...)...)
	ctx := ctxTimeout(t, 2*time.Minute)
	q, con := inst.QMP(), inst.Console()
	online := func(want string) {
		t.Helper()
		if got := guestAsk(t, inst, "echo ans=$(grep -c ^processor /proc/cpuinfo)"); got != want {
			t.Fatalf("the guest's online CPUs: %s, want %s", got, want)
		}
	}
	online("1")
	if _, err := q.AddCPU(ctx, "cpu1"); err == nil {
		// the guest brings a hot-added CPU online only when told
		con.Write([]byte("until echo 1 > /sys/devices/system/cpu/cpu1/online 2>/dev/null; do sleep 0.1; done\n"))
		if _, err := con.WaitFor(ctx, "TESTGUEST: exit 0"); err != nil {
			t.Fatal(err)
		}
	} else {
		t.Fatal(err)
	}
	online("2")
	cpus, err := q.ExecuteQueryCPUsFast(ctx)
	if err != nil || len(cpus) != 2 {
		t.Fatalf("query-cpus-fast = %+v, %v", cpus, err)
	}
	if _, err := q.AddCPU(ctx, "cpu2"); err == nil || !strings.Contains(err.Error(), "no free vCPU slot") {
		t.Errorf("a third vCPU in two slots: %v", err)
	}
	start := time.Now()
	if err := q.RemoveCPU(ctx, "cpu1"); err != nil {
		t.Fatal(err)
	}
	t.Logf("vCPU removed in %v", time.Since(start).Round(time.Millisecond))
	online("1")
}

// AddCPU takes the free slot lowest in the topology, though QEMU lists
// the slots highest first.
func TestAddCPULowestFreeSlot(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	done := s.p.serve(func(cmd string) []string {
		if strings.Contains(cmd, "query-hotpluggable-cpus") {
			return []string{`{"return": [` +
				`{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 1, "core-id": 1, "thread-id": 0}},` +
				`{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}},` +
				`{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 0, "core-id": 1, "thread-id": 0}},` +
				`{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 0, "core-id": 0, "thread-id": 0}, "qom-path": "/machine/unattached/device[0]"}]}`}
		}
		return []string{okReply}
	})
	slot, err := s.q.AddCPU(ctxTimeout(t, 5*time.Second), "cpu1")
	s.q.Shutdown()
	lines := <-done
	if err != nil || slot.Props["socket-id"] != 0 || slot.Props["core-id"] != 1 {
		t.Errorf("AddCPU = %+v, %v; want socket 0 core 1", slot, err)
	}
	if want := `{"execute":"device_add","arguments":{"core-id":1,"driver":"qemu64-x86_64-cpu","id":"cpu1","socket-id":0,"thread-id":0}}`; len(lines) != 2 || lines[1] != want {
		t.Errorf("sent %q, want the query and %s", lines, want)
	}
}

// ExecuteQueryKVM asks query-kvm before QEMU 10.2 and query-accelerators
// from 10.2 on, where query-kvm is deprecated, with the same answer.
func TestQueryKVMByVersion(t *testing.T) {
	for _, tc := range []struct {
		version, wire, reply string
	}{
		{"10.0.2", `{"execute":"query-kvm"}`, `{"return": {"enabled": true, "present": true}}`},
		{"11.1.3", `{"execute":"query-accelerators"}`, `{"return": {"enabled": "kvm", "present": ["kvm", "tcg"]}}`},
	} {
		s := connect(t, tc.version, nil)
		done := s.p.serve(func(string) []string { return []string{tc.reply} })
		info, err := s.q.ExecuteQueryKVM(ctxTimeout(t, 5*time.Second))
		s.q.Shutdown()
		if lines := <-done; len(lines) != 1 || lines[0] != tc.wire {
			t.Errorf("QEMU %s: sent %q, want %s", tc.version, lines, tc.wire)
		}
		if err != nil || !info.Enabled || !info.Present {
			t.Errorf("QEMU %s: %+v, %v", tc.version, info, err)
		}
	}
}
