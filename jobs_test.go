package qemu

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

func jobEvent(id, status string) string {
	return event("JOB_STATUS_CHANGE", fmt.Sprintf(`{"id": %q, "status": %q}`, id, status), 1, 0)
}

func jobsReply(id, status, errDesc string, current, total int64) string {
	e := ""
	if errDesc != "" {
		e = fmt.Sprintf(`, "error": %q`, errDesc)
	}
	return fmt.Sprintf(`{"return": [{"id": "other", "type": "stream", "status": "running", "current-progress": 0, "total-progress": 1}, {"id": %q, "type": "mirror", "status": %q, "current-progress": %d, "total-progress": %d%s}]}`, id, status, current, total, e)
}

const (
	wireQueryJobs  = `{"execute":"query-jobs"}`
	wireMirrorJob0 = `{"execute":"blockdev-mirror","arguments":{"auto-dismiss":false,"job-id":"job0","device":"src","target":"dst","sync":"full"}}`
)

// A mirror is completed once ready, after Ready, and dismissed once
// concluded; the events QEMU sends before its reply are not missed.
func TestMirrorRunsToItsEnd(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ready := make(chan struct{})
	var progress []JobInfo
	var final JobInfo
	ch := pendingCall(func() error {
		var err error
		final, err = s.q.Mirror(ctxTimeout(t, 10*time.Second), BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{
			ProgressInterval: time.Millisecond,
			Ready:            func(context.Context) error { close(ready); return nil },
			Progress:         func(j JobInfo) { progress = append(progress, j) },
		})
		return err
	})
	s.p.expect(t, wireMirrorJob0)
	s.p.send(jobEvent("job0", "created"), jobEvent("other", "ready"), jobEvent("job0", "running"), okReply)
	// Polls until the job is ready, each answered; another job's ready
	// is not this one's.
	for polls := 0; ; polls++ {
		cmd := s.p.recv()
		if cmd == `{"execute":"job-complete","arguments":{"id":"job0"}}` {
			break
		}
		if cmd != wireQueryJobs {
			t.Fatalf("got %q", cmd)
		}
		s.p.send(jobsReply("job0", "running", "", 5, 10))
		if polls == 2 {
			s.p.send(jobEvent("job0", "ready"))
		}
	}
	select {
	case <-ready:
	default:
		t.Fatal("job-complete before Ready")
	}
	s.p.send(jobEvent("job0", "waiting"), jobEvent("job0", "pending"), jobEvent("job0", "concluded"), okReply)
	rest := s.p.serve(func(cmd string) []string {
		if cmd == wireQueryJobs {
			return []string{jobsReply("job0", "concluded", "", 10, 10)}
		}
		return []string{jobEvent("job0", "null"), okReply}
	})
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	s.q.Shutdown()
	if lines := <-rest; len(lines) == 0 || lines[len(lines)-1] != `{"execute":"job-dismiss","arguments":{"id":"job0"}}` {
		t.Errorf("after job-complete: %q, want polls, query-jobs, job-dismiss", lines)
	}
	if final.Status != "concluded" || final.CurrentProgress != 10 {
		t.Errorf("final %+v", final)
	}
	if len(progress) < 4 || progress[0].CurrentProgress != 5 || progress[len(progress)-1].CurrentProgress != 10 {
		t.Errorf("progress %+v, want 5 (at least 3 times) ... 10", progress)
	}
}

// A ready mirror that pauses and becomes ready again is completed once:
// Ready is not called again, and no second job-complete is sent.
func TestMirrorReadyOnce(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	readies := 0
	done := s.p.serve(func(cmd string) []string {
		switch {
		case strings.Contains(cmd, `"blockdev-mirror"`):
			return []string{jobEvent("job0", "running"), okReply, jobEvent("job0", "ready")}
		case strings.Contains(cmd, `"job-complete"`):
			return []string{okReply, jobEvent("job0", "standby"), jobEvent("job0", "ready"),
				jobEvent("job0", "waiting"), jobEvent("job0", "pending"), jobEvent("job0", "concluded")}
		case cmd == wireQueryJobs:
			return []string{jobsReply("job0", "concluded", "", 10, 10)}
		}
		return []string{okReply}
	})
	_, err := s.q.Mirror(ctxTimeout(t, 5*time.Second), BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{
		Ready: func(context.Context) error { readies++; return nil }})
	s.q.Shutdown()
	lines := <-done
	completes := 0
	for _, cmd := range lines {
		if strings.Contains(cmd, `"job-complete"`) {
			completes++
		}
	}
	if err != nil || readies != 1 || completes != 1 {
		t.Errorf("error %v, Ready called %d times, %d job-complete; sent %q", err, readies, completes, lines)
	}
}

// A job that concludes as its context ends is read and dismissed all the
// same, its result reported; an error names each command once.
func TestJobConcludesAsContextEnds(t *testing.T) {
	for _, dismissed := range []bool{true, false} {
		t.Run(fmt.Sprintf("dismissed=%v", dismissed), func(t *testing.T) {
			s := connect(t, "10.0.2", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			polls := 0
			done := s.p.serve(func(cmd string) []string {
				switch {
				case strings.Contains(cmd, `"block-stream"`):
					return []string{okReply, jobEvent("job0", "running")}
				case cmd == wireQueryJobs && polls == 0:
					polls++
					return []string{jobEvent("job0", "concluded"), jobsReply("job0", "running", "", 5, 10)}
				case cmd == wireQueryJobs:
					return []string{jobsReply("job0", "concluded", "", 10, 10)}
				case strings.Contains(cmd, `"job-dismiss"`) && !dismissed:
					return []string{`{"error": {"class": "GenericError", "desc": "Job 'job0' in state 'null' cannot accept command verb 'dismiss'"}}`}
				}
				return []string{okReply}
			})
			info, err := s.q.Stream(ctx, BlockStream{JobID: "job0", Device: "top"}, JobOptions{ProgressInterval: time.Millisecond,
				Progress: func(JobInfo) { cancel() }})
			s.q.Shutdown()
			lines := <-done
			if !slices.Contains(lines, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`) || slices.Contains(lines, `{"execute":"job-cancel","arguments":{"id":"job0"}}`) {
				t.Errorf("sent %q, want job-dismiss and no job-cancel", lines)
			}
			if info.Status != "concluded" || info.CurrentProgress != 10 {
				t.Errorf("info %+v", info)
			}
			switch {
			case dismissed && err != nil:
				t.Errorf("error %v", err)
			case !dismissed && (err == nil || strings.Count(err.Error(), "qmp:") != 1 || !strings.Contains(err.Error(), "job-dismiss")):
				t.Errorf("error %v, want one naming job-dismiss under one qmp: prefix", err)
			}
		})
	}
}

// A start whose context ends before its reply is cancelled only if QEMU
// made the job (its "created" came): never a job of that id QEMU refused
// to make again, which is someone else's, and nothing is sent for a
// context that ended before the call.
func TestJobCancelsOnlyWhatItStarted(t *testing.T) {
	for _, made := range []bool{false, true} {
		t.Run(fmt.Sprintf("made=%v", made), func(t *testing.T) {
			s := connect(t, "10.0.2", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			cancelSent := false
			done := s.p.serve(func(cmd string) []string {
				switch {
				case strings.Contains(cmd, `"blockdev-mirror"`):
					cancel()
					time.Sleep(10 * time.Millisecond)
					if made {
						return []string{jobEvent("job0", "created"), jobEvent("job0", "running"), okReply}
					}
					// The other job0 changes status meanwhile.
					return []string{jobEvent("job0", "paused"), jobEvent("job0", "running"),
						`{"error": {"class": "GenericError", "desc": "Job ID 'job0' already in use"}}`}
				case strings.Contains(cmd, `"job-cancel"`):
					cancelSent = true
					return []string{okReply, jobEvent("job0", "aborting"), jobEvent("job0", "concluded")}
				case cmd == wireQueryJobs && made && cancelSent:
					return []string{jobsReply("job0", "concluded", "Operation canceled", 5, 10)}
				case cmd == wireQueryJobs:
					return []string{jobsReply("job0", "running", "", 5, 10)}
				}
				return []string{okReply}
			})
			err := returnsWithin(t, 5*time.Second, func() error {
				_, err := s.q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{})
				return err
			})
			s.q.Shutdown()
			lines := <-done
			cancelled := slices.Contains(lines, `{"execute":"job-cancel","arguments":{"id":"job0"}}`)
			dismissed := slices.Contains(lines, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`)
			if cancelled != made || dismissed != made {
				t.Errorf("sent %q: job-cancel %v, job-dismiss %v, want %v", lines, cancelled, dismissed, made)
			}
			var qerr *QMPError
			if err == nil || !errors.Is(err, context.Canceled) && !errors.As(err, &qerr) {
				t.Errorf("error %v, want the context's or QEMU's refusal", err)
			}
		})
	}
	s := connect(t, "10.0.2", nil)
	done := s.p.serve(func(string) []string { return []string{okReply} })
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := s.q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{})
	s.q.Shutdown()
	if lines := <-done; len(lines) != 0 || !errors.Is(err, context.Canceled) {
		t.Errorf("sent %q, error %v", lines, err)
	}
}

// A cancel QEMU does not carry out (a mirror whose target hangs never
// drains; a QEMU that does not answer job-cancel) ends the wait after
// the grace, with an error that says so.
func TestJobCancelPending(t *testing.T) {
	for _, answered := range []bool{true, false} {
		t.Run(fmt.Sprintf("answered=%v", answered), func(t *testing.T) {
			s := connect(t, "10.0.2", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := s.p.serve(func(cmd string) []string {
				switch {
				case strings.Contains(cmd, `"blockdev-mirror"`):
					return []string{jobEvent("job0", "created"), okReply}
				case cmd == wireQueryJobs:
					return []string{jobsReply("job0", "running", "", 5, 10)}
				case strings.Contains(cmd, `"job-cancel"`) && answered:
					return []string{okReply, jobEvent("job0", "aborting")}
				case strings.Contains(cmd, `"job-cancel"`):
					return nil
				}
				return []string{okReply}
			})
			ch := pendingCall(func() error {
				_, err := s.q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{CancelGrace: 50 * time.Millisecond})
				return err
			})
			stillPending(t, ch, "Mirror")
			cancel()
			err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
			s.q.Shutdown()
			<-done
			if !errors.Is(err, ErrCancelPending) || !errors.Is(err, context.Canceled) {
				t.Errorf("error %v, want one wrapping ErrCancelPending and the context's", err)
			}
		})
	}
}

// A job QEMU concludes with an error fails with a *JobError carrying
// QEMU's reason, and is dismissed all the same.
func TestJobFails(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	var dismissed bool
	done := s.p.serve(func(cmd string) []string {
		switch {
		case strings.Contains(cmd, `"blockdev-backup"`):
			return []string{okReply, jobEvent("job0", "running"),
				event("BLOCK_JOB_ERROR", `{"device": "job0", "operation": "write", "action": "report"}`, 1, 0),
				jobEvent("job0", "aborting"), jobEvent("job0", "concluded")}
		case cmd == wireQueryJobs:
			return []string{jobsReply("job0", "concluded", "No space left on device", 3, 10)}
		case strings.Contains(cmd, `"job-dismiss"`):
			dismissed = true
		}
		return []string{okReply}
	})
	_, err := s.q.Backup(ctxTimeout(t, 5*time.Second), BlockdevBackup{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{})
	var jerr *JobError
	if !errors.As(err, &jerr) || jerr.Desc != "No space left on device" || jerr.Type != "mirror" || jerr.Event != "write error, action report" {
		t.Fatalf("error %v (%#v)", err, jerr)
	}
	if want := "qmp: blockdev-backup job0: mirror job job0 failed: No space left on device (write error, action report)"; err.Error() != want {
		t.Errorf("error %q, want %q", err, want)
	}
	s.q.Shutdown()
	<-done
	if !dismissed {
		t.Error("the failed job was not dismissed")
	}
}

// When the context ends the job is cancelled, waited for and dismissed;
// a Ready that fails cancels it the same way.
func TestJobCancelled(t *testing.T) {
	for _, how := range []string{"context", "ready"} {
		t.Run(how, func(t *testing.T) {
			s := connect(t, "7.2.22", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			refused := errors.New("the guest is still writing")
			ch := pendingCall(func() error {
				_, err := s.q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{
					Ready: func(context.Context) error { return refused }})
				return err
			})
			s.p.expect(t, wireMirrorJob0)
			s.p.send(okReply, jobEvent("job0", "running"))
			if how == "context" {
				stillPending(t, ch, "Mirror")
				cancel()
			} else {
				s.p.send(jobEvent("job0", "ready"))
			}
			s.p.expect(t, wireQueryJobs)
			s.p.send(jobsReply("job0", "running", "", 1, 10))
			s.p.expect(t, `{"execute":"job-cancel","arguments":{"id":"job0"}}`)
			s.p.send(okReply, jobEvent("job0", "aborting"))
			stillPending(t, ch, "Mirror while aborting")
			s.p.send(jobEvent("job0", "concluded"))
			s.p.expect(t, wireQueryJobs)
			s.p.send(jobsReply("job0", "concluded", "Operation canceled", 1, 10))
			s.p.expect(t, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`)
			s.p.send(okReply)
			err := <-ch
			want := error(refused)
			if how == "context" {
				want = context.Canceled
			}
			if !errors.Is(err, want) || !strings.Contains(err.Error(), "cancelled") {
				t.Errorf("error %v, want one wrapping %v", err, want)
			}
		})
	}
}

// A job that concluded before the cancel, or before the cancel reached it,
// is reported as it ended: whether to cancel is asked of QEMU first.
func TestJobConcludedBeforeCancel(t *testing.T) {
	for _, when := range []string{"before the query", "before the cancel"} {
		t.Run(when, func(t *testing.T) {
			s := connect(t, "7.2.22", nil)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			ch := pendingCall(func() error {
				_, err := s.q.Stream(ctx, BlockStream{JobID: "job0", Device: "top"}, JobOptions{})
				return err
			})
			s.p.expect(t, `{"execute":"block-stream","arguments":{"auto-dismiss":false,"job-id":"job0","device":"top"}}`)
			s.p.send(okReply)
			stillPending(t, ch, "Stream")
			cancel()
			s.p.expect(t, wireQueryJobs)
			if when == "before the query" {
				s.p.send(jobEvent("job0", "concluded"), jobsReply("job0", "concluded", "", 10, 10))
			} else {
				s.p.send(jobsReply("job0", "running", "", 9, 10))
				s.p.expect(t, `{"execute":"job-cancel","arguments":{"id":"job0"}}`)
				s.p.send(jobEvent("job0", "concluded"), `{"error": {"class": "GenericError", "desc": "Job 'job0' in state 'concluded' cannot accept command verb 'cancel'"}}`)
				s.p.expect(t, wireQueryJobs)
				s.p.send(jobsReply("job0", "concluded", "", 10, 10))
			}
			s.p.expect(t, wireQueryJobs)
			s.p.send(jobsReply("job0", "concluded", "", 10, 10))
			s.p.expect(t, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`)
			s.p.send(okReply)
			if err := <-ch; err != nil {
				t.Errorf("error %v", err)
			}
		})
	}
}

// QEMU dying half-way ends the wait with the session's end; a refused
// start fails at once; a job needs an id.
func TestJobQEMUDiesAndRefusals(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ch := pendingCall(func() error {
		_, err := s.q.Commit(ctxTimeout(t, 10*time.Second), BlockCommit{JobID: "job0", Device: "top"}, JobOptions{})
		return err
	})
	s.p.recv()
	s.p.send(okReply, jobEvent("job0", "running"))
	s.p.conn.Close()
	if err := returnsWithin(t, 5*time.Second, func() error { return <-ch }); !errors.Is(err, ErrDisconnected) {
		t.Errorf("error %v, want one wrapping ErrDisconnected", err)
	}

	s = connect(t, "10.0.2", nil)
	done := s.p.serve(func(string) []string {
		return []string{`{"error": {"class": "GenericError", "desc": "Cannot find device='nope' nor node-name='nope'"}}`}
	})
	ctx := ctxTimeout(t, 5*time.Second)
	_, err := s.q.Backup(ctx, BlockdevBackup{JobID: "job1", Device: "nope", Target: "dst"}, JobOptions{})
	var qerr *QMPError
	if !errors.As(err, &qerr) || !strings.HasPrefix(err.Error(), "qmp: blockdev-backup job1: ") {
		t.Errorf("refused: %v", err)
	}
	for name, err := range map[string]error{
		"mirror":   second(s.q.Mirror(ctx, BlockdevMirror{Device: "a", Target: "b"}, JobOptions{})),
		"save":     second(s.q.SaveSnapshot(ctx, Snapshot{JobID: "j", Tag: "t", Devices: []string{"d"}}, JobOptions{})),
		"load":     second(s.q.LoadSnapshot(ctx, Snapshot{JobID: "j", VMState: "d", Devices: []string{"d"}}, JobOptions{})),
		"delete":   second(s.q.DeleteSnapshot(ctx, Snapshot{JobID: "j", Tag: "t"}, JobOptions{})),
		"no jobid": second(s.q.DeleteSnapshot(ctx, Snapshot{Tag: "t", Devices: []string{"d"}}, JobOptions{})),
	} {
		if err == nil || errors.As(err, &qerr) {
			t.Errorf("%s: %v, want an error before anything is sent", name, err)
		}
	}
	s.q.Shutdown()
	if lines := <-done; len(lines) != 1 {
		t.Errorf("sent %q, want only the backup", lines)
	}
}

// The real-VM layer: block jobs on the disks of a running test guest,
// while it writes to them.

// imageSum returns the SHA-256 of MiB off of an image as the host reads
// it alone, its backing chain included as its header names it. The VM
// is stopped meanwhile: a stop flushes every node (QEMU keeps qcow2
// metadata in a write-back cache), and nothing writes until cont.
func imageSum(t *testing.T, q *QMP, image string, off int) string {
	t.Helper()
	ctx := ctxTimeout(t, 10*time.Second)
	if err := q.ExecuteStop(ctx); err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := q.ExecuteCont(ctx); err != nil {
			t.Error(err)
		}
	}()
	raw := filepath.Join(t.TempDir(), "image.raw")
	qemuImg(t, "convert", "-U", "-O", "raw", image, raw)
	f, err := os.Open(raw)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1<<20)
	if _, err := f.ReadAt(b, int64(off)<<20); err != nil {
		t.Fatal(err)
	}
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

// startWriter makes the guest overwrite MiB [from, from+n) of d again
// and again until stopWriter.
func startWriter(t *testing.T, inst *Instance, d guestDisk, from, n int) {
	t.Helper()
	fmt.Fprintf(inst.Console(), "rm -f /tmp/stop; (i=0; while [ ! -e /tmp/stop ]; do dd if=/dev/urandom of=%s bs=64k count=4 seek=$((%d*16 + i %% (%d*4) * 4)) conv=fsync 2>/dev/null; i=$((i+1)); done; echo WRITER STOPPED $i) &\n", d.dev, from, n)
}

// stopWriter stops the writer and returns how many writes it made.
func stopWriter(t *testing.T, inst *Instance) int {
	t.Helper()
	fmt.Fprintln(inst.Console(), "touch /tmp/stop")
	line, err := inst.Console().WaitForRegexp(ctxTimeout(t, time.Minute), regexp.MustCompile(`^WRITER STOPPED \d+$`))
	if err != nil {
		t.Fatalf("%v; console:\n%s", err, inst.Console().History())
	}
	n, _ := strconv.Atoi(strings.TrimPrefix(line, "WRITER STOPPED "))
	return n
}

func noJobs(t *testing.T, q *QMP) {
	t.Helper()
	if jobs, err := q.ExecuteQueryJobs(ctxTimeout(t, 10*time.Second)); err != nil || len(jobs) != 0 {
		t.Errorf("jobs left: %+v, %v", jobs, err)
	}
}

func addNode(t *testing.T, q *QMP, node, path string) {
	t.Helper()
	if err := q.ExecuteBlockdevAddNode(ctxTimeout(t, 10*time.Second), BlockdevNode{NodeName: node, Driver: "qcow2",
		File: BlockdevFile{Filename: path}, NoBacking: true}); err != nil {
		t.Fatal(err)
	}
}

// TestBlockJobsRealQEMU runs the block jobs on a running guest's disks:
// a mirror while the guest writes, pivoted once ready; an external
// snapshot, commit and stream flattening the chain; a backup consistent
// to its start while the guest overwrites what it copies; a backup that
// fails on a full filesystem; a backup cancelled by its context; and one
// whose QEMU is killed half-way.
func TestBlockJobsRealQEMU(t *testing.T) {
	vm := testVM(t)
	dir := t.TempDir()
	m, mArgs := newDisk(t, dir, "m0")
	c, cArgs := newDisk(t, dir, "c0")
	b, bArgs := newDisk(t, dir, "b0")
	inst := vm.start(t, "", append(append(mArgs, cArgs...), bArgs...)...)
	q := inst.QMP()
	for _, d := range []*guestDisk{&m, &c, &b} {
		findDisk(t, inst, d)
	}

	step(t, "mirror while the guest writes", func() {
		_, sum := pattern("mirror")
		guestWrite(t, inst, m, 0, "mirror")
		target := filepath.Join(dir, "m1.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", target, "32M")
		addNode(t, q, "m1", target)
		startWriter(t, inst, m, 4, 8)
		var last JobInfo
		writes := 0
		info, err := q.Mirror(ctxTimeout(t, 2*time.Minute), BlockdevMirror{JobID: "mirror0", Device: "m0", Target: "m1", Speed: 16 << 20}, JobOptions{
			Progress: func(j JobInfo) { last = j },
			Ready:    func(context.Context) error { writes = stopWriter(t, inst); return nil },
		})
		if err != nil {
			t.Fatal(err)
		}
		if info.Type != "mirror" || last.CurrentProgress != last.TotalProgress || last.TotalProgress == 0 {
			t.Errorf("final %+v, last progress %+v", info, last)
		}
		t.Logf("mirror: %d bytes, the guest made %d writes during it", info.TotalProgress, writes)
		if writes == 0 {
			t.Error("the guest did not write during the mirror")
		}
		blocks, err := q.ExecuteQueryBlock(ctxTimeout(t, 10*time.Second))
		if err != nil {
			t.Fatal(err)
		}
		if blk := FindBlockDevice(blocks, "vd-m0"); blk == nil || blk.Inserted == nil || blk.Inserted.NodeName != "m1" {
			t.Errorf("the disk's backend after the pivot: %+v", blk)
		}
		ctx := ctxTimeout(t, 10*time.Second)
		if err := q.ExecuteStop(ctx); err != nil { // flushes the target
			t.Fatal(err)
		}
		if out, err := exec.Command("qemu-img", "compare", "-U", m.path, target).CombinedOutput(); err != nil {
			t.Errorf("qemu-img compare source target: %v\n%s", err, out)
		}
		if err := q.ExecuteCont(ctx); err != nil {
			t.Fatal(err)
		}
		if got := guestRead(t, inst, m, 0); got != sum {
			t.Errorf("the guest reads %s after the pivot, wrote %s", got, sum)
		}
		noJobs(t, q)
	})

	step(t, "external snapshots, commit and stream", func() {
		sums := map[int]string{}
		for i, word := range []string{"base", "over1", "over2"} {
			if i > 0 {
				overlay := fmt.Sprintf("c%d", i)
				path := filepath.Join(dir, overlay+".qcow2")
				qemuImg(t, "create", "-q", "-f", "qcow2", path, "32M")
				addNode(t, q, overlay, path)
				if err := q.ExecuteBlockdevSnapshot(ctxTimeout(t, 10*time.Second), fmt.Sprintf("c%d", i-1), overlay); err != nil {
					t.Fatal(err)
				}
			}
			guestWrite(t, inst, c, i, word)
			_, sums[i] = pattern(word)
		}
		// c0 <- c1 <- c2 (active). Commit c1 into c0, then stream c0
		// into c2, which is then the whole disk alone.
		if _, err := q.Commit(ctxTimeout(t, time.Minute), BlockCommit{JobID: "commit0", Device: "c2", TopNode: "c1", BaseNode: "c0"}, JobOptions{}); err != nil {
			t.Fatal(err)
		}
		if got := imageSum(t, q, c.path, 1); got != sums[1] {
			t.Errorf("c0 after the commit holds %s at 1 MiB, want %s", got, sums[1])
		}
		if _, err := q.Stream(ctxTimeout(t, time.Minute), BlockStream{JobID: "stream0", Device: "c2"}, JobOptions{}); err != nil {
			t.Fatal(err)
		}
		top := filepath.Join(dir, "c2.qcow2")
		if out := qemuImg(t, "info", "-U", "--output=json", top); strings.Contains(out, "backing-filename") {
			t.Errorf("c2 still has a backing file after the stream: %s", out)
		}
		for off, sum := range sums {
			if got := imageSum(t, q, top, off); got != sum {
				t.Errorf("c2 alone at %d MiB: %s, want %s", off, got, sum)
			}
			if got := guestRead(t, inst, c, off); got != sum {
				t.Errorf("the guest reads %s at %d MiB, wrote %s", got, off, sum)
			}
		}
		noJobs(t, q)
	})

	step(t, "backup consistent to its start", func() {
		// Data to copy before the part the guest overwrites, at a speed
		// that leaves the guest time to overwrite it before it is copied.
		for off := range 8 {
			guestWrite(t, inst, b, off, fmt.Sprintf("fill%d", off))
		}
		_, sum := pattern("before")
		guestWrite(t, inst, b, 8, "before")
		target := filepath.Join(dir, "backup.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", target, "32M")
		addNode(t, q, "bk0", target)
		started := false
		_, err := q.Backup(ctxTimeout(t, 2*time.Minute), BlockdevBackup{JobID: "backup0", Device: "b0", Target: "bk0", Speed: 4 << 20}, JobOptions{
			ProgressInterval: 100 * time.Millisecond,
			Progress: func(j JobInfo) {
				if !started {
					started = true
					startWriter(t, inst, b, 8, 1)
				}
			}})
		if err != nil {
			t.Fatal(err)
		}
		writes := stopWriter(t, inst)
		if err := q.ExecuteBlockdevDel(ctxTimeout(t, 10*time.Second), "bk0"); err != nil {
			t.Fatal(err)
		}
		if got := imageSum(t, q, target, 8); got != sum {
			t.Errorf("the backup holds %s at 8 MiB, the disk held %s when it started", got, sum)
		}
		if got := guestRead(t, inst, b, 8); got == sum {
			t.Errorf("the guest's %d writes did not change the disk during the backup", writes)
		}
		t.Logf("backup: the guest made %d writes during it", writes)
		noJobs(t, q)
	})

	step(t, "a backup onto a full filesystem", func() {
		if os.Geteuid() != 0 {
			t.Log("not run: mounting a small tmpfs needs root")
			return
		}
		small := filepath.Join(dir, "small")
		if err := os.Mkdir(small, 0o700); err != nil {
			t.Fatal(err)
		}
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", small).CombinedOutput(); err != nil {
			t.Fatalf("mount a 2 MiB tmpfs: %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", "-l", small).Run() })
		target := filepath.Join(small, "full.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", target, "32M")
		addNode(t, q, "full0", target)
		_, err := q.Backup(ctxTimeout(t, time.Minute), BlockdevBackup{JobID: "full0", Device: "b0", Target: "full0"}, JobOptions{})
		var jerr *JobError
		if !errors.As(err, &jerr) || !strings.Contains(jerr.Desc, "No space left on device") {
			t.Fatalf("backup onto a full filesystem: %v", err)
		}
		t.Logf("full: %v", err)
		noJobs(t, q)
		if err := q.ExecuteBlockdevDel(ctxTimeout(t, 10*time.Second), "full0"); err != nil {
			t.Error(err)
		}
	})

	step(t, "a backup whose context ends half-way", func() {
		target := filepath.Join(dir, "cancel.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", target, "32M")
		addNode(t, q, "bk1", target)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		var at JobInfo
		_, err := q.Backup(ctx, BlockdevBackup{JobID: "backup1", Device: "b0", Target: "bk1", Speed: 1 << 20}, JobOptions{
			ProgressInterval: 100 * time.Millisecond,
			Progress: func(j JobInfo) {
				if j.CurrentProgress > 0 && at.ID == "" {
					at = j
					cancel()
				}
			}})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("backup cancelled by its context: %v", err)
		}
		t.Logf("cancelled at %d of %d: %v", at.CurrentProgress, at.TotalProgress, err)
		noJobs(t, q)
	})

	step(t, "a backup whose QEMU dies half-way", func() {
		target := filepath.Join(dir, "dies.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", target, "32M")
		addNode(t, q, "bk2", target)
		killed := false
		_, err := q.Backup(ctxTimeout(t, time.Minute), BlockdevBackup{JobID: "backup2", Device: "b0", Target: "bk2", Speed: 1 << 20}, JobOptions{
			ProgressInterval: 100 * time.Millisecond,
			Progress: func(j JobInfo) {
				if !killed {
					killed = true
					syscall.Kill(inst.Pid(), syscall.SIGKILL)
				}
			}})
		if !errors.Is(err, ErrDisconnected) {
			t.Errorf("backup whose QEMU was killed: %v", err)
		}
	})
}

// A job that was aborting (failing by itself) when the context ended gets
// no job-cancel, and ends with QEMU's reason beside the context's error,
// not as cancelled.
func TestJobFailingAsContextEnds(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := pendingCall(func() error {
		_, err := s.q.Backup(ctx, BlockdevBackup{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{})
		return err
	})
	s.p.recv()
	s.p.send(okReply, jobEvent("job0", "running"))
	stillPending(t, ch, "Backup")
	cancel()
	s.p.expect(t, wireQueryJobs)
	s.p.send(jobsReply("job0", "aborting", "", 3, 10))
	stillPending(t, ch, "Backup while aborting")
	s.p.send(jobEvent("job0", "concluded"))
	s.p.expect(t, wireQueryJobs)
	s.p.send(jobsReply("job0", "concluded", "No space left on device", 3, 10))
	s.p.expect(t, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`)
	s.p.send(okReply)
	err := returnsWithin(t, 5*time.Second, func() error { return <-ch })
	var jerr *JobError
	if !errors.As(err, &jerr) || jerr.Desc != "No space left on device" || !errors.Is(err, context.Canceled) || strings.Contains(err.Error(), "cancelled:") {
		t.Errorf("%v; want QEMU's reason beside the context's error, not a cancel", err)
	}
}
