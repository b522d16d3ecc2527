package qemu

import (
	"bufio"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"regexp"
	"strings"
	"testing"
	"time"
)

// The fake guest agent: a scripted peer that speaks qemu-ga's framing
// (guest-sync-delimited answered after a 0xFF), and an answerer that
// replies to every command in the shape qemu-ga does.

// agentPeer connects a GuestAgent to a fake agent on a real unix socket.
func agentPeer(t *testing.T) (*GuestAgent, *peer) {
	t.Helper()
	return agentPeerWith(t, GuestAgentConfig{})
}

// agentPeerWith is agentPeer with a configuration.
func agentPeerWith(t *testing.T, cfg GuestAgentConfig) (*GuestAgent, *peer) {
	t.Helper()
	s := newFakeServer(t)
	peers := make(chan *peer, 1)
	go func() { peers <- s.accept() }()
	a, err := OpenGuestAgent(ctxTimeout(t, 5*time.Second), s.path, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { a.Close() })
	p := <-peers
	if p == nil {
		t.FailNow()
	}
	// A test whose client never sends what it waits for fails, not hangs.
	p.conn.SetReadDeadline(time.Now().Add(30 * time.Second))
	return a, p
}

var syncCommand = regexp.MustCompile(`^\{"execute":"guest-sync-delimited","arguments":\{"id":([0-9]+)\}\}$`)

// syncLine returns the id of a guest-sync-delimited line preceded by 0xFF,
// or "".
func syncLine(line string) string {
	rest, ok := strings.CutPrefix(line, "\xff")
	if m := syncCommand.FindStringSubmatch(rest); ok && m != nil {
		return m[1]
	}
	return ""
}

// answerAgent is a fake agent on c: it answers a guest-sync-delimited with its id after 0xFF, and
// anything else with an empty return.
func answerAgent(c io.ReadWriter) {
	r := bufio.NewReader(c)
	for {
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		reply := `{"return": {}}` + "\n"
		if id := syncLine(strings.TrimSuffix(line, "\n")); id != "" {
			reply = "\xff{\"return\": " + id + "}\n"
		}
		if _, err := io.WriteString(c, reply); err != nil {
			return
		}
	}
}

// syncID returns the id of a guest-sync-delimited line, or fails the test
// (from any goroutine: it panics there, which ends the test binary).
func syncID(t *testing.T, line string) string {
	id := syncLine(line)
	if id == "" {
		panic(fmt.Sprintf("got %q, want a guest-sync-delimited preceded by 0xFF", line))
	}
	return id
}

// fakeAgentAnswer answers a command the way qemu-ga would, in shape.
func fakeAgentAnswer(cmd string) string {
	if id := syncLine(cmd); id != "" {
		return "\xff{\"return\": " + id + "}"
	}
	var c struct {
		Execute   string
		Arguments struct {
			Buf []byte `json:"buf-b64"`
		}
	}
	json.Unmarshal([]byte(cmd), &c)
	switch c.Execute {
	case "guest-info":
		var list []string
		for _, name := range agentCommandNames {
			list = append(list, fmt.Sprintf(`{"name": %q, "enabled": true, "success-response": true}`, name))
		}
		return `{"return": {"version": "7.2.0", "supported_commands": [` + strings.Join(list, ", ") + `]}}`
	case "guest-file-open", "guest-get-time", "guest-fsfreeze-freeze", "guest-fsfreeze-freeze-list", "guest-fsfreeze-thaw":
		return `{"return": 1}`
	case "guest-file-read":
		return `{"return": {"count": 3, "buf-b64": "` + base64.StdEncoding.EncodeToString([]byte("abc")) + `", "eof": false}}`
	case "guest-file-write":
		return fmt.Sprintf(`{"return": {"count": %d, "eof": false}}`, len(c.Arguments.Buf))
	case "guest-file-seek":
		return `{"return": {"position": 0, "eof": false}}`
	case "guest-exec":
		return `{"return": {"pid": 7}}`
	case "guest-exec-status":
		return `{"return": {"exited": true, "exitcode": 0}}`
	case "guest-fsfreeze-status":
		return `{"return": "thawed"}`
	case "guest-network-get-interfaces":
		return `{"return": []}`
	case "guest-shutdown":
		return `{"error": {"class": "GenericError", "desc": "ends the call"}}`
	}
	return `{"return": {}}`
}

// serveAgent answers on p as an agent would until the client goes: a
// guest-sync-delimited with its id after 0xFF, anything else with what
// answer returns, or nothing when it returns "".
func serveAgent(p *peer, answer func(cmd string) string) {
	for {
		line := p.recv()
		switch {
		case line == "":
			return
		case syncLine(line) != "":
			p.send("\xff{\"return\": " + syncLine(line) + "}")
		default:
			if reply := answer(line); reply != "" {
				p.send(reply)
			}
		}
	}
}

// agentOffering is guest-info's reply for an agent that offers commands.
func agentOffering(commands ...string) string {
	var list []string
	for _, c := range commands {
		list = append(list, fmt.Sprintf(`{"name": %q, "enabled": true}`, c))
	}
	return `{"return": {"version": "7.2", "supported_commands": [` + strings.Join(list, ", ") + `]}}`
}
