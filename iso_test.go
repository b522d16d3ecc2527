package qemu

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"testing/iotest"
	"time"
	"unicode/utf16"

	"github.com/fc93c01d/qemu/internal/iso9660"
)

// isoTestTime is the ModTime of the images the tests compare byte for byte.
var isoTestTime = time.Date(2026, 12, 1, 10, 30, 15, 0, time.UTC)

// isoTestTree is a tree that exercises the writer: mixed case, spaces,
// non-ASCII names, names that map to the same ISO 9660 name, a directory
// whose records take several blocks, empty files and directories, the
// deepest path allowed, and sizes around block boundaries.
func isoTestTree() (files map[string][]byte, dirs []string) {
	files = map[string][]byte{
		"user-data":                        []byte("#cloud-config\nhostname: vm-1\n"),
		"meta-data":                        []byte("instance-id: iid-1\n"),
		"Mixed Case/A Long File Name.Text": bytes.Repeat([]byte("long name "), 300),
		"Mixed Case/a long file name.text": []byte("same ISO name, other case"),
		"ünïcödé/Grüße 日本.txt":             []byte("non-ASCII names"),
		"empty":                            {},
		"a/b/c/d/e/f/g/deepest":            []byte("eight levels"),
		"blocks/exactly-one-block":         bytes.Repeat([]byte{1}, iso9660.BlockSize),
		"blocks/one-byte-more":             bytes.Repeat([]byte{2}, iso9660.BlockSize+1),
		"blocks/one-byte-less":             bytes.Repeat([]byte{3}, iso9660.BlockSize-1),
		// ECMA-119 §9.3 order is not that of the raw identifiers: A.;1
		// sorts before A.1;1 (an empty extension reads as spaces), and the
		// Joliet a.b (name a, extension b) before a-b.
		"order/a":   []byte("A.;1"),
		"order/a.1": []byte("A.1;1"),
		"order/a.b": []byte("Joliet name a, extension b"),
		"order/a-b": []byte("Joliet name a-b"),
		"order/.x":  []byte("Joliet: no name, extension x"),
		// MaxISONameBytes beside the longest ISO 9660 name, ________.CDE;1:
		// a directory record of 254 bytes.
		"longest/" + strings.Repeat("日", 53) + "ab.cde": []byte("165 bytes of name"),
	}
	for i := 0; i < 60; i++ {
		files[fmt.Sprintf("many/File number %03d with a long name.dat", i)] = []byte(strconv.Itoa(i))
	}
	return files, []string{"empty dir", "nested/empty/dirs"}
}

func newISOTestImage(t testing.TB, label string, files map[string][]byte, dirs []string) *ISOImage {
	t.Helper()
	im := &ISOImage{Label: label, ModTime: isoTestTime}
	for _, name := range sortedKeys(files) {
		if err := im.AddFile(name, files[name]); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range dirs {
		if err := im.AddDir(d); err != nil {
			t.Fatal(err)
		}
	}
	return im
}

// isoBytes writes im to memory.
func isoBytes(t testing.TB, im *ISOImage) []byte {
	t.Helper()
	var b bytes.Buffer
	if err := im.Write(context.Background(), &b); err != nil {
		t.Fatal(err)
	}
	return b.Bytes()
}

// allDirs lists the directories that files and dirs make, with every
// parent.
func allDirs(files map[string][]byte, dirs []string) []string {
	set := map[string]bool{}
	add := func(p string) {
		for p = filepath.Dir(p); p != "."; p = filepath.Dir(p) {
			set[p] = true
		}
	}
	for f := range files {
		add(f)
	}
	for _, d := range dirs {
		set[d] = true
		add(d)
	}
	return sortedSet(set)
}

func TestISOImageReadBack(t *testing.T) {
	files, dirs := isoTestTree()
	img := isoBytes(t, newISOTestImage(t, "Test-Volume_1", files, dirs))
	if len(img)%iso9660.BlockSize != 0 {
		t.Fatalf("image of %d bytes, not whole blocks", len(img))
	}
	got, err := readISO(img)
	if err != nil {
		t.Fatal(err)
	}
	if got.label != "Test-Volume_1" || got.jolietLabel != "Test-Volume_1" {
		t.Errorf("labels %q and %q, want Test-Volume_1", got.label, got.jolietLabel)
	}
	checkFiles(t, "Rock Ridge", got.rockRidge, files)
	checkFiles(t, "Joliet", got.joliet, files)
	wantDirs := allDirs(files, dirs)
	for tree, d := range map[string][]string{"Rock Ridge": got.rockRidgeDirs, "Joliet": got.jolietDirs} {
		if strings.Join(d, "\n") != strings.Join(wantDirs, "\n") {
			t.Errorf("%s directories %q, want %q", tree, d, wantDirs)
		}
	}
	// The ISO 9660 names of the two files that differ only in case.
	if !got.isoNames["MIXED_CA/A_LONG_F.TEX;1"] || !got.isoNames["MIXED_CA/A_LONG_1.TEX;1"] {
		t.Errorf("ISO 9660 names %q lack MIXED_CA/A_LONG_F.TEX;1 and MIXED_CA/A_LONG_1.TEX;1", sortedSet(got.isoNames))
	}
	if got.modes["user-data"] != iso9660.FileMode || got.modes["a/b"] != iso9660.DirMode {
		t.Errorf("Rock Ridge modes %o and %o, want %o and %o", got.modes["user-data"], got.modes["a/b"], iso9660.FileMode, iso9660.DirMode)
	}
}

func sortedSet(m map[string]bool) []string {
	var out []string
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

func TestISOImageReproducible(t *testing.T) {
	files, dirs := isoTestTree()
	a := isoBytes(t, newISOTestImage(t, "cidata", files, dirs))
	// The same entries added in the opposite order, from readers.
	im := &ISOImage{Label: "cidata", ModTime: isoTestTime}
	names := sortedKeys(files)
	for i := len(dirs) - 1; i >= 0; i-- {
		if err := im.AddDir(dirs[i]); err != nil {
			t.Fatal(err)
		}
	}
	for i := len(names) - 1; i >= 0; i-- {
		data := files[names[i]]
		if err := im.AddFileFrom(names[i], int64(len(data)), func() (io.ReadCloser, error) {
			return io.NopCloser(bytes.NewReader(data)), nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	b := isoBytes(t, im)
	if !bytes.Equal(a, b) {
		t.Errorf("two builds of the same tree differ (%d and %d bytes)", len(a), len(b))
	}
	if c := isoBytes(t, im); !bytes.Equal(b, c) {
		t.Error("writing the same ISOImage twice gave different bytes")
	}
	im.ModTime = isoTestTime.Add(time.Second)
	if c := isoBytes(t, im); bytes.Equal(b, c) {
		t.Error("a different ModTime gave the same bytes")
	}
}

func TestISOImageLimits(t *testing.T) {
	long := strings.Repeat("n", MaxISONameLen)
	for _, tc := range []struct {
		name, path string
		dir        bool
		size       int64
		want       string
	}{
		{name: "empty path", path: "", want: "not a relative slash-separated path"},
		{name: "dot", path: ".", want: "not a relative"},
		{name: "absolute", path: "/etc/passwd", want: "not a relative"},
		{name: "dot dot", path: "a/../b", want: "not a relative"},
		{name: "trailing slash", path: "a/", want: "not a relative"},
		{name: "too deep file", path: "1/2/3/4/5/6/7/8/9", want: "9 path elements, more than the 8"},
		{name: "too deep dir", path: "1/2/3/4/5/6/7/8", dir: true, want: "8 path elements, more than the 7"},
		{name: "long name", path: long + "x", want: "65 characters, more than 64"},
		{name: "long path", path: strings.Repeat(long+"/", 4)[:4*65-1], want: "path longer than 255 bytes"},
		{name: "control character", path: "a\nb", want: "control character"},
		{name: "outside the BMP", path: "emoji-😀", want: "outside the Basic Multilingual Plane"},
		{name: "Joliet reserved", path: "a:b", want: "which Joliet reserves"},
		{name: "backslash", path: `a\b`, want: "which Joliet reserves"},
		{name: "not UTF-8", path: "a\xffb", want: "not UTF-8"},
		{name: "too big", path: "big", size: MaxISOFileSize + 1, want: "is not between 0 and 4294967295"},
		{name: "negative size", path: "neg", size: -1, want: "is not between 0"},
		{name: "file in place of a directory", path: "file/x", want: "file is a file"},
		{name: "duplicate", path: "file", want: "already in the image"},
		{name: "dir over a file", path: "file", dir: true, want: "already in the image"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			im := &ISOImage{ModTime: isoTestTime}
			if err := im.AddFile("file", []byte("x")); err != nil {
				t.Fatal(err)
			}
			before := isoBytes(t, im)
			var err error
			if tc.dir {
				err = im.AddDir(tc.path)
			} else {
				err = im.AddFileFrom(tc.path, tc.size, func() (io.ReadCloser, error) { return nil, errors.New("unused") })
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want one saying %q", err, tc.want)
			}
			if after := isoBytes(t, im); !bytes.Equal(before, after) {
				t.Error("a failed add changed the image")
			}
		})
	}
	t.Run("166 bytes of UTF-8 in 56 characters", func(t *testing.T) {
		// 56 characters is within Joliet's 64, but 166 bytes overflow
		// the record that holds the Rock Ridge name.
		err := (&ISOImage{}).AddFile(strings.Repeat("日", 55)+"a", nil)
		if err == nil || !strings.Contains(err.Error(), "166 bytes, more than 165") {
			t.Errorf("error %v, want one about 166 bytes", err)
		}
	})
	t.Run("the longest names", func(t *testing.T) {
		files := map[string][]byte{
			long:                         []byte("64 ASCII characters"),
			strings.Repeat("é", 64):      []byte("64 characters in 128 bytes"),
			strings.Repeat("日", 55):      []byte("55 characters in 165 bytes"),
			"d/" + long + "/" + long[:3]: []byte("a directory with the longest name"),
		}
		got, err := readISO(isoBytes(t, newISOTestImage(t, strings.Repeat("L", MaxISOLabelLen), files, nil)))
		if err != nil {
			t.Fatal(err)
		}
		checkFiles(t, "Rock Ridge", got.rockRidge, files)
		checkFiles(t, "Joliet", got.joliet, files)
		if got.label != strings.Repeat("L", 32) || got.jolietLabel != strings.Repeat("L", 16) {
			t.Errorf("labels %q and %q, want 32 and 16 L", got.label, got.jolietLabel)
		}
	})
	t.Run("directories", func(t *testing.T) {
		im := &ISOImage{}
		for i := 0; i < MaxISODirs-1; i++ { // the root is one
			if err := im.AddDir(strconv.Itoa(i)); err != nil {
				t.Fatalf("directory %d: %v", i+2, err)
			}
		}
		if err := im.AddFile("one/more/file", nil); err == nil || !strings.Contains(err.Error(), "more than 65535 directories") {
			t.Errorf("one more directory: %v", err)
		}
		if err := im.AddFile("0/file", nil); err != nil {
			t.Errorf("a file in an existing directory: %v", err)
		}
	})
	for _, label := range []string{strings.Repeat("L", MaxISOLabelLen+1), "tab\there", "é"} {
		err := (&ISOImage{Label: label}).Write(context.Background(), io.Discard)
		if err == nil || !strings.Contains(err.Error(), "label") {
			t.Errorf("label %q: error %v, want one about the label", label, err)
		}
	}
}

// TestISOImageBadContent gives files whose content does not match what
// they were added with: WriteFile fails, naming the file, and leaves the
// old image in place.
func TestISOImageBadContent(t *testing.T) {
	for _, tc := range []struct {
		name string
		size int64
		open func() (io.ReadCloser, error)
		want string
	}{
		{"short", 10, func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("12345")), nil }, "5 bytes, not the 10"},
		{"long", 3, func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("12345")), nil }, "more than the 3 bytes"},
		{"open fails", 3, func() (io.ReadCloser, error) { return nil, fs.ErrPermission }, "permission denied"},
		{"read fails", 3, func() (io.ReadCloser, error) { return io.NopCloser(&failingReader{}), nil }, "disk on fire"},
		// An empty file is opened and read too.
		{"empty, open fails", 0, func() (io.ReadCloser, error) { return nil, fs.ErrPermission }, "permission denied"},
		{"empty, has bytes", 0, func() (io.ReadCloser, error) { return io.NopCloser(strings.NewReader("x")), nil }, "more than the 0 bytes"},
		{"empty, read fails", 0, func() (io.ReadCloser, error) { return io.NopCloser(iotest.ErrReader(errors.New("disk on fire"))), nil }, "disk on fire"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "out.iso")
			if err := os.WriteFile(path, []byte("old"), 0o644); err != nil {
				t.Fatal(err)
			}
			im := &ISOImage{}
			if err := im.AddFileFrom("dir/the-file", tc.size, tc.open); err != nil {
				t.Fatal(err)
			}
			err := im.WriteFile(context.Background(), path)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "dir/the-file") {
				t.Fatalf("error %v, want one naming dir/the-file and saying %q", err, tc.want)
			}
			if b, _ := os.ReadFile(path); string(b) != "old" {
				t.Errorf("the old file now holds %q", b)
			}
			checkTree(t, dir, []string{"out.iso"})
		})
	}
}

type failingReader struct{ n int }

func (r *failingReader) Read(p []byte) (int, error) {
	if r.n == 0 {
		r.n++
		return copy(p, "x"), nil
	}
	return 0, errors.New("disk on fire")
}

// TestISOImageEmptyFile checks that an empty file's content is opened,
// read to its end and closed, like any other's, on each Write.
func TestISOImageEmptyFile(t *testing.T) {
	var opened, closed int
	im := &ISOImage{ModTime: isoTestTime}
	if err := im.AddFileFrom("empty", 0, func() (io.ReadCloser, error) {
		opened++
		return &closeCounter{Reader: strings.NewReader(""), closed: &closed}, nil
	}); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 2; i++ {
		got, err := readISO(isoBytes(t, im))
		if err != nil {
			t.Fatal(err)
		}
		checkFiles(t, "Rock Ridge", got.rockRidge, map[string][]byte{"empty": {}})
		if opened != i || closed != i {
			t.Errorf("after %d writes, opened %d times and closed %d", i, opened, closed)
		}
	}
}

type closeCounter struct {
	io.Reader
	closed *int
}

func (c *closeCounter) Close() error {
	*c.closed++
	return nil
}

// TestISOImageModTime writes the first and last seconds that a directory
// record's one-byte year holds, and refuses the times beyond them, which
// would wrap (1899, 2156) or overflow the volume descriptor's 4-digit year
// (10000).
func TestISOImageModTime(t *testing.T) {
	for _, tc := range []struct {
		t    time.Time
		year byte // years since 1900
		date string
	}{
		{time.Date(1900, 1, 1, 0, 0, 0, 0, time.UTC), 0, "1900010100000000"},
		{time.Date(2155, 12, 31, 23, 59, 59, 990e6, time.UTC), 255, "2155123123595999"},
		// Another zone: the image holds UTC.
		{time.Date(2156, 1, 1, 0, 59, 59, 0, time.FixedZone("CET", 3600)), 255, "2155123123595900"},
	} {
		img := isoBytes(t, &ISOImage{ModTime: tc.t})
		pvd := img[16*iso9660.BlockSize:]
		if got := pvd[156+18]; got != tc.year {
			t.Errorf("%v: the root record's year byte is %d, want %d", tc.t, got, tc.year)
		}
		if got := string(pvd[813:829]); got != tc.date {
			t.Errorf("%v: the volume's creation time is %s, want %s", tc.t, got, tc.date)
		}
	}
	for _, tc := range []struct {
		t  time.Time
		ok bool
	}{
		{time.Date(1899, 12, 31, 23, 59, 59, 0, time.UTC), false},
		{time.Date(2156, 1, 1, 0, 0, 0, 0, time.UTC), false},
		{time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC), false},
		{time.Date(1900, 1, 1, 0, 30, 0, 0, time.FixedZone("CET", 3600)), false}, // 1899 in UTC
		{time.Date(1899, 12, 31, 23, 30, 0, 0, time.FixedZone("EST", -5*3600)), true},
	} {
		err := (&ISOImage{ModTime: tc.t}).Write(context.Background(), io.Discard)
		if tc.ok != (err == nil) || (err != nil && !strings.Contains(err.Error(), "outside the years 1900 to 2155")) {
			t.Errorf("ModTime %v: %v", tc.t, err)
		}
	}
}

// TestISOImageWriteFileCancel ends the context while a file's content is
// being read: WriteFile returns the context's error and leaves nothing.
func TestISOImageWriteFileCancel(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	im := &ISOImage{}
	if err := im.AddFile("first", []byte("content")); err != nil {
		t.Fatal(err)
	}
	if err := im.AddFileFrom("second", 10<<20, func() (io.ReadCloser, error) {
		return io.NopCloser(&cancellingReader{cancel: cancel}), nil
	}); err != nil {
		t.Fatal(err)
	}
	err := im.WriteFile(ctx, filepath.Join(dir, "out.iso"))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v is not context.Canceled", err)
	}
	checkTree(t, dir, nil)
}

// cancellingReader gives zeros and calls cancel on its second read.
type cancellingReader struct {
	cancel func()
	reads  int
}

func (r *cancellingReader) Read(p []byte) (int, error) {
	r.reads++
	if r.reads == 2 {
		r.cancel()
	}
	clear(p)
	return len(p), nil
}

func TestISOImageAddFS(t *testing.T) {
	dir := t.TempDir()
	files, dirs := isoTestTree()
	writeTree(t, dir, files, dirs)
	im := &ISOImage{Label: "fs", ModTime: isoTestTime}
	if err := im.AddFS(os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	if a, b := isoBytes(t, im), isoBytes(t, newISOTestImage(t, "fs", files, dirs)); !bytes.Equal(a, b) {
		t.Error("the image of the tree on disk differs from the image of the same tree in memory")
	}
	if err := os.Symlink("user-data", filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := (&ISOImage{}).AddFS(os.DirFS(dir)); err == nil || !strings.Contains(err.Error(), "link: not a regular file") {
		t.Errorf("AddFS of a tree with a symbolic link: %v", err)
	}
}

// writeTree lays out files and dirs under dir.
func writeTree(t testing.TB, dir string, files map[string][]byte, dirs []string) {
	t.Helper()
	for _, d := range dirs {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, data := range files {
		p := filepath.Join(dir, filepath.FromSlash(name))
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// isoinfoEntry is matched against each entry line of `isoinfo -l`:
// mode, links, owner, group, size, date, [extent flags], then the name.
var isoinfoEntry = regexp.MustCompile(`^([-d])\S{9}\s+\d+\s+\d+\s+\d+\s+(\d+) .*\]  (.*) $`)

// TestISOImageIndependentReaders lists the image with isoinfo and xorriso
// and extracts it with xorriso: each must see exactly the written tree.
func TestISOImageIndependentReaders(t *testing.T) {
	files, dirs := isoTestTree()
	dir := t.TempDir()
	iso := filepath.Join(dir, "test.iso")
	if err := newISOTestImage(t, "Readers", files, dirs).WriteFile(context.Background(), iso); err != nil {
		t.Fatal(err)
	}
	// listing is the tree as the tools print it, each name passed
	// through conv.
	listing := func(conv func(string) string) []string {
		var want []string
		for name, data := range files {
			want = append(want, fmt.Sprintf("f %d /%s", len(data), conv(name)))
		}
		for _, d := range allDirs(files, dirs) {
			want = append(want, "d /"+conv(d))
		}
		sort.Strings(want)
		return want
	}
	want := listing(func(s string) string { return s })

	t.Run("isoinfo", func(t *testing.T) {
		isoinfo := requireTool(t, "isoinfo", "genisoimage")
		for _, args := range [][]string{{"-R", "-J"}, {"-R"}, {"-J"}} {
			out, err := exec.Command(isoinfo, append(args, "-l", "-i", iso)...).CombinedOutput()
			if err != nil {
				t.Fatalf("isoinfo %q: %v: %s", args, err, out)
			}
			var got []string
			cur := ""
			for _, line := range strings.Split(string(out), "\n") {
				if d, ok := strings.CutPrefix(line, "Directory listing of "); ok {
					cur = strings.TrimSpace(d)
					continue
				}
				m := isoinfoEntry.FindStringSubmatch(line)
				if m == nil || m[3] == "." || m[3] == ".." {
					continue
				}
				if m[1] == "d" {
					got = append(got, "d "+cur+m[3])
				} else {
					got = append(got, fmt.Sprintf("f %s %s%s", m[2], cur, m[3]))
				}
			}
			sort.Strings(got)
			want := want
			if args[len(args)-1] == "-J" {
				// isoinfo prints Joliet names in ISO 8859-1, with _ for
				// what that lacks.
				want = listing(latin1)
			}
			if strings.Join(got, "\n") != strings.Join(want, "\n") {
				t.Errorf("isoinfo %q lists:\n%s\nwant:\n%s", args, strings.Join(got, "\n"), strings.Join(want, "\n"))
			}
		}
	})
	t.Run("xorriso", func(t *testing.T) {
		xorriso := requireTool(t, "xorriso", "xorriso")
		// -return_with SORRY 32: any complaint about the image fails the
		// command.
		out, err := exec.Command(xorriso, "-abort_on", "NEVER", "-return_with", "SORRY", "32",
			"-indev", iso, "-find", "/", "-exec", "lsdl", "--").Output()
		if err != nil {
			t.Fatalf("xorriso -find: %v: %s", err, out)
		}
		var got []string
		for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
			f := strings.Fields(line)
			if len(f) < 9 {
				t.Fatalf("xorriso line %q", line)
			}
			name, err := strconv.Unquote(strings.Join(f[8:], " "))
			if err != nil {
				name = strings.Trim(strings.Join(f[8:], " "), "'")
			}
			switch {
			case name == "/":
			case f[0][0] == 'd':
				got = append(got, "d "+name)
			default:
				got = append(got, fmt.Sprintf("f %s %s", f[4], name))
			}
		}
		sort.Strings(got)
		if strings.Join(got, "\n") != strings.Join(want, "\n") {
			t.Errorf("xorriso lists:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
		}

		out2 := filepath.Join(dir, "extracted")
		if out, err := exec.Command(xorriso, "-abort_on", "NEVER", "-return_with", "SORRY", "32",
			"-osirrox", "on", "-indev", iso, "-extract", "/", out2).CombinedOutput(); err != nil {
			t.Fatalf("xorriso -extract: %v: %s", err, out)
		}
		gotFiles := map[string][]byte{}
		err = filepath.WalkDir(out2, func(p string, d fs.DirEntry, err error) error {
			if err != nil || d.IsDir() {
				return err
			}
			rel, _ := filepath.Rel(out2, p)
			gotFiles[filepath.ToSlash(rel)], err = os.ReadFile(p)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		checkFiles(t, "xorriso -extract", gotFiles, files)
	})
}

// latin1 encodes s in ISO 8859-1, with _ for the characters it lacks.
func latin1(s string) string {
	var b []byte
	for _, r := range s {
		if r > 0xff {
			r = '_'
		}
		b = append(b, byte(r))
	}
	return string(b)
}

// FuzzISOImage builds a tree from the fuzzer's bytes (names, sizes and
// depths within the limits), writes it, and reads it back: both trees must
// hold exactly what was added, and the path tables must match them.
func FuzzISOImage(f *testing.F) {
	f.Add([]byte{})
	f.Add([]byte("a"))
	f.Add([]byte("\x05Hello\x10\x03World\x82"))
	f.Add([]byte("\xff\xfe\xfd\x00\x01\x02 deep deep deep deep deep deep deep deep"))
	f.Add(bytes.Repeat([]byte("Same name, other case. "), 20))
	// Eight elements of twelve three-byte characters: a path of 295
	// bytes, which the image must refuse, then a short one it must take.
	long := []byte{7}
	for i := 0; i < 8; i++ {
		long = append(long, 11)
		long = append(long, bytes.Repeat([]byte{16}, 12)...)
	}
	f.Add(append(long, 1, 3, 3, 0, 0, 1, 7, 1))
	f.Fuzz(checkISOTreeFrom)
}

// isoFuzzAlphabet is what FuzzISOImage makes names of.
var isoFuzzAlphabet = []rune("abcXYZ09 ._-~éüß日本Ω")

// checkISOTreeFrom is FuzzISOImage's body.
func checkISOTreeFrom(t *testing.T, in []byte) {
	alphabet := isoFuzzAlphabet
	{
		next := func() int {
			if len(in) == 0 {
				return 0
			}
			b := int(in[0])
			in = in[1:]
			return b
		}
		files := map[string][]byte{}
		var dirs []string
		im := &ISOImage{Label: "fuzz", ModTime: isoTestTime}
		for len(in) > 0 && len(files)+len(dirs) < 200 {
			depth := next()%MaxISODepth + 1
			var elems []string
			for i := 0; i < depth; i++ {
				n := next()%12 + 1
				var name []rune
				for j := 0; j < n; j++ {
					name = append(name, alphabet[next()%len(alphabet)])
				}
				elems = append(elems, string(name))
			}
			p := strings.Join(elems, "/")
			kind := next()
			var err error
			if kind%7 == 0 && depth < MaxISODepth {
				if err = im.AddDir(p); err == nil {
					dirs = append(dirs, p)
				}
			} else {
				size := next() * next() / 8 // 0 to 8 KiB, around block sizes
				data := bytes.Repeat([]byte{byte(kind)}, size)
				if err = im.AddFile(p, data); err == nil {
					files[p] = data
				}
			}
			// The alphabet's widest characters take three bytes, so eight
			// elements of twelve can pass MaxISOPathLen: that must be
			// refused, and nothing else is but a name that clashes with
			// what is there or an element made only of dots.
			tooLong := len(p) > MaxISOPathLen
			if tooLong && (err == nil || !strings.Contains(err.Error(), "path longer than 255 bytes")) {
				t.Fatalf("add %q of %d bytes: %v, want it refused", p, len(p), err)
			}
			if err != nil && !tooLong && !strings.Contains(err.Error(), "already in the image") &&
				!strings.Contains(err.Error(), "is a file") && !strings.Contains(err.Error(), "not a relative") {
				t.Fatalf("add %q: %v", p, err)
			}
		}
		var b bytes.Buffer
		if err := im.Write(context.Background(), &b); err != nil {
			t.Fatal(err)
		}
		got, err := readISO(b.Bytes())
		if err != nil {
			t.Fatal(err)
		}
		checkFiles(t, "Rock Ridge", got.rockRidge, files)
		checkFiles(t, "Joliet", got.joliet, files)
		// A directory added where a file later clashed is still there.
		var stillDirs []string
		for _, d := range dirs {
			if _, isFile := files[d]; !isFile {
				stillDirs = append(stillDirs, d)
			}
		}
		want := allDirs(files, stillDirs)
		if strings.Join(got.rockRidgeDirs, "\n") != strings.Join(want, "\n") ||
			strings.Join(got.jolietDirs, "\n") != strings.Join(want, "\n") {
			t.Errorf("directories %q and %q, want %q", got.rockRidgeDirs, got.jolietDirs, want)
		}
	}
}

// An ISO 9660 reader, to check what ISOImage writes without trusting
// another tool. ECMA-119 gives the layout: volume descriptors from sector
// 16, each 2048 bytes; directory records with little- and big-endian
// copies of their numbers; path tables listing the directories. Rock Ridge
// (SUSP entries in a record's system use area: NM for the name, PX for the
// mode) and Joliet (a supplementary volume descriptor whose tree has UCS-2
// names) each carry the real file names. It checks what Linux and the
// tools rely on: both copies of every number agree, "." and ".." point
// where they should, and the L and M path tables list exactly the
// directories of their tree, in order.

// isoImage is what readISO recovers from an image.
type isoImage struct {
	label, jolietLabel string
	creator            string            // data preparer and application identifiers
	rockRidge          map[string][]byte // files of the primary tree, by Rock Ridge name
	joliet             map[string][]byte // files of the Joliet tree, by Joliet name
	rockRidgeDirs      []string          // sorted
	jolietDirs         []string
	isoNames           map[string]bool   // ISO 9660 paths of the primary tree's files
	modes              map[string]uint32 // Rock Ridge modes, by name
}

// isoRecord is a parsed directory record.
type isoRecord struct {
	extent, size uint32
	dir          bool
	name         []byte // file identifier
	systemUse    []byte // system use area, where Rock Ridge lives
}

type isoReader struct {
	img     []byte
	susSkip int // bytes to skip in each system use area (the SP entry's LEN_SKP)
	// Per walk: each directory's extent and its parent's; the directories.
	parents map[uint32]uint32
	dirs    []string
}

func readISO(img []byte) (*isoImage, error) {
	r := &isoReader{img: img}
	im := &isoImage{rockRidge: map[string][]byte{}, joliet: map[string][]byte{},
		isoNames: map[string]bool{}, modes: map[string]uint32{}}
	var pvd, svd []byte
	for sector := 16; ; sector++ {
		off := sector * iso9660.BlockSize
		if off+iso9660.BlockSize > len(img) {
			return nil, errors.New("no volume descriptor set terminator")
		}
		vd := img[off : off+iso9660.BlockSize]
		if string(vd[1:6]) != "CD001" {
			return nil, fmt.Errorf("sector %d is not a volume descriptor", sector)
		}
		if vd[0] == 255 {
			break
		}
		switch {
		case vd[0] == 1:
			pvd = vd
		case vd[0] == 2 && vd[88] == '%' && vd[89] == '/' && strings.IndexByte("@CE", vd[90]) >= 0:
			svd = vd
		}
	}
	if pvd == nil {
		return nil, errors.New("no primary volume descriptor")
	}
	if svd == nil {
		return nil, errors.New("no Joliet volume descriptor")
	}
	for _, vd := range [][]byte{pvd, svd} {
		if bs, err := both16(vd[128:]); err != nil || bs != iso9660.BlockSize {
			return nil, fmt.Errorf("block size %d, %v", bs, err)
		}
		if n, err := both32(vd[80:]); err != nil || int(n)*iso9660.BlockSize != len(img) {
			return nil, fmt.Errorf("volume space of %d blocks for an image of %d bytes, %v", n, len(img), err)
		}
	}
	im.label = strings.TrimRight(string(pvd[40:72]), " ")
	im.jolietLabel = strings.TrimRight(ucs2(svd[40:72]), " ")
	im.creator = strings.TrimSpace(string(pvd[446:574])) + " " + strings.TrimSpace(string(pvd[574:702]))

	for _, tree := range []struct {
		vd     []byte
		joliet bool
		files  map[string][]byte
		dirs   *[]string
	}{{pvd, false, im.rockRidge, &im.rockRidgeDirs}, {svd, true, im.joliet, &im.jolietDirs}} {
		root, err := parseISORecord(tree.vd[156:190])
		if err != nil {
			return nil, fmt.Errorf("root record: %w", err)
		}
		if !tree.joliet {
			if err := r.findSUSPSkip(root); err != nil {
				return nil, err
			}
		}
		r.parents = map[uint32]uint32{root.extent: root.extent}
		r.dirs = nil
		if err := r.walk(root, root.extent, "", "", tree.joliet, tree.files, im, 0); err != nil {
			return nil, fmt.Errorf("joliet=%v: %w", tree.joliet, err)
		}
		sort.Strings(r.dirs)
		*tree.dirs = r.dirs
		if err := r.checkPathTables(tree.vd, tree.joliet); err != nil {
			return nil, fmt.Errorf("joliet=%v: %w", tree.joliet, err)
		}
	}
	return im, nil
}

func both16(b []byte) (uint16, error) {
	le, be := binary.LittleEndian.Uint16(b), binary.BigEndian.Uint16(b[2:])
	if le != be {
		return 0, fmt.Errorf("both-endian number %d/%d", le, be)
	}
	return le, nil
}

func both32(b []byte) (uint32, error) {
	le, be := binary.LittleEndian.Uint32(b), binary.BigEndian.Uint32(b[4:])
	if le != be {
		return 0, fmt.Errorf("both-endian number %d/%d", le, be)
	}
	return le, nil
}

func ucs2(b []byte) string {
	u := make([]uint16, len(b)/2)
	for i := range u {
		u[i] = binary.BigEndian.Uint16(b[2*i:])
	}
	return string(utf16.Decode(u))
}

func parseISORecord(b []byte) (isoRecord, error) {
	if len(b) < 34 || int(b[0]) < 34 || int(b[0]) > len(b) {
		return isoRecord{}, errors.New("bad directory record length")
	}
	b = b[:b[0]]
	nameLen := int(b[32])
	sysUse := 33 + nameLen
	if nameLen%2 == 0 {
		sysUse++ // a pad byte keeps the system use area at an even offset
	}
	if sysUse > len(b) {
		return isoRecord{}, errors.New("directory record name overflows the record")
	}
	ext, err := both32(b[2:])
	if err != nil {
		return isoRecord{}, err
	}
	size, err := both32(b[10:])
	if err != nil {
		return isoRecord{}, err
	}
	return isoRecord{
		extent:    ext,
		size:      size,
		dir:       b[25]&2 != 0,
		name:      b[33 : 33+nameLen],
		systemUse: b[sysUse:],
	}, nil
}

func (r *isoReader) data(rec isoRecord) ([]byte, error) {
	start := int64(rec.extent) * iso9660.BlockSize
	end := start + int64(rec.size)
	if end > int64(len(r.img)) {
		return nil, fmt.Errorf("extent %d+%d beyond the image", rec.extent, rec.size)
	}
	return r.img[start:end], nil
}

// records returns the records of a directory, "." and ".." included. A
// record never crosses a sector: a zero length byte means the rest of the
// sector is padding.
func (r *isoReader) records(dir isoRecord) ([]isoRecord, error) {
	data, err := r.data(dir)
	if err != nil {
		return nil, err
	}
	var recs []isoRecord
	for off := 0; off < len(data); {
		if data[off] == 0 {
			off = (off/iso9660.BlockSize + 1) * iso9660.BlockSize
			continue
		}
		if off%iso9660.BlockSize+int(data[off]) > iso9660.BlockSize {
			return nil, errors.New("directory record crosses a block boundary")
		}
		rec, err := parseISORecord(data[off:])
		if err != nil {
			return nil, err
		}
		recs = append(recs, rec)
		off += int(data[off])
	}
	if len(recs) < 2 || string(recs[0].name) != "\x00" || string(recs[1].name) != "\x01" {
		return nil, errors.New("directory does not start with . and ..")
	}
	return recs, nil
}

// findSUSPSkip reads the SP entry that starts the system use area of the
// root's "." record, and insists on Rock Ridge's ER entry there.
func (r *isoReader) findSUSPSkip(root isoRecord) error {
	recs, err := r.records(root)
	if err != nil {
		return fmt.Errorf("root directory: %v", err)
	}
	su := recs[0].systemUse
	if len(su) < 7 || string(su[:2]) != "SP" || su[4] != 0xBE || su[5] != 0xEF {
		return errors.New("no SUSP SP entry in the root's . record")
	}
	r.susSkip = int(su[6])
	if _, ok := r.suspEntries(recs[0].systemUse[7:])["ER"]; !ok {
		return errors.New("no Rock Ridge ER entry in the root's . record")
	}
	return nil
}

// suspEntries splits a system use area into its entries, by signature;
// NM entries are concatenated.
func (r *isoReader) suspEntries(su []byte) map[string][]byte {
	entries := map[string][]byte{}
	for len(su) >= 4 {
		n := int(su[2])
		if n < 4 || n > len(su) || string(su[:2]) == "ST" {
			break
		}
		sig := string(su[:2])
		if sig == "NM" && n >= 5 {
			entries[sig] = append(entries[sig], su[5:n]...)
		} else {
			entries[sig] = su[4:n]
		}
		su = su[n:]
	}
	return entries
}

func (r *isoReader) walk(dir isoRecord, parentExt uint32, prefix, isoPrefix string, joliet bool,
	files map[string][]byte, im *isoImage, depth int) error {
	if depth > 8 {
		return errors.New("directories nested too deep")
	}
	recs, err := r.records(dir)
	if err != nil {
		return err
	}
	if recs[0].extent != dir.extent || recs[1].extent != parentExt {
		return fmt.Errorf("%s: . and .. point at %d and %d, not %d and %d",
			prefix, recs[0].extent, recs[1].extent, dir.extent, parentExt)
	}
	for i := 3; i < len(recs); i++ {
		if a, b := ecma119Key(recs[i-1], joliet), ecma119Key(recs[i], joliet); slices.Compare(a, b) > 0 {
			return fmt.Errorf("%s: record %q before %q, not in ECMA-119 §9.3 order", prefix, recs[i-1].name, recs[i].name)
		}
	}
	seen := map[string]bool{}
	for _, rec := range recs[2:] {
		name := r.name(rec, joliet)
		if seen[name] {
			return fmt.Errorf("%s%s twice", prefix, name)
		}
		seen[name] = true
		if !joliet {
			su := rec.systemUse
			if r.susSkip <= len(su) {
				su = su[r.susSkip:]
			}
			if px := r.suspEntries(su)["PX"]; len(px) >= 8 {
				im.modes[prefix+name] = binary.LittleEndian.Uint32(px)
			}
		}
		if rec.dir {
			if _, dup := r.parents[rec.extent]; dup {
				return fmt.Errorf("%s%s: extent %d used twice", prefix, name, rec.extent)
			}
			r.parents[rec.extent] = dir.extent
			r.dirs = append(r.dirs, prefix+name)
			if err := r.walk(rec, dir.extent, prefix+name+"/", isoPrefix+string(rec.name)+"/", joliet, files, im, depth+1); err != nil {
				return err
			}
			continue
		}
		if !joliet {
			im.isoNames[isoPrefix+string(rec.name)] = true
		}
		if files[prefix+name], err = r.data(rec); err != nil {
			return fmt.Errorf("%s%s: %w", prefix, name, err)
		}
	}
	return nil
}

// ecma119Key is what ECMA-119 §9.3 sorts a record by, as one sequence of
// characters that sorts the same way: the file name, then the extension,
// each padded with spaces to a width no identifier reaches, then the
// version's complement, so the highest version comes first. A directory's
// identifier is all name; the extension of a file starts after its last
// dot. The characters are bytes in the primary tree and UCS-2 units in
// Joliet's.
func ecma119Key(rec isoRecord, joliet bool) []uint16 {
	const width = 256
	var id []uint16
	if joliet {
		for i := 0; i+1 < len(rec.name); i += 2 {
			id = append(id, binary.BigEndian.Uint16(rec.name[i:]))
		}
	} else {
		for _, b := range rec.name {
			id = append(id, uint16(b))
		}
	}
	name, ext, version := id, []uint16(nil), 0
	if !rec.dir {
		if i := slices.Index(name, ';'); i >= 0 {
			version, _ = strconv.Atoi(string(utf16.Decode(name[i+1:])))
			name = name[:i]
		}
		if i := slices.Index(name, '.'); i >= 0 {
			for j := i + 1; j < len(name); j++ {
				if name[j] == '.' {
					i = j
				}
			}
			name, ext = name[:i], name[i+1:]
		}
	}
	key := make([]uint16, 0, 2*width+1)
	for i, part := range [][]uint16{name, ext} {
		key = append(key, part...)
		for len(key) < (i+1)*width {
			key = append(key, ' ')
		}
	}
	return append(key, uint16(32767-version))
}

// name returns a record's long name: UCS-2 in the Joliet tree, the Rock
// Ridge NM entries in the primary tree. Without NM it returns the ISO 9660
// name (upper case, 8.3), which then fails the comparison.
func (r *isoReader) name(rec isoRecord, joliet bool) string {
	if joliet {
		return strings.TrimSuffix(ucs2(rec.name), ";1")
	}
	su := rec.systemUse
	if r.susSkip <= len(su) {
		su = su[r.susSkip:]
	}
	if nm, ok := r.suspEntries(su)["NM"]; ok {
		return string(nm)
	}
	return strings.TrimSuffix(string(rec.name), ";1")
}

// checkPathTables checks that the L and M path tables of a volume
// descriptor agree, list every directory the walk found, each under its
// parent, in ECMA-119's order: by level, then parent number, then name.
func (r *isoReader) checkPathTables(vd []byte, joliet bool) error {
	size, err := both32(vd[132:])
	if err != nil {
		return err
	}
	type entry struct {
		id     []byte
		extent uint32
		parent uint16
	}
	read := func(at uint32, order binary.ByteOrder) ([]entry, error) {
		start := int64(at) * iso9660.BlockSize
		if start+int64(size) > int64(len(r.img)) {
			return nil, errors.New("path table beyond the image")
		}
		b := r.img[start : start+int64(size)]
		var out []entry
		for len(b) > 0 {
			if len(b) < 8 || len(b) < 8+int(b[0]) {
				return nil, errors.New("truncated path table record")
			}
			n := int(b[0])
			out = append(out, entry{append([]byte(nil), b[8:8+n]...), order.Uint32(b[2:]), order.Uint16(b[6:])})
			b = b[8+n+n%2:]
		}
		return out, nil
	}
	l, err := read(binary.LittleEndian.Uint32(vd[140:]), binary.LittleEndian)
	if err != nil {
		return fmt.Errorf("L path table: %w", err)
	}
	m, err := read(binary.BigEndian.Uint32(vd[148:]), binary.BigEndian)
	if err != nil {
		return fmt.Errorf("M path table: %w", err)
	}
	if fmt.Sprint(l) != fmt.Sprint(m) {
		return errors.New("L and M path tables differ")
	}
	if len(l) != len(r.parents) {
		return fmt.Errorf("path tables list %d directories, the tree has %d", len(l), len(r.parents))
	}
	level := make([]int, len(l))
	for i, e := range l {
		if e.parent < 1 || int(e.parent) > i+1 || (i > 0 && int(e.parent) == i+1) {
			return fmt.Errorf("path table entry %d: parent %d", i+1, e.parent)
		}
		p := l[e.parent-1]
		if parent, ok := r.parents[e.extent]; !ok || parent != p.extent {
			return fmt.Errorf("path table entry %d (extent %d) is not a directory under extent %d", i+1, e.extent, p.extent)
		}
		if i == 0 {
			continue
		}
		level[i] = level[e.parent-1] + 1
		prev := l[i-1]
		switch {
		case level[i] < level[i-1],
			level[i] == level[i-1] && e.parent < prev.parent,
			level[i] == level[i-1] && e.parent == prev.parent && i > 1 &&
				slices.Compare(ecma119Key(isoRecord{name: prev.id, dir: true}, joliet), ecma119Key(isoRecord{name: e.id, dir: true}, joliet)) > 0:
			return fmt.Errorf("path table entry %d (%q) out of order", i+1, e.id)
		}
	}
	return nil
}
