package qemu

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strings"
	"testing"
	"time"
	"unicode/utf16"
)

// testMetaData and testUserData are what the tests put on a ConfigDrive. The
// user data spans many 2 KiB sectors and holds non-ASCII and NUL bytes, so
// a reader that gets extents or lengths wrong sees different bytes.
var (
	testMetaData = []byte(`{"uuid": "0b9d2f0e-7b43-4b6f-9f4e-2d0c3a1e5f00", "hostname": "vm-1"}`)
	testUserData = func() []byte {
		b := []byte("#cloud-config\nusers:\n  - name: ünïcode\n")
		for i := 0; len(b) < 70<<10; i++ {
			b = append(b, fmt.Sprintf("# line %d\x00\xff\n", i)...)
		}
		return b
	}()
)

func TestCreateCloudInitISO(t *testing.T) {
	for _, tc := range []struct{ tool, creator string }{
		{"xorriso", "XORRISO"},
		{"genisoimage", "GENISOIMAGE"},
	} {
		t.Run(tc.tool, func(t *testing.T) {
			onlyTool(t, tc.tool)
			scratch, outDir := t.TempDir(), t.TempDir()
			iso := filepath.Join(outDir, "seed.iso")

			// The second call replaces the first's image.
			if err := CreateCloudInitISO(context.Background(), scratch, iso, []byte("old"), []byte(`{"old":1}`)); err != nil {
				t.Fatal(err)
			}
			if err := CreateCloudInitISO(context.Background(), scratch, iso, testUserData, testMetaData); err != nil {
				t.Fatal(err)
			}

			img, err := os.ReadFile(iso)
			if err != nil {
				t.Fatal(err)
			}
			got, err := readISO(img)
			if err != nil {
				t.Fatalf("read back %s: %v", iso, err)
			}
			if got.label != "config-2" {
				t.Errorf("volume label = %q, want config-2", got.label)
			}
			// The image says which tool made it: proof that PATH chose it.
			if !strings.Contains(got.creator, tc.creator) {
				t.Errorf("image made by %q, want %s", got.creator, tc.creator)
			}
			want := map[string][]byte{
				"openstack/latest/meta_data.json": testMetaData,
				"openstack/latest/user_data":      testUserData,
			}
			checkFiles(t, "Rock Ridge", got.rockRidge, want)
			checkFiles(t, "Joliet", got.joliet, want)

			if fi, err := os.Stat(iso); err != nil || fi.Mode().Perm() != 0o600 {
				t.Errorf("stat %s = %v, %v; want mode 0600", iso, fi, err)
			}
			checkTree(t, scratch, nil)
			checkTree(t, outDir, []string{"seed.iso"})
		})
	}
}

func TestCreateCloudInitISOBadInput(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	// Each case gets a fresh scratch directory and output directory, each
	// holding one file; afterwards both must be exactly as they were.
	for _, tc := range []struct {
		name      string
		ctx       context.Context
		scratch   func(dir string) string
		iso       func(dir string) string
		meta      []byte
		wantText  string
		wantError error
	}{
		{name: "empty scratchDir", scratch: func(string) string { return "" },
			wantText: "scratch directory not given"},
		{name: "missing scratchDir", scratch: func(dir string) string { return filepath.Join(dir, "missing") },
			wantText: "scratch directory", wantError: fs.ErrNotExist},
		{name: "scratchDir is a file", scratch: func(dir string) string { return filepath.Join(dir, "keep") },
			wantText: "is not a directory"},
		{name: "empty isoPath", iso: func(string) string { return "" },
			wantText: "output path not given"},
		{name: "isoPath in a missing directory", iso: func(dir string) string { return filepath.Join(dir, "missing", "seed.iso") },
			wantText: "output directory", wantError: fs.ErrNotExist},
		{name: "isoPath is a directory", iso: func(dir string) string { return dir },
			wantText: "output path is a directory"},
		{name: "cancelled ctx", ctx: canceled,
			wantText: "context canceled", wantError: context.Canceled},
		{name: "meta data not JSON", meta: []byte("uuid: vm-1"),
			wantText: "meta data is not valid JSON"},
		{name: "meta data empty", meta: []byte{},
			wantText: "meta data is not valid JSON"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			scratchDir, outDir := t.TempDir(), t.TempDir()
			for _, dir := range []string{scratchDir, outDir} {
				if err := os.WriteFile(filepath.Join(dir, "keep"), []byte("x"), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			ctx, scratch, iso, meta := context.Background(), scratchDir, filepath.Join(outDir, "seed.iso"), testMetaData
			if tc.ctx != nil {
				ctx = tc.ctx
			}
			if tc.scratch != nil {
				scratch = tc.scratch(scratchDir)
			}
			if tc.iso != nil {
				iso = tc.iso(outDir)
			}
			if tc.meta != nil {
				meta = tc.meta
			}
			err := CreateCloudInitISO(ctx, scratch, iso, testUserData, meta)
			if err == nil {
				t.Fatal("CreateCloudInitISO succeeded, want an error")
			}
			if !strings.Contains(err.Error(), tc.wantText) {
				t.Errorf("error %q does not say %q", err, tc.wantText)
			}
			if tc.wantError != nil && !errors.Is(err, tc.wantError) {
				t.Errorf("error %q is not %v", err, tc.wantError)
			}
			checkTree(t, scratchDir, []string{"keep"})
			checkTree(t, outDir, []string{"keep"})
		})
	}
}

func TestCreateCloudInitISOMissingTools(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	scratch, outDir := t.TempDir(), t.TempDir()
	err := CreateCloudInitISO(context.Background(), scratch, filepath.Join(outDir, "seed.iso"), testUserData, testMetaData)
	if err == nil {
		t.Fatal("CreateCloudInitISO succeeded with no tool in PATH")
	}
	for _, want := range []string{"xorriso (Debian package xorriso)", "genisoimage (Debian package genisoimage)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
	if !errors.Is(err, exec.ErrNotFound) {
		t.Errorf("error %q is not exec.ErrNotFound", err)
	}
	checkTree(t, scratch, nil)
	checkTree(t, outDir, nil)
}

// TestCreateCloudInitISOToolFails runs a stand-in xorriso that writes part
// of an image and fails: its message must reach the error, and the old
// isoPath must survive untouched.
func TestCreateCloudInitISOToolFails(t *testing.T) {
	fakeTool(t, "xorriso", `
out=
while [ $# -gt 0 ]; do
	[ "$1" = -o ] && out=$2
	shift
done
printf 'half an image' >"$out"
echo "xorriso : FAILURE : stand-in ran out of space" >&2
exit 5
`)
	scratch, outDir := t.TempDir(), t.TempDir()
	iso := filepath.Join(outDir, "seed.iso")
	if err := os.WriteFile(iso, []byte("old image"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := CreateCloudInitISO(context.Background(), scratch, iso, testUserData, testMetaData)
	if err == nil {
		t.Fatal("CreateCloudInitISO succeeded, want the tool's failure")
	}
	for _, want := range []string{"stand-in ran out of space", "exit status 5", "xorriso"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if b, err := os.ReadFile(iso); err != nil || string(b) != "old image" {
		t.Errorf("isoPath after a failed build = %q, %v; want the old image", b, err)
	}
	checkTree(t, scratch, nil)
	checkTree(t, outDir, []string{"seed.iso"})
}

// TestCreateCloudInitISOCancel cancels the context while a stand-in tool
// runs: the tool is killed, the call returns the context's error, and
// nothing is left behind.
func TestCreateCloudInitISOCancel(t *testing.T) {
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Skipf("no sleep to stand in for a slow tool: %v", err)
	}
	started := filepath.Join(t.TempDir(), "started")
	fakeTool(t, "xorriso", fmt.Sprintf(": >%q\nexec %q 60\n", started, sleep))
	scratch, outDir := t.TempDir(), t.TempDir()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- CreateCloudInitISO(ctx, scratch, filepath.Join(outDir, "seed.iso"), testUserData, testMetaData)
	}()
	waitFile(t, started, done)
	cancel()
	select {
	case err = <-done:
	case <-time.After(30 * time.Second):
		t.Fatal("CreateCloudInitISO still running 30s after its context was cancelled")
	}
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("error %v is not context.Canceled", err)
	}
	if !strings.Contains(err.Error(), "xorriso stopped") {
		t.Errorf("error %q does not say the tool was stopped", err)
	}
	checkTree(t, scratch, nil)
	checkTree(t, outDir, nil)
}

// TestCloudInitISOInGuest boots the test guest with two ConfigDrives, one
// on virtio-blk and one on an AHCI CD-ROM, each built by a different tool
// when both are installed; the guest mounts each and prints its files.
func TestCloudInitISOInGuest(t *testing.T) {
	requireGuest(t)
	dir := t.TempDir()
	type drive struct {
		tool, iso   string
		meta, user  []byte
		attachments []string
	}
	drives := []*drive{
		{tool: "xorriso", iso: filepath.Join(dir, "virtio.iso"),
			meta: []byte(`{"uuid": "virtio-drive"}`), user: []byte("#cloud-config\nhostname: on-virtio\n")},
		{tool: "genisoimage", iso: filepath.Join(dir, "cdrom.iso"),
			meta: []byte(`{"uuid": "cdrom-drive"}`), user: []byte("#cloud-config\nhostname: on-cdrom\n")},
	}
	for _, d := range drives {
		// Without the tool, build with whichever is installed.
		t.Run("build-"+d.tool, func(t *testing.T) {
			if _, err := exec.LookPath(d.tool); err == nil {
				onlyTool(t, d.tool)
			}
			if err := CreateCloudInitISO(context.Background(), dir, d.iso, d.user, d.meta); err != nil {
				t.Fatal(err)
			}
		})
	}
	if t.Failed() {
		t.FailNow()
	}
	virtio := "file=" + qemuOptionValue(drives[0].iso) + ",if=virtio,format=raw,readonly=on"
	cdrom := "file=" + qemuOptionValue(drives[1].iso) + ",if=none,id=cd0,format=raw,readonly=on,media=cdrom"
	inst := startGuest(t, "", InstanceOptions{}, "-drive", virtio, "-drive", cdrom, "-device", "ide-cd,drive=cd0,bus=ide.0")
	ctx := ctxTimeout(t, 3*time.Minute)

	var want, got []string
	for _, d := range drives {
		for _, f := range []struct {
			name string
			data []byte
		}{{"openstack/latest/meta_data.json", d.meta}, {"openstack/latest/user_data", d.user}} {
			want = append(want, "TESTGUEST: file "+f.name+" base64="+base64.StdEncoding.EncodeToString(f.data))
		}
	}
	// A CD-ROM may be probed after the guest's ready line, so collect file
	// lines until there are as many as expected, in whatever order.
	for len(got) < len(want) {
		line, err := inst.Console().WaitFor(ctx, "TESTGUEST: file ")
		if err != nil {
			t.Fatalf("after %d of %d files: %v", len(got), len(want), err)
		}
		got = append(got, strings.TrimSpace(line[strings.Index(line, "TESTGUEST: "):]))
	}
	sort.Strings(want)
	sort.Strings(got)
	if !reflect.DeepEqual(got, want) {
		t.Errorf("guest read:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// qemuOptionValue doubles commas so a path can go inside a QEMU option list.
func qemuOptionValue(s string) string {
	return strings.ReplaceAll(s, ",", ",,")
}

// onlyTool makes PATH hold nothing but the named tool, for the rest of the
// test: CreateCloudInitISO must then use it.
func onlyTool(t *testing.T, tool string) {
	t.Helper()
	bin, err := exec.LookPath(tool)
	if err != nil {
		if realVM.require {
			t.Fatalf("%s not installed (make deps installs it): %v", tool, err)
		}
		t.Skipf("%s not installed: %v", tool, err)
	}
	dir := t.TempDir()
	if err := os.Symlink(bin, filepath.Join(dir, tool)); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir)
}

// fakeTool makes PATH hold only a shell script named tool with the given
// body. The script can use only the shell's builtins and absolute paths.
func fakeTool(t *testing.T, tool, body string) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, tool), []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	t.Setenv("PATH", dir)
}

// waitFile waits until path exists, failing the test if done delivers
// first or if it takes unreasonably long.
func waitFile(t *testing.T, path string, done <-chan error) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		if _, err := os.Stat(path); err == nil {
			return
		}
		select {
		case err := <-done:
			t.Fatalf("CreateCloudInitISO returned before the tool started: %v", err)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("the stand-in tool never started (%s missing)", path)
		}
	}
}

// checkTree fails the test unless dir holds exactly the entries want
// (slash-separated paths relative to dir, in any order).
func checkTree(t *testing.T, dir string, want []string) {
	t.Helper()
	var got []string
	err := filepath.WalkDir(dir, func(path string, _ fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if path != dir {
			rel, _ := filepath.Rel(dir, path)
			got = append(got, filepath.ToSlash(rel))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	sort.Strings(got)
	want = append([]string(nil), want...)
	sort.Strings(want)
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("%s holds %q, want %q", dir, got, want)
	}
}

// checkFiles compares the files read back from one of an image's trees.
func checkFiles(t *testing.T, tree string, got, want map[string][]byte) {
	t.Helper()
	for name := range got {
		if _, ok := want[name]; !ok {
			t.Errorf("%s tree holds unexpected file %q", tree, name)
		}
	}
	for name, data := range want {
		g, ok := got[name]
		switch {
		case !ok:
			t.Errorf("%s tree lacks %q (it holds %q)", tree, name, sortedKeys(got))
		case !bytes.Equal(g, data):
			t.Errorf("%s tree: %s holds %d bytes that differ from the %d written", tree, name, len(g), len(data))
		}
	}
}

func sortedKeys(m map[string][]byte) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// An ISO 9660 reader, just enough to check what CreateCloudInitISO wrote
// without trusting another tool. ECMA-119 gives the layout: volume
// descriptors from sector 16, each 2048 bytes; directory records with
// little-endian copies of their numbers. Rock Ridge (SUSP NM entries in a
// record's system use area) and Joliet (a supplementary volume descriptor
// whose tree has UCS-2 names) each carry the real file names.

// isoImage is what readISO recovers from an image.
type isoImage struct {
	label     string            // volume identifier of the primary volume descriptor
	creator   string            // its data preparer and application identifiers
	rockRidge map[string][]byte // files of the primary tree, by Rock Ridge name
	joliet    map[string][]byte // files of the Joliet tree, by Joliet name
}

// isoRecord is a parsed directory record.
type isoRecord struct {
	extent, size uint32
	dir          bool
	name         []byte // file identifier
	systemUse    []byte // system use area, where Rock Ridge lives
}

type isoReader struct {
	img       []byte
	blockSize int
	susSkip   int // bytes to skip in each system use area (the SP entry's LEN_SKP)
}

const isoSectorSize = 2048

func readISO(img []byte) (*isoImage, error) {
	r := &isoReader{img: img}
	im := &isoImage{}
	var primary, joliet *isoRecord
	for sector := 16; ; sector++ {
		off := sector * isoSectorSize
		if off+isoSectorSize > len(img) {
			return nil, errors.New("no volume descriptor set terminator")
		}
		vd := img[off : off+isoSectorSize]
		if string(vd[1:6]) != "CD001" {
			return nil, fmt.Errorf("sector %d is not a volume descriptor", sector)
		}
		if vd[0] == 255 {
			break
		}
		root, err := parseISORecord(vd[156:190])
		if err != nil {
			return nil, fmt.Errorf("root record of descriptor %d: %w", sector, err)
		}
		switch {
		case vd[0] == 1:
			im.label = strings.TrimRight(string(vd[40:72]), " ")
			im.creator = strings.TrimSpace(string(vd[446:574])) + " " + strings.TrimSpace(string(vd[574:702]))
			r.blockSize = int(binary.LittleEndian.Uint16(vd[128:130]))
			primary = &root
		case vd[0] == 2 && vd[88] == '%' && vd[89] == '/' && strings.IndexByte("@CE", vd[90]) >= 0:
			joliet = &root
		}
	}
	if primary == nil || r.blockSize == 0 {
		return nil, errors.New("no primary volume descriptor")
	}
	if err := r.findSUSPSkip(*primary); err != nil {
		return nil, err
	}
	im.rockRidge = map[string][]byte{}
	if err := r.walk(*primary, "", false, im.rockRidge, 0); err != nil {
		return nil, fmt.Errorf("primary tree: %w", err)
	}
	if joliet == nil {
		return nil, errors.New("no Joliet volume descriptor")
	}
	im.joliet = map[string][]byte{}
	if err := r.walk(*joliet, "", true, im.joliet, 0); err != nil {
		return nil, fmt.Errorf("Joliet tree: %w", err)
	}
	return im, nil
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
	return isoRecord{
		extent:    binary.LittleEndian.Uint32(b[2:6]),
		size:      binary.LittleEndian.Uint32(b[10:14]),
		dir:       b[25]&2 != 0,
		name:      b[33 : 33+nameLen],
		systemUse: b[sysUse:],
	}, nil
}

func (r *isoReader) data(rec isoRecord) ([]byte, error) {
	start := int64(rec.extent) * int64(r.blockSize)
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
			off = (off/r.blockSize + 1) * r.blockSize
			continue
		}
		rec, err := parseISORecord(data[off:])
		if err != nil {
			return nil, err
		}
		recs = append(recs, rec)
		off += int(data[off])
	}
	return recs, nil
}

// findSUSPSkip reads the SP entry that starts the system use area of the
// root's "." record, if Rock Ridge is there.
func (r *isoReader) findSUSPSkip(root isoRecord) error {
	recs, err := r.records(root)
	if err != nil || len(recs) == 0 {
		return fmt.Errorf("root directory: %v", err)
	}
	su := recs[0].systemUse
	if len(su) >= 7 && string(su[:2]) == "SP" && su[4] == 0xBE && su[5] == 0xEF {
		r.susSkip = int(su[6])
	}
	return nil
}

func (r *isoReader) walk(dir isoRecord, prefix string, joliet bool, files map[string][]byte, depth int) error {
	if depth > 8 {
		return errors.New("directories nested too deep")
	}
	recs, err := r.records(dir)
	if err != nil {
		return err
	}
	for _, rec := range recs {
		if len(rec.name) == 1 && rec.name[0] <= 1 {
			continue // "." and ".."
		}
		name := r.name(rec, joliet)
		if rec.dir {
			if err := r.walk(rec, prefix+name+"/", joliet, files, depth+1); err != nil {
				return err
			}
			continue
		}
		if files[prefix+name], err = r.data(rec); err != nil {
			return fmt.Errorf("%s%s: %w", prefix, name, err)
		}
	}
	return nil
}

// name returns a record's long name: UCS-2 in the Joliet tree, the Rock
// Ridge NM entries in the primary tree. Without NM it returns the ISO 9660
// name (upper case, 8.3), which then fails the comparison.
func (r *isoReader) name(rec isoRecord, joliet bool) string {
	if joliet {
		u := make([]uint16, len(rec.name)/2)
		for i := range u {
			u[i] = binary.BigEndian.Uint16(rec.name[2*i:])
		}
		return strings.TrimSuffix(string(utf16.Decode(u)), ";1")
	}
	var nm []byte
	found := false
	su := rec.systemUse
	if r.susSkip <= len(su) {
		su = su[r.susSkip:]
	}
	for len(su) >= 4 {
		n := int(su[2])
		if n < 4 || n > len(su) || string(su[:2]) == "ST" {
			break
		}
		// NM: signature, length, version, flags, then part of the name;
		// flag bit 0 says the name continues in the next NM entry.
		if string(su[:2]) == "NM" && n >= 5 {
			nm = append(nm, su[5:n]...)
			found = true
		}
		su = su[n:]
	}
	if found {
		return string(nm)
	}
	return strings.TrimSuffix(string(rec.name), ";1")
}
