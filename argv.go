package qemu

import (
	"os"
	"strconv"
	"strings"
)

// Rendering a Config as QEMU's command line: one helper joins key=value
// pairs and doubles commas, QEMU's own escape, so that no field can add an
// option to a list; the parts of a Config without a Valid method of their
// own; and the renderer, which puts the parts in the documented order.

// options renders one of QEMU's comma-separated option lists, such as
// "virtio-blk,drive=hd0,config-wce=off". first is the leading value (a
// driver, backend or size; "" for none) and kv holds key, value pairs; a
// pair whose value is empty is left out. Every value has its commas
// doubled, QEMU's own escape, so that no field can add an option.
func options(first string, kv ...string) string {
	n := len(first)
	for i := 0; i+1 < len(kv); i += 2 {
		n += len(kv[i]) + len(kv[i+1]) + 2
	}
	var b strings.Builder
	b.Grow(n)
	writeEscaped(&b, first)
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == "" {
			continue
		}
		if b.Len() > 0 {
			b.WriteByte(',')
		}
		b.WriteString(kv[i])
		b.WriteByte('=')
		writeEscaped(&b, kv[i+1])
	}
	return b.String()
}

func writeEscaped(b *strings.Builder, value string) {
	for {
		i := strings.IndexByte(value, ',')
		if i < 0 {
			b.WriteString(value)
			return
		}
		b.WriteString(value[:i+1])
		b.WriteByte(',')
		value = value[i+1:]
	}
}

// when returns value if cond holds, and "" (which options leaves out)
// otherwise.
func when(cond bool, value string) string {
	if cond {
		return value
	}
	return ""
}

// count returns n in decimal, or "" (which options leaves out) for 0.
func count(n uint32) string {
	if n == 0 {
		return ""
	}
	return strconv.FormatUint(uint64(n), 10)
}

// plainPart is a part of the command line made from Config fields that
// have no Valid method of their own.
type plainPart struct {
	name   string   // the Config field, for errors and warnings
	fields []string // the values it renders, which must be clean
	argv   []string // nil when the part is not set
}

func namePart(c *Config) plainPart {
	if c.Name == "" {
		return plainPart{}
	}
	return plainPart{"Name", []string{c.Name}, []string{"-name", options(c.Name)}}
}

// uuidPart passes the UUID verbatim: QEMU parses it as a whole, with no
// option syntax.
func uuidPart(c *Config) plainPart {
	if c.UUID == "" {
		return plainPart{}
	}
	return plainPart{"UUID", []string{c.UUID}, []string{"-uuid", c.UUID}}
}

// machinePart escapes the type but not Acceleration, which is documented
// as an option list of its own.
func machinePart(c *Config) plainPart {
	m := c.Machine
	if m.Type == "" {
		return plainPart{}
	}
	arg := options(m.Type)
	if m.Acceleration != "" {
		arg += ",accel=" + m.Acceleration
	}
	return plainPart{"Machine", []string{m.Type, m.Acceleration}, []string{"-machine", arg}}
}

func cpuPart(c *Config) plainPart {
	if c.CPUModel == "" {
		return plainPart{}
	}
	return plainPart{"CPUModel", []string{c.CPUModel}, []string{"-cpu", c.CPUModel}}
}

func memoryPart(c *Config) plainPart {
	m := c.Memory
	if m.Size == "" {
		return plainPart{}
	}
	return plainPart{"Memory", []string{m.Size, m.MaxMem}, []string{"-m",
		options(m.Size, "slots", count(uint32(m.Slots)), "maxmem", m.MaxMem)}}
}

func smpPart(c *Config) plainPart {
	s := c.SMP
	if s.CPUs == 0 {
		return plainPart{}
	}
	return plainPart{"SMP", nil, []string{"-smp", options(count(s.CPUs),
		"cores", count(s.Cores), "threads", count(s.Threads), "sockets", count(s.Sockets),
		"maxcpus", count(s.MaxCPUs))}}
}

func globalPart(c *Config) plainPart {
	if c.GlobalParam == "" {
		return plainPart{}
	}
	return plainPart{"GlobalParam", []string{c.GlobalParam}, []string{"-global", c.GlobalParam}}
}

func vgaPart(c *Config) plainPart {
	if c.VGA == "" {
		return plainPart{}
	}
	return plainPart{"VGA", []string{c.VGA}, []string{"-vga", c.VGA}}
}

func knobsPart(c *Config) plainPart {
	var argv []string
	if c.Knobs.NoUserConfig {
		argv = append(argv, "-no-user-config")
	}
	if c.Knobs.NoDefaults {
		argv = append(argv, "-nodefaults")
	}
	if c.Knobs.NoGraphic {
		argv = append(argv, "-nographic")
	}
	if c.Knobs.Daemonize {
		argv = append(argv, "-daemonize")
	}
	if c.Knobs.Paused {
		argv = append(argv, "-S")
	}
	return plainPart{"Knobs", nil, argv}
}

// kernelPart passes the paths and the command line verbatim: QEMU reads
// -kernel, -initrd and -append as they are, so a doubled comma would
// break them.
func kernelPart(c *Config) plainPart {
	k := c.Kernel
	if k.Path == "" {
		return plainPart{}
	}
	argv := []string{"-kernel", k.Path}
	if k.InitrdPath != "" {
		argv = append(argv, "-initrd", k.InitrdPath)
	}
	if k.Params != "" {
		argv = append(argv, "-append", k.Params)
	}
	return plainPart{"Kernel", []string{k.Path, k.InitrdPath, k.Params}, argv}
}

// incomingPart passes the value verbatim: QEMU parses a URI, not an
// option list.
func incomingPart(c *Config) plainPart {
	if c.Incoming == "" {
		return plainPart{}
	}
	return plainPart{"Incoming", []string{c.Incoming}, []string{"-incoming", c.Incoming}}
}

// firmwarePart passes each directory verbatim: -L takes a path.
func firmwarePart(c *Config) plainPart {
	if len(c.FirmwareDirs) == 0 {
		return plainPart{}
	}
	var argv []string
	for _, dir := range c.FirmwareDirs {
		argv = append(argv, "-L", dir)
	}
	return plainPart{"FirmwareDirs", c.FirmwareDirs, argv}
}

func extraPart(c *Config) plainPart {
	if len(c.ExtraParams) == 0 {
		return plainPart{}
	}
	return plainPart{"ExtraParams", c.ExtraParams, append([]string(nil), c.ExtraParams...)}
}

// plainParts lists every plainPart, for checkConfig.
var plainParts = []func(*Config) plainPart{
	namePart, uuidPart, machinePart, cpuPart, memoryPart, smpPart,
	globalPart, vgaPart, knobsPart, kernelPart, incomingPart, firmwarePart, extraPart,
}

// renderer accumulates the argv of one Config.
type renderer struct {
	config *Config
	log    QMPLog
	params []string
}

func (r *renderer) plain(p plainPart) {
	if p.argv == nil {
		return
	}
	if !clean(p.fields...) {
		r.log.Warningf("qemu: config %s left out: it contains a newline or NUL", p.name)
		return
	}
	r.params = append(r.params, p.argv...)
}

func (r *renderer) qmpSockets() {
	for i, s := range r.config.QMPSockets {
		if !s.Valid() {
			r.log.Warningf("qemu: QMPSockets[%d] left out: not valid", i)
			continue
		}
		r.params = append(r.params, s.params()...)
	}
}

func (r *renderer) devices() {
	for i, d := range r.config.Devices {
		if d == nil || !d.Valid() {
			r.log.Warningf("qemu: Devices[%d] (%T) left out: not valid", i, d)
			continue
		}
		r.params = append(r.params, d.QemuParams(r.config)...)
	}
}

func (r *renderer) rtc() {
	rtc := r.config.RTC
	if rtc == (RTC{}) {
		return
	}
	if !rtc.Valid() {
		r.log.Warningf("qemu: RTC left out: not valid")
		return
	}
	r.params = append(r.params, "-rtc", options("", "base", string(rtc.Base),
		"driftfix", string(rtc.DriftFix), "clock", string(rtc.Clock)))
}

// renderConfig returns the command line of config in the documented order
// and the files its devices registered, fds[i] being QEMU's descriptor
// 3+i. Devices, QMP sockets and an RTC that are not Valid, and plain parts
// holding a newline or NUL, are left out with a warning to logger (which
// may be nil). config is a copy, and renderConfig writes into none of the
// slices it shares with the caller's Config, so rendering the same Config
// twice gives the same result.
func renderConfig(config Config, logger QMPLog) (params []string, fds []*os.File) {
	// Number the files from 3 whatever QemuParams calls the caller made
	// on its own Config, and never append into the caller's array.
	config.fds = nil
	r := renderer{config: &config, log: orNullLogger(logger),
		params: make([]string, 0, 24+2*len(config.QMPSockets)+4*len(config.Devices))}
	r.plain(namePart(&config))
	r.plain(uuidPart(&config))
	r.plain(machinePart(&config))
	r.plain(cpuPart(&config))
	r.qmpSockets()
	r.plain(memoryPart(&config))
	r.plain(smpPart(&config))
	r.devices()
	r.rtc()
	r.plain(globalPart(&config))
	r.plain(vgaPart(&config))
	r.plain(knobsPart(&config))
	if k := config.Kernel; k.Path == "" && (k.InitrdPath != "" || k.Params != "") {
		r.log.Warningf("qemu: Kernel.InitrdPath and Kernel.Params left out: Kernel.Path is empty")
	}
	r.plain(kernelPart(&config))
	r.plain(incomingPart(&config))
	r.plain(firmwarePart(&config))
	r.plain(extraPart(&config))
	if len(r.params) == 0 {
		return nil, config.fds
	}
	return r.params, config.fds
}

// appendFDs registers files for QEMU to inherit and returns the
// descriptor numbers QEMU will see them as, joined with ':'. os/exec gives
// ExtraFiles[i] the number 3+i, after stdin, stdout and stderr.
func (config *Config) appendFDs(files []*os.File) string {
	nums := make([]string, len(files))
	for i := range files {
		nums[i] = strconv.Itoa(3 + len(config.fds) + i)
	}
	config.fds = append(config.fds, files...)
	return strings.Join(nums, ":")
}

// shellQuote quotes s for a POSIX shell, leaving words that need no
// quoting as they are.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
