package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// Files of a NoCloud seed, at the root of a volume labelled cidata.
const (
	noCloudLabel         = "cidata"
	noCloudUserData      = "user-data"
	noCloudMetaData      = "meta-data"
	noCloudNetworkConfig = "network-config"
	noCloudVendorData    = "vendor-data"
)

// CreateCloudInitISO writes to isoPath an OpenStack ConfigDrive ISO for
// cloud-init: an ISO 9660 image labelled config-2 that holds metaData as
// openstack/latest/meta_data.json and userData as openstack/latest/user_data.
//
// It writes the image itself (see ISOImage: Rock Ridge and Joliet names,
// so the long lower-case names reach the guest), with no external tool.
// scratchDir must be an existing directory, as it had to be when the image
// was built from a tree laid out there; nothing is written in it now. The
// image is written under a temporary name in isoPath's directory and
// renamed to isoPath only once it is complete, so a failed or cancelled
// call never leaves a partial isoPath, and an existing isoPath is replaced
// atomically. The new file has mode 0600, since user data often carries
// secrets.
//
// isoPath's directory must exist, and metaData must be valid JSON. If ctx
// ends first, the error wraps ctx.Err(). The image records the current
// second as its time; ConfigDriveSeed.ISO gives the same image to write
// with a ModTime of the caller's choice, for the same bytes every time.
//
// A typical use attaches the result to a VM as a CD-ROM (or a read-only
// disk) with a Disk, which escapes the path:
//
//	meta := []byte(`{"uuid": "4f7d0c52-1c2e-4b8a-9d53-0e6f2a7b9c10", "hostname": "vm-1"}`)
//	user := []byte("#cloud-config\nssh_authorized_keys:\n  - ssh-ed25519 AAAA... admin\n")
//	iso := "/var/lib/vms/vm-1-seed.iso"
//	if err := qemu.CreateCloudInitISO(ctx, os.TempDir(), iso, user, meta); err != nil {
//		return err
//	}
//	config.Devices = append(config.Devices, qemu.Disk{ID: "seed", File: iso, Interface: qemu.DiskIDE, CDROM: true})
func CreateCloudInitISO(ctx context.Context, scratchDir, isoPath string, userData, metaData []byte) error {
	if err := checkISOPaths(scratchDir, isoPath); err != nil {
		return err
	}
	if ctx.Err() != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, contextError(ctx))
	}
	im, err := ConfigDriveSeed{UserData: userData, MetaData: metaData}.ISO()
	if err != nil {
		return fmt.Errorf("qemu: cloud-init iso %s: %w", isoPath, err)
	}
	return writeSeed(ctx, "cloud-init iso", isoPath, im)
}

// ConfigDriveSeed is what cloud-init's ConfigDrive datasource reads from a
// volume labelled config-2, as CreateCloudInitISO writes it: MetaData,
// which must be valid JSON, as openstack/latest/meta_data.json and
// UserData as openstack/latest/user_data.
type ConfigDriveSeed struct {
	UserData []byte
	MetaData []byte
}

// ISO returns the seed as an ISOImage labelled config-2, the image that
// CreateCloudInitISO writes, to be written by its Write or WriteFile (with
// a fixed ModTime, for the same bytes from the same seed every time). The
// image refers to the seed's slices, which must not change until it is
// written. It is an error if MetaData is not valid JSON.
func (s ConfigDriveSeed) ISO() (*ISOImage, error) {
	if !json.Valid(s.MetaData) {
		return nil, errors.New("meta data is not valid JSON")
	}
	im := &ISOImage{Label: configDriveLabel}
	for _, f := range []struct {
		name string
		data []byte
	}{{configDriveMetaData, s.MetaData}, {configDriveUserData, s.UserData}} {
		if err := im.AddFile(f.name, f.data); err != nil {
			return nil, err
		}
	}
	return im, nil
}

// NoCloudSeed is what cloud-init's NoCloud datasource reads from a volume
// labelled cidata: files user-data and meta-data, always present (cloud-init
// wants both, empty or not), and network-config and vendor-data when they
// are not nil. meta-data is YAML (JSON is YAML too) and usually names the
// instance-id; user-data is a #cloud-config document or a script.
type NoCloudSeed struct {
	UserData      []byte
	MetaData      []byte
	NetworkConfig []byte
	VendorData    []byte
}

// ISO returns the seed as an ISOImage labelled cidata, to be written by
// its Write or WriteFile (with a fixed ModTime, for the same bytes from the
// same seed every time). The image refers to the seed's slices, which must
// not change until it is written.
func (s NoCloudSeed) ISO() (*ISOImage, error) {
	im := &ISOImage{Label: noCloudLabel}
	for _, f := range []struct {
		name string
		data []byte
		keep bool
	}{
		{noCloudUserData, s.UserData, true},
		{noCloudMetaData, s.MetaData, true},
		{noCloudNetworkConfig, s.NetworkConfig, s.NetworkConfig != nil},
		{noCloudVendorData, s.VendorData, s.VendorData != nil},
	} {
		if !f.keep {
			continue
		}
		if err := im.AddFile(f.name, f.data); err != nil {
			return nil, err
		}
	}
	return im, nil
}

// CreateNoCloudISO writes seed to isoPath as an ISO 9660 image for
// cloud-init's NoCloud datasource (see NoCloudSeed), with no external
// tool. Like CreateCloudInitISO, it writes under a temporary name in
// isoPath's directory and renames the complete image to isoPath, which
// gets mode 0600; a failed or cancelled call leaves no partial image and
// an existing isoPath untouched. If ctx ends first, the error wraps
// ctx.Err().
//
// Attach the result to the VM as a CD-ROM or a read-only disk with a Disk:
//
//	seed := qemu.NoCloudSeed{
//		MetaData: []byte("instance-id: vm-1\nlocal-hostname: vm-1\n"),
//		UserData: []byte("#cloud-config\npassword: secret\nchpasswd: {expire: false}\n"),
//	}
//	if err := qemu.CreateNoCloudISO(ctx, "/var/lib/vms/vm-1-cidata.iso", seed); err != nil {
//		return err
//	}
//	config.Devices = append(config.Devices, qemu.Disk{ID: "cidata", File: "/var/lib/vms/vm-1-cidata.iso", ReadOnly: true})
func CreateNoCloudISO(ctx context.Context, isoPath string, seed NoCloudSeed) error {
	if isoPath == "" {
		return errors.New("qemu: nocloud iso: output path not given")
	}
	if err := checkDir(filepath.Dir(isoPath)); err != nil {
		return fmt.Errorf("qemu: nocloud iso %s: output directory: %w", isoPath, err)
	}
	im, err := seed.ISO()
	if err != nil {
		return fmt.Errorf("qemu: nocloud iso %s: %w", isoPath, err)
	}
	return writeSeed(ctx, "nocloud iso", isoPath, im)
}

// writeSeed writes a seed image atomically, stamped with the current
// second.
func writeSeed(ctx context.Context, what, isoPath string, im *ISOImage) error {
	if ctx.Err() != nil {
		return fmt.Errorf("qemu: %s %s: %w", what, isoPath, contextError(ctx))
	}
	im.ModTime = time.Now().Truncate(time.Second)
	err := writeFileAtomic(isoPath, func(f *os.File) error { return im.write(ctx, f) })
	if err != nil {
		return fmt.Errorf("qemu: %s %s: %w", what, isoPath, err)
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

// writeFileAtomic creates a temporary file beside path (mode 0600), has
// write fill it, syncs it, renames it to path and syncs path's directory,
// so the new name survives a crash. On any failure, or a panic in write,
// it removes the temporary file. A failure to sync the directory is
// reported although path is then in place.
func writeFileAtomic(path string, write func(f *os.File) error) error {
	if path == "" {
		return errors.New("output path not given")
	}
	if fi, err := os.Stat(path); err == nil && fi.IsDir() {
		return errors.New("output path is a directory")
	}
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	renamed := false
	defer func() {
		if !renamed {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := write(f); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	renamed = true
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("syncing directory: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("syncing directory %s: %w", dir, err)
	}
	return nil
}
