package qemu

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"
)

// Live migration: capabilities and parameters, migrate and
// migrate-incoming over a unix socket, a file passed with getfd, or TCP
// (with TLS through a tls-creds-x509 object), query-migrate, cancel and
// postcopy, and Migrate, which runs a migration to its end with progress.

// MigrationCapability names a migration capability, for
// ExecuteMigrateSetCapabilities.
type MigrationCapability string

// The capabilities most used; QEMU has more, which may be named as strings.
const (
	// MigrationEvents makes QEMU send a MIGRATION event at each change of
	// status.
	MigrationEvents MigrationCapability = "events"
	// MigrationMultifd sends RAM over several channels
	// (MigrationParameters.MultifdChannels), on both sides.
	MigrationMultifd MigrationCapability = "multifd"
	// MigrationAutoConverge throttles the guest's vCPUs when it dirties
	// memory faster than it is sent.
	MigrationAutoConverge MigrationCapability = "auto-converge"
	// MigrationPostcopyRAM allows ExecuteMigrateStartPostcopy, on both
	// sides.
	MigrationPostcopyRAM MigrationCapability = "postcopy-ram"
)

type migrationCapabilityState struct {
	Capability MigrationCapability `json:"capability"`
	State      bool                `json:"state"`
}

// ExecuteMigrateSetCapabilities turns migration capabilities on or off
// (migrate-set-capabilities). QEMU refuses while a migration runs.
func (q *QMP) ExecuteMigrateSetCapabilities(ctx context.Context, caps map[MigrationCapability]bool) error {
	if len(caps) == 0 {
		return commandError("migrate-set-capabilities", "", errors.New("no capability given"))
	}
	list := make([]migrationCapabilityState, 0, len(caps))
	for c, on := range caps {
		list = append(list, migrationCapabilityState{c, on})
	}
	args := struct {
		Capabilities []migrationCapabilityState `json:"capabilities"`
	}{list}
	return q.run(ctx, "migrate-set-capabilities", "", args, nil)
}

// MigrationParameters are migrate-set-parameters' arguments; a nil field
// leaves that parameter as it is.
type MigrationParameters struct {
	// MaxBandwidth caps the migration's speed, in bytes per second; it
	// may be changed while a migration runs.
	MaxBandwidth *int64 `json:"max-bandwidth,omitempty"`
	// DowntimeLimit is the longest pause of the guest allowed for the
	// switch-over, in milliseconds.
	DowntimeLimit *int64 `json:"downtime-limit,omitempty"`
	// MultifdChannels is the number of channels of a multifd migration,
	// set alike on both sides.
	MultifdChannels *int64 `json:"multifd-channels,omitempty"`
	// TLSCreds is the id of a tls-creds-x509 object
	// (ExecuteObjectAddTLSCredsX509) the migration is encrypted with, on
	// both sides; "" turns TLS off.
	TLSCreds *string `json:"tls-creds,omitempty"`
	// TLSHostname, on the source, is the name the destination's
	// certificate must carry, when it is not the host of the URI.
	TLSHostname *string `json:"tls-hostname,omitempty"`
}

// ExecuteMigrateSetParameters sets migration parameters
// (migrate-set-parameters).
func (q *QMP) ExecuteMigrateSetParameters(ctx context.Context, p MigrationParameters) error {
	return q.run(ctx, "migrate-set-parameters", "", p, nil)
}

// TLSCredsX509 is a tls-creds-x509 object: the certificates in Dir, read
// by QEMU as ca-cert.pem and, for the endpoint's own identity,
// server-cert.pem and server-key.pem (Endpoint "server") or
// client-cert.pem and client-key.pem (Endpoint "client").
type TLSCredsX509 struct {
	ID       string
	Dir      string
	Endpoint string // "server" or "client"
	// NoVerifyPeer accepts a peer without checking its certificate: a
	// client then trusts any server, a server asks for no client
	// certificate.
	NoVerifyPeer bool
}

// ExecuteObjectAddTLSCredsX509 adds a tls-creds-x509 object (object-add).
func (q *QMP) ExecuteObjectAddTLSCredsX509(ctx context.Context, c TLSCredsX509) error {
	if c.Endpoint != "server" && c.Endpoint != "client" {
		return commandError("object-add", c.ID, fmt.Errorf("Endpoint is %q, not server or client", c.Endpoint))
	}
	args := map[string]interface{}{"qom-type": "tls-creds-x509", "id": c.ID, "dir": c.Dir, "endpoint": c.Endpoint}
	if c.NoVerifyPeer {
		args["verify-peer"] = false
	}
	return q.run(ctx, "object-add", c.ID, args, nil)
}

type uriArgs struct {
	URI string `json:"uri"`
}

// ExecuteMigrate starts migrating the VM to uri (migrate) and returns once
// QEMU has started: "unix:PATH", "tcp:HOST:PORT", or "fd:NAME" for a
// socket passed with ExecuteGetFD. Migrate runs a migration to its end.
func (q *QMP) ExecuteMigrate(ctx context.Context, uri string) error {
	return q.run(ctx, "migrate", uri, uriArgs{uri}, nil)
}

// ExecuteMigrateIncoming makes a QEMU started with "-incoming defer"
// (Config.Incoming) wait for a migration on uri (migrate-incoming), in
// the forms ExecuteMigrate takes. For "tcp:HOST:0", QEMU picks the port,
// which ExecuteQueryMigrate's SocketAddresses then report.
func (q *QMP) ExecuteMigrateIncoming(ctx context.Context, uri string) error {
	return q.run(ctx, "migrate-incoming", uri, uriArgs{uri}, nil)
}

// ExecuteMigrateCancel cancels the running migration (migrate_cancel): it
// goes through "cancelling" to "cancelled" and the source VM runs on.
func (q *QMP) ExecuteMigrateCancel(ctx context.Context) error {
	return q.run(ctx, "migrate_cancel", "", nil, nil)
}

// ExecuteMigrateStartPostcopy switches a running migration to postcopy
// (migrate-start-postcopy): the guest runs on the destination at once and
// fetches the pages not yet sent. Both sides need MigrationPostcopyRAM.
func (q *QMP) ExecuteMigrateStartPostcopy(ctx context.Context) error {
	return q.run(ctx, "migrate-start-postcopy", "", nil, nil)
}

// MigrationInfo is what query-migrate reports. Times are in milliseconds.
type MigrationInfo struct {
	// Status is "none", "setup", "active", "postcopy-active",
	// "completed", "failed", "cancelling", "cancelled", and so on.
	Status string `json:"status"`
	// RAM is absent until the migration has started.
	RAM              *MigrationRAM `json:"ram,omitempty"`
	TotalTime        int64         `json:"total-time,omitempty"`
	ExpectedDowntime int64         `json:"expected-downtime,omitempty"`
	Downtime         int64         `json:"downtime,omitempty"`
	SetupTime        int64         `json:"setup-time,omitempty"`
	// ErrorDesc says why a migration failed.
	ErrorDesc string `json:"error-desc,omitempty"`
	// SocketAddresses, on a destination, are the addresses it listens on.
	SocketAddresses []MigrationSocketAddress `json:"socket-address,omitempty"`
}

// MigrationRAM is the RAM part of MigrationInfo, in bytes but for the
// rates.
type MigrationRAM struct {
	Transferred    int64   `json:"transferred"`
	Remaining      int64   `json:"remaining"`
	Total          int64   `json:"total"`
	DirtyPagesRate int64   `json:"dirty-pages-rate"`
	Mbps           float64 `json:"mbps"`
	DirtySyncCount int64   `json:"dirty-sync-count"`
}

// MigrationSocketAddress is an address a destination listens on: Type
// "inet" with Host and Port, or "unix" with Path.
type MigrationSocketAddress struct {
	Type string `json:"type"`
	Host string `json:"host,omitempty"`
	Port string `json:"port,omitempty"`
	Path string `json:"path,omitempty"`
}

// Progress returns how far the migration is, from 0 to 1: the part of
// the RAM sent of what was sent and what remains. It is 1 once the
// migration has completed, and 0 before it has a RAM part.
func (m MigrationInfo) Progress() float64 {
	if m.Status == "completed" {
		return 1
	}
	if m.RAM == nil {
		return 0
	}
	// In floats, so that no sum overflows; a negative count is none.
	sent, left := max(float64(m.RAM.Transferred), 0), max(float64(m.RAM.Remaining), 0)
	if sent+left == 0 {
		return 0
	}
	return sent / (sent + left)
}

// ExecuteQueryMigrate reports the migration's status and progress
// (query-migrate).
func (q *QMP) ExecuteQueryMigrate(ctx context.Context) (MigrationInfo, error) {
	return runFor[MigrationInfo](ctx, q, "query-migrate", "", nil)
}

// MigrationFilter selects the MIGRATION events that report one of
// statuses ("completed", "failed", "cancelled", say), or every MIGRATION
// event when none is given.
func MigrationFilter(statuses ...string) EventFilter {
	return EventFilter{Names: []string{"MIGRATION"}, Match: statusIn(statuses)}
}

// ErrMigrationFailed is wrapped by the error of a migration that QEMU
// ended as "failed" or "cancelled"; the error carries QEMU's reason.
var ErrMigrationFailed = errors.New("migration failed")

// ErrMigrationInPostcopy is wrapped, beside the context's error, by
// Migrate's error when its context ended after the migration had switched
// to postcopy. Migrate does not cancel it then: the guest runs on the
// destination, which fetches from the source the pages it lacks, so the
// end of either side loses the guest. The migration goes on in QEMU; the
// caller waits for its end (MigrationFilter, ExecuteQueryMigrate) or
// decides otherwise.
var ErrMigrationInPostcopy = errors.New("migration in postcopy, not cancelled")

// MigrateOptions are Migrate's options.
type MigrateOptions struct {
	// Progress, if not nil, is called with query-migrate's answer every
	// ProgressInterval while the migration runs, and with the final one.
	// It runs on Migrate's goroutine, so it may call the session (to
	// raise MaxBandwidth, or to start postcopy) but delays the wait while
	// it runs. A poll that fails is skipped: the wait goes on, and ends
	// as it would have without it.
	Progress         func(MigrationInfo)
	ProgressInterval time.Duration
	// CancelGrace bounds the cancel after ctx ended; 0 means
	// DefaultCancelGrace.
	CancelGrace time.Duration
}

// Migrate migrates the VM to uri, as ExecuteMigrate does, and waits for
// the migration's end: it returns the final query-migrate when the status
// is "completed", and an error that wraps ErrMigrationFailed, with QEMU's
// reason (error-desc), when it is "failed" or "cancelled" (by
// ExecuteMigrateCancel, say). The destination must be waiting already
// (ExecuteMigrateIncoming).
//
// Migrate turns the events capability on first, so that it learns of the
// end from the MIGRATION event at once rather than by polling. It is
// bounded by ctx: when ctx ends first, Migrate asks QEMU for the
// migration's status and cancels it (migrate_cancel) unless it is in
// postcopy or ending already, waits for QEMU to say it is over, which is
// the moment the source runs on, and returns an error that wraps ctx's
// error and its cause (context.Cause); should the migration have completed
// all the same, it returns success, since the VM has moved. That wait is
// bounded by opts.CancelGrace; past it the error wraps ErrCancelPending
// too. A migration in postcopy (postcopy-active, or paused or recovering
// from it) is not cancelled: the guest runs on the destination, the error
// wraps ErrMigrationInPostcopy, and the migration goes on. A migrate whose
// reply ctx cut short is cancelled only if QEMU started a migration for
// it. If the session ends (QEMU died), the error wraps ErrDisconnected.
//
// Did the VM move? Only a nil error says yes. With an error, the
// returned MigrationInfo's Status is QEMU's last word on the migration:
// "cancelled", "failed" or "none" (the source runs, whoever cancelled),
// a postcopy status (the guest runs on the destination, and the
// migration goes on), "cancelling" (ErrCancelPending: not over yet), or
// empty when Migrate started no migration or lost QEMU before it knew.
func (q *QMP) Migrate(ctx context.Context, uri string, opts MigrateOptions) (MigrationInfo, error) {
	if err := q.ExecuteMigrateSetCapabilities(ctx, map[MigrationCapability]bool{MigrationEvents: true}); err != nil {
		return MigrationInfo{}, err
	}
	// Every status: "setup" says that a migrate given up on started a
	// migration; once it is being cancelled, every status is a reason to
	// ask QEMU again.
	sub := q.Subscribe(MigrationFilter())
	defer sub.Close()
	m := &migration{q: q, uri: uri, opts: opts,
		op: newOperation(sub, opts.ProgressInterval, opts.Progress != nil, opts.CancelGrace)}
	if err := m.op.run(ctx, m, func(ctx context.Context) error { return q.ExecuteMigrate(ctx, uri) }); err != nil {
		return m.info, err
	}
	return m.info, m.err
}

// migration is one run of Migrate: the steps of its operation, and its
// result.
type migration struct {
	q         *QMP
	uri       string
	opts      MigrateOptions
	op        *operation
	cancelled bool // migrate_cancel has been sent

	info MigrationInfo // QEMU's last word on it
	err  error
}

// migrationEnds are the statuses a migration ends in.
var migrationEnds = []string{"completed", "failed", "cancelled"}

func isMigrationEnd(status string) bool { return slices.Contains(migrationEnds, status) }

// inPostcopy reports whether a migration in status runs the guest on the
// destination already, so that cancelling it would lose the guest:
// postcopy-active and the statuses of its recovery. QEMU 10.2's
// postcopy-device is not one of them: a migration that fails then is
// resumed on the source.
func inPostcopy(status string) bool {
	switch status {
	case "postcopy-active", "postcopy-paused", "postcopy-recover-setup", "postcopy-recover":
		return true
	}
	return false
}

// isMigrationEnding reports whether a migration in status is on its way to
// an end already, with nothing for a cancel to do: "cancelling", and QEMU
// 11.x's "failing", which precedes "failed".
func isMigrationEnding(status string) bool { return status == "cancelling" || status == "failing" }

func (m *migration) query(ctx context.Context) error {
	_, err := m.queryInfo(ctx)
	return err
}

func (m *migration) startedBy(ev QMPEvent) bool { return ev.Data["status"] == "setup" }

// poll reports query-migrate's answer, and sees the end when it comes
// before its event.
func (m *migration) poll(ctx context.Context) bool {
	if m.op.cause != nil {
		return m.decide(ctx)
	}
	info, err := m.queryInfo(ctx)
	if err != nil {
		return false // ctx's end or the session's is seen next
	}
	if isMigrationEnd(info.Status) {
		return m.ended(ctx, info)
	}
	m.opts.Progress(info)
	return false
}

// event waits for an end status; once the migration is being cancelled,
// every status is a reason to ask QEMU again.
func (m *migration) event(ctx context.Context, ev QMPEvent) bool {
	status, _ := ev.Data["status"].(string)
	switch {
	case m.op.cause != nil:
		return m.decide(ctx)
	case !isMigrationEnd(status):
		return false
	}
	// Over: its figures and reason are read whatever ctx says.
	ectx, done := m.op.ending(ctx)
	defer done()
	info, err := m.queryInfo(ectx)
	if err != nil {
		m.err = m.error(err)
		return true
	}
	return m.ended(ctx, info)
}

// cancel cancels a migration that ctx's end left running, as decide says.
// QEMU ends a cancelled migration promptly unless it waits on its peer,
// and the source VM runs on only once it has.
func (m *migration) cancel(gctx context.Context) bool { return m.decide(gctx) }

// decide acts on query-migrate, asked now, for a migration whose context
// has ended, not on the events it holds, which may be behind QEMU (one may
// be on its way), since a cancel cannot be taken back. A migration in
// postcopy is left to run; one that is ending, or in QEMU 10.2's
// postcopy-device (which QEMU will not cancel, and which the source takes
// back if it fails), is waited for; any other is cancelled, once. A cancel
// QEMU refuses is followed by another look, which says why: QEMU 10.0 and
// later refuse one in postcopy.
func (m *migration) decide(gctx context.Context) bool {
	var refused error
	for {
		info, err := m.queryInfo(gctx)
		if err != nil {
			m.err = m.stopFailed(gctx, err)
			return true
		}
		m.info = info
		switch {
		case isMigrationEnd(info.Status) || info.Status == "none":
			return m.ended(gctx, info)
		case inPostcopy(info.Status):
			m.err = m.error(fmt.Errorf("%w; %w", m.op.cause, ErrMigrationInPostcopy))
			return true
		case refused != nil:
			m.err = m.stopFailed(gctx, refused)
			return true
		case m.cancelled || info.Status == "postcopy-device" || isMigrationEnding(info.Status):
			return false
		}
		if err := m.q.execute(gctx, "migrate_cancel", nil, nil); err != nil {
			if gctx.Err() != nil {
				m.err = m.stopFailed(gctx, err)
				return true
			}
			refused = fmt.Errorf("migrate_cancel: %w", err)
			continue
		}
		m.cancelled = true
	}
}

// pending is the error of a migration not over when the grace ran out.
func (m *migration) pending() error {
	return m.error(fmt.Errorf("%w; %s, but not over %v later (%q): %w", m.op.cause, m.whatWasDone(), m.op.grace, m.info.Status, ErrCancelPending))
}

// stopFailed is the error of a migration whose end could not be seen
// after its context ended: the grace ran out, or a command or the
// session failed.
func (m *migration) stopFailed(gctx context.Context, err error) error {
	if gctx.Err() != nil {
		return m.pending()
	}
	return m.error(fmt.Errorf("%w; %s, and its end is unknown: %w", m.op.cause, m.whatWasDone(), err))
}

func (m *migration) whatWasDone() string {
	if m.cancelled {
		return "cancelled"
	}
	return "not cancelled"
}

// ended records a migration's end, as info says it. A completed migration
// is over on the source only once QEMU has set its figures (total-time,
// downtime) and moved the VM from finish-migrate to postmigrate: QEMU 7.2
// and 10.0 report "completed" before both, by a few milliseconds (by tens
// over TLS on 10.0). Until then it asks again, a millisecond apart,
// bounded by ctx; when ctx ends first, it reports what it has.
func (m *migration) ended(ctx context.Context, info MigrationInfo) bool {
	for info.Status == "completed" {
		if info.TotalTime != 0 {
			st, err := m.q.ExecuteQueryStatus(ctx)
			if err != nil || st.Status != "finish-migrate" {
				break
			}
		}
		select {
		case <-ctx.Done():
		case <-time.After(time.Millisecond):
		}
		next, err := m.queryInfo(ctx)
		if err != nil {
			break
		}
		info = next
	}
	if m.opts.Progress != nil {
		m.opts.Progress(info)
	}
	m.info, m.err = info, m.endError(info)
	return true
}

// endError is the error of a migration that ended in info's status: none
// for a completed one.
func (m *migration) endError(info MigrationInfo) error {
	cause := m.op.cause
	switch {
	case info.Status == "completed":
		return nil
	case cause != nil && (info.Status == "cancelled" || info.Status == "none"):
		return m.error(fmt.Errorf("cancelled: %w", cause))
	}
	reason := info.ErrorDesc
	if reason == "" {
		reason = "no reason given"
	}
	err := fmt.Errorf("%w: %s", ErrMigrationFailed, reason)
	if info.Status != "failed" {
		err = fmt.Errorf("%w: %s: %s", ErrMigrationFailed, info.Status, reason)
	}
	if cause != nil {
		err = fmt.Errorf("%w; %w", cause, err)
	}
	return m.error(err)
}

// queryInfo is ExecuteQueryMigrate with the error named for Migrate's.
func (m *migration) queryInfo(ctx context.Context) (MigrationInfo, error) {
	var info MigrationInfo
	if err := m.q.execute(ctx, "query-migrate", nil, &info); err != nil {
		return info, fmt.Errorf("query-migrate: %w", err)
	}
	return info, nil
}

func (m *migration) error(err error) error { return commandError("migrate", m.uri, err) }
