package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"
)

// configDriveLabel is the volume label cloud-init looks for when it searches
// for an OpenStack ConfigDrive.
const configDriveLabel = "config-2"

// Paths of the two files inside a ConfigDrive.
const (
	configDriveMetaData = "openstack/latest/meta_data.json"
	configDriveUserData = "openstack/latest/user_data"
)

// isoTool is a program that can build an ISO 9660 image from a directory.
type isoTool struct {
	name string // executable looked up in PATH
	pkg  string // Debian package that provides it
	args func(out, label, root string) []string
}

// isoTools lists the tools CreateCloudInitISO tries, best first. Both write
// Rock Ridge (-R) and Joliet (-J) names: plain ISO 9660 would turn
// meta_data.json into META_DAT.JSO, which cloud-init cannot find.
var isoTools = []isoTool{
	{name: "xorriso", pkg: "xorriso", args: func(out, label, root string) []string {
		return []string{"-as", "mkisofs", "-quiet", "-o", out, "-V", label, "-R", "-J", root}
	}},
	{name: "genisoimage", pkg: "genisoimage", args: func(out, label, root string) []string {
		// Without -input-charset, genisoimage guesses it from the locale
		// and says so on stderr.
		return []string{"-quiet", "-o", out, "-V", label, "-R", "-J", "-input-charset", "utf-8", root}
	}},
}

// isoToolWaitDelay bounds how long CreateCloudInitISO waits for a killed
// tool's stderr to close, in case something it started still holds it.
const isoToolWaitDelay = 2 * time.Second

// maxToolOutput caps how much of a failed tool's stderr goes into the error.
const maxToolOutput = 4 << 10

// CreateCloudInitISO writes to isoPath an OpenStack ConfigDrive ISO for
// cloud-init: an ISO 9660 image labelled config-2 that holds metaData as
// openstack/latest/meta_data.json and userData as openstack/latest/user_data.
//
// It builds the image with xorriso, or with genisoimage when xorriso is not
// installed, from a temporary tree it creates under scratchDir and removes
// before returning, whether it succeeds or not. The image is written under a
// temporary name in isoPath's directory and renamed to isoPath only once it
// is complete, so a failed or cancelled call never leaves a partial isoPath,
// and an existing isoPath is replaced atomically. The new file has mode 0600,
// since user data often carries secrets.
//
// scratchDir and isoPath's directory must exist, and metaData must be valid
// JSON. If ctx ends first, the tool is killed and the error wraps ctx.Err().
//
// A typical use attaches the result to a VM as a read-only disk:
//
//	meta := []byte(`{"uuid": "4f7d0c52-1c2e-4b8a-9d53-0e6f2a7b9c10", "hostname": "vm-1"}`)
//	user := []byte("#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA... admin\n")
//	iso := "/var/lib/vms/vm-1-seed.iso"
//	if err := qemu.CreateCloudInitISO(ctx, os.TempDir(), iso, user, meta); err != nil {
//		return err
//	}
//	params = append(params, "-drive", "file="+iso+",if=virtio,format=raw,readonly=on")
//
// (A path with a comma must have it doubled inside -drive.)
func CreateCloudInitISO(ctx context.Context, scratchDir, isoPath string, userData, metaData []byte) error {
	if err := checkISOPaths(scratchDir, isoPath); err != nil {
		return err
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}
	if !json.Valid(metaData) {
		return fmt.Errorf("qemu: cloud-init iso %s: meta data is not valid JSON", isoPath)
	}
	bin, tool, err := findISOTool()
	if err != nil {
		return err
	}

	tmpDir, err := os.MkdirTemp(scratchDir, "cloud-init-")
	if err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}
	defer os.RemoveAll(tmpDir)
	root, err := writeConfigDrive(tmpDir, userData, metaData)
	if err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}

	out, err := os.CreateTemp(filepath.Dir(isoPath), "."+filepath.Base(isoPath)+".tmp*")
	if err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}
	tmpISO := out.Name()
	out.Close()
	if err := buildISO(ctx, bin, tool, tmpISO, root); err != nil {
		os.Remove(tmpISO)
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}
	if err := commitFile(tmpISO, isoPath); err != nil {
		os.Remove(tmpISO)
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}
	return nil
}

// checkISOPaths rejects arguments that would make CreateCloudInitISO fail
// half-way, before it creates anything.
func checkISOPaths(scratchDir, isoPath string) error {
	if isoPath == "" {
		return errors.New("qemu: cloud-init iso: output path not given")
	}
	if scratchDir == "" {
		return fmt.Errorf("qemu: cloud-init iso %s: scratch directory not given", isoPath)
	}
	if err := checkDir(scratchDir); err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: scratch directory: %w", isoPath, err)
	}
	if err := checkDir(filepath.Dir(isoPath)); err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: output directory: %w", isoPath, err)
	}
	if fi, err := os.Stat(isoPath); err == nil && fi.IsDir() {
		return fmt.Errorf("qemu: cloud-init iso %s: output path is a directory", isoPath)
	}
	return nil
}

// checkDir reports an error unless dir is an existing directory.
func checkDir(dir string) error {
	fi, err := os.Stat(dir)
	if err != nil {
		return err
	}
	if !fi.IsDir() {
		return fmt.Errorf("%s is not a directory", dir)
	}
	return nil
}

// findISOTool returns the path of the first of isoTools found in PATH.
func findISOTool() (string, isoTool, error) {
	var firstErr error
	var names []string
	for _, tool := range isoTools {
		bin, err := exec.LookPath(tool.name)
		if err == nil {
			return bin, tool, nil
		}
		if firstErr == nil {
			firstErr = err
		}
		names = append(names, fmt.Sprintf("%s (Debian package %s)", tool.name, tool.pkg))
	}
	return "", isoTool{}, fmt.Errorf("qemu: cloud-init iso: no ISO tool found, install %s: %w",
		strings.Join(names, " or "), firstErr)
}

// writeConfigDrive lays out the ConfigDrive files under dir and returns the
// root of the tree. dir itself stays private to the caller (MkdirTemp makes
// it 0700); the tree inside is world-readable because Rock Ridge records its
// modes in the image, where a guest's cloud-init must be able to read them.
func writeConfigDrive(dir string, userData, metaData []byte) (string, error) {
	root := filepath.Join(dir, "drive")
	latest := filepath.Join(root, filepath.FromSlash(filepath.Dir(configDriveMetaData)))
	if err := os.MkdirAll(latest, 0o755); err != nil {
		return "", err
	}
	files := []struct {
		name string
		data []byte
	}{{configDriveMetaData, metaData}, {configDriveUserData, userData}}
	for _, f := range files {
		if err := os.WriteFile(filepath.Join(root, filepath.FromSlash(f.name)), f.data, 0o644); err != nil {
			return "", err
		}
	}
	return root, nil
}

// buildISO runs tool to write the image of root to out.
func buildISO(ctx context.Context, bin string, tool isoTool, out, root string) error {
	cmd := exec.CommandContext(ctx, bin, tool.args(out, configDriveLabel, root)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	cmd.WaitDelay = isoToolWaitDelay
	err := cmd.Run()
	if err == nil {
		return nil
	}
	if ctxErr := ctx.Err(); ctxErr != nil {
		return fmt.Errorf("%s stopped: %w", tool.name, ctxErr)
	}
	msg := strings.TrimSpace(stderr.String())
	if len(msg) > maxToolOutput {
		msg = "..." + msg[len(msg)-maxToolOutput:]
	}
	if msg == "" {
		return fmt.Errorf("%s: %w", tool.name, err)
	}
	return fmt.Errorf("%s: %w: %s", tool.name, err, msg)
}

// commitFile flushes tmp to disk and renames it to path, so that path holds
// either its old content or the complete new one, even after a crash.
func commitFile(tmp, path string) error {
	f, err := os.Open(tmp)
	if err != nil {
		return err
	}
	err = f.Sync()
	f.Close()
	if err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
