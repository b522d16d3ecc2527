package qemu

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/fc93c01d/qemu/internal/iso9660"
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
	// No tool is needed: with nothing in PATH, the image is still made.
	t.Setenv("PATH", t.TempDir())
	scratch, outDir := t.TempDir(), t.TempDir()
	iso := filepath.Join(outDir, "seed.iso")

	// The second call replaces the first's image.
	if err := CreateCloudInitISO(context.Background(), scratch, iso, []byte("old"), []byte(`{"old":1}`)); err != nil {
		t.Fatal(err)
	}
	if err := CreateCloudInitISO(context.Background(), scratch, iso, testUserData, testMetaData); err != nil {
		t.Fatal(err)
	}
	checkSeed(t, iso, "config-2", map[string][]byte{
		"openstack/latest/meta_data.json": testMetaData,
		"openstack/latest/user_data":      testUserData,
	})
	checkTree(t, scratch, nil)
	checkTree(t, outDir, []string{"seed.iso"})
}

// TestSeedBuilders checks that ConfigDriveSeed.ISO and NoCloudSeed.ISO
// build exactly the images that CreateCloudInitISO and CreateNoCloudISO
// write (rebuilt with the time those recorded, they are the same bytes),
// and that with a fixed ModTime two builds are byte-identical.
func TestSeedBuilders(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	cd := ConfigDriveSeed{UserData: testUserData, MetaData: testMetaData}
	nc := NoCloudSeed{UserData: testUserData, MetaData: []byte("instance-id: iid-1\n"), NetworkConfig: []byte("version: 2\n")}
	for _, tc := range []struct {
		name  string
		write func(path string) error
		build func() (*ISOImage, error)
	}{
		{"ConfigDrive", func(p string) error { return CreateCloudInitISO(ctx, dir, p, cd.UserData, cd.MetaData) }, cd.ISO},
		{"NoCloud", func(p string) error { return CreateNoCloudISO(ctx, p, nc) }, nc.ISO},
	} {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(dir, tc.name+".iso")
			if err := tc.write(path); err != nil {
				t.Fatal(err)
			}
			written, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			// The primary volume descriptor's creation time.
			recorded, err := time.Parse("20060102150405", string(written[16*iso9660.BlockSize+813:][:14]))
			if err != nil {
				t.Fatal(err)
			}
			im, err := tc.build()
			if err != nil {
				t.Fatal(err)
			}
			im.ModTime = recorded
			if b := isoBytes(t, im); !bytes.Equal(b, written) {
				t.Errorf("the builder's image at %v differs from the one written", recorded)
			}
			a := isoBytes(t, im)
			im2, err := tc.build()
			if err != nil {
				t.Fatal(err)
			}
			im2.ModTime = recorded
			if b := isoBytes(t, im2); !bytes.Equal(a, b) {
				t.Error("two builds of the same seed with the same ModTime differ")
			}
		})
	}
	if _, err := (ConfigDriveSeed{MetaData: []byte("uuid: x")}).ISO(); err == nil || !strings.Contains(err.Error(), "meta data is not valid JSON") {
		t.Errorf("ConfigDriveSeed with YAML meta data: %v", err)
	}
}

// TestSeedLabelsBlkid reads the label of each kind of seed, and of an
// image whose label is longer than the Joliet descriptor holds, with
// util-linux's blkid, which is how cloud-init finds its seed (blkid -t
// LABEL=...): it merges the Joliet label with the primary one.
func TestSeedLabelsBlkid(t *testing.T) {
	blkid := requireTool(t, "blkid", "util-linux")
	ctx := context.Background()
	dir := t.TempDir()
	for _, tc := range []struct {
		label string
		write func(path string) error
	}{
		{"config-2", func(p string) error { return CreateCloudInitISO(ctx, dir, p, testUserData, testMetaData) }},
		{"cidata", func(p string) error { return CreateNoCloudISO(ctx, p, NoCloudSeed{}) }},
		{"Mixed-Case_Label_Longer", func(p string) error {
			return (&ISOImage{Label: "Mixed-Case_Label_Longer"}).WriteFile(ctx, p)
		}},
	} {
		p := filepath.Join(dir, tc.label+".iso")
		if err := tc.write(p); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command(blkid, "-p", "-o", "export", p).Output()
		if err != nil {
			t.Fatalf("blkid %s: %v", p, err)
		}
		if !strings.Contains("\n"+string(out), "\nLABEL="+tc.label+"\n") || !strings.Contains(string(out), "TYPE=iso9660") {
			t.Errorf("blkid says of the %s image:\n%s", tc.label, out)
		}
	}
}

// TestWriteFileAtomicPanic has a file's opener panic half-way through
// WriteFile: the panic goes on to the caller, and the temporary file is
// gone.
func TestWriteFileAtomicPanic(t *testing.T) {
	dir := t.TempDir()
	im := &ISOImage{}
	if err := im.AddFile("first", bytes.Repeat([]byte("x"), 100<<10)); err != nil {
		t.Fatal(err)
	}
	if err := im.AddFileFrom("second", 1, func() (io.ReadCloser, error) { panic("opener bug") }); err != nil {
		t.Fatal(err)
	}
	func() {
		defer func() {
			if r := recover(); r != "opener bug" {
				t.Errorf("recovered %v, want the opener's panic", r)
			}
		}()
		im.WriteFile(context.Background(), filepath.Join(dir, "out.iso"))
	}()
	checkTree(t, dir, nil)
}

// checkSeed reads the image at iso back: its label, the files of both its
// trees, and its mode.
func checkSeed(t *testing.T, iso, label string, want map[string][]byte) {
	t.Helper()
	img, err := os.ReadFile(iso)
	if err != nil {
		t.Fatal(err)
	}
	got, err := readISO(img)
	if err != nil {
		t.Fatalf("read back %s: %v", iso, err)
	}
	if got.label != label || got.jolietLabel != label {
		t.Errorf("volume labels %q and %q, want %s", got.label, got.jolietLabel, label)
	}
	checkFiles(t, "Rock Ridge", got.rockRidge, want)
	checkFiles(t, "Joliet", got.joliet, want)
	if fi, err := os.Stat(iso); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("stat %s = %v, %v; want mode 0600", iso, fi, err)
	}
}

func TestCreateNoCloudISO(t *testing.T) {
	t.Setenv("PATH", t.TempDir())
	for _, tc := range []struct {
		name string
		seed NoCloudSeed
		want map[string][]byte
	}{
		{"required files only", NoCloudSeed{UserData: testUserData, MetaData: []byte("instance-id: iid-1\n")},
			map[string][]byte{"user-data": testUserData, "meta-data": []byte("instance-id: iid-1\n")}},
		{"empty required files", NoCloudSeed{},
			map[string][]byte{"user-data": {}, "meta-data": {}}},
		{"all four", NoCloudSeed{UserData: []byte("#cloud-config\n"), MetaData: []byte("{}"),
			NetworkConfig: []byte("version: 2\n"), VendorData: []byte{}},
			map[string][]byte{"user-data": []byte("#cloud-config\n"), "meta-data": []byte("{}"),
				"network-config": []byte("version: 2\n"), "vendor-data": {}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			iso := filepath.Join(dir, "cidata.iso")
			if err := os.WriteFile(iso, []byte("old"), 0o644); err != nil {
				t.Fatal(err)
			}
			if err := CreateNoCloudISO(context.Background(), iso, tc.seed); err != nil {
				t.Fatal(err)
			}
			checkSeed(t, iso, "cidata", tc.want)
			checkTree(t, dir, []string{"cidata.iso"})

			// The builder with a fixed time: the same bytes every time.
			im, err := tc.seed.ISO()
			if err != nil {
				t.Fatal(err)
			}
			im.ModTime = isoTestTime
			a := isoBytes(t, im)
			im, _ = tc.seed.ISO()
			im.ModTime = isoTestTime
			if b := isoBytes(t, im); !bytes.Equal(a, b) {
				t.Error("two builds of the same seed differ")
			}
		})
	}
}

func TestCreateNoCloudISOBadInput(t *testing.T) {
	canceled, cancel := context.WithCancel(context.Background())
	cancel()
	for _, tc := range []struct {
		name      string
		ctx       context.Context
		iso       func(dir string) string
		wantText  string
		wantError error
	}{
		{name: "empty isoPath", iso: func(string) string { return "" }, wantText: "output path not given"},
		{name: "isoPath in a missing directory", iso: func(dir string) string { return filepath.Join(dir, "missing", "seed.iso") },
			wantText: "output directory", wantError: fs.ErrNotExist},
		{name: "isoPath is a directory", iso: func(dir string) string { return dir }, wantText: "output path is a directory"},
		{name: "cancelled ctx", ctx: canceled, wantText: "context canceled", wantError: context.Canceled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, "keep"), []byte("x"), 0o644); err != nil {
				t.Fatal(err)
			}
			ctx, iso := context.Background(), filepath.Join(dir, "seed.iso")
			if tc.ctx != nil {
				ctx = tc.ctx
			}
			if tc.iso != nil {
				iso = tc.iso(dir)
			}
			err := CreateNoCloudISO(ctx, iso, NoCloudSeed{MetaData: []byte("instance-id: x\n")})
			if err == nil || !strings.Contains(err.Error(), tc.wantText) {
				t.Fatalf("error %v does not say %q", err, tc.wantText)
			}
			if tc.wantError != nil && !errors.Is(err, tc.wantError) {
				t.Errorf("error %q is not %v", err, tc.wantError)
			}
			checkTree(t, dir, []string{"keep"})
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

// TestCloudInitISOInGuest boots the test guest with five images: a
// ConfigDrive and a NoCloud seed each on virtio-blk and on an AHCI CD-ROM,
// and an image with long mixed-case and non-ASCII names on virtio-blk. The
// guest mounts each twice, reading the Rock Ridge names and then the
// Joliet ones, and prints every file with the volume label: each must be
// exactly what was written.
func TestCloudInitISOInGuest(t *testing.T) {
	requireGuest(t)
	dir := t.TempDir()
	type drive struct {
		name  string
		cdrom bool
		label string
		files map[string][]byte
		make  func(path string) error
		dev   string // the guest's name for it, once found
	}
	ctx := context.Background()
	configDrive := func(name string, cdrom bool) *drive {
		meta := []byte(`{"uuid": "` + name + `"}`)
		user := []byte("#cloud-config\nhostname: " + name + "\n")
		return &drive{name: name, cdrom: cdrom, label: "config-2",
			files: map[string][]byte{"openstack/latest/meta_data.json": meta, "openstack/latest/user_data": user},
			make:  func(p string) error { return CreateCloudInitISO(ctx, dir, p, user, meta) }}
	}
	noCloud := func(name string, cdrom bool) *drive {
		seed := NoCloudSeed{
			UserData:      []byte("#cloud-config\nhostname: " + name + "\n"),
			MetaData:      []byte("instance-id: " + name + "\n"),
			NetworkConfig: []byte("version: 2\nethernets: {}\n"),
			VendorData:    []byte("#cloud-config\n# " + name + "\n"),
		}
		return &drive{name: name, cdrom: cdrom, label: "cidata",
			files: map[string][]byte{"user-data": seed.UserData, "meta-data": seed.MetaData,
				"network-config": seed.NetworkConfig, "vendor-data": seed.VendorData},
			make: func(p string) error { return CreateNoCloudISO(ctx, p, seed) }}
	}
	// A label longer than the 16 characters the Joliet descriptor holds:
	// the two views see different labels.
	names := &drive{name: "names", label: "Mixed-Case_Label_Longer", files: map[string][]byte{
		"Mixed Case Directory/A Rather Long File Name With Capitals.Text": []byte("long mixed-case name"),
		"Mixed Case Directory/a rather long file name with capitals.text": []byte("same name, lower case"),
		"ünïcödé/Grüße aus 日本.txt":                                        []byte("non-ASCII"),
		"a/b/c/d/e/f/g/deepest-file":                                      []byte("eight levels"),
		"Big.Bin":                                                         bytes.Repeat([]byte("0123456789abcdef"), 10000),
		"Longest/" + strings.Repeat("日", 53) + "ab.cde":                   []byte("MaxISONameBytes in a record of 254 bytes"),
	}}
	// Enough long names that their directory's records take two blocks.
	for i := 0; i < 30; i++ {
		names.files[fmt.Sprintf("Many/File Number %02d With A Long Name.Data", i)] = []byte(strconv.Itoa(i))
	}
	names.make = func(p string) error {
		im := &ISOImage{Label: names.label}
		for _, n := range sortedKeys(names.files) {
			if err := im.AddFile(n, names.files[n]); err != nil {
				return err
			}
		}
		return im.WriteFile(ctx, p)
	}
	drives := []*drive{configDrive("configdrive-virtio", false), configDrive("configdrive-cdrom", true),
		noCloud("nocloud-virtio", false), noCloud("nocloud-cdrom", true), names}
	var extra []string
	cds := 0
	for _, d := range drives {
		p := filepath.Join(dir, d.name+".iso")
		if err := d.make(p); err != nil {
			t.Fatal(err)
		}
		disk := Disk{ID: d.name, File: p, ReadOnly: true}
		if d.cdrom {
			disk = Disk{ID: d.name, File: p, Interface: DiskIDE, CDROM: true, Bus: fmt.Sprintf("ide.%d", cds)}
			cds++
		}
		extra = append(extra, disk.QemuParams(nil)...)
	}
	inst := startGuest(t, "", InstanceOptions{}, extra...)
	wctx := ctxTimeout(t, 3*time.Minute)

	// What the guest read, by device and view. A CD-ROM may be probed
	// after the guest's ready line, so collect lines until every image
	// has been listed in both views.
	seen := map[string]*guestListing{}
	done := 0
	for done < 2*len(drives) {
		line, err := inst.Console().WaitFor(wctx, "TESTGUEST: file")
		if err != nil {
			t.Fatalf("after %d of %d listings: %v; console:\n%s", done, 2*len(drives), err, inst.Console().History())
		}
		line = strings.TrimSpace(line[strings.Index(line, "TESTGUEST: "):])
		f := strings.SplitN(line, " ", 5)
		if len(f) < 5 {
			t.Fatalf("guest line %q", line)
		}
		key := f[2] + " " + f[3]
		l := seen[key]
		if l == nil {
			l = &guestListing{files: map[string][]byte{}}
			seen[key] = l
		}
		switch f[1] {
		case "file":
			i := strings.LastIndex(f[4], " base64=")
			data, err := base64.StdEncoding.DecodeString(f[4][i+len(" base64="):])
			if i < 0 || err != nil {
				t.Fatalf("guest line %q: %v", line, err)
			}
			l.files[f[4][:i]] = data
		case "files":
			label, count, _ := strings.Cut(strings.TrimPrefix(f[4], "label="), " count=")
			if n, err := strconv.Atoi(count); err != nil || n != len(l.files) {
				t.Errorf("%s: guest counted %s files, printed %d", key, count, len(l.files))
			}
			l.label = label
			done++
		}
	}
	for _, d := range drives {
		for dev := range seen {
			dev, _, _ = strings.Cut(dev, " ")
			rr := seen[dev+" rr"]
			if rr != nil && rr.label == d.label && reflect.DeepEqual(rr.files, d.files) {
				d.dev = dev
			}
		}
		if d.dev == "" {
			t.Errorf("%s: no disk in the guest holds its files; the guest listed:\n%s", d.name, listingSummary(seen))
			continue
		}
		if got := strings.HasPrefix(d.dev, "sr"); got != d.cdrom {
			t.Errorf("%s was found on %s", d.name, d.dev)
		}
		// The guest reads the Joliet view's label from the Joliet volume
		// descriptor, which holds 16 characters.
		jolietLabel := d.label[:min(len(d.label), iso9660.JolietLabelLen)]
		j := seen[d.dev+" joliet"]
		if j == nil || j.label != jolietLabel {
			t.Errorf("%s: no Joliet listing with label %s on %s; the guest listed:\n%s", d.name, jolietLabel, d.dev, listingSummary(seen))
			continue
		}
		checkFiles(t, d.name+" Joliet", j.files, d.files)
	}
	for _, bad := range []string{"ISOFS", "isofs", "rock:", "Rock Ridge"} {
		if bytes.Contains(inst.Console().History(), []byte(bad)) {
			t.Errorf("the guest's console mentions %q:\n%s", bad, inst.Console().History())
		}
	}
}

// guestListing is what testguest-block printed of one disk in one view.
type guestListing struct {
	label string
	files map[string][]byte
}

// listingSummary lists what the guest printed, one device and view a line.
func listingSummary(seen map[string]*guestListing) string {
	var lines []string
	for k, l := range seen {
		lines = append(lines, fmt.Sprintf("%s label=%s %q", k, l.label, sortedKeys(l.files)))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
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
