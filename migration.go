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

// DefaultProgressInterval is how often Migrate and the block job methods
// query the progress they report, when their options say 0.
const DefaultProgressInterval = 200 * time.Millisecond

// MigrateOptions are Migrate's options.
type MigrateOptions struct {
	// Progress, if not nil, is called with query-migrate's answer every
	// ProgressInterval while the migration runs, and with the final one.
	// It runs on Migrate's goroutine, so it may call the session (to
	// raise MaxBandwidth, or to start postcopy) but delays the wait while
	// it runs.
	Progress         func(MigrationInfo)
	ProgressInterval time.Duration
}

// ErrMigrationFailed is wrapped by the error of a migration that QEMU
// ended as "failed" or "cancelled"; the error carries QEMU's reason.
var ErrMigrationFailed = errors.New("migration failed")

// Migrate migrates the VM to uri, as ExecuteMigrate does, and waits for
// the migration's end: it returns the final query-migrate when the status
// is "completed", and an error that wraps ErrMigrationFailed, with QEMU's
// reason (error-desc), when it is "failed" or "cancelled" (by
// ExecuteMigrateCancel, say). The destination must be waiting already
// (ExecuteMigrateIncoming).
//
// Migrate turns the events capability on first, so that it learns of the
// end from the MIGRATION event at once rather than by polling. It is
// bounded by ctx alone: when ctx ends first, Migrate cancels the
// migration (migrate_cancel), waits for QEMU to say it is over, which is
// the moment the source runs on, and returns an error that wraps
// ctx.Err(); should the migration have completed all the same, it
// returns success, since the VM has moved. If the session ends (QEMU
// died), the error wraps ErrDisconnected.
func (q *QMP) Migrate(ctx context.Context, uri string, opts MigrateOptions) (MigrationInfo, error) {
	if err := q.ExecuteMigrateSetCapabilities(ctx, map[MigrationCapability]bool{MigrationEvents: true}); err != nil {
		return MigrationInfo{}, err
	}
	sub := q.Subscribe(MigrationFilter(migrationEnds...))
	defer sub.Close()
	if err := q.ExecuteMigrate(ctx, uri); err != nil {
		if ctx.Err() != nil {
			// The command may have reached QEMU before ctx ended.
			return q.cancelMigration(ctx, uri, sub, opts)
		}
		return MigrationInfo{}, err
	}
	w := waiter{sub: sub, interval: opts.ProgressInterval, poll: opts.Progress != nil}
	for {
		_, err := w.next(ctx)
		switch {
		case errors.Is(err, errPoll):
			info, err := q.ExecuteQueryMigrate(ctx)
			if err == nil && isMigrationEnd(info.Status) {
				return q.migrationEnded(ctx, uri, info, opts)
			}
			if err == nil {
				opts.Progress(info)
			} else if ctx.Err() == nil {
				return info, err
			}
		case err != nil && ctx.Err() != nil:
			return q.cancelMigration(ctx, uri, sub, opts)
		case err != nil:
			return MigrationInfo{}, commandError("migrate", uri, fmt.Errorf("waiting for its end: %w", err))
		default:
			info, err := q.ExecuteQueryMigrate(ctx)
			if err != nil {
				if ctx.Err() != nil {
					return q.cancelMigration(ctx, uri, sub, opts)
				}
				return info, err
			}
			return q.migrationEnded(ctx, uri, info, opts)
		}
	}
}

// migrationEnds are the statuses a migration ends in.
var migrationEnds = []string{"completed", "failed", "cancelled"}

func isMigrationEnd(status string) bool { return slices.Contains(migrationEnds, status) }

// migrationEnded reports a migration's end, as info says it. A completed
// migration is over on the source only once QEMU has set its figures
// (total-time, downtime) and moved the VM from finish-migrate to
// postmigrate: QEMU 7.2 and 10.0 report "completed" before both, by a few
// milliseconds (by tens over TLS on 10.0). Until then it asks again, a
// millisecond apart, bounded by ctx.
func (q *QMP) migrationEnded(ctx context.Context, uri string, info MigrationInfo, opts MigrateOptions) (MigrationInfo, error) {
	for info.Status == "completed" {
		if info.TotalTime != 0 {
			st, err := q.ExecuteQueryStatus(ctx)
			if err != nil || st.Status != "finish-migrate" {
				break
			}
		}
		select {
		case <-ctx.Done():
			return info, nil // completed all the same
		case <-time.After(time.Millisecond):
		}
		next, err := q.ExecuteQueryMigrate(ctx)
		if err != nil {
			break
		}
		info = next
	}
	if opts.Progress != nil {
		opts.Progress(info)
	}
	if info.Status == "completed" {
		return info, nil
	}
	reason := info.ErrorDesc
	if reason == "" {
		reason = "no reason given"
	}
	if info.Status == "failed" {
		return info, commandError("migrate", uri, fmt.Errorf("%w: %s", ErrMigrationFailed, reason))
	}
	return info, commandError("migrate", uri, fmt.Errorf("%w: %s: %s", ErrMigrationFailed, info.Status, reason))
}

// cancelMigration cancels the migration after ctx ended, and waits for it
// to be over, bounded by the session: QEMU ends a cancelled migration
// promptly, and the source VM runs on only once it has.
func (q *QMP) cancelMigration(ctx context.Context, uri string, sub *Subscription, opts MigrateOptions) (MigrationInfo, error) {
	cause := ctx.Err()
	ctx = context.WithoutCancel(ctx)
	if err := q.ExecuteMigrateCancel(ctx); err != nil {
		return MigrationInfo{}, commandError("migrate", uri, fmt.Errorf("%w; and the cancel failed: %w", cause, err))
	}
	for {
		info, err := q.ExecuteQueryMigrate(ctx)
		if err != nil {
			return info, commandError("migrate", uri, fmt.Errorf("%w; cancelled, but its end is unknown: %w", cause, err))
		}
		if info.Status == "completed" {
			return q.migrationEnded(ctx, uri, info, opts)
		}
		if isMigrationEnd(info.Status) || info.Status == "none" {
			return info, commandError("migrate", uri, fmt.Errorf("cancelled: %w", cause))
		}
		if _, err := sub.Receive(ctx); err != nil {
			return info, commandError("migrate", uri, fmt.Errorf("%w; cancelled, but its end is unknown: %w", cause, err))
		}
	}
}

// errPoll is what waiter.next returns when it is time to poll.
var errPoll = errors.New("poll")

// waiter waits for the events of a long operation, and for the moments to
// poll its progress when it has a progress callback.
type waiter struct {
	sub      *Subscription
	interval time.Duration
	poll     bool
}

// next returns the next event, or errPoll when interval has passed
// without one and the operation reports progress.
func (w *waiter) next(ctx context.Context) (QMPEvent, error) {
	if !w.poll {
		return w.sub.Receive(ctx)
	}
	d := w.interval
	if d <= 0 {
		d = DefaultProgressInterval
	}
	tctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	ev, err := w.sub.Receive(tctx)
	if err != nil && ctx.Err() == nil && tctx.Err() != nil {
		return ev, errPoll
	}
	return ev, err
}
