package qemu

import (
	"context"
	"encoding/json"
	"fmt"
	"slices"
)

// Typed machine and introspection commands: the run state (stop, cont,
// quit, the power button and reset), versions and names, QOM, and the
// human monitor. Their arguments and results are QEMU's (QAPI) names, as
// every typed command's are; each is checked against QEMU's recorded
// schemas in schema_test.go.

// ExecuteStop sends the stop command to the instance.
func (q *QMP) ExecuteStop(ctx context.Context) error {
	return q.run(ctx, "stop", "", nil, nil)
}

// ExecuteCont sends the cont command to the instance.
func (q *QMP) ExecuteCont(ctx context.Context) error {
	return q.run(ctx, "cont", "", nil, nil)
}

// ExecuteQuit sends the quit command to the instance, terminating the QMP
// instance immediately. It succeeds when QEMU replies, and also when QEMU
// closes the connection after the command was sent, since QEMU exiting is
// what was asked for. A quit that could not be written is an error.
func (q *QMP) ExecuteQuit(ctx context.Context) error {
	if err := q.execute(ctx, "quit", nil, nil); err != nil && !lostToPeer(err) {
		return fmt.Errorf("qmp: quit: %w", err)
	}
	return nil
}

// ExecuteSystemPowerdown sends the system_powerdown command to the instance.
// This function will block until both the reply and the SHUTDOWN event have
// been received, in either order; a SHUTDOWN followed by QEMU closing the
// connection counts as success.
func (q *QMP) ExecuteSystemPowerdown(ctx context.Context) error {
	_, err := q.runAndWait(ctx, "system_powerdown", "", nil, nil, EventFilter{Names: []string{"SHUTDOWN"}})
	return err
}

// StatusInfo is query-status's answer: whether the guest's CPUs run, and
// the run state ("running", "paused", "prelaunch", "shutdown", ...).
type StatusInfo struct {
	Running bool   `json:"running"`
	Status  string `json:"status"`
}

// ExecuteQueryStatus returns the VM's run state (query-status).
func (q *QMP) ExecuteQueryStatus(ctx context.Context) (StatusInfo, error) {
	return runFor[StatusInfo](ctx, q, "query-status", "", nil)
}

// VersionInfo is query-version's answer. Package is the distribution's
// build string, such as "Debian 1:7.2+dfsg-7+deb12u18".
type VersionInfo struct {
	QEMU struct {
		Major int `json:"major"`
		Minor int `json:"minor"`
		Micro int `json:"micro"`
	} `json:"qemu"`
	Package string `json:"package"`
}

// ExecuteQueryVersion returns QEMU's version (query-version).
func (q *QMP) ExecuteQueryVersion(ctx context.Context) (VersionInfo, error) {
	return runFor[VersionInfo](ctx, q, "query-version", "", nil)
}

// KVMInfo is query-kvm's answer: whether KVM is there and in use.
type KVMInfo struct {
	Enabled bool `json:"enabled"`
	Present bool `json:"present"`
}

// ExecuteQueryKVM says whether the VM runs under KVM: query-kvm, or from
// QEMU 10.2 on, where query-kvm is deprecated, query-accelerators (KVM is
// enabled when it is the accelerator in use, present when it is among
// those this QEMU can use).
func (q *QMP) ExecuteQueryKVM(ctx context.Context) (KVMInfo, error) {
	if !q.version.atLeast(10, 2) {
		return runFor[KVMInfo](ctx, q, "query-kvm", "", nil)
	}
	accels, err := runFor[struct {
		Enabled string   `json:"enabled"`
		Present []string `json:"present"`
	}](ctx, q, "query-accelerators", "", nil)
	return KVMInfo{Enabled: accels.Enabled == "kvm", Present: slices.Contains(accels.Present, "kvm")}, err
}

// ExecuteQueryName returns the VM's name (query-name), "" when it has none.
func (q *QMP) ExecuteQueryName(ctx context.Context) (string, error) {
	var info struct {
		Name string `json:"name"`
	}
	err := q.run(ctx, "query-name", "", nil, &info)
	return info.Name, err
}

// ExecuteQueryUUID returns the VM's UUID (query-uuid).
func (q *QMP) ExecuteQueryUUID(ctx context.Context) (string, error) {
	var info struct {
		UUID string `json:"UUID"`
	}
	err := q.run(ctx, "query-uuid", "", nil, &info)
	return info.UUID, err
}

// ExecuteSystemReset resets the VM, as the reset button would
// (system_reset).
func (q *QMP) ExecuteSystemReset(ctx context.Context) error {
	return q.run(ctx, "system_reset", "", nil, nil)
}

// ObjectProperty is one property of a QOM object, as qom-list lists it.
type ObjectProperty struct {
	Name        string `json:"name"`
	Type        string `json:"type"`
	Description string `json:"description,omitempty"`
}

// ExecuteQOMList lists the properties of the QOM object at path (qom-list),
// such as "/machine/peripheral/disk0".
func (q *QMP) ExecuteQOMList(ctx context.Context, path string) ([]ObjectProperty, error) {
	args := struct {
		Path string `json:"path"`
	}{path}
	return runFor[[]ObjectProperty](ctx, q, "qom-list", path, args)
}

// ExecuteQOMGet reads property of the QOM object at path into result, a
// pointer (qom-get).
func (q *QMP) ExecuteQOMGet(ctx context.Context, path, property string, result interface{}) error {
	args := struct {
		Path     string `json:"path"`
		Property string `json:"property"`
	}{path, property}
	return q.run(ctx, "qom-get", path+" "+property, args, result)
}

// ExecuteQOMSet sets property of the QOM object at path to value, which
// must encode to the JSON the property takes (qom-set).
func (q *QMP) ExecuteQOMSet(ctx context.Context, path, property string, value interface{}) error {
	v, err := json.Marshal(value)
	if err != nil {
		return commandError("qom-set", path+" "+property, err)
	}
	args := struct {
		Path     string          `json:"path"`
		Property string          `json:"property"`
		Value    json.RawMessage `json:"value"`
	}{path, property, v}
	return q.run(ctx, "qom-set", path+" "+property, args, nil)
}

// ExecuteHumanMonitorCommand runs a command of the human monitor (HMP)
// and returns its output (human-monitor-command), for what QMP lacks. HMP
// output is for people: its form changes between QEMU versions.
func (q *QMP) ExecuteHumanMonitorCommand(ctx context.Context, commandLine string) (string, error) {
	args := struct {
		CommandLine string `json:"command-line"`
	}{commandLine}
	return runFor[string](ctx, q, "human-monitor-command", "", args)
}

// ExecuteQueryCommands lists the names of the commands this QEMU accepts
// (query-commands).
func (q *QMP) ExecuteQueryCommands(ctx context.Context) ([]string, error) {
	var cmds []struct {
		Name string `json:"name"`
	}
	if err := q.run(ctx, "query-commands", "", nil, &cmds); err != nil {
		return nil, err
	}
	names := make([]string, len(cmds))
	for i, c := range cmds {
		names[i] = c.Name
	}
	return names, nil
}
