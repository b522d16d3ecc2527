package qemu

import (
	"fmt"
	"strings"
	"testing"
)

func TestTailBuffer(t *testing.T) {
	b := newTailBuffer(10)
	var all []byte
	for i := 0; i < 100; i++ {
		p := []byte(fmt.Sprintf("%d,", i))
		all = append(all, p...)
		if n, err := b.Write(p); n != len(p) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
		want := all
		if len(want) > 10 {
			want = want[len(want)-10:]
		}
		if got := b.String(); got != string(want) {
			t.Fatalf("after %q: String() = %q, want %q", all, got, want)
		}
	}
}

func TestLastLines(t *testing.T) {
	in := "one\n\ntwo\r\n  three  \nfour\n\n"
	if got, want := lastLines(in, 3), "two | three | four"; got != want {
		t.Errorf("lastLines(%q, 3) = %q, want %q", in, got, want)
	}
	if got := lastLines("", 3); got != "" {
		t.Errorf("lastLines of nothing = %q", got)
	}
	long := strings.Repeat("x", 5000)
	if got := lastLines(long, 5); len(got) != 2048+3 || !strings.HasPrefix(got, "...") {
		t.Errorf("lastLines of a 5000-byte line: %d bytes", len(got))
	}
}
