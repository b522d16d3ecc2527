package qemu

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// Block jobs: blockdev-mirror, block-stream, block-commit and
// blockdev-backup, started with auto-dismiss off so that a job's result
// stays readable until it is dismissed; the job-* commands and
// query-jobs; and the methods that run a job to its end through the event
// router, with progress.

// BlockdevMirror is blockdev-mirror's arguments: copy Device's node (and,
// with Sync "full", its backing chain) to the node Target, added before.
type BlockdevMirror struct {
	JobID  string `json:"job-id"`
	Device string `json:"device"`
	Target string `json:"target"`
	// Sync is "full" (the whole chain), "top" (the top image) or "none"
	// (only new writes); empty means full.
	Sync string `json:"sync"`
	// Speed caps the copy, in bytes per second; 0 means no cap.
	Speed int64 `json:"speed,omitempty"`
	// CopyMode "write-blocking" makes the guest's writes reach the target
	// before they complete, so the job converges under any write load;
	// empty means QEMU's "background".
	CopyMode string `json:"copy-mode,omitempty"`
	// OnTargetError is "report" (QEMU's default, the job fails), "stop",
	// "ignore" or "enospc".
	OnTargetError string `json:"on-target-error,omitempty"`
}

// BlockStream is block-stream's arguments: copy into Device's node the
// data of its backing chain down to BaseNode (all of it when empty),
// which then becomes its backing node.
type BlockStream struct {
	JobID    string `json:"job-id"`
	Device   string `json:"device"`
	BaseNode string `json:"base-node,omitempty"`
	Speed    int64  `json:"speed,omitempty"`
}

// BlockCommit is block-commit's arguments: write the data of TopNode (the
// active layer when empty) and the images between it and BaseNode (the
// bottom of the chain when empty) into BaseNode, which takes their place.
// A commit of the active layer becomes ready and is completed as a mirror
// is.
type BlockCommit struct {
	JobID    string `json:"job-id"`
	Device   string `json:"device"`
	TopNode  string `json:"top-node,omitempty"`
	BaseNode string `json:"base-node,omitempty"`
	Speed    int64  `json:"speed,omitempty"`
}

// BlockdevBackup is blockdev-backup's arguments: copy Device's node as it
// was when the job started to the node Target, while the guest writes on.
type BlockdevBackup struct {
	JobID  string `json:"job-id"`
	Device string `json:"device"`
	Target string `json:"target"`
	// Sync is "full", "top" or "none"; empty means full.
	Sync  string `json:"sync"`
	Speed int64  `json:"speed,omitempty"`
}

// startArgs encodes a job's arguments with auto-dismiss off, so that its
// end and error stay in query-jobs until job-dismiss. Each job's struct
// encodes to an object with job-id first, so the member goes in front;
// should one not, nil makes the command fail before it is sent.
func startArgs(args interface{}) json.RawMessage {
	b, err := json.Marshal(args)
	if err != nil || len(b) < 3 || b[0] != '{' {
		return nil
	}
	return append([]byte(`{"auto-dismiss":false,`), b[1:]...)
}

func orFull(sync string) string {
	if sync == "" {
		return "full"
	}
	return sync
}

// ExecuteBlockdevMirror starts a mirror job (blockdev-mirror) with
// auto-dismiss off. The job becomes "ready" once the target has caught
// up; ExecuteJobComplete then pivots the device to the target.
func (q *QMP) ExecuteBlockdevMirror(ctx context.Context, m BlockdevMirror) error {
	m.Sync = orFull(m.Sync)
	return q.run(ctx, "blockdev-mirror", m.JobID, startArgs(m), nil)
}

// ExecuteBlockStream starts a stream job (block-stream) with auto-dismiss
// off.
func (q *QMP) ExecuteBlockStream(ctx context.Context, s BlockStream) error {
	return q.run(ctx, "block-stream", s.JobID, startArgs(s), nil)
}

// ExecuteBlockCommit starts a commit job (block-commit) with auto-dismiss
// off.
func (q *QMP) ExecuteBlockCommit(ctx context.Context, c BlockCommit) error {
	return q.run(ctx, "block-commit", c.JobID, startArgs(c), nil)
}

// ExecuteBlockdevBackup starts a backup job (blockdev-backup) with
// auto-dismiss off.
func (q *QMP) ExecuteBlockdevBackup(ctx context.Context, b BlockdevBackup) error {
	b.Sync = orFull(b.Sync)
	return q.run(ctx, "blockdev-backup", b.JobID, startArgs(b), nil)
}

// JobInfo is a job as query-jobs lists it.
type JobInfo struct {
	ID   string `json:"id"`
	Type string `json:"type"`
	// Status is "created", "running", "paused", "ready", "standby",
	// "waiting", "pending", "aborting", "concluded" or "null".
	Status          string `json:"status"`
	CurrentProgress int64  `json:"current-progress"`
	TotalProgress   int64  `json:"total-progress"`
	// Error, once the job has concluded, says why it failed; "" when it
	// succeeded.
	Error string `json:"error,omitempty"`
}

// ExecuteQueryJobs lists the jobs (query-jobs).
func (q *QMP) ExecuteQueryJobs(ctx context.Context) ([]JobInfo, error) {
	return runFor[[]JobInfo](ctx, q, "query-jobs", "", nil)
}

// ExecuteJobComplete tells a ready job to finish (job-complete): a mirror
// pivots to its target.
func (q *QMP) ExecuteJobComplete(ctx context.Context, id string) error {
	return q.run(ctx, "job-complete", id, idArgs{id}, nil)
}

// ExecuteJobCancel cancels a job (job-cancel); a ready mirror so
// cancelled ends without pivoting.
func (q *QMP) ExecuteJobCancel(ctx context.Context, id string) error {
	return q.run(ctx, "job-cancel", id, idArgs{id}, nil)
}

// ExecuteJobFinalize finalizes a pending job started with auto-finalize
// off (job-finalize).
func (q *QMP) ExecuteJobFinalize(ctx context.Context, id string) error {
	return q.run(ctx, "job-finalize", id, idArgs{id}, nil)
}

// ExecuteJobDismiss removes a concluded job (job-dismiss).
func (q *QMP) ExecuteJobDismiss(ctx context.Context, id string) error {
	return q.run(ctx, "job-dismiss", id, idArgs{id}, nil)
}

// JobOptions are the options of the methods that run a job to its end.
type JobOptions struct {
	// Progress, if not nil, is called with the job's query-jobs entry
	// every ProgressInterval while it runs, and with its last one. It
	// runs on the waiting goroutine.
	Progress         func(JobInfo)
	ProgressInterval time.Duration

	// Ready, for a job that becomes ready (a mirror, a commit of the
	// active layer), is called then, on the waiting goroutine, before the
	// job is completed: to stop the guest's writes, or to switch a
	// migration over. It may call the session. When it returns an
	// error, the job is cancelled instead (a ready mirror then ends
	// without pivoting) and the method returns that error. Nil completes
	// the job at once.
	Ready func(ctx context.Context) error
}

// JobError is the error of a job that QEMU concluded with an error.
type JobError struct {
	ID   string
	Type string
	// Desc is QEMU's reason, from query-jobs.
	Desc string
	// Event describes the job's last BLOCK_JOB_ERROR ("write error,
	// action report"), or is "" when it sent none.
	Event string
}

// Error returns the job's type, id and QEMU's reason.
func (e *JobError) Error() string {
	if e.Event != "" {
		return fmt.Sprintf("%s job %s failed: %s (%s)", e.Type, e.ID, e.Desc, e.Event)
	}
	return fmt.Sprintf("%s job %s failed: %s", e.Type, e.ID, e.Desc)
}

// Mirror runs a mirror job to its end: it starts it as
// ExecuteBlockdevMirror does, waits for it to be ready, calls
// opts.Ready, completes it (the device pivots to the target) and waits
// for it to conclude. See runJob for how it ends.
func (q *QMP) Mirror(ctx context.Context, m BlockdevMirror, opts JobOptions) (JobInfo, error) {
	m.Sync = orFull(m.Sync)
	return q.runJob(ctx, "blockdev-mirror", m.JobID, startArgs(m), opts)
}

// Stream runs a stream job to its end (block-stream).
func (q *QMP) Stream(ctx context.Context, s BlockStream, opts JobOptions) (JobInfo, error) {
	return q.runJob(ctx, "block-stream", s.JobID, startArgs(s), opts)
}

// Commit runs a commit job to its end (block-commit), completing a commit
// of the active layer once it is ready, as Mirror does.
func (q *QMP) Commit(ctx context.Context, c BlockCommit, opts JobOptions) (JobInfo, error) {
	return q.runJob(ctx, "block-commit", c.JobID, startArgs(c), opts)
}

// Backup runs a backup job to its end (blockdev-backup).
func (q *QMP) Backup(ctx context.Context, b BlockdevBackup, opts JobOptions) (JobInfo, error) {
	b.Sync = orFull(b.Sync)
	return q.runJob(ctx, "blockdev-backup", b.JobID, startArgs(b), opts)
}

// runJob starts a job with command name and waits for its end through the
// job's JOB_STATUS_CHANGE events, subscribed before the command is sent
// (QEMU sends "created" and "running" before its reply). A job that
// becomes ready is completed after opts.Ready. Once it has concluded it
// is dismissed, and its last query-jobs entry is returned, with a
// *JobError when QEMU concluded it with one.
//
// It is bounded by ctx alone: when ctx ends first, the job is cancelled
// (job-cancel), and runJob waits for it to conclude, bounded by the
// session (QEMU ends a cancelled job once its requests in flight have
// drained), dismisses it and returns an error that wraps ctx.Err(). If
// the session ends (QEMU died), the error wraps ErrDisconnected. A job
// whose error policy is "stop" pauses on an error (BLOCK_JOB_ERROR,
// action stop) and stays paused, as QEMU means it to, until job-resume
// from another goroutine or the end of ctx.
func (q *QMP) runJob(ctx context.Context, name, id string, args interface{}, opts JobOptions) (JobInfo, error) {
	if id == "" {
		return JobInfo{}, commandError(name, id, errors.New("JobID is empty"))
	}
	sub := q.Subscribe(jobFilter(id))
	defer sub.Close()
	j := jobRun{q: q, name: name, id: id, opts: opts,
		w: waiter{sub: sub, interval: opts.ProgressInterval, poll: opts.Progress != nil}}
	if err := q.run(ctx, name, id, args, nil); err != nil {
		if ctx.Err() == nil {
			return JobInfo{}, err
		}
		// The command may have reached QEMU before ctx ended: cancel
		// the job if there is one.
		wctx, cerr := j.cancel(ctx, ctx.Err())
		if cerr != nil {
			return JobInfo{}, err
		}
		return j.wait(wctx)
	}
	return j.wait(ctx)
}

// jobRun is one job being waited for.
type jobRun struct {
	q        *QMP
	name, id string
	opts     JobOptions
	w        waiter
	cause    error  // why the job was cancelled, once QEMU took the cancel
	lastErr  string // the last BLOCK_JOB_ERROR's operation and action
}

func (j *jobRun) wait(ctx context.Context) (JobInfo, error) {
	for {
		ev, err := j.w.next(ctx)
		switch {
		case errors.Is(err, errPoll):
			if info, err := j.query(ctx); err == nil {
				j.opts.Progress(info)
			}
			continue
		case err != nil && ctx.Err() != nil:
			if ctx, err = j.cancel(ctx, ctx.Err()); err != nil {
				return JobInfo{}, err
			}
			continue
		case err != nil:
			return JobInfo{}, j.error(fmt.Errorf("waiting for its end: %w", err))
		}
		if ev.Name == "BLOCK_JOB_ERROR" {
			j.lastErr = fmt.Sprintf("%v error, action %v", ev.Data["operation"], ev.Data["action"])
			continue
		}
		switch ev.Data["status"] {
		case "ready":
			if j.cause != nil {
				continue
			}
			if rerr := j.ready(ctx); rerr != nil {
				if ctx, err = j.cancel(ctx, rerr); err != nil {
					return JobInfo{}, err
				}
			}
		case "concluded":
			return j.conclude(ctx)
		}
	}
}

// jobFilter selects the JOB_STATUS_CHANGE events of job id, and its
// BLOCK_JOB_ERROR events, which name it as the device.
func jobFilter(id string) EventFilter {
	return EventFilter{
		Names: []string{"JOB_STATUS_CHANGE", "BLOCK_JOB_ERROR"},
		Match: func(ev QMPEvent) bool { return ev.Data["id"] == id || ev.Data["device"] == id },
	}
}

// ready calls opts.Ready and completes the job.
func (j *jobRun) ready(ctx context.Context) error {
	if j.opts.Ready != nil {
		if err := j.opts.Ready(ctx); err != nil {
			return fmt.Errorf("Ready: %w", err)
		}
	}
	err := j.q.ExecuteJobComplete(ctx, j.id)
	if err != nil && ctx.Err() != nil {
		return ctx.Err()
	}
	return err
}

// cancel cancels the job for cause and returns the context to wait for
// its end with, which only the session bounds. A job that concluded
// before the cancel reached it is waited for as it ended.
func (j *jobRun) cancel(ctx context.Context, cause error) (context.Context, error) {
	ctx = context.WithoutCancel(ctx)
	if err := j.q.ExecuteJobCancel(ctx, j.id); err != nil {
		if info, qerr := j.query(ctx); qerr == nil && info.Status == "concluded" {
			return ctx, nil // its "concluded" is queued
		}
		return ctx, j.error(fmt.Errorf("%w; and the cancel failed: %w", cause, err))
	}
	j.cause = cause
	return ctx, nil
}

// conclude reads the concluded job's entry and dismisses it.
func (j *jobRun) conclude(ctx context.Context) (JobInfo, error) {
	info, qerr := j.query(ctx)
	if derr := j.q.ExecuteJobDismiss(ctx, j.id); derr != nil && qerr == nil {
		qerr = derr
	}
	if j.opts.Progress != nil && qerr == nil {
		j.opts.Progress(info)
	}
	switch {
	case j.cause != nil:
		return info, j.error(fmt.Errorf("cancelled: %w", j.cause))
	case info.Error != "":
		return info, j.error(&JobError{ID: j.id, Type: info.Type, Desc: info.Error, Event: j.lastErr})
	case qerr != nil:
		return info, j.error(qerr)
	}
	return info, nil
}

// query returns the job's query-jobs entry.
func (j *jobRun) query(ctx context.Context) (JobInfo, error) {
	jobs, err := j.q.ExecuteQueryJobs(ctx)
	if err != nil {
		return JobInfo{}, err
	}
	for _, info := range jobs {
		if info.ID == j.id {
			return info, nil
		}
	}
	return JobInfo{}, fmt.Errorf("query-jobs does not list job %s", j.id)
}

func (j *jobRun) error(err error) error { return commandError(j.name, j.id, err) }
