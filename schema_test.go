package qemu

import (
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
)

// The QAPI schemas of QEMU 7.2 and 10.0, as query-qmp-schema returns them,
// are recorded in testdata/qapi by `make schema`, which runs
// TestRecordSchema with -record-schema against each QEMU. Every command the
// package sends is checked against both.

var recordSchema = flag.Bool("record-schema", false, "TestRecordSchema: write the QEMU under test's query-qmp-schema to testdata/qapi")

// schemaVersions are the recorded schemas, by QEMU version.
var schemaVersions = []string{"7.2", "10.0", "11.1"}

func schemaPath(version string) string {
	return filepath.Join("testdata", "qapi", "qemu-"+version+".json.gz")
}

// TestRecordSchema writes the schema of the QEMU under test, and the
// properties of the device and object types the package uses, named by
// its major and minor version, when -record-schema is given.
func TestRecordSchema(t *testing.T) {
	if !*recordSchema {
		t.Skip("records the schema only with -record-schema (make schema)")
	}
	q, inst := startPausedQEMU(t)
	var raw json.RawMessage
	if err := q.ExecuteCommand(ctxTimeout(t, 30*time.Second), "query-qmp-schema", nil, &raw); err != nil {
		t.Fatal(err)
	}
	// One entity a line, sorted, so that a diff between recordings reads.
	var entities []json.RawMessage
	if err := json.Unmarshal(raw, &entities); err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, e := range entities {
		var b bytes.Buffer
		json.Compact(&b, e)
		lines = append(lines, b.String())
	}
	sort.Strings(lines)
	v := inst.Version()
	version := fmt.Sprintf("%d.%d", v.Major, v.Minor)
	writeGzip(t, schemaPath(version), []byte("[\n"+strings.Join(lines, ",\n")+"\n]\n"))
	t.Logf("wrote %s: %d entities from QEMU %d.%d.%d", schemaPath(version), len(lines), v.Major, v.Minor, v.Micro)
	recordDevices(t, q, version)
}

// writeGzip writes b to path, gzipped, for a recording.
func writeGzip(t *testing.T, path string, b []byte) {
	var out bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&out, gzip.BestCompression)
	zw.Write(b)
	zw.Close()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, out.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

// schemaEntity is one entity of query-qmp-schema.
type schemaEntity struct {
	Name     string   `json:"name"`
	MetaType string   `json:"meta-type"`
	ArgType  string   `json:"arg-type"`
	JSONType string   `json:"json-type"`
	Element  string   `json:"element-type"`
	Tag      string   `json:"tag"`
	Features []string `json:"features"`
	Values   []string
	// Deprecated are an enum's values that QEMU deprecates (10.0 lists
	// features per value).
	Deprecated []string `json:"-"`
	Members    []struct {
		Name     string           `json:"name"`
		Type     string           `json:"type"`
		Default  *json.RawMessage `json:"default"`
		Features []string         `json:"features"`
	} `json:"members"`
	Variants []struct {
		Case string `json:"case"`
		Type string `json:"type"`
	} `json:"variants"`
}

type qapiSchema map[string]*schemaEntity

func loadSchema(t *testing.T, version string) qapiSchema {
	t.Helper()
	return loadSchemaFile(t, schemaPath(version))
}

// loadSchemaFile reads a schema recorded as loadSchema's are.
func loadSchemaFile(t *testing.T, path string) qapiSchema {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatalf("%v (make schema records it)", err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	b, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	var raw []map[string]json.RawMessage
	if err := json.Unmarshal(b, &raw); err != nil {
		t.Fatal(err)
	}
	s := make(qapiSchema, len(raw))
	for _, r := range raw {
		var e schemaEntity
		b, _ := json.Marshal(r)
		if err := json.Unmarshal(b, &e); err != nil {
			t.Fatal(err)
		}
		// Enums list their values under "values" (7.2 and 10.0); 10.0
		// also has "members" with names, which must not be read as an
		// object's members.
		if e.MetaType == "enum" {
			json.Unmarshal(r["values"], &e.Values)
			for _, m := range e.Members {
				if slices.Contains(m.Features, "deprecated") {
					e.Deprecated = append(e.Deprecated, m.Name)
				}
			}
			e.Members = nil
		}
		// A member is optional when it has a "default" key, which the
		// decoder above cannot tell from a null one: read it again.
		if e.MetaType == "object" {
			var members []map[string]json.RawMessage
			json.Unmarshal(r["members"], &members)
			for i, m := range members {
				if _, ok := m["default"]; ok {
					null := json.RawMessage("null")
					e.Members[i].Default = &null
				}
			}
		}
		s[e.Name] = &e
	}
	return s
}

// openCommands take members their schema does not list: device_add passes
// everything but driver, bus and id to the device's properties (its QAPI
// definition has 'gen': false).
var openCommands = map[string]bool{"device_add": true}

// checkCommand validates one command line as the package writes it.
func (s qapiSchema) checkCommand(line []byte) error {
	var cmd struct {
		Execute   string          `json:"execute"`
		Arguments json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal(line, &cmd); err != nil {
		return err
	}
	e, ok := s[cmd.Execute]
	if !ok || e.MetaType != "command" {
		return fmt.Errorf("no command %s", cmd.Execute)
	}
	if slices.Contains(e.Features, "deprecated") {
		return fmt.Errorf("command %s is deprecated", cmd.Execute)
	}
	args := cmd.Arguments
	if args == nil {
		args = json.RawMessage("{}")
	}
	return s.check(args, e.ArgType, cmd.Execute, openCommands[cmd.Execute])
}

// check validates value against type name; path names it in errors.
func (s qapiSchema) check(value json.RawMessage, name, path string, open bool) error {
	e, ok := s[name]
	if !ok {
		return fmt.Errorf("%s: no type %s in the schema", path, name)
	}
	switch e.MetaType {
	case "builtin":
		return checkJSONType(value, e.JSONType, path)
	case "enum":
		var v string
		if err := json.Unmarshal(value, &v); err != nil {
			return fmt.Errorf("%s: %s is not a string of enum %s", path, value, name)
		}
		if slices.Contains(e.Deprecated, v) {
			return fmt.Errorf("%s: %q is deprecated", path, v)
		}
		for _, ok := range e.Values {
			if v == ok {
				return nil
			}
		}
		return fmt.Errorf("%s: %q is not one of %q", path, v, e.Values)
	case "array":
		var elems []json.RawMessage
		if err := json.Unmarshal(value, &elems); err != nil {
			return fmt.Errorf("%s: %s is not an array", path, value)
		}
		for i, el := range elems {
			if err := s.check(el, e.Element, fmt.Sprintf("%s[%d]", path, i), false); err != nil {
				return err
			}
		}
		return nil
	case "alternate":
		var errs []string
		for _, m := range e.Members {
			err := s.check(value, m.Type, path, false)
			if err == nil {
				return nil
			}
			errs = append(errs, err.Error())
		}
		return fmt.Errorf("%s: no branch of alternate %s takes %s: %s", path, name, value, strings.Join(errs, "; "))
	case "object":
		return s.checkObject(value, e, path, open)
	}
	return fmt.Errorf("%s: unexpected meta-type %s", path, e.MetaType)
}

// checkObject validates an object through its members and, for a union,
// the members of the branch its tag selects.
func (s qapiSchema) checkObject(value json.RawMessage, e *schemaEntity, path string, open bool) error {
	var fields map[string]json.RawMessage
	if err := json.Unmarshal(value, &fields); err != nil || fields == nil {
		return fmt.Errorf("%s: %s is not an object", path, value)
	}
	members := append([]struct {
		Name     string           `json:"name"`
		Type     string           `json:"type"`
		Default  *json.RawMessage `json:"default"`
		Features []string         `json:"features"`
	}(nil), e.Members...)
	if e.Tag != "" {
		var tag string
		json.Unmarshal(fields[e.Tag], &tag)
		for _, v := range e.Variants {
			if v.Case == tag {
				members = append(members, s[v.Type].Members...)
			}
		}
	}
	known := make(map[string]bool)
	for _, m := range members {
		known[m.Name] = true
		v, present := fields[m.Name]
		if !present {
			if m.Default == nil {
				return fmt.Errorf("%s: required member %s is missing", path, m.Name)
			}
			continue
		}
		if slices.Contains(m.Features, "deprecated") {
			return fmt.Errorf("%s: member %s is deprecated", path, m.Name)
		}
		if err := s.check(v, m.Type, path+"."+m.Name, false); err != nil {
			return err
		}
	}
	if !open {
		for name := range fields {
			if !known[name] {
				return fmt.Errorf("%s: member %s is not in the schema", path, name)
			}
		}
	}
	return nil
}

func checkJSONType(value json.RawMessage, want, path string) error {
	var v interface{}
	if err := json.Unmarshal(value, &v); err != nil {
		return err
	}
	ok := false
	switch want {
	case "value":
		ok = true
	case "string":
		_, ok = v.(string)
	case "boolean":
		_, ok = v.(bool)
	case "null":
		ok = v == nil
	case "number":
		_, ok = v.(float64)
	case "int":
		f, isNum := v.(float64)
		ok = isNum && f == float64(int64(f))
	case "object":
		_, ok = v.(map[string]interface{})
	}
	if !ok {
		return fmt.Errorf("%s: %s is not a %s", path, value, want)
	}
	return nil
}

// typedCommands calls every typed command of the package, with each form
// it can send, on q. The returned names label the calls in order.
func typedCommands(ctx context.Context, q *QMP, file *os.File) []string {
	set, fd := 3, 5
	calls := []struct {
		name string
		call func() error
	}{
		{"qmp_capabilities", func() error { return q.ExecuteQMPCapabilities(ctx) }},
		{"stop", func() error { return q.ExecuteStop(ctx) }},
		{"cont", func() error { return q.ExecuteCont(ctx) }},
		{"system_powerdown", func() error { return q.ExecuteSystemPowerdown(ctx) }},
		{"quit", func() error { return q.ExecuteQuit(ctx) }},
		{"blockdev-add file", func() error { return q.ExecuteBlockdevAdd(ctx, file.Name(), "drive0") }},
		{"blockdev-add host_device", func() error { return q.ExecuteBlockdevAdd(ctx, "/dev/null", "drive1") }},
		{"blockdev-add fdset", func() error { return q.ExecuteBlockdevAdd(ctx, "/dev/fdset/3", "drive2") }},
		{"device_add", func() error { return q.ExecuteDeviceAdd(ctx, "drive0", "disk0", "virtio-blk-pci", "rp1") }},
		{"device_add no bus", func() error { return q.ExecuteDeviceAdd(ctx, "drive0", "disk0", "virtio-blk-pci", "") }},
		{"device_del", func() error { return q.ExecuteDeviceDel(ctx, "disk0") }},
		{"blockdev-del", func() error { return q.ExecuteXBlockdevDel(ctx, "drive0") }},
		{"getfd", func() error { return q.ExecuteGetFD(ctx, "tap0", file) }},
		{"closefd", func() error { return q.ExecuteCloseFD(ctx, "tap0") }},
		{"add-fd", func() error { _, err := q.ExecuteAddFD(ctx, file, AddFDOptions{}); return err }},
		{"add-fd set and opaque", func() error {
			_, err := q.ExecuteAddFD(ctx, file, AddFDOptions{FDSetID: &set, Opaque: "x"})
			return err
		}},
		{"remove-fd", func() error { return q.ExecuteRemoveFD(ctx, set, &fd) }},
		{"remove-fd set", func() error { return q.ExecuteRemoveFD(ctx, set, nil) }},
		{"query-fdsets", func() error { _, err := q.ExecuteQueryFDSets(ctx); return err }},
		{"query-status", func() error { _, err := q.ExecuteQueryStatus(ctx); return err }},
		{"query-version", func() error { _, err := q.ExecuteQueryVersion(ctx); return err }},
		{"query-kvm", func() error { _, err := q.ExecuteQueryKVM(ctx); return err }},
		{"query-name", func() error { _, err := q.ExecuteQueryName(ctx); return err }},
		{"query-uuid", func() error { _, err := q.ExecuteQueryUUID(ctx); return err }},
		{"system_reset", func() error { return q.ExecuteSystemReset(ctx) }},
		{"qom-list", func() error { _, err := q.ExecuteQOMList(ctx, "/machine"); return err }},
		{"qom-get", func() error { var v string; return q.ExecuteQOMGet(ctx, "/machine", "type", &v) }},
		{"qom-set", func() error { return q.ExecuteQOMSet(ctx, "/machine/peripheral/nic0", "x-pci-vendor-id", 1) }},
		{"human-monitor-command", func() error { _, err := q.ExecuteHumanMonitorCommand(ctx, "info usernet"); return err }},
		{"query-commands", func() error { _, err := q.ExecuteQueryCommands(ctx); return err }},
		{"query-cpus-fast", func() error { _, err := q.ExecuteQueryCPUsFast(ctx); return err }},
		{"blockdev-add raw", func() error {
			return q.ExecuteBlockdevAddNode(ctx, BlockdevNode{NodeName: "n0", Driver: "raw", File: BlockdevFile{Filename: file.Name()}})
		}},
		{"blockdev-add qcow2 all options", func() error {
			return q.ExecuteBlockdevAddNode(ctx, BlockdevNode{NodeName: "n1", Driver: "qcow2", Backing: "n0", ReadOnly: true,
				AutoReadOnly: true, CacheDirect: true, CacheNoFlush: true, Discard: "unmap",
				File: BlockdevFile{Filename: "/dev/null", AIO: "native"}})
		}},
		{"blockdev-add qcow2 no backing on a node", func() error {
			return q.ExecuteBlockdevAddNode(ctx, BlockdevNode{NodeName: "n2", Driver: "qcow2", FileNode: "proto0", NoBacking: true, Discard: "ignore"})
		}},
		{"blockdev-add file driver and io_uring", func() error {
			return q.ExecuteBlockdevAddNode(ctx, BlockdevNode{NodeName: "n3", Driver: "raw",
				File: BlockdevFile{Filename: "/dev/fdset/1", Driver: "file", AIO: "io_uring"}})
		}},
		{"blockdev-del node", func() error { return q.ExecuteBlockdevDel(ctx, "n0") }},
		{"block_resize", func() error { return q.ExecuteBlockResize(ctx, "n0", 64<<20) }},
		{"query-named-block-nodes", func() error { _, err := q.ExecuteQueryNamedBlockNodes(ctx); return err }},
		{"query-block", func() error { _, err := q.ExecuteQueryBlock(ctx); return err }},
		{"device_add spec", func() error {
			return q.ExecuteDeviceAddSpec(ctx, DeviceSpec{Driver: "virtio-net-pci", ID: "nic0", Bus: "rp1", Addr: "0x0",
				Properties: map[string]interface{}{"netdev": "net0", "mac": "52:54:00:12:34:56", "mq": true}})
		}},
		{"query-pci", func() error { _, err := q.ExecuteQueryPCI(ctx); return err }},
		{"netdev_add user", func() error {
			return q.ExecuteNetdevAddUser(ctx, "net0", []HostForward{{HostAddr: "127.0.0.1", HostPort: 2222, GuestPort: 22}, {Protocol: "udp", HostPort: 53, GuestPort: 53}})
		}},
		{"netdev_add user no forwards", func() error { return q.ExecuteNetdevAddUser(ctx, "net1", nil) }},
		{"netdev_add tap fd", func() error { return q.ExecuteNetdevAddTap(ctx, TapNetdev{ID: "net2", FDName: "tapfd"}) }},
		{"netdev_add tap ifname", func() error { return q.ExecuteNetdevAddTap(ctx, TapNetdev{ID: "net3", IFName: "tap0"}) }},
		{"netdev_del", func() error { return q.ExecuteNetdevDel(ctx, "net0") }},
		{"set_link", func() error { return q.ExecuteSetLink(ctx, "nic0", false) }},
		{"query-rx-filter", func() error { _, err := q.ExecuteQueryRxFilter(ctx, "nic0"); return err }},
		{"query-rx-filter all", func() error { _, err := q.ExecuteQueryRxFilter(ctx, ""); return err }},
		{"object-add ram", func() error {
			return q.ExecuteObjectAddMemoryBackend(ctx, MemoryBackend{Type: "memory-backend-ram", ID: "mem0", Size: 128 << 20})
		}},
		{"object-add file", func() error {
			return q.ExecuteObjectAddMemoryBackend(ctx, MemoryBackend{Type: "memory-backend-file", ID: "mem1", Size: 128 << 20, MemPath: "/dev/shm/m", Share: true})
		}},
		{"object-del", func() error { return q.ExecuteObjectDel(ctx, "mem0") }},
		{"query-memory-devices", func() error { _, err := q.ExecuteQueryMemoryDevices(ctx); return err }},
		{"query-memory-size-summary", func() error { _, err := q.ExecuteQueryMemorySizeSummary(ctx); return err }},
		{"chardev-add server", func() error { return q.ExecuteChardevAddUnixSocket(ctx, "ch0", "/tmp/ch0.sock", true) }},
		{"chardev-add client", func() error { return q.ExecuteChardevAddUnixSocket(ctx, "ch1", "/tmp/ch1.sock", false) }},
		{"chardev-remove", func() error { return q.ExecuteChardevRemove(ctx, "ch0") }},
		{"balloon", func() error { return q.ExecuteBalloon(ctx, 128<<20) }},
		{"query-balloon", func() error { _, err := q.ExecuteQueryBalloon(ctx); return err }},
		{"AddCPU: query-hotpluggable-cpus", nil},
		{"AddCPU: device_add", func() error { _, err := q.AddCPU(ctx, "cpu1"); return err }},
		{"RemoveCPU: device_del", nil},
		{"RemoveCPU: query-hotpluggable-cpus", func() error { return q.RemoveCPU(ctx, "cpu1") }},
		{"migrate-set-capabilities", func() error {
			return q.ExecuteMigrateSetCapabilities(ctx, map[MigrationCapability]bool{MigrationEvents: true, MigrationMultifd: false,
				MigrationAutoConverge: true, MigrationPostcopyRAM: true})
		}},
		{"migrate-set-parameters all", func() error {
			bw, downtime, channels, creds, host := int64(32<<20), int64(300), int64(4), "tls0", "127.0.0.1"
			return q.ExecuteMigrateSetParameters(ctx, MigrationParameters{MaxBandwidth: &bw, DowntimeLimit: &downtime,
				MultifdChannels: &channels, TLSCreds: &creds, TLSHostname: &host})
		}},
		{"migrate-set-parameters tls off", func() error {
			off := ""
			return q.ExecuteMigrateSetParameters(ctx, MigrationParameters{TLSCreds: &off})
		}},
		{"object-add tls-creds-x509 server", func() error {
			return q.ExecuteObjectAddTLSCredsX509(ctx, TLSCredsX509{ID: "tls0", Dir: "/tmp/pki", Endpoint: "server"})
		}},
		{"object-add tls-creds-x509 client no verify", func() error {
			return q.ExecuteObjectAddTLSCredsX509(ctx, TLSCredsX509{ID: "tls1", Dir: "/tmp/pki", Endpoint: "client", NoVerifyPeer: true})
		}},
		{"migrate", func() error { return q.ExecuteMigrate(ctx, "unix:/tmp/mig.sock") }},
		{"migrate-incoming", func() error { return q.ExecuteMigrateIncoming(ctx, "tcp:127.0.0.1:0") }},
		{"migrate_cancel", func() error { return q.ExecuteMigrateCancel(ctx) }},
		{"migrate-start-postcopy", func() error { return q.ExecuteMigrateStartPostcopy(ctx) }},
		{"query-migrate", func() error { _, err := q.ExecuteQueryMigrate(ctx); return err }},
		{"Migrate: migrate-set-capabilities", nil},
		{"Migrate: migrate", nil},
		{"Migrate: query-migrate", nil},
		{"Migrate: query-status", func() error { _, err := q.Migrate(ctx, "fd:mig", MigrateOptions{}); return err }},
		{"blockdev-mirror", func() error {
			return q.ExecuteBlockdevMirror(ctx, BlockdevMirror{JobID: "job0", Device: "n0", Target: "n1"})
		}},
		{"blockdev-mirror all", func() error {
			return q.ExecuteBlockdevMirror(ctx, BlockdevMirror{JobID: "job0", Device: "n0", Target: "n1", Sync: "top", Speed: 1 << 20,
				CopyMode: "write-blocking", OnTargetError: "enospc"})
		}},
		{"block-stream", func() error { return q.ExecuteBlockStream(ctx, BlockStream{JobID: "job0", Device: "n1"}) }},
		{"block-stream all", func() error {
			return q.ExecuteBlockStream(ctx, BlockStream{JobID: "job0", Device: "n1", BaseNode: "n0", Speed: 1 << 20})
		}},
		{"block-commit", func() error { return q.ExecuteBlockCommit(ctx, BlockCommit{JobID: "job0", Device: "n1"}) }},
		{"block-commit all", func() error {
			return q.ExecuteBlockCommit(ctx, BlockCommit{JobID: "job0", Device: "n2", TopNode: "n1", BaseNode: "n0", Speed: 1 << 20})
		}},
		{"blockdev-backup", func() error {
			return q.ExecuteBlockdevBackup(ctx, BlockdevBackup{JobID: "job0", Device: "n0", Target: "n1"})
		}},
		{"blockdev-backup all", func() error {
			return q.ExecuteBlockdevBackup(ctx, BlockdevBackup{JobID: "job0", Device: "n0", Target: "n1", Sync: "full", Speed: 1 << 20})
		}},
		{"query-jobs", func() error { _, err := q.ExecuteQueryJobs(ctx); return err }},
		{"job-complete", func() error { return q.ExecuteJobComplete(ctx, "job0") }},
		{"job-cancel", func() error { return q.ExecuteJobCancel(ctx, "job0") }},
		{"job-finalize", func() error { return q.ExecuteJobFinalize(ctx, "job0") }},
		{"job-dismiss", func() error { return q.ExecuteJobDismiss(ctx, "job0") }},
		{"Mirror: blockdev-mirror", nil},
		{"Mirror: job-complete", nil},
		{"Mirror: query-jobs", nil},
		{"Mirror: job-dismiss", func() error {
			_, err := q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "n0", Target: "n1"}, JobOptions{})
			return err
		}},
		{"Stream: block-stream", nil},
		{"Stream: query-jobs", nil},
		{"Stream: job-dismiss", func() error {
			_, err := q.Stream(ctx, BlockStream{JobID: "job0", Device: "n1"}, JobOptions{})
			return err
		}},
		{"Commit: block-commit", nil},
		{"Commit: query-jobs", nil},
		{"Commit: job-dismiss", func() error {
			_, err := q.Commit(ctx, BlockCommit{JobID: "job0", Device: "n1"}, JobOptions{})
			return err
		}},
		{"Backup: blockdev-backup", nil},
		{"Backup: query-jobs", nil},
		{"Backup: job-dismiss", func() error {
			_, err := q.Backup(ctx, BlockdevBackup{JobID: "job0", Device: "n0", Target: "n1"}, JobOptions{})
			return err
		}},
		{"SaveSnapshot: snapshot-save", nil},
		{"SaveSnapshot: query-jobs", nil},
		{"SaveSnapshot: job-dismiss", func() error {
			_, err := q.SaveSnapshot(ctx, Snapshot{JobID: "job0", Tag: "s1", VMState: "n1", Devices: []string{"n1", "n2"}}, JobOptions{})
			return err
		}},
		{"LoadSnapshot: snapshot-load", nil},
		{"LoadSnapshot: query-jobs", nil},
		{"LoadSnapshot: job-dismiss", func() error {
			_, err := q.LoadSnapshot(ctx, Snapshot{JobID: "job0", Tag: "s1", VMState: "n1", Devices: []string{"n1"}}, JobOptions{})
			return err
		}},
		{"DeleteSnapshot: snapshot-delete", nil},
		{"DeleteSnapshot: query-jobs", nil},
		{"DeleteSnapshot: job-dismiss", func() error {
			_, err := q.DeleteSnapshot(ctx, Snapshot{JobID: "job0", Tag: "s1", VMState: "n1", Devices: []string{"n1"}}, JobOptions{})
			return err
		}},
		{"blockdev-snapshot", func() error { return q.ExecuteBlockdevSnapshot(ctx, "n0", "n1") }},
	}
	var names []string
	for _, c := range calls {
		// A call that writes several commands is listed with one name
		// for each; nil calls name the commands before the last one.
		if c.call != nil {
			c.call()
		}
		names = append(names, c.name)
	}
	return names
}

// TestTypedCommandsMatchSchema records every command the typed methods
// write, against a fake server speaking each version, and validates it
// against that version's recorded schema: the command exists, every member
// sent exists (through unions and alternates), every required member is
// there, and enum values are in their enum.
func TestTypedCommandsMatchSchema(t *testing.T) {
	file, err := os.Create(filepath.Join(t.TempDir(), "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	defer file.Close()
	for _, version := range schemaVersions {
		t.Run(version, func(t *testing.T) {
			schema := loadSchema(t, version)
			s := connect(t, version+".0", nil)
			done := s.p.serve(func(cmd string) []string {
				switch {
				case strings.Contains(cmd, `"system_powerdown"`):
					return []string{okReply, event("SHUTDOWN", `{"guest": true}`, 1, 0)}
				case strings.Contains(cmd, `"device_del"`):
					return []string{okReply, event("DEVICE_DELETED", `{"device": "disk0"}`, 1, 0)}
				case strings.Contains(cmd, `"add-fd"`):
					return []string{`{"return": {"fdset-id": 3, "fd": 5}}`}
				case strings.Contains(cmd, `"query-fdsets"`):
					return []string{`{"return": []}`}
				case strings.Contains(cmd, `"execute":"migrate"`):
					return []string{okReply, event("MIGRATION", `{"status": "completed"}`, 1, 0)}
				case strings.Contains(cmd, `"query-migrate"`):
					return []string{`{"return": {"status": "completed", "total-time": 600}}`}
				case strings.Contains(cmd, `"blockdev-mirror"`):
					return []string{okReply, event("JOB_STATUS_CHANGE", `{"id": "job0", "status": "ready"}`, 1, 0)}
				case strings.Contains(cmd, `"job-complete"`), strings.Contains(cmd, `"block-stream"`), strings.Contains(cmd, `"block-commit"`),
					strings.Contains(cmd, `"blockdev-backup"`), strings.Contains(cmd, `"snapshot-`):
					return []string{okReply, event("JOB_STATUS_CHANGE", `{"id": "job0", "status": "concluded"}`, 1, 0)}
				case strings.Contains(cmd, `"query-jobs"`):
					return []string{`{"return": [{"id": "job0", "type": "mirror", "status": "concluded", "current-progress": 1, "total-progress": 1}]}`}
				case strings.Contains(cmd, `"query-hotpluggable-cpus"`):
					return []string{`{"return": [{"type": "qemu64-x86_64-cpu", "vcpus-count": 1, "props": {"socket-id": 1, "core-id": 0, "thread-id": 0}}]}`}
				}
				return []string{okReply}
			})
			names := typedCommands(ctxTimeout(t, 10*time.Second), s.q, file)
			s.q.Shutdown()
			lines := <-done
			if len(lines) != len(names) {
				t.Fatalf("%d commands on the wire for %d calls: %q", len(lines), len(names), lines)
			}
			props := loadDevices(t, version)
			for i, line := range lines {
				if err := schema.checkCommand([]byte(line)); err != nil {
					t.Errorf("%s: %s: %v", names[i], line, err)
				}
				// device_add's members are the device's properties,
				// which the schema does not list.
				if err := props.checkDeviceAdd([]byte(line)); err != nil {
					t.Errorf("%s: %s: %v", names[i], line, err)
				}
			}
		})
	}
}

// The validator itself refuses what QEMU would refuse.
func TestSchemaCheckRefuses(t *testing.T) {
	for _, version := range schemaVersions {
		schema := loadSchema(t, version)
		for _, bad := range []string{
			`{"execute":"no-such-command"}`,
			`{"execute":"getfd"}`,
			`{"execute":"getfd","arguments":{"fdname":"x","extra":1}}`,
			`{"execute":"getfd","arguments":{"fdname":7}}`,
			`{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"n","file":{"driver":"file"}}}`,
			`{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"n","file":{"driver":"file","filename":"f","aio":"turbo"}}}`,
			`{"execute":"blockdev-add","arguments":{"driver":"nope","node-name":"n"}}`,
			`{"execute":"remove-fd","arguments":{"fdset-id":1.5}}`,
			`{"execute":"device_add","arguments":{"id":"d"}}`,
		} {
			if err := schema.checkCommand([]byte(bad)); err == nil {
				t.Errorf("%s: %s accepted", version, bad)
			}
		}
		for _, good := range []string{
			`{"execute":"blockdev-add","arguments":{"driver":"qcow2","node-name":"n","file":"proto0","backing":null}}`,
			`{"execute":"blockdev-add","arguments":{"driver":"raw","node-name":"n","file":{"driver":"file","filename":"f","aio":"threads"},"cache":{"direct":true}}}`,
			`{"execute":"device_add","arguments":{"driver":"virtio-net-pci","id":"nic0","netdev":"n0","mac":"52:54:00:00:00:01"}}`,
		} {
			if err := schema.checkCommand([]byte(good)); err != nil {
				t.Errorf("%s: %s refused: %v", version, good, err)
			}
		}
	}
}
