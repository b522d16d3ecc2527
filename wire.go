package qemu

import (
	"encoding/json"
	"fmt"
	"io"
	"reflect"
)

// The wire format a session speaks: a command's line (no id, no empty
// arguments, one write), and a reply's value decoded into its caller's
// result.

// encodeArgs encodes a command's arguments, which must be a JSON object.
func encodeArgs(args interface{}) ([]byte, error) {
	if args == nil {
		return nil, nil
	}
	argsJSON, err := json.Marshal(args)
	if err != nil {
		return nil, fmt.Errorf("encode arguments: %w", err)
	}
	if len(argsJSON) == 0 || argsJSON[0] != '{' {
		return nil, fmt.Errorf("arguments encode to %.20s, not a JSON object", argsJSON)
	}
	return argsJSON, nil
}

// checkResult refuses a result that a reply could not be decoded into.
func checkResult(result interface{}) error {
	if result == nil {
		return nil
	}
	if v := reflect.ValueOf(result); v.Kind() != reflect.Pointer || v.IsNil() {
		return fmt.Errorf("result is a %T, not a non-nil pointer", result)
	}
	return nil
}

// appendCommand appends the wire form of a command: no id, since only one
// command is ever in flight, no empty "arguments", and a newline so the
// peer's parser need not wait for more input.
func appendCommand(buf []byte, name string, argsJSON []byte) []byte {
	buf = append(buf, `{"execute":`...)
	buf = appendJSONString(buf, name)
	if argsJSON != nil {
		buf = append(buf, `,"arguments":`...)
		buf = append(buf, argsJSON...)
	}
	return append(buf, "}\n"...)
}

// appendJSONString appends s as a JSON string. Command names are plain
// ASCII; anything else goes through encoding/json.
func appendJSONString(buf []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c < 0x20 || c >= 0x7f || c == '"' || c == '\\' {
			b, _ := json.Marshal(s)
			return append(buf, b...)
		}
	}
	buf = append(buf, '"')
	buf = append(buf, s...)
	return append(buf, '"')
}

// keptDecoder decodes one JSON value at a time with a json.Decoder kept
// between values: json.Unmarshal makes its decoding state afresh each
// time, and for a struct an error context and field stack too, which a
// kept Decoder reuses. A session's reader keeps one for its lines, and its
// callers share a pool of them for their results. Measured on
// query-status decoded into a struct against a fake QEMU on a socket pair:
// 9 allocations a command with Unmarshal, 5 with kept Decoders (the
// others: the command's completion and its channel, the reply's value,
// the struct's string).
type keptDecoder struct {
	src lineReader
	dec *json.Decoder
}

// decode decodes b, which holds exactly one valid JSON value, into v.
func (d *keptDecoder) decode(b []byte, v interface{}) error {
	if len(b) > keptDecoderLine {
		return json.Unmarshal(b, v)
	}
	if d.dec == nil {
		d.dec = json.NewDecoder(&d.src)
	}
	d.src.line = b
	err := d.dec.Decode(v)
	if err != nil {
		d.dec = nil // start afresh after anything unexpected
	}
	return err
}

// decodeReply decodes ret, a reply's value (valid JSON: it came from a
// valid line), into result.
func (s *session) decodeReply(ret json.RawMessage, result interface{}) error {
	d, _ := s.decoders.Get().(*keptDecoder)
	if d == nil {
		d = new(keptDecoder)
	}
	err := d.decode(ret, result)
	s.decoders.Put(d)
	return err
}

// lineReader is a kept json.Decoder's input: the line or value being
// decoded, which holds exactly one JSON value, so the Decoder never reads
// past it.
type lineReader struct{ line []byte }

func (r *lineReader) Read(p []byte) (int, error) {
	if len(r.line) == 0 {
		return 0, io.EOF
	}
	n := copy(p, r.line)
	r.line = r.line[n:]
	return n, nil
}

// keptDecoderLine is the longest line or value decoded through a kept
// Decoder, whose buffer grows to the longest it has read; a longer one
// goes through json.Unmarshal, so that one large reply leaves no large
// buffer.
const keptDecoderLine = 64 << 10
