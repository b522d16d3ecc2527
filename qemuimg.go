package qemu

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"strings"
	"time"
)

// QemuImg runs qemu-img, QEMU's disk image tool, one process a call. Its
// zero value runs qemu-img from PATH.
//
// Every method honours its context: when ctx ends, qemu-img is killed and
// the error wraps ctx.Err(). Create and Convert write their output under a
// temporary name beside it and rename it into place only when qemu-img
// succeeds, so a failed or cancelled call leaves no partial image (and an
// existing file at that path untouched); the new image has mode 0600.
// Resize and Commit change images in place, as qemu-img does: a Commit
// stopped half-way leaves the overlay whole and part of its data already
// copied into the backing file. A failure's error carries qemu-img's own
// message, with the caller's path where qemu-img named a temporary file.
//
// Every method that opens an existing image takes its format, passed to
// qemu-img as -f, and refuses to run without it, except Info, which is
// how a format is found. qemu-img guesses a format it is not given from
// the image's first bytes, and those are the guest's to write: a guest
// that writes a qcow2 header into its raw disk makes a guessing qemu-img
// read the disk as qcow2, with any host file it names as its backing
// file, so that Convert copies that file out and Commit writes into it.
// Guess (Info with no Format) only for an image no guest has written,
// and keep the answer. The formats of backing files come from the
// overlay's header, where Create always records them (qemu-img guesses
// one that an image made elsewhere lacks).
//
// Paths are file names: a relative one that qemu-img would read as
// something else (a protocol for "vm:1.qcow2", a node definition for
// "json:{...}", an option for "-disk") is passed with "./" before it.
type QemuImg struct {
	// Path is the qemu-img executable; "" means qemu-img from PATH.
	Path string
}

// qemuImgWaitDelay bounds how long a killed qemu-img's output may stay
// open, in case something it started still holds it.
const qemuImgWaitDelay = 2 * time.Second

// maxToolOutput caps how much of qemu-img's stderr goes into an error.
const maxToolOutput = 4 << 10

// ErrImageCheckNotSupported is returned by QemuImg.Check for an image
// whose format has no consistency check (raw, for one).
var ErrImageCheckNotSupported = errors.New("the image format does not support checks")

// CreateImageOptions says what image QemuImg.Create makes.
type CreateImageOptions struct {
	// Format is the image format; "" means qcow2.
	Format string
	// Size is the virtual size in bytes. With a BackingFile, 0 means the
	// backing file's size.
	Size int64
	// BackingFile makes the image an overlay on that file: reads of what
	// the image has not written come from it. A relative name is
	// relative to the image's directory, and is recorded as given (with
	// "./" before it where it would not read as a file name; see QemuImg).
	BackingFile string
	// BackingFormat is the backing file's format, needed with a
	// BackingFile (qemu-img no longer guesses it).
	BackingFormat string
}

// Create makes a new image at path, replacing what is there.
func (q QemuImg) Create(ctx context.Context, path string, opts CreateImageOptions) error {
	format := opts.Format
	if format == "" {
		format = "qcow2"
	}
	switch {
	case opts.Size < 0:
		return fmt.Errorf("qemu: qemu-img create %s: negative size %d", path, opts.Size)
	case opts.Size == 0 && opts.BackingFile == "":
		return fmt.Errorf("qemu: qemu-img create %s: no size and no backing file", path)
	case opts.BackingFile != "" && opts.BackingFormat == "":
		return fmt.Errorf("qemu: qemu-img create %s: backing file %s has no BackingFormat", path, opts.BackingFile)
	}
	err := writeFileAtomic(path, func(f *os.File) error {
		args := []string{"create", "-q", "-f", format}
		if opts.BackingFile != "" {
			args = append(args, "-b", plainImagePath(opts.BackingFile), "-F", opts.BackingFormat)
		}
		args = append(args, plainImagePath(f.Name()))
		if opts.Size > 0 {
			args = append(args, strconv.FormatInt(opts.Size, 10))
		}
		_, _, err := q.run(ctx, qemuImgCall{args: args, tmp: f.Name(), path: path})
		return err
	})
	if err != nil {
		return fmt.Errorf("qemu: qemu-img create %s: %w", path, err)
	}
	return nil
}

// DiskImageInfo is what qemu-img info says of one image: the fields of
// QEMU's ImageInfo that qemu-img fills in (block.go's ImageInfo holds the
// few that query-named-block-nodes gives).
type DiskImageInfo struct {
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	// ActualSize is the space the file takes on its file system.
	ActualSize  int64 `json:"actual-size"`
	ClusterSize int64 `json:"cluster-size"`
	Encrypted   bool  `json:"encrypted"`
	// DirtyFlag says the image was not closed cleanly.
	DirtyFlag bool `json:"dirty-flag"`
	// BackingFilename is the backing file as the image records it;
	// FullBackingFilename is where qemu-img found it.
	BackingFilename     string `json:"backing-filename"`
	FullBackingFilename string `json:"full-backing-filename"`
	BackingFormat       string `json:"backing-filename-format"`
	// FormatSpecific is qemu-img's format-specific object as it sent it
	// ({"type": "qcow2", "data": {...}}), or nil.
	FormatSpecific json.RawMessage `json:"format-specific"`
}

// InfoImageOptions qualifies QemuImg.Info.
type InfoImageOptions struct {
	// Format is the image's format; "" lets qemu-img guess it, which is
	// safe only for an image no guest has written (see QemuImg).
	Format string
}

// Info describes the image at path and its backing chain: the image
// first, then its backing file, that file's backing file, and so on.
func (q QemuImg) Info(ctx context.Context, path string, opts InfoImageOptions) ([]DiskImageInfo, error) {
	args := []string{"info", "--output=json", "--backing-chain"}
	if opts.Format != "" {
		args = append(args, "-f", opts.Format)
	}
	out, _, err := q.run(ctx, qemuImgCall{args: append(args, plainImagePath(path))})
	if err != nil {
		return nil, fmt.Errorf("qemu: qemu-img info %s: %w", path, err)
	}
	var chain []DiskImageInfo
	if err := json.Unmarshal(out, &chain); err != nil {
		return nil, fmt.Errorf("qemu: qemu-img info %s: reading its output: %w", path, err)
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("qemu: qemu-img info %s: no image in its output", path)
	}
	return chain, nil
}

// ImageCheck is what qemu-img check found in an image.
type ImageCheck struct {
	Filename string `json:"filename"`
	Format   string `json:"format"`
	// CheckErrors counts what the check could not read or verify;
	// Corruptions counts metadata errors that can lose data; Leaks
	// counts clusters allocated but unused, which waste space only.
	CheckErrors int64 `json:"check-errors"`
	Corruptions int64 `json:"corruptions"`
	Leaks       int64 `json:"leaks"`
	// The fixed counts stay 0: Check never repairs.
	CorruptionsFixed   int64 `json:"corruptions-fixed"`
	LeaksFixed         int64 `json:"leaks-fixed"`
	ImageEndOffset     int64 `json:"image-end-offset"`
	TotalClusters      int64 `json:"total-clusters"`
	AllocatedClusters  int64 `json:"allocated-clusters"`
	FragmentedClusters int64 `json:"fragmented-clusters"`
	CompressedClusters int64 `json:"compressed-clusters"`
}

// Clean reports whether the check found nothing wrong.
func (c ImageCheck) Clean() bool {
	return c.CheckErrors == 0 && c.Corruptions == 0 && c.Leaks == 0
}

// CheckImageOptions qualifies QemuImg.Check.
type CheckImageOptions struct {
	// Format is the image's format, which must be given (see QemuImg).
	Format string
}

// Check checks the consistency of the image at path without changing
// it. Corruptions and leaks are results, not errors: the error is for a
// check that could not run or finish (then the ImageCheck holds what
// qemu-img reported, if anything), and wraps ErrImageCheckNotSupported
// for a format that has no check.
func (q QemuImg) Check(ctx context.Context, path string, opts CheckImageOptions) (ImageCheck, error) {
	var c ImageCheck
	if err := requireImageFormat("Format", opts.Format); err != nil {
		return c, fmt.Errorf("qemu: qemu-img check %s: %w", path, err)
	}
	// Exit status 2 means corruptions, 3 leaks: both are results.
	out, code, err := q.run(ctx, qemuImgCall{
		args: []string{"check", "--output=json", "-f", opts.Format, plainImagePath(path)},
		ok:   []int{2, 3},
	})
	if code == 63 {
		return c, fmt.Errorf("qemu: qemu-img check %s: %w", path, ErrImageCheckNotSupported)
	}
	if jerr := json.Unmarshal(out, &c); err == nil && jerr != nil {
		err = fmt.Errorf("reading its output: %w", jerr)
	}
	if err != nil {
		return c, fmt.Errorf("qemu: qemu-img check %s: %w", path, err)
	}
	return c, nil
}

// ConvertImageOptions says how QemuImg.Convert writes its copy.
type ConvertImageOptions struct {
	// Format is the output format; "" means raw, as for qemu-img.
	Format string
	// SourceFormat is the input's format, which must be given (see
	// QemuImg).
	SourceFormat string
	// Compress compresses the output's data (qcow2 supports it).
	Compress bool
	// Progress, if set, is called with qemu-img's progress in percent
	// (0 to 100) each time it reports some, in order, from one goroutine,
	// and never after Convert returns.
	Progress func(percent float64)
}

// Convert copies the image src, with everything it reads through its
// backing chain, into a new image dst with no backing file.
func (q QemuImg) Convert(ctx context.Context, src, dst string, opts ConvertImageOptions) error {
	format := opts.Format
	if format == "" {
		format = "raw"
	}
	if err := requireImageFormat("SourceFormat", opts.SourceFormat); err != nil {
		return fmt.Errorf("qemu: qemu-img convert %s to %s: %w", src, dst, err)
	}
	err := writeFileAtomic(dst, func(f *os.File) error {
		args := []string{"convert", "-O", format, "-f", opts.SourceFormat}
		if opts.Compress {
			args = append(args, "-c")
		}
		var progress *progressWriter
		if opts.Progress != nil {
			args = append(args, "-p")
			progress = &progressWriter{report: opts.Progress}
		}
		args = append(args, plainImagePath(src), plainImagePath(f.Name()))
		_, _, err := q.run(ctx, qemuImgCall{args: args, progress: progress, tmp: f.Name(), path: dst})
		return err
	})
	if err != nil {
		return fmt.Errorf("qemu: qemu-img convert %s to %s: %w", src, dst, err)
	}
	return nil
}

// ResizeImageOptions qualifies QemuImg.Resize.
type ResizeImageOptions struct {
	// Format is the image's format, which must be given (see QemuImg).
	Format string
	// Shrink allows a size below the current one, which drops the data
	// past it. Without it, qemu-img refuses to shrink.
	Shrink bool
}

// Resize sets the virtual size of the image at path to size bytes.
func (q QemuImg) Resize(ctx context.Context, path string, size int64, opts ResizeImageOptions) error {
	if size <= 0 {
		return fmt.Errorf("qemu: qemu-img resize %s: size %d is not positive", path, size)
	}
	if err := requireImageFormat("Format", opts.Format); err != nil {
		return fmt.Errorf("qemu: qemu-img resize %s: %w", path, err)
	}
	args := []string{"resize", "-q", "-f", opts.Format}
	if opts.Shrink {
		args = append(args, "--shrink")
	}
	args = append(args, plainImagePath(path), strconv.FormatInt(size, 10))
	if _, _, err := q.run(ctx, qemuImgCall{args: args}); err != nil {
		return fmt.Errorf("qemu: qemu-img resize %s: %w", path, err)
	}
	return nil
}

// CommitImageOptions qualifies QemuImg.Commit.
type CommitImageOptions struct {
	// Format is the overlay's format, which must be given (see QemuImg).
	Format string
}

// Commit writes what the overlay at path holds into its backing file, and
// empties the overlay.
func (q QemuImg) Commit(ctx context.Context, path string, opts CommitImageOptions) error {
	if err := requireImageFormat("Format", opts.Format); err != nil {
		return fmt.Errorf("qemu: qemu-img commit %s: %w", path, err)
	}
	if _, _, err := q.run(ctx, qemuImgCall{args: []string{"commit", "-q", "-f", opts.Format, plainImagePath(path)}}); err != nil {
		return fmt.Errorf("qemu: qemu-img commit %s: %w", path, err)
	}
	return nil
}

// CompareImageOptions qualifies QemuImg.Compare.
type CompareImageOptions struct {
	// FormatA and FormatB are the formats of a and b, which must be
	// given (see QemuImg).
	FormatA, FormatB string
}

// Compare reports whether the images a and b hold the same guest-visible
// content, whatever their formats (an unallocated area reads as zeros); a
// difference in size counts only if the larger image holds anything but
// zeros past the smaller one's end.
func (q QemuImg) Compare(ctx context.Context, a, b string, opts CompareImageOptions) (bool, error) {
	for _, f := range []struct{ field, format string }{{"FormatA", opts.FormatA}, {"FormatB", opts.FormatB}} {
		if err := requireImageFormat(f.field, f.format); err != nil {
			return false, fmt.Errorf("qemu: qemu-img compare %s %s: %w", a, b, err)
		}
	}
	// Exit status 0 means identical, 1 different, more an error.
	_, code, err := q.run(ctx, qemuImgCall{
		args: []string{"compare", "-q", "-f", opts.FormatA, "-F", opts.FormatB, plainImagePath(a), plainImagePath(b)},
		ok:   []int{1},
	})
	if err != nil {
		return false, fmt.Errorf("qemu: qemu-img compare %s %s: %w", a, b, err)
	}
	return code == 0, nil
}

// qemuImgCall is one run of qemu-img.
type qemuImgCall struct {
	args []string
	// progress, if not nil, reads stdout, as qemu-img writes it.
	progress *progressWriter
	// ok lists the exit statuses besides 0 that are results, not errors.
	ok []int
	// tmp, if set, is the temporary file that stands for path, the
	// caller's name, which qemu-img's messages then give instead.
	tmp, path string
}

// requireImageFormat refuses an empty format, which would have qemu-img
// guess it.
func requireImageFormat(field, format string) error {
	if format == "" {
		return fmt.Errorf("no %s given: qemu-img would guess it from the image's content, which a guest can forge", field)
	}
	return nil
}

// plainImagePath returns a path that qemu-img reads as a file name. QEMU
// reads a colon before the first slash as the end of a protocol's name
// ("json:" starts a node definition), and qemu-img a leading dash as an
// option: such a path gets "./" before it.
func plainImagePath(p string) string {
	first, _, _ := strings.Cut(p, "/")
	if strings.Contains(first, ":") || strings.HasPrefix(p, "-") {
		return "./" + p
	}
	return p
}

// run runs qemu-img and returns its stdout and exit status. An exit
// status other than 0 is an error, with qemu-img's stderr, unless it is in
// c.ok.
func (q QemuImg) run(ctx context.Context, c qemuImgCall) ([]byte, int, error) {
	bin := q.Path
	if bin == "" {
		var err error
		if bin, err = exec.LookPath("qemu-img"); err != nil {
			return nil, -1, fmt.Errorf("qemu-img not found, install it (Debian and Ubuntu package qemu-utils, Fedora qemu-img): %w", err)
		}
	}
	if ctx.Err() != nil {
		return nil, -1, contextError(ctx)
	}
	cmd := exec.CommandContext(ctx, bin, c.args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout = &stdout
	if c.progress != nil {
		cmd.Stdout = c.progress
	}
	cmd.Stderr = &stderr
	cmd.WaitDelay = qemuImgWaitDelay
	err := cmd.Run()
	if err == nil {
		return stdout.Bytes(), 0, nil
	}
	if ctx.Err() != nil {
		return nil, -1, fmt.Errorf("qemu-img stopped: %w", contextError(ctx))
	}
	code := -1
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		code = exit.ExitCode()
		for _, ok := range c.ok {
			if code == ok {
				return stdout.Bytes(), code, nil
			}
		}
	}
	msg := strings.TrimSpace(stderr.String())
	if c.tmp != "" {
		msg = strings.ReplaceAll(msg, plainImagePath(c.tmp), c.path)
	}
	if len(msg) > maxToolOutput {
		msg = "..." + msg[len(msg)-maxToolOutput:]
	}
	if msg != "" {
		err = fmt.Errorf("%w: %s", err, msg)
	}
	return stdout.Bytes(), code, err
}

// progressLine matches what qemu-img -p prints, "    (12.34/100%)".
var progressLine = regexp.MustCompile(`\((\d+(?:\.\d+)?)/100%\)`)

// progressWriter receives qemu-img's stdout with -p: reports separated by
// carriage returns (newlines at the end). It calls report for each
// complete one, so a report split across writes is read whole.
type progressWriter struct {
	report  func(float64)
	partial []byte
}

func (p *progressWriter) Write(b []byte) (int, error) {
	p.partial = append(p.partial, b...)
	for {
		i := bytes.IndexAny(p.partial, "\r\n")
		if i < 0 {
			break
		}
		if m := progressLine.FindSubmatch(p.partial[:i]); m != nil {
			if v, err := strconv.ParseFloat(string(m[1]), 64); err == nil {
				p.report(v)
			}
		}
		p.partial = p.partial[i+1:]
	}
	// A line without an end is not qemu-img's progress: keep it bounded.
	if len(p.partial) > 4096 {
		p.partial = p.partial[len(p.partial)-4096:]
	}
	return len(b), nil
}
