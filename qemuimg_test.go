package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// requireQemuImg returns a QemuImg for the real qemu-img.
func requireQemuImg(t *testing.T) QemuImg {
	t.Helper()
	return QemuImg{Path: requireTool(t, "qemu-img", "qemu-utils")}
}

// fakeQemuImg writes a shell script that stands in for qemu-img. The
// script can use only the shell's builtins and absolute paths.
func fakeQemuImg(t *testing.T, body string) QemuImg {
	t.Helper()
	p := filepath.Join(t.TempDir(), "qemu-img")
	if err := os.WriteFile(p, []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	return QemuImg{Path: p}
}

func TestQemuImgMissing(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	dir := t.TempDir()
	_, err := QemuImg{}.Info(context.Background(), filepath.Join(dir, "x.qcow2"), InfoImageOptions{})
	if err == nil || !strings.Contains(err.Error(), "qemu-utils") || !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("Info with no qemu-img: %v, want exec.ErrNotFound naming qemu-utils", err)
	}
	err = QemuImg{}.Create(context.Background(), filepath.Join(dir, "x.qcow2"), CreateImageOptions{Size: 1 << 20})
	if err == nil || !strings.Contains(err.Error(), "qemu-utils") {
		t.Errorf("Create with no qemu-img: %v", err)
	}
	checkTree(t, dir, nil)
}

// TestQemuImgFails runs every method against a qemu-img that fails: each
// error carries its message, and Create and Convert leave no file.
func TestQemuImgFails(t *testing.T) {
	// compare's exit status 1 means "different": its errors are 2.
	q := fakeQemuImg(t, `echo "qemu-img: Could not open 'disk': stand-in failure" >&2
[ "$1" = compare ] && exit 2
exit 1`)
	dir := t.TempDir()
	out := filepath.Join(dir, "out.img")
	ctx := context.Background()
	check := func(what string, err error) {
		t.Helper()
		if err == nil || !strings.Contains(err.Error(), "stand-in failure") || !strings.Contains(err.Error(), "exit status") {
			t.Errorf("%s: %v, want qemu-img's message", what, err)
		}
	}
	check("Create", q.Create(ctx, out, CreateImageOptions{Size: 1 << 20}))
	_, err := q.Info(ctx, "disk", InfoImageOptions{})
	check("Info", err)
	_, err = q.Check(ctx, "disk", CheckImageOptions{Format: "qcow2"})
	check("Check", err)
	check("Convert", q.Convert(ctx, "disk", out, ConvertImageOptions{SourceFormat: "qcow2", Progress: func(float64) {}}))
	check("Resize", q.Resize(ctx, "disk", 1<<20, ResizeImageOptions{Format: "raw"}))
	check("Commit", q.Commit(ctx, "disk", CommitImageOptions{Format: "qcow2"}))
	_, err = q.Compare(ctx, "disk", "other", CompareImageOptions{FormatA: "raw", FormatB: "raw"})
	check("Compare", err)
	checkTree(t, dir, nil)
}

// TestQemuImgErrorNamesPath has qemu-img fail naming its output file,
// which Create and Convert make under a temporary name: the error gives
// the caller's path instead.
func TestQemuImgErrorNamesPath(t *testing.T) {
	q := fakeQemuImg(t, `for a; do case $a in */*) out=$a ;; esac; done
echo "qemu-img: $out: stand-in failure" >&2
exit 1`)
	dir := t.TempDir()
	ctx := context.Background()
	out := filepath.Join(dir, "vm-1.qcow2")
	for what, err := range map[string]error{
		"Create":  q.Create(ctx, out, CreateImageOptions{Size: 1 << 20}),
		"Convert": q.Convert(ctx, "in.raw", out, ConvertImageOptions{SourceFormat: "raw", Format: "qcow2"}),
	} {
		if err == nil || !strings.Contains(err.Error(), "qemu-img: "+out+": stand-in failure") || strings.Contains(err.Error(), ".tmp") {
			t.Errorf("%s: %v, want qemu-img's message naming %s", what, err, out)
		}
	}
	checkTree(t, dir, nil)
}

// TestQemuImgForgedHeader gives qemu-img a raw disk into which a guest
// could have written a qcow2 header naming a host file as its backing
// file. Told the format, every method reads the disk as the raw bytes it
// is, and the host file is neither read nor written; guessing, qemu-img
// would follow the header, which is why only Info may guess.
func TestQemuImgForgedHeader(t *testing.T) {
	q := requireQemuImg(t)
	dir := t.TempDir()
	ctx := context.Background()
	secret := filepath.Join(dir, "host-secret")
	secretData := bytes.Repeat([]byte("host secret "), 1000)
	if err := os.WriteFile(secret, secretData, 0o600); err != nil {
		t.Fatal(err)
	}
	disk := filepath.Join(dir, "disk.raw")
	if out, err := exec.Command(q.Path, "create", "-q", "-f", "qcow2", "-b", secret, "-F", "raw", disk, "1M").CombinedOutput(); err != nil {
		t.Fatalf("forging the header: %v: %s", err, out)
	}
	if err := os.Truncate(disk, 1<<20); err != nil { // a whole raw disk
		t.Fatal(err)
	}
	forged, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}

	guessed, err := q.Info(ctx, disk, InfoImageOptions{})
	if err != nil || len(guessed) != 2 || guessed[1].Filename != secret {
		t.Fatalf("Info guessing: %+v, %v; want qemu-img to follow the header to %s (else this test shows nothing)", guessed, err, secret)
	}
	chain, err := q.Info(ctx, disk, InfoImageOptions{Format: "raw"})
	if err != nil || len(chain) != 1 || chain[0].Format != "raw" || chain[0].BackingFilename != "" || chain[0].VirtualSize != int64(len(forged)) {
		t.Errorf("Info of the raw disk: %+v, %v; want one raw image", chain, err)
	}
	if _, err := q.Check(ctx, disk, CheckImageOptions{Format: "raw"}); !errors.Is(err, ErrImageCheckNotSupported) {
		t.Errorf("Check as raw: %v, want ErrImageCheckNotSupported", err)
	}
	copied := filepath.Join(dir, "copy.raw")
	if err := q.Convert(ctx, disk, copied, ConvertImageOptions{SourceFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	if got, err := os.ReadFile(copied); err != nil || !bytes.Equal(got, forged) {
		t.Errorf("Convert copied %d bytes (%v), not the disk's %d", len(got), err, len(forged))
	}
	if same, err := q.Compare(ctx, disk, copied, CompareImageOptions{FormatA: "raw", FormatB: "raw"}); err != nil || !same {
		t.Errorf("Compare with the copy: %v, %v", same, err)
	}
	if err := q.Commit(ctx, disk, CommitImageOptions{Format: "raw"}); err == nil {
		t.Error("Commit of a raw image succeeded")
	}
	if got, err := os.ReadFile(secret); err != nil || !bytes.Equal(got, secretData) {
		t.Errorf("the host file changed: %v", err)
	}
}

// TestQemuImgDies has qemu-img killed by a signal half-way through a
// convert: the error says so, and no file is left.
func TestQemuImgDies(t *testing.T) {
	q := fakeQemuImg(t, `for out; do :; done
printf 'half an image' >"$out"
kill -9 $$`)
	dir := t.TempDir()
	err := q.Convert(context.Background(), "in.qcow2", filepath.Join(dir, "out.raw"), ConvertImageOptions{SourceFormat: "qcow2"})
	if err == nil || !strings.Contains(err.Error(), "signal: killed") {
		t.Errorf("Convert: %v, want the signal", err)
	}
	checkTree(t, dir, nil)
}

func TestQemuImgBadArguments(t *testing.T) {
	q := fakeQemuImg(t, `echo "must not run" >&2; exit 1`)
	dir := t.TempDir()
	ctx := context.Background()
	for _, tc := range []struct {
		name string
		err  error
		want string
	}{
		{"negative size", q.Create(ctx, filepath.Join(dir, "a"), CreateImageOptions{Size: -1}), "negative size"},
		{"no size", q.Create(ctx, filepath.Join(dir, "a"), CreateImageOptions{}), "no size and no backing file"},
		{"no backing format", q.Create(ctx, filepath.Join(dir, "a"), CreateImageOptions{BackingFile: "base.qcow2"}), "has no BackingFormat"},
		{"output is a directory", q.Create(ctx, dir, CreateImageOptions{Size: 1}), "output path is a directory"},
		{"resize to 0", q.Resize(ctx, "a", 0, ResizeImageOptions{Format: "raw"}), "size 0 is not positive"},
		// Every method but Info refuses to have qemu-img guess a format.
		{"check, no format", func() error { _, err := q.Check(ctx, "a", CheckImageOptions{}); return err }(), "no Format given: qemu-img would guess it"},
		{"convert, no source format", q.Convert(ctx, "a", filepath.Join(dir, "b"), ConvertImageOptions{Format: "raw"}), "no SourceFormat given"},
		{"resize, no format", q.Resize(ctx, "a", 1<<20, ResizeImageOptions{}), "no Format given"},
		{"commit, no format", q.Commit(ctx, "a", CommitImageOptions{}), "no Format given"},
		{"compare, no first format", func() error {
			_, err := q.Compare(ctx, "a", "b", CompareImageOptions{FormatB: "raw"})
			return err
		}(), "no FormatA given"},
		{"compare, no second format", func() error {
			_, err := q.Compare(ctx, "a", "b", CompareImageOptions{FormatA: "raw"})
			return err
		}(), "no FormatB given"},
	} {
		if tc.err == nil || !strings.Contains(tc.err.Error(), tc.want) {
			t.Errorf("%s: %v, want %q", tc.name, tc.err, tc.want)
		}
	}
	checkTree(t, dir, nil)
}

// TestQemuImgArguments checks what each method passes to qemu-img.
func TestQemuImgArguments(t *testing.T) {
	dir := t.TempDir()
	argsFile := filepath.Join(dir, "args")
	q := fakeQemuImg(t, `for a in "$@"; do echo "$a"; done >`+argsFile+`
case $1 in
info) echo '[{"filename":"o.qcow2","format":"qcow2","virtual-size":1048576,"backing-filename":"b.qcow2","backing-filename-format":"raw"},{"filename":"b.qcow2","format":"raw","virtual-size":1048576}]' ;;
check) echo '{"filename":"o.qcow2","format":"qcow2","check-errors":0,"corruptions":2,"leaks":0,"total-clusters":16}'; exit 2 ;;
esac`)
	ctx := context.Background()
	args := func() string {
		b, err := os.ReadFile(argsFile)
		if err != nil {
			t.Fatal(err)
		}
		return strings.ReplaceAll(strings.TrimSpace(string(b)), "\n", " ")
	}
	out := filepath.Join(dir, "new.qcow2")
	if err := q.Create(ctx, out, CreateImageOptions{BackingFile: "base.img", BackingFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	if got := args(); !regexp.MustCompile(`^create -q -f qcow2 -b base.img -F raw .*/\.new\.qcow2\.tmp[0-9]+$`).MatchString(got) {
		t.Errorf("create: %s", got)
	}
	if err := q.Convert(ctx, "in.qcow2", out, ConvertImageOptions{Format: "qcow2", SourceFormat: "raw", Compress: true}); err != nil {
		t.Fatal(err)
	}
	if got := args(); !regexp.MustCompile(`^convert -O qcow2 -f raw -c in.qcow2 .*/\.new\.qcow2\.tmp[0-9]+$`).MatchString(got) {
		t.Errorf("convert: %s", got)
	}
	if err := q.Convert(ctx, "nbd:host:1", filepath.Join(dir, "out:x"), ConvertImageOptions{SourceFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	if got := args(); !regexp.MustCompile(`^convert -O raw -f raw \./nbd:host:1 /.*/\.out:x\.tmp[0-9]+$`).MatchString(got) {
		t.Errorf("convert: %s", got)
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("stat %s: %v, %v; want mode 0600", out, fi, err)
	}
	for _, tc := range []struct {
		run  func() error
		want string
	}{
		{func() error { return q.Resize(ctx, "d.img", 5<<30, ResizeImageOptions{Format: "raw", Shrink: true}) }, "resize -q -f raw --shrink d.img 5368709120"},
		{func() error { return q.Commit(ctx, "o.qcow2", CommitImageOptions{Format: "qcow2"}) }, "commit -q -f qcow2 o.qcow2"},
		{func() error {
			_, err := q.Compare(ctx, "a", "/abs/b", CompareImageOptions{FormatA: "raw", FormatB: "qcow2"})
			return err
		}, "compare -q -f raw -F qcow2 a /abs/b"},
		// Relative paths that qemu-img would read as a protocol, a node
		// definition or an option are made file names.
		{func() error {
			_, err := q.Compare(ctx, "vm:1.qcow2", "json:{}", CompareImageOptions{FormatA: "qcow2", FormatB: "raw"})
			return err
		}, "compare -q -f qcow2 -F raw ./vm:1.qcow2 ./json:{}"},
		{func() error { return q.Resize(ctx, "-d.img", 1<<20, ResizeImageOptions{Format: "raw"}) }, "resize -q -f raw ./-d.img 1048576"},
		{func() error { return q.Commit(ctx, "dir/x:y.qcow2", CommitImageOptions{Format: "qcow2"}) }, "commit -q -f qcow2 dir/x:y.qcow2"},
		{func() error {
			_, err := q.Check(ctx, "--help", CheckImageOptions{Format: "qcow2"})
			return err
		}, "check --output=json -f qcow2 ./--help"},
		{func() error { _, err := q.Info(ctx, "json:{}", InfoImageOptions{Format: "raw"}); return err }, "info --output=json --backing-chain -f raw ./json:{}"},
	} {
		if err := tc.run(); err != nil {
			t.Fatal(err)
		}
		if got := args(); got != tc.want {
			t.Errorf("ran %q, want %q", got, tc.want)
		}
	}
	chain, err := q.Info(ctx, "o.qcow2", InfoImageOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if got := args(); got != "info --output=json --backing-chain o.qcow2" {
		t.Errorf("info: %s", got)
	}
	if len(chain) != 2 || chain[0].BackingFilename != "b.qcow2" || chain[0].BackingFormat != "raw" || chain[1].Format != "raw" || chain[1].VirtualSize != 1<<20 {
		t.Errorf("info: %+v", chain)
	}
	// Exit status 2 means corruptions: a result, not an error.
	c, err := q.Check(ctx, "o.qcow2", CheckImageOptions{Format: "qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	if c.Corruptions != 2 || c.TotalClusters != 16 || c.Clean() {
		t.Errorf("check: %+v", c)
	}
	if got := args(); got != "check --output=json -f qcow2 o.qcow2" {
		t.Errorf("check: %s", got)
	}
}

func TestQemuImgExitCodes(t *testing.T) {
	ctx := context.Background()
	for code, want := range map[int]bool{0: true, 1: false} {
		q := fakeQemuImg(t, "exit "+strconv.Itoa(code))
		same, err := q.Compare(ctx, "a", "b", CompareImageOptions{FormatA: "raw", FormatB: "raw"})
		if err != nil || same != want {
			t.Errorf("compare exit %d: %v, %v; want %v", code, same, err, want)
		}
	}
	q := fakeQemuImg(t, `echo "qemu-img: Could not open 'b'" >&2; exit 2`)
	if _, err := q.Compare(ctx, "a", "b", CompareImageOptions{FormatA: "raw", FormatB: "raw"}); err == nil || !strings.Contains(err.Error(), "Could not open 'b'") {
		t.Errorf("compare exit 2: %v", err)
	}
	q = fakeQemuImg(t, `echo '{"filename":"x","format":"qcow2","check-errors":0,"leaks":5}'; exit 3`)
	if c, err := q.Check(ctx, "x", CheckImageOptions{Format: "qcow2"}); err != nil || c.Leaks != 5 || c.Clean() {
		t.Errorf("check exit 3: %+v, %v", c, err)
	}
	q = fakeQemuImg(t, `echo "qemu-img: This image format does not support checks" >&2; exit 63`)
	if _, err := q.Check(ctx, "x", CheckImageOptions{Format: "qcow2"}); !errors.Is(err, ErrImageCheckNotSupported) {
		t.Errorf("check exit 63: %v, want ErrImageCheckNotSupported", err)
	}
	q = fakeQemuImg(t, `echo '{"filename":"x","format":"qcow2","check-errors":1}'; echo "qemu-img: Check failed: Input/output error" >&2; exit 1`)
	if c, err := q.Check(ctx, "x", CheckImageOptions{Format: "qcow2"}); err == nil || !strings.Contains(err.Error(), "Check failed") || c.CheckErrors != 1 {
		t.Errorf("check exit 1: %+v, %v; want the error and the partial result", c, err)
	}
	q = fakeQemuImg(t, `echo 'not json'`)
	if _, err := q.Info(ctx, "x", InfoImageOptions{}); err == nil || !strings.Contains(err.Error(), "reading its output") {
		t.Errorf("info with garbage output: %v", err)
	}
}

func TestProgressWriter(t *testing.T) {
	var got []float64
	p := &progressWriter{report: func(v float64) { got = append(got, v) }}
	for _, chunk := range []string{"    (0.00/100%)\r", "    (12.", "5/100%)\r    (50.00/100%)\r", "garbage\r", "    (100.00/100%)\r\n"} {
		if n, err := p.Write([]byte(chunk)); n != len(chunk) || err != nil {
			t.Fatalf("Write = %d, %v", n, err)
		}
	}
	if want := []float64{0, 12.5, 50, 100}; !reflect.DeepEqual(got, want) {
		t.Errorf("reports %v, want %v", got, want)
	}
	p.Write(bytes.Repeat([]byte("x"), 100<<10))
	if len(p.partial) > 4096 {
		t.Errorf("an endless line keeps %d bytes", len(p.partial))
	}
}

// TestQemuImgConvertCancel cancels a convert at its first progress report,
// with a stand-in that has written part of its output and sleeps: the
// stand-in is killed and reaped, and no file is left.
func TestQemuImgConvertCancel(t *testing.T) {
	dir := t.TempDir()
	pidFile := filepath.Join(t.TempDir(), "pid")
	q := fakeQemuImg(t, `for out; do :; done
printf 'half an image' >"$out"
echo $$ >`+pidFile+`
printf '    (0.00/100%%)\r'
exec /bin/sleep 60
`)
	if err := os.WriteFile(filepath.Join(dir, "old.img"), []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	start := time.Now()
	err := q.Convert(ctx, "in.qcow2", filepath.Join(dir, "old.img"), ConvertImageOptions{SourceFormat: "qcow2", Progress: func(float64) { cancel() }})
	if !errors.Is(err, context.Canceled) || !strings.Contains(err.Error(), "qemu-img stopped") {
		t.Fatalf("Convert: %v, want context.Canceled", err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Errorf("Convert returned %v after the cancel", d)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
		t.Errorf("the stand-in (pid %d) is still there: %v", pid, err)
	}
	if b, _ := os.ReadFile(filepath.Join(dir, "old.img")); string(b) != "old" {
		t.Errorf("the old output now holds %q", b)
	}
	checkTree(t, dir, []string{"old.img"})
}

// writeRandomRaw writes size bytes of a seeded pseudo-random stream.
func writeRandomRaw(t *testing.T, path string, size int, seed uint64) []byte {
	t.Helper()
	r := rand.New(rand.NewPCG(seed, seed))
	b := make([]byte, size)
	for i := 0; i+8 <= len(b); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			b[i+j] = byte(v >> (8 * j))
		}
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestQemuImgRealConvertCancel cancels a real, slow (compressing) convert
// at its first progress report: qemu-img is killed and no file is left.
func TestQemuImgRealConvertCancel(t *testing.T) {
	q := requireQemuImg(t)
	src := filepath.Join(t.TempDir(), "random.raw")
	writeRandomRaw(t, src, 64<<20, 1)
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var reports []float64
	err := q.Convert(ctx, src, filepath.Join(dir, "out.qcow2"), ConvertImageOptions{
		Format: "qcow2", SourceFormat: "raw", Compress: true,
		Progress: func(v float64) { reports = append(reports, v); cancel() },
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Convert: %v, want context.Canceled (progress %v)", err, reports)
	}
	if len(reports) == 0 || reports[len(reports)-1] >= 100 {
		t.Errorf("progress reports %v", reports)
	}
	checkTree(t, dir, nil)
}

func TestQemuImgRealErrors(t *testing.T) {
	q := requireQemuImg(t)
	dir := t.TempDir()
	ctx := context.Background()
	_, err := q.Info(ctx, filepath.Join(dir, "missing.qcow2"), InfoImageOptions{})
	if err == nil || !strings.Contains(err.Error(), "Could not open") {
		t.Errorf("Info of a missing file: %v", err)
	}
	raw := filepath.Join(dir, "disk.raw")
	if err := q.Create(ctx, raw, CreateImageOptions{Format: "raw", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := q.Check(ctx, raw, CheckImageOptions{Format: "raw"}); !errors.Is(err, ErrImageCheckNotSupported) {
		t.Errorf("Check of a raw image: %v, want ErrImageCheckNotSupported", err)
	}
	err = q.Resize(ctx, raw, 512<<10, ResizeImageOptions{Format: "raw"})
	if err == nil || !strings.Contains(err.Error(), "--shrink") {
		t.Errorf("Resize down without Shrink: %v, want qemu-img's advice to use --shrink", err)
	}
	if err := q.Resize(ctx, raw, 512<<10, ResizeImageOptions{Format: "raw", Shrink: true}); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(raw); err != nil || fi.Size() != 512<<10 {
		t.Errorf("after the shrink: %v, %v", fi, err)
	}
	checkTree(t, dir, []string{"disk.raw"})
}

// TestQemuImgRealColonNames makes an overlay whose backing file, named
// relative to it, has a colon in its name, which qemu-img would take for a
// protocol: Create records it as a file name, and the chain opens.
func TestQemuImgRealColonNames(t *testing.T) {
	q := requireQemuImg(t)
	dir := t.TempDir()
	ctx := context.Background()
	base := filepath.Join(dir, "vm:base.qcow2")
	if err := q.Create(ctx, base, CreateImageOptions{Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "json:{overlay}.qcow2")
	if err := q.Create(ctx, overlay, CreateImageOptions{BackingFile: "vm:base.qcow2", BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	chain, err := q.Info(ctx, overlay, InfoImageOptions{Format: "qcow2"})
	if err != nil || len(chain) != 2 || chain[0].BackingFilename != "./vm:base.qcow2" || chain[1].VirtualSize != 1<<20 {
		t.Errorf("Info: %+v, %v; want the overlay on ./vm:base.qcow2", chain, err)
	}
}

// TestQemuImgRealCheck damages the refcounts of fresh qcow2 images by hand
// (qcow2's header gives the refcount table at byte 48; in a 1 MiB image
// clusters 0 to 3 are the header, the refcount table, the refcount block
// and the L1 table): a used cluster with no reference count is a
// corruption, an unused one with a count a leak.
func TestQemuImgRealCheck(t *testing.T) {
	q := requireQemuImg(t)
	ctx := context.Background()
	for _, tc := range []struct {
		name               string
		cluster, refcount  int
		grow               int64
		corruptions, leaks int64
	}{
		{"clean", -1, 0, 0, 0, 0},
		{"corruption", 3, 0, 0, 1, 0},
		{"leak", 4, 1, 6 << 16, 0, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "disk.qcow2")
			if err := q.Create(ctx, img, CreateImageOptions{Size: 1 << 20}); err != nil {
				t.Fatal(err)
			}
			if tc.cluster >= 0 {
				setQcow2Refcount(t, img, tc.cluster, tc.refcount, tc.grow)
			}
			c, err := q.Check(ctx, img, CheckImageOptions{Format: "qcow2"})
			if err != nil {
				t.Fatal(err)
			}
			if c.Corruptions != tc.corruptions || c.Leaks != tc.leaks || c.CheckErrors != 0 || c.Clean() != (tc.cluster < 0) || c.Format != "qcow2" {
				t.Errorf("check: %+v, want %d corruptions and %d leaks", c, tc.corruptions, tc.leaks)
			}
		})
	}
}

// setQcow2Refcount sets the 16-bit refcount of a cluster of the qcow2
// image at path, after growing the file to grow bytes (if more than 0) so
// that the cluster is inside it.
func setQcow2Refcount(t *testing.T, path string, cluster, refcount int, grow int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if grow > 0 {
		if err := f.Truncate(grow); err != nil {
			t.Fatal(err)
		}
	}
	b := make([]byte, 8)
	if _, err := f.ReadAt(b, 48); err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(b, int64(binary.BigEndian.Uint64(b))); err != nil { // the refcount table
		t.Fatal(err)
	}
	block := int64(binary.BigEndian.Uint64(b))
	binary.BigEndian.PutUint16(b, uint16(refcount))
	if _, err := f.WriteAt(b[:2], block+2*int64(cluster)); err != nil {
		t.Fatal(err)
	}
}

// TestQemuImgInGuest puts an overlay on a base image, boots the test guest
// on the overlay and has it write through it; then info shows the chain,
// check is clean, convert flattens it to raw with progress to 100%,
// compare agrees, commit moves the write into the base, and resize grows
// the copy.
func TestQemuImgInGuest(t *testing.T) {
	q := requireQemuImg(t)
	requireGuest(t)
	dir := t.TempDir()
	ctx := ctxTimeout(t, 5*time.Minute)
	const size = 16 << 20
	pattern := writeRandomRaw(t, filepath.Join(dir, "pattern.raw"), size, 2)
	base := filepath.Join(dir, "base.qcow2")
	if err := q.Convert(ctx, filepath.Join(dir, "pattern.raw"), base, ConvertImageOptions{Format: "qcow2", SourceFormat: "raw"}); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "overlay.qcow2")
	if err := q.Create(ctx, overlay, CreateImageOptions{BackingFile: "base.qcow2", BackingFormat: "qcow2"}); err != nil {
		t.Fatal(err)
	}

	inst := startGuestInstance(t, "", InstanceOptions{}, Disk{ID: "overlay", File: overlay, Format: QCOW2}.QemuParams(nil)...)
	const offset, text = 1 << 20, "written by the guest through the overlay"
	if ans := guestAsk(t, inst, "printf '"+text+"' | dd of=/dev/vda bs=512 seek="+strconv.Itoa(offset/512)+" conv=fsync 2>/dev/null; echo ans=$?"); ans != "0" {
		t.Fatalf("dd in the guest: %s", ans)
	}
	// Stop powers the guest down, so QEMU flushes the overlay and exits.
	if step, err := inst.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v (at %v)", err, step)
	}
	want := append([]byte(nil), pattern...)
	copy(want[offset:], text)

	chain, err := q.Info(ctx, overlay, InfoImageOptions{Format: "qcow2"})
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 2 || chain[0].Format != "qcow2" || chain[0].BackingFilename != "base.qcow2" ||
		chain[0].BackingFormat != "qcow2" || chain[0].FullBackingFilename != base ||
		chain[1].Filename != base || chain[1].BackingFilename != "" || chain[0].VirtualSize != size || chain[1].VirtualSize != size {
		t.Errorf("backing chain: %+v", chain)
	}
	for _, img := range []string{overlay, base} {
		c, err := q.Check(ctx, img, CheckImageOptions{Format: "qcow2"})
		if err != nil || !c.Clean() || c.Format != "qcow2" || c.TotalClusters == 0 {
			t.Errorf("check %s: %+v, %v", img, c, err)
		}
	}

	flat := filepath.Join(dir, "flat.raw")
	var mu sync.Mutex
	var reports []float64
	if err := q.Convert(ctx, overlay, flat, ConvertImageOptions{Format: "raw", SourceFormat: "qcow2", Progress: func(v float64) {
		mu.Lock()
		reports = append(reports, v)
		mu.Unlock()
	}}); err != nil {
		t.Fatal(err)
	}
	if len(reports) < 2 || reports[len(reports)-1] != 100 {
		t.Errorf("progress reports %v, want some ending at 100", reports)
	}
	for i := 1; i < len(reports); i++ {
		if reports[i] < reports[i-1] {
			t.Errorf("progress went back: %v", reports)
		}
	}
	if got, err := os.ReadFile(flat); err != nil || !bytes.Equal(got, want) {
		t.Errorf("the flattened image does not hold the base with the guest's write (%d bytes, %v)", len(got), err)
	}
	if same, err := q.Compare(ctx, overlay, flat, CompareImageOptions{FormatA: "qcow2", FormatB: "raw"}); err != nil || !same {
		t.Errorf("compare overlay with its flat copy: %v, %v; want identical", same, err)
	}
	if same, err := q.Compare(ctx, base, flat, CompareImageOptions{FormatA: "qcow2", FormatB: "raw"}); err != nil || same {
		t.Errorf("compare base with the flat copy: %v, %v; want different", same, err)
	}
	if err := q.Commit(ctx, overlay, CommitImageOptions{Format: "qcow2"}); err != nil {
		t.Fatal(err)
	}
	if same, err := q.Compare(ctx, base, flat, CompareImageOptions{FormatA: "qcow2", FormatB: "raw"}); err != nil || !same {
		t.Errorf("compare base with the flat copy after commit: %v, %v; want identical", same, err)
	}
	if err := q.Resize(ctx, flat, 2*size, ResizeImageOptions{Format: "raw"}); err != nil {
		t.Fatal(err)
	}
	if info, err := q.Info(ctx, flat, InfoImageOptions{Format: "raw"}); err != nil || info[0].VirtualSize != 2*size || info[0].Format != "raw" {
		t.Errorf("info after resize: %+v, %v", info, err)
	}
	// Zeros past the smaller image's end are no difference.
	if same, err := q.Compare(ctx, base, flat, CompareImageOptions{FormatA: "qcow2", FormatB: "raw"}); err != nil || !same {
		t.Errorf("compare after growing with zeros: %v, %v; want identical", same, err)
	}
	checkTree(t, dir, []string{"base.qcow2", "flat.raw", "overlay.qcow2", "pattern.raw"})
}
