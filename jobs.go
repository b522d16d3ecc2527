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

// JobStatusFilter selects the JOB_STATUS_CHANGE events of job id, those
// reaching one of statuses ("concluded", say), or every status change of
// the job when none is given.
func JobStatusFilter(id string, statuses ...string) EventFilter {
	return EventFilter{
		Names: []string{"JOB_STATUS_CHANGE"},
		Data:  map[string]string{"id": id},
		Match: statusIn(statuses),
	}
}

// JobOptions are the options of the methods that run a job to its end.
type JobOptions struct {
	// Progress, if not nil, is called with the job's query-jobs entry
	// every ProgressInterval while it runs, and with its last one. It
	// runs on the waiting goroutine. A poll that fails is skipped: the
	// wait goes on, and ends as it would have without it.
	Progress         func(JobInfo)
	ProgressInterval time.Duration
	// CancelGrace bounds the cancel after ctx ended; 0 means
	// DefaultCancelGrace.
	CancelGrace time.Duration

	// Ready, for a job that becomes ready (a mirror, a commit of the
	// active layer), is called then, on the waiting goroutine, before the
	// job is completed: to stop the guest's writes, or to switch a
	// migration over. It may call the session. When it returns an
	// error, the job is cancelled instead (a ready mirror then ends
	// without pivoting) and the method returns that error. Nil completes
	// the job at once. It is called once: a ready job that pauses and
	// becomes ready again is not completed again.
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
// It is bounded by ctx: when ctx ends first, the job is cancelled
// (job-cancel, unless query-jobs says it has concluded or is aborting
// already), and runJob waits for it to conclude (QEMU ends a cancelled job
// once its requests in flight have drained), dismisses it and returns an
// error that wraps ctx's error and its cause (context.Cause). A job that
// had concluded by then is reported as it ended (success, or its
// *JobError beside ctx's error), and so is one that was aborting. That wait is
// bounded by opts.CancelGrace; past it the error wraps ErrCancelPending
// too, and the job is left to QEMU. A start whose reply ctx cut short is
// cancelled only if QEMU made the job (its "created" came), never when the
// start was not sent or QEMU refused it (a job of that id is someone
// else's). If the session ends (QEMU died), the error wraps
// ErrDisconnected. A job whose error policy is "stop" pauses on an error
// (BLOCK_JOB_ERROR, action stop) and stays paused, as QEMU means it to,
// until job-resume from another goroutine or the end of ctx.
func (q *QMP) runJob(ctx context.Context, name, id string, args interface{}, opts JobOptions) (JobInfo, error) {
	if id == "" {
		return JobInfo{}, commandError(name, id, errors.New("JobID is empty"))
	}
	sub := q.Subscribe(jobFilter(id))
	defer sub.Close()
	j := &jobRun{q: q, name: name, id: id, opts: opts,
		op: newOperation(sub, opts.ProgressInterval, opts.Progress != nil, opts.CancelGrace)}
	if err := j.op.run(ctx, j, func(ctx context.Context) error { return q.run(ctx, name, id, args, nil) }); err != nil {
		return JobInfo{}, err
	}
	return j.info, j.err
}

// jobRun is one job being waited for: the steps of its operation, and its
// result.
type jobRun struct {
	q         *QMP
	name, id  string
	opts      JobOptions
	op        *operation
	readied   bool   // the job has been ready once
	cancelled bool   // job-cancel has been sent
	lastErr   string // the last BLOCK_JOB_ERROR's operation and action

	info JobInfo
	err  error
}

// jobFilter selects the JOB_STATUS_CHANGE events of job id, and its
// BLOCK_JOB_ERROR events, which name it as the device.
func jobFilter(id string) EventFilter {
	return EventFilter{
		Names: []string{"JOB_STATUS_CHANGE", "BLOCK_JOB_ERROR"},
		Match: func(ev QMPEvent) bool { return ev.Data["id"] == id || ev.Data["device"] == id },
	}
}

func (j *jobRun) query(ctx context.Context) error {
	_, err := j.queryInfo(ctx)
	return err
}

func (j *jobRun) startedBy(ev QMPEvent) bool {
	return ev.Name == "JOB_STATUS_CHANGE" && ev.Data["status"] == "created"
}

func (j *jobRun) poll(ctx context.Context) bool {
	if info, err := j.queryInfo(ctx); err == nil {
		j.opts.Progress(info)
	}
	return false
}

func (j *jobRun) event(ctx context.Context, ev QMPEvent) bool {
	if ev.Name == "BLOCK_JOB_ERROR" {
		j.lastErr = fmt.Sprintf("%v error, action %v", ev.Data["operation"], ev.Data["action"])
		return false
	}
	switch ev.Data["status"] {
	case "ready":
		// Once: a ready mirror that pauses goes ready, standby, ready,
		// and is completing already.
		if j.op.cause != nil || j.readied {
			return false
		}
		j.readied = true
		if err := j.ready(ctx); err != nil {
			return j.op.cancel(ctx, err, j)
		}
	case "concluded":
		// Over: its entry is read and it is dismissed whatever ctx says,
		// or the job would stay, its id taken.
		ectx, done := j.op.ending(ctx)
		defer done()
		return j.conclude(ectx)
	}
	return false
}

// ready calls opts.Ready and completes the job.
func (j *jobRun) ready(ctx context.Context) error {
	if ctx.Err() != nil {
		return contextError(ctx)
	}
	if j.opts.Ready != nil {
		if err := j.opts.Ready(ctx); err != nil {
			return fmt.Errorf("Ready: %w", err)
		}
	}
	if err := j.q.execute(ctx, "job-complete", idArgs{j.id}, nil); err != nil {
		if ctx.Err() != nil {
			return contextError(ctx)
		}
		return fmt.Errorf("job-complete: %w", err)
	}
	return nil
}

// cancel sends job-cancel, once query-jobs has said the job still runs:
// the decision is QEMU's state, asked now, not the events held. It
// reports the job over when it had concluded (reported as it ended), when
// its status could not be read, or when the cancel failed.
func (j *jobRun) cancel(gctx context.Context) bool {
	info, err := j.queryInfo(gctx)
	switch {
	case err != nil && gctx.Err() != nil:
		j.err = j.pending()
		return true
	case err != nil:
		j.err = j.error(fmt.Errorf("%w; and its status is unknown, so it was not cancelled: %w", j.op.cause, err))
		return true
	case info.Status == "concluded":
		return j.conclude(gctx) // it ended by itself
	case info.Status == "aborting":
		return false // on its way to concluded already
	}
	err = j.q.execute(gctx, "job-cancel", idArgs{j.id}, nil)
	switch {
	case err == nil:
		j.cancelled = true
		return false
	case gctx.Err() != nil:
		j.err = j.pending()
		return true
	}
	if info, qerr := j.queryInfo(gctx); qerr == nil && info.Status == "concluded" {
		return j.conclude(gctx) // it ended in between
	}
	j.err = j.error(fmt.Errorf("%w; and job-cancel failed: %w", j.op.cause, err))
	return true
}

// pending is the error of a job not concluded when the grace ran out.
func (j *jobRun) pending() error {
	what := "cancelled"
	if !j.cancelled {
		what = "not cancelled (it was ending already)"
	}
	return j.error(fmt.Errorf("%w; %s, but not concluded %v later: %w", j.op.cause, what, j.op.grace, ErrCancelPending))
}

// conclude reads the concluded job's entry and dismisses it. A job this
// run cancelled ends with the cancel's cause; one QEMU ended with an error
// (also one that failed as the context ended) with its *JobError, beside
// the cause when there is one.
func (j *jobRun) conclude(ctx context.Context) bool {
	info, qerr := j.queryInfo(ctx)
	if derr := j.q.execute(ctx, "job-dismiss", idArgs{j.id}, nil); derr != nil && qerr == nil {
		qerr = fmt.Errorf("job-dismiss: %w", derr)
	}
	if j.opts.Progress != nil && qerr == nil {
		j.opts.Progress(info)
	}
	j.info = info
	cause := j.op.cause
	switch {
	case j.cancelled:
		j.err = j.error(fmt.Errorf("cancelled: %w", cause))
	case info.Error != "" && cause != nil:
		j.err = j.error(fmt.Errorf("%w; %w", cause, &JobError{ID: j.id, Type: info.Type, Desc: info.Error, Event: j.lastErr}))
	case info.Error != "":
		j.err = j.error(&JobError{ID: j.id, Type: info.Type, Desc: info.Error, Event: j.lastErr})
	case qerr != nil:
		j.err = j.error(qerr)
	}
	return true
}

// queryInfo returns the job's query-jobs entry.
func (j *jobRun) queryInfo(ctx context.Context) (JobInfo, error) {
	var jobs []JobInfo
	if err := j.q.execute(ctx, "query-jobs", nil, &jobs); err != nil {
		return JobInfo{}, fmt.Errorf("query-jobs: %w", err)
	}
	for _, info := range jobs {
		if info.ID == j.id {
			return info, nil
		}
	}
	return JobInfo{}, fmt.Errorf("query-jobs does not list job %s", j.id)
}

func (j *jobRun) error(err error) error { return commandError(j.name, j.id, err) }
