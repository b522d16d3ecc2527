package qemu

import (
	"compress/gzip"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
)

// The properties of every device and object type the package renders or
// hot-plugs, as each QEMU's device-list-properties and qom-list-properties
// report them, are recorded in testdata/qapi by `make schema`
// (TestRecordSchema, which records the QAPI schema too). device_add is "open" in the
// QAPI schema (its members are the device's properties), and a command
// line is no QMP command at all, so the schema checks neither: every
// property the package sends is checked here, by name and type, against
// every recorded QEMU.

// recordedDevices and recordedObjects are the types recorded: those the
// package renders, hot-plugs or checks (the seed's devices and those added
// since, what an Instance adds for its console and agent, the devices the
// tests plug).
var (
	recordedDevices = []string{
		"virtio-blk-pci", "virtio-net-pci", "virtio-serial-pci", "virtconsole", "virtserialport",
		"virtio-9p-pci", "nvdimm", "pc-dimm", "pcie-root-port", "ide-cd", "ide-hd", "scsi-cd", "scsi-hd",
		"virtio-scsi-pci", "virtio-balloon-pci", "virtio-rng-pci", "e1000", "qemu64-x86_64-cpu",
	}
	recordedObjects = []string{"memory-backend-file", "memory-backend-ram", "tls-creds-x509"}
)

// deviceAliases are the names QEMU takes for a device model on x86 that
// are not type names (qdev's alias table): device-list-properties knows
// only the types.
var deviceAliases = map[string]string{
	"virtio-blk": "virtio-blk-pci", "virtio-net": "virtio-net-pci", "virtio-serial": "virtio-serial-pci",
	"virtio-9p": "virtio-9p-pci", "virtio-balloon": "virtio-balloon-pci", "virtio-rng": "virtio-rng-pci",
	"virtio-scsi": "virtio-scsi-pci",
}

// typeProperties are the recorded properties of one QEMU: property names
// to types (str, bool, uint32, link<...>, and so on), by device and
// object type.
type typeProperties struct {
	Devices map[string]map[string]string `json:"devices"`
	Objects map[string]map[string]string `json:"objects"`
}

func devicesPath(version string) string {
	return filepath.Join("testdata", "qapi", "devices-"+version+".json.gz")
}

// recordDevices writes the properties of the recorded types of the QEMU
// q runs, for TestRecordSchema.
func recordDevices(t *testing.T, q *QMP, version string) {
	ctx := ctxTimeout(t, 30*time.Second)
	props := typeProperties{Devices: map[string]map[string]string{}, Objects: map[string]map[string]string{}}
	list := func(command, typename string) map[string]string {
		var got []struct {
			Name string `json:"name"`
			Type string `json:"type"`
		}
		args := map[string]string{"typename": typename}
		if err := q.ExecuteCommand(ctx, command, args, &got); err != nil {
			t.Fatalf("%s %s: %v", command, typename, err)
		}
		m := make(map[string]string, len(got))
		for _, p := range got {
			m[p.Name] = p.Type
		}
		return m
	}
	for _, d := range recordedDevices {
		props.Devices[d] = list("device-list-properties", d)
	}
	for _, o := range recordedObjects {
		props.Objects[o] = list("qom-list-properties", o)
	}
	b, err := json.MarshalIndent(props, "", "\t")
	if err != nil {
		t.Fatal(err)
	}
	writeGzip(t, devicesPath(version), append(b, '\n'))
	t.Logf("wrote %s: %d devices, %d objects", devicesPath(version), len(props.Devices), len(props.Objects))
}

// loadDevices reads the properties recorded for version.
func loadDevices(t *testing.T, version string) typeProperties {
	t.Helper()
	f, err := os.Open(devicesPath(version))
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
	var props typeProperties
	if err := json.Unmarshal(b, &props); err != nil {
		t.Fatal(err)
	}
	return props
}

// genericProperties are what QEMU takes for every device without listing
// them as properties: its id and the bus it plugs into.
var genericProperties = map[string]bool{"id": true, "bus": true}

// stringToo are the properties QEMU lists with one type that also take a
// string: a PCI device's addr is an int32 (devfn) or "slot.function".
var stringToo = map[string]bool{"addr": true}

// checkOption checks one key=value of a command line against a property
// of type typ.
func checkOption(typ, value string) error {
	switch {
	case typ == "bool":
		if !slices.Contains([]string{"on", "off", "true", "false", "yes", "no"}, value) {
			return fmt.Errorf("%q is not a bool", value)
		}
	case strings.HasPrefix(typ, "int") || strings.HasPrefix(typ, "uint"):
		bits, _ := strconv.Atoi(strings.TrimLeft(typ, "uint"))
		if bits == 0 {
			bits = 64
		}
		var err error
		if strings.HasPrefix(typ, "u") {
			_, err = strconv.ParseUint(value, 0, bits)
		} else {
			_, err = strconv.ParseInt(value, 0, bits)
		}
		if err != nil {
			return fmt.Errorf("%q is not a %s", value, typ)
		}
	case typ == "size":
		if _, err := strconv.ParseUint(strings.TrimRight(value, "KMGTkmgt"), 10, 64); err != nil {
			return fmt.Errorf("%q is not a size", value)
		}
	}
	return nil
}

// checkJSONProperty checks one property of a device_add against type typ.
func checkJSONProperty(typ string, value json.RawMessage) error {
	var v interface{}
	if err := json.Unmarshal(value, &v); err != nil {
		return err
	}
	ok := true
	switch {
	case typ == "bool":
		_, ok = v.(bool)
	case strings.HasPrefix(typ, "int") || strings.HasPrefix(typ, "uint") || typ == "size":
		f, isNum := v.(float64)
		ok = isNum && f == float64(int64(f)) && (f >= 0 || !strings.HasPrefix(typ, "u") && typ != "size")
	case typ == "str" || typ == "string" || strings.HasPrefix(typ, "link<") || strings.HasPrefix(typ, "child<"):
		_, ok = v.(string)
	}
	if !ok {
		return fmt.Errorf("%s is not a %s", value, typ)
	}
	return nil
}

// splitOptions splits a QEMU option list into its first value and its
// key=value pairs, undoing the doubling of commas.
func splitOptions(list string) (first string, kv [][2]string) {
	var parts []string
	var cur strings.Builder
	for i := 0; i < len(list); i++ {
		if list[i] == ',' {
			if i+1 < len(list) && list[i+1] == ',' {
				cur.WriteByte(',')
				i++
				continue
			}
			parts = append(parts, cur.String())
			cur.Reset()
			continue
		}
		cur.WriteByte(list[i])
	}
	parts = append(parts, cur.String())
	for i, p := range parts {
		k, v, ok := strings.Cut(p, "=")
		if i == 0 && !ok {
			first = p
			continue
		}
		kv = append(kv, [2]string{k, v})
	}
	return first, kv
}

// checkArgv checks the -device and -object arguments of argv against the
// properties of one QEMU.
func (props typeProperties) checkArgv(argv []string) []string {
	var problems []string
	for i := 0; i+1 < len(argv); i++ {
		var known map[string]map[string]string
		switch argv[i] {
		case "-device":
			known = props.Devices
		case "-object":
			known = props.Objects
		default:
			continue
		}
		typ, kv := splitOptions(argv[i+1])
		if a, ok := deviceAliases[typ]; ok && argv[i] == "-device" {
			typ = a
		}
		have, ok := known[typ]
		if !ok {
			problems = append(problems, fmt.Sprintf("%s %s: type not recorded", argv[i], typ))
			continue
		}
		for _, p := range kv {
			if genericProperties[p[0]] {
				continue
			}
			pt, ok := have[p[0]]
			if !ok {
				problems = append(problems, fmt.Sprintf("%s %s: no property %s", argv[i], typ, p[0]))
				continue
			}
			if stringToo[p[0]] {
				continue // on the command line, every value is a string
			}
			if err := checkOption(pt, p[1]); err != nil {
				problems = append(problems, fmt.Sprintf("%s %s: property %s: %v", argv[i], typ, p[0], err))
			}
		}
	}
	return problems
}

// checkDeviceAdd checks a device_add command line as the package writes
// it against the properties of one QEMU.
func (props typeProperties) checkDeviceAdd(line []byte) error {
	var cmd struct {
		Execute   string                     `json:"execute"`
		Arguments map[string]json.RawMessage `json:"arguments"`
	}
	if err := json.Unmarshal(line, &cmd); err != nil || cmd.Execute != "device_add" {
		return err
	}
	var driver string
	json.Unmarshal(cmd.Arguments["driver"], &driver)
	if a, ok := deviceAliases[driver]; ok {
		driver = a
	}
	have, ok := props.Devices[driver]
	if !ok {
		return fmt.Errorf("device_add %s: type not recorded", driver)
	}
	var names []string
	for name := range cmd.Arguments {
		names = append(names, name)
	}
	sort.Strings(names)
	for _, name := range names {
		if name == "driver" || genericProperties[name] {
			continue
		}
		typ, ok := have[name]
		if !ok {
			return fmt.Errorf("device_add %s: no property %s", driver, name)
		}
		if stringToo[name] && cmd.Arguments[name][0] == '"' {
			continue
		}
		if err := checkJSONProperty(typ, cmd.Arguments[name]); err != nil {
			return fmt.Errorf("device_add %s: property %s: %w", driver, name, err)
		}
	}
	return nil
}

// renderedDevices renders every Device the package has, each with every
// field it renders set, and what an Instance adds for its console and
// guest agent.
func renderedDevices(t *testing.T) []string {
	files := openFiles(t, 2)
	config := &Config{}
	devices := []Device{
		Object{Driver: NVDIMM, Type: MemoryBackendFile, ID: "mem0", DeviceID: "nv0", MemPath: "/dev/shm/x", Size: 1 << 20},
		FSDevice{Driver: Virtio9P, FSDriver: Local, ID: "fs0", Path: "/srv", MountTag: "tag", SecurityModel: None},
		CharDevice{Backend: Socket, Driver: VirtioSerialPort, Bus: "vser0.0", DeviceID: "port0", ID: "char0", Path: "/tmp/c", Name: "org.test"},
		CharDevice{Backend: Socket, Driver: Console, Bus: "vser0.0", DeviceID: "con0", ID: "char1", Path: "/tmp/d"},
		NetDevice{Type: TAP, Driver: VirtioNet, ID: "net0", IFName: "tap0", MACAddress: "52:54:00:12:34:56", Script: "no", DownScript: "no"},
		NetDevice{Type: MACVTAP, Driver: VirtioNet, ID: "net1", IFName: "mvt0", FDs: files},
		SerialDevice{Driver: VirtioSerial, ID: "vser0"},
		BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/x.img", Format: QCOW2, AIO: Threads, Interface: NoInterface},
		GenericDevice{Driver: "virtio-rng-pci", ID: "rng0", Bus: "pcie.0", Addr: "0x5", Properties: []DeviceProperty{{"max-bytes", "1024"}, {"period", "1000"}}},
		PCIeRootPort{ID: "rp1", Chassis: 1, Slot: 2},
		UserNetwork{ID: "n0", DeviceID: "nic0", Bus: "rp1", MACAddress: "52:54:00:12:34:57"},
		Disk{ID: "d0", File: "/d.img", ReadOnly: true, Serial: "s0", Bus: "rp1"},
		Disk{ID: "cd0", File: "/cd.iso", Interface: DiskIDE, CDROM: true, Bus: "ide.1"},
		Disk{ID: "hd1", File: "/hd.img", Interface: DiskIDE},
		Disk{ID: "sd0", File: "/sd.img", Interface: DiskSCSI, Serial: "s1"},
		Disk{ID: "sc0", File: "/sc.iso", Interface: DiskSCSI, CDROM: true},
	}
	var argv []string
	for _, d := range devices {
		argv = append(argv, d.QemuParams(config)...)
	}
	for _, port := range []ConsolePort{ConsoleSerial, ConsoleVirtio} {
		params, err := consoleParams(port, 4)
		if err != nil {
			t.Fatal(err)
		}
		argv = append(argv, params...)
	}
	return append(argv, agentParams(5)...)
}

// Every -device and -object property the package renders exists, with a
// value of its type, in every recorded QEMU.
func TestRenderedPropertiesMatchQEMU(t *testing.T) {
	argv := renderedDevices(t)
	for _, version := range schemaVersions {
		t.Run(version, func(t *testing.T) {
			for _, p := range loadDevices(t, version).checkArgv(argv) {
				t.Errorf("QEMU %s: %s", version, p)
			}
		})
	}
}

// The one property the package renders only for some versions, scsi on
// virtio-blk (BlockDevice.SCSI), is there in 7.2 and gone from 10.0 and
// 11.1, as StartInstance's refusal says; no other property differs.
func TestVersionedPropertiesAsStartInstanceSays(t *testing.T) {
	argv := BlockDevice{Driver: VirtioBlock, ID: "hd0", File: "/x.img", SCSI: true}.QemuParams(nil)
	for _, version := range schemaVersions {
		problems := loadDevices(t, version).checkArgv(argv)
		var v QMPVersion
		fmt.Sscanf(version, "%d.%d", &v.Major, &v.Minor)
		want := []string(nil)
		if v.atLeast(9, 1) {
			want = []string{"-device virtio-blk-pci: no property scsi"}
		}
		if !slices.Equal(problems, want) {
			t.Errorf("QEMU %s: %q, want %q", version, problems, want)
		}
	}
}

// The property check refuses what QEMU would: a property the device does
// not have, a value that is not of its type, an unknown device; and a
// device_add with a boolean sent as a string, or a number as a string.
func TestPropertyCheckRefuses(t *testing.T) {
	props := loadDevices(t, schemaVersions[0])
	for _, argv := range [][]string{
		{"-device", "virtio-blk-pci,drive=hd0,no-such-property=1"},
		{"-device", "virtio-blk-pci,drive=hd0,config-wce=maybe"},
		{"-device", "pcie-root-port,id=rp1,chassis=x"},
		{"-device", "no-such-device,id=x"},
		{"-object", "memory-backend-ram,id=m,size=lots"},
	} {
		if p := props.checkArgv(argv); len(p) == 0 {
			t.Errorf("%q passed the check", argv)
		}
	}
	for _, line := range []string{
		`{"execute":"device_add","arguments":{"driver":"virtio-blk-pci","id":"d","drive":"n","config-wce":"on"}}`,
		`{"execute":"device_add","arguments":{"driver":"qemu64-x86_64-cpu","id":"c","core-id":"1"}}`,
		`{"execute":"device_add","arguments":{"driver":"virtio-net-pci","id":"n","no-such-property":1}}`,
	} {
		if err := props.checkDeviceAdd([]byte(line)); err == nil {
			t.Errorf("%s passed the check", line)
		}
	}
	if err := props.checkDeviceAdd([]byte(`{"execute":"device_add","arguments":{"driver":"qemu64-x86_64-cpu","id":"c","core-id":1,"socket-id":0}}`)); err != nil {
		t.Errorf("a vCPU's device_add: %v", err)
	}
}
