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
	"sort"
	"strings"
	"testing"
	"time"
)

// qemu-ga has no query-qmp-schema: its schema is recorded from the QAPI
// source that builds it, qga/qapi-schema.json of QEMU 7.2, 10.0 and 10.2
// (make schema fetches Debian's source tarballs; the mirror serves none of
// 11.1's), converted to the entities query-qmp-schema would list, so that
// the QMP checker validates the agent's commands too. The files are
// testdata/qapi/qemu-qga-VERSION.json.gz.

var (
	recordAgentSchema = flag.String("record-qga-schema", "", "TestRecordAgentSchema: the qga/qapi-schema.json to record")
	agentSchemaFor    = flag.String("qga-version", "", "TestRecordAgentSchema: the QEMU version (major.minor) of -record-qga-schema")
)

func agentSchemaVersion(v string) string { return "qga-" + v }

// agentSchemaVersions are the recorded guest agent schemas, by QEMU
// version.
var agentSchemaVersions = []string{"7.2", "10.0", "10.2"}

func TestRecordAgentSchema(t *testing.T) {
	if *recordAgentSchema == "" || *agentSchemaFor == "" {
		t.Skip("records the guest agent's schema only with -record-qga-schema and -qga-version (make schema)")
	}
	src, err := os.ReadFile(*recordAgentSchema)
	if err != nil {
		t.Fatal(err)
	}
	entities, err := qapiSourceEntities(src)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, e := range entities {
		b, err := json.Marshal(e)
		if err != nil {
			t.Fatal(err)
		}
		lines = append(lines, string(b))
	}
	sort.Strings(lines)
	path := schemaPath(agentSchemaVersion(*agentSchemaFor))
	writeGzip(t, path, []byte("[\n"+strings.Join(lines, ",\n")+"\n]\n"))
	t.Logf("wrote %s: %d entities", path, len(lines))
}

// qapiSourceEntities converts a QAPI schema source (JSON with single
// quotes and # comments, one expression after another) into introspection
// entities: the meta-types command, object, enum, alternate, array and
// builtin, with members and arg-type as query-qmp-schema names them.
// Conditions ('if') are ignored: every command of every build is kept.
func qapiSourceEntities(src []byte) ([]map[string]interface{}, error) {
	// QAPI strings have no escapes: a quote always opens or closes one.
	var js bytes.Buffer
	inString, comment := false, false
	for _, b := range src {
		switch {
		case comment:
			if b == '\n' {
				comment = false
				js.WriteByte(b)
			}
		case b == '\'':
			inString = !inString
			js.WriteByte('"')
		case b == '#' && !inString:
			comment = true
		default:
			js.WriteByte(b)
		}
	}
	c := &qapiConverter{types: map[string]map[string]interface{}{}}
	for _, b := range []string{"str", "int", "bool", "number", "any", "null"} {
		jt := map[string]string{"str": "string", "int": "int", "bool": "boolean", "number": "number", "any": "value", "null": "null"}[b]
		c.add(map[string]interface{}{"name": b, "meta-type": "builtin", "json-type": jt})
	}
	for _, b := range []string{"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "size"} {
		c.add(map[string]interface{}{"name": b, "meta-type": "builtin", "json-type": "int"})
	}
	dec := json.NewDecoder(&js)
	for {
		var expr map[string]json.RawMessage
		if err := dec.Decode(&expr); err == io.EOF {
			break
		} else if err != nil {
			return nil, err
		}
		if err := c.expression(expr); err != nil {
			return nil, err
		}
	}
	var all []map[string]interface{}
	for _, e := range c.types {
		all = append(all, e)
	}
	return all, nil
}

type qapiConverter struct {
	types map[string]map[string]interface{}
}

func (c *qapiConverter) add(e map[string]interface{}) { c.types[e["name"].(string)] = e }

func (c *qapiConverter) expression(expr map[string]json.RawMessage) error {
	var name string
	for _, kind := range []string{"command", "struct", "enum", "alternate", "union"} {
		if raw, ok := expr[kind]; ok {
			json.Unmarshal(raw, &name)
			switch kind {
			case "command":
				argType := "q_empty"
				if data, ok := expr["data"]; ok {
					var err error
					if argType, err = c.inline(name+"-arg", data); err != nil {
						return err
					}
				} else {
					c.add(map[string]interface{}{"name": "q_empty", "meta-type": "object", "members": []interface{}{}})
				}
				c.add(map[string]interface{}{"name": name, "meta-type": "command", "arg-type": argType})
			case "struct":
				members, err := c.members(expr["data"])
				if err != nil {
					return fmt.Errorf("%s: %w", name, err)
				}
				if base, ok := expr["base"]; ok {
					var b string
					json.Unmarshal(base, &b)
					be, ok := c.types[b]
					if !ok {
						return fmt.Errorf("%s: base %s is not defined before it", name, b)
					}
					members = append(append([]interface{}{}, be["members"].([]interface{})...), members...)
				}
				c.add(map[string]interface{}{"name": name, "meta-type": "object", "members": members})
			case "enum":
				var raw []json.RawMessage
				json.Unmarshal(expr["data"], &raw)
				var values []string
				for _, v := range raw {
					var s string
					if json.Unmarshal(v, &s) != nil {
						var o struct{ Name string }
						json.Unmarshal(v, &o)
						s = o.Name
					}
					values = append(values, s)
				}
				c.add(map[string]interface{}{"name": name, "meta-type": "enum", "values": values})
			case "alternate":
				members, err := c.members(expr["data"])
				if err != nil {
					return fmt.Errorf("%s: %w", name, err)
				}
				c.add(map[string]interface{}{"name": name, "meta-type": "alternate", "members": members})
			case "union":
				// Only in replies; recorded with its base members.
				members, err := c.members(expr["base"])
				if err != nil {
					members = nil
				}
				c.add(map[string]interface{}{"name": name, "meta-type": "object", "members": members})
			}
			return nil
		}
	}
	return nil // pragma, include
}

// inline returns the type of data: a type's name, or an object named
// q_obj_NAME made of its members.
func (c *qapiConverter) inline(name string, data json.RawMessage) (string, error) {
	var typeName string
	if json.Unmarshal(data, &typeName) == nil {
		return typeName, nil
	}
	members, err := c.members(data)
	if err != nil {
		return "", fmt.Errorf("%s: %w", name, err)
	}
	name = "q_obj_" + name
	c.add(map[string]interface{}{"name": name, "meta-type": "object", "members": members})
	return name, nil
}

// members converts a QAPI member dict: '*name' is optional, and a member's
// type is a name, [name] or {'type': ...}.
func (c *qapiConverter) members(data json.RawMessage) ([]interface{}, error) {
	var order []string
	var m map[string]json.RawMessage
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.Token()
	for dec.More() {
		k, _ := dec.Token()
		order = append(order, k.(string))
		var skip json.RawMessage
		dec.Decode(&skip)
	}
	members := []interface{}{}
	for _, k := range order {
		t, err := c.memberType(m[k])
		if err != nil {
			return nil, fmt.Errorf("member %s: %w", k, err)
		}
		member := map[string]interface{}{"name": strings.TrimPrefix(k, "*"), "type": t}
		if strings.HasPrefix(k, "*") {
			member["default"] = nil
		}
		members = append(members, member)
	}
	return members, nil
}

func (c *qapiConverter) memberType(raw json.RawMessage) (string, error) {
	var s string
	if json.Unmarshal(raw, &s) == nil {
		return s, nil
	}
	var arr []string
	if json.Unmarshal(raw, &arr) == nil && len(arr) == 1 {
		name := "[" + arr[0] + "]"
		c.add(map[string]interface{}{"name": name, "meta-type": "array", "element-type": arr[0]})
		return name, nil
	}
	var o struct{ Type json.RawMessage }
	if json.Unmarshal(raw, &o) == nil && o.Type != nil {
		return c.memberType(o.Type)
	}
	return "", fmt.Errorf("unexpected type %s", raw)
}

// agentCommandNames are the commands typedAgentCommands sends.
var agentCommandNames = []string{"guest-ping", "guest-info", "guest-get-osinfo", "guest-get-host-name",
	"guest-network-get-interfaces", "guest-get-time", "guest-set-time", "guest-exec", "guest-exec-status",
	"guest-file-open", "guest-file-read", "guest-file-write", "guest-file-seek", "guest-file-flush",
	"guest-file-close", "guest-fsfreeze-status", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list",
	"guest-fsfreeze-thaw", "guest-ssh-add-authorized-keys", "guest-ssh-remove-authorized-keys", "guest-shutdown"}

// typedAgentCommands calls every typed guest-agent command, in each form
// it can send.
func typedAgentCommands(ctx context.Context, a *GuestAgent) error {
	f, err := a.OpenFile(ctx, "/tmp/f", "w+")
	if err != nil {
		return err
	}
	calls := []func() error{
		func() error { return a.Ping(ctx) },
		func() error { _, err := a.OSInfo(ctx); return err },
		func() error { _, err := a.HostName(ctx); return err },
		func() error { _, err := a.NetworkInterfaces(ctx); return err },
		func() error { _, err := a.Time(ctx); return err },
		func() error { return a.SetTime(ctx, time.Now()) },
		func() error { return a.SetTime(ctx, time.Time{}) },
		func() error {
			_, err := a.Exec(ctx, GuestCommand{Path: "/bin/sh", Args: []string{"-c", "x"}, Env: []string{"A=b"}, Input: []byte("in")})
			return err
		},
		func() error { _, err := a.Exec(ctx, GuestCommand{Path: "true"}); return err },
		func() error { _, err := f.Write([]byte("data")); return err },
		func() error { _, err := f.Read(make([]byte, 3)); return err },
		func() error { _, err := f.Seek(1, io.SeekStart); return err },
		func() error { _, err := f.Seek(1, io.SeekCurrent); return err },
		func() error { _, err := f.Seek(-1, io.SeekEnd); return err },
		func() error { return f.Flush() },
		func() error { return f.Close() },
		func() error { _, err := a.FSFreezeStatus(ctx); return err },
		func() error { _, err := a.FSFreeze(ctx); return err },
		func() error { _, err := a.FSFreeze(ctx, "/mnt", "/srv"); return err },
		func() error { _, err := a.FSThaw(ctx); return err },
		func() error { return a.AddAuthorizedKeys(ctx, "root", []string{"ssh-ed25519 AAAA x"}, false) },
		func() error { return a.AddAuthorizedKeys(ctx, "root", []string{"ssh-ed25519 AAAA x"}, true) },
		func() error { return a.RemoveAuthorizedKeys(ctx, "root", []string{"ssh-ed25519 AAAA x"}) },
	}
	for i, call := range calls {
		if err := call(); err != nil {
			return fmt.Errorf("call %d: %w", i, err)
		}
	}
	for _, mode := range []string{"", "halt", "reboot"} {
		if err := a.Shutdown(ctx, mode); err == nil || !strings.Contains(err.Error(), "ends the call") {
			return fmt.Errorf("shutdown %q: %v", mode, err)
		}
	}
	return nil
}

// Every line the typed agent commands send is valid for qemu-ga 7.2 and
// 10.0, as their schemas say.
func TestAgentCommandsMatchSchema(t *testing.T) {
	for _, version := range agentSchemaVersions {
		t.Run(version, func(t *testing.T) {
			schema := loadSchema(t, agentSchemaVersion(version))
			a, p := agentPeer(t)
			done := p.serve(func(cmd string) []string { return []string{fakeAgentAnswer(cmd)} })
			if err := typedAgentCommands(ctxTimeout(t, 10*time.Second), a); err != nil {
				t.Fatal(err)
			}
			a.Close()
			sent := map[string]bool{}
			for _, line := range <-done {
				line = strings.TrimPrefix(line, "\xff")
				var c struct{ Execute string }
				json.Unmarshal([]byte(line), &c)
				sent[c.Execute] = true
				if err := schema.checkCommand([]byte(line)); err != nil {
					t.Errorf("%s: %v", line, err)
				}
			}
			for _, name := range agentCommandNames {
				if !sent[name] {
					t.Errorf("%s was never sent", name)
				}
			}
		})
	}
}

// The converted schema refuses what qemu-ga would refuse.
func TestAgentSchemaCheckRefuses(t *testing.T) {
	for _, version := range agentSchemaVersions {
		schema := loadSchema(t, agentSchemaVersion(version))
		for _, bad := range []string{
			`{"execute":"guest-no-such"}`,
			`{"execute":"guest-exec"}`,
			`{"execute":"guest-exec","arguments":{"path":"x","args":["a"]}}`,
			`{"execute":"guest-file-seek","arguments":{"handle":1,"offset":0,"whence":"middle"}}`,
			`{"execute":"guest-set-time","arguments":{"time":"now"}}`,
		} {
			if err := schema.checkCommand([]byte(bad)); err == nil {
				t.Errorf("%s: %s accepted", version, bad)
			}
		}
	}
}

// The converter reads what qga/qapi-schema.json uses: comments (and a '#'
// inside a string), optional members, arrays, a struct base, enums of
// strings and of objects, alternates, and commands with inline or named
// arguments.
func TestQAPISourceConversion(t *testing.T) {
	src := []byte(`# a comment, with 'quotes'
{ 'enum': 'Mode', 'data': [ 'a', { 'name': 'b', 'if': 'CONFIG_X' } ] }
{ 'struct': 'Base', 'data': { 'id': 'int' } }
{ 'struct': 'One', 'base': 'Base', 'data': { '*tag': 'str' } }
{ 'struct': 'Two', 'base': 'Base', 'data': { 'list': ['Mode'] } } # trailing
{ 'alternate': 'Either', 'data': { 'n': 'int', 'm': 'Mode' } }
{ 'command': 'cmd-inline', 'data': { 'text': 'str', '*e': { 'type': 'Either' } } }
{ 'command': 'cmd-named', 'data': 'One' }
{ 'command': 'cmd-none', 'returns': 'int' }
{ 'command': 'cmd-hash', 'data': { 'x': 'str' }, 'if': 'CONFIG_#X' }
`)
	entities, err := qapiSourceEntities(src)
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	b.WriteString("[")
	for i, e := range entities {
		if i > 0 {
			b.WriteString(",")
		}
		j, _ := json.Marshal(e)
		b.Write(j)
	}
	b.WriteString("]")
	dir := t.TempDir()
	path := filepath.Join(dir, "s.json.gz")
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(b.Bytes())
	zw.Close()
	os.WriteFile(path, gz.Bytes(), 0o644)
	schema := loadSchemaFile(t, path)
	for _, good := range []string{
		`{"execute":"cmd-inline","arguments":{"text":"t"}}`,
		`{"execute":"cmd-inline","arguments":{"text":"t","e":3}}`,
		`{"execute":"cmd-inline","arguments":{"text":"t","e":"b"}}`,
		`{"execute":"cmd-named","arguments":{"id":1,"tag":"x"}}`,
		`{"execute":"cmd-none"}`,
		`{"execute":"cmd-hash","arguments":{"x":"y"}}`,
	} {
		if err := schema.checkCommand([]byte(good)); err != nil {
			t.Errorf("%s: %v", good, err)
		}
	}
	for _, bad := range []string{
		`{"execute":"cmd-inline"}`,
		`{"execute":"cmd-inline","arguments":{"text":"t","e":"c"}}`,
		`{"execute":"cmd-named","arguments":{"tag":"x"}}`,
		`{"execute":"cmd-named","arguments":{"id":1,"list":[]}}`,
		`{"execute":"cmd-none","arguments":{"x":1}}`,
	} {
		if err := schema.checkCommand([]byte(bad)); err == nil {
			t.Errorf("%s accepted", bad)
		}
	}
	if _, err := qapiSourceEntities([]byte(`{ 'struct': 'Late', 'base': 'Later', 'data': {} }`)); err == nil {
		t.Error("a base defined after its use was accepted")
	}
}
