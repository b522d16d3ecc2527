package qemu

import (
	"context"
	"errors"
	"fmt"
	"strings"
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
	ch := make(chan error, 1)
	var final JobInfo
	go func() {
		var err error
		final, err = s.q.Mirror(ctxTimeout(t, 10*time.Second), BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{
			Ready:    func(context.Context) error { close(ready); return nil },
			Progress: func(j JobInfo) { progress = append(progress, j) },
		})
		ch <- err
	}()
	s.p.expect(t, wireMirrorJob0)
	s.p.send(jobEvent("job0", "created"), jobEvent("other", "ready"), jobEvent("job0", "running"), okReply)
	// Another job's ready is not this one's.
	stillPending(t, ch, "Mirror")
	// The first poll comes after DefaultProgressInterval.
	s.p.expect(t, wireQueryJobs)
	s.p.send(jobsReply("job0", "running", "", 5, 10))
	s.p.send(jobEvent("job0", "ready"))
	s.p.expect(t, `{"execute":"job-complete","arguments":{"id":"job0"}}`)
	select {
	case <-ready:
	default:
		t.Fatal("job-complete before Ready")
	}
	s.p.send(jobEvent("job0", "waiting"), jobEvent("job0", "pending"), jobEvent("job0", "concluded"), okReply)
	s.p.expect(t, wireQueryJobs)
	s.p.send(jobsReply("job0", "concluded", "", 10, 10))
	s.p.expect(t, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`)
	s.p.send(jobEvent("job0", "null"), okReply)
	if err := <-ch; err != nil {
		t.Fatal(err)
	}
	if final.Status != "concluded" || final.CurrentProgress != 10 {
		t.Errorf("final %+v", final)
	}
	if len(progress) != 2 || progress[0].CurrentProgress != 5 || progress[1].CurrentProgress != 10 {
		t.Errorf("progress %+v", progress)
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
			ch := make(chan error, 1)
			go func() {
				_, err := s.q.Mirror(ctx, BlockdevMirror{JobID: "job0", Device: "src", Target: "dst"}, JobOptions{
					Ready: func(context.Context) error { return refused }})
				ch <- err
			}()
			s.p.expect(t, wireMirrorJob0)
			s.p.send(okReply, jobEvent("job0", "running"))
			if how == "context" {
				stillPending(t, ch, "Mirror")
				cancel()
			} else {
				s.p.send(jobEvent("job0", "ready"))
			}
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

// A job that concluded before the cancel reached it is reported as it
// ended.
func TestJobConcludedBeforeCancel(t *testing.T) {
	s := connect(t, "7.2.22", nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ch := make(chan error, 1)
	go func() { _, err := s.q.Stream(ctx, BlockStream{JobID: "job0", Device: "top"}, JobOptions{}); ch <- err }()
	s.p.expect(t, `{"execute":"block-stream","arguments":{"auto-dismiss":false,"job-id":"job0","device":"top"}}`)
	s.p.send(okReply)
	stillPending(t, ch, "Stream")
	cancel()
	s.p.expect(t, `{"execute":"job-cancel","arguments":{"id":"job0"}}`)
	s.p.send(jobEvent("job0", "concluded"), `{"error": {"class": "GenericError", "desc": "Job 'job0' in state 'concluded' cannot accept command verb 'cancel'"}}`)
	s.p.expect(t, wireQueryJobs)
	s.p.send(jobsReply("job0", "concluded", "", 10, 10))
	s.p.expect(t, wireQueryJobs)
	s.p.send(jobsReply("job0", "concluded", "", 10, 10))
	s.p.expect(t, `{"execute":"job-dismiss","arguments":{"id":"job0"}}`)
	s.p.send(okReply)
	if err := <-ch; err != nil {
		t.Errorf("error %v", err)
	}
}

// QEMU dying half-way ends the wait with the session's end; a refused
// start fails at once; a job needs an id.
func TestJobQEMUDiesAndRefusals(t *testing.T) {
	s := connect(t, "10.0.2", nil)
	ch := make(chan error, 1)
	go func() {
		_, err := s.q.Commit(ctxTimeout(t, 10*time.Second), BlockCommit{JobID: "job0", Device: "top"}, JobOptions{})
		ch <- err
	}()
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

func second[T any](_ T, err error) error { return err }
