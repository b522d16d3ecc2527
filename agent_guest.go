package qemu

import (
	"context"
	"fmt"
	"time"
)

// The guest agent's typed calls about the guest: the agent itself, the
// operating system, its name, network, clock and users' keys, freezing its
// file systems, and shutting it down.

// Ping runs guest-ping: a nil error says the agent answers.
func (a *GuestAgent) Ping(ctx context.Context) error {
	return a.run(ctx, "guest-ping", nil, nil)
}

// GuestAgentInfo is the reply of guest-info.
type GuestAgentInfo struct {
	Version           string                  `json:"version"`
	SupportedCommands []GuestAgentCommandInfo `json:"supported_commands"`
}

// GuestAgentCommandInfo is one command the agent knows.
type GuestAgentCommandInfo struct {
	Name    string `json:"name"`
	Enabled bool   `json:"enabled"`
	// SuccessResponse is false for the commands that do not reply when
	// they succeed (guest-shutdown, guest-suspend-*).
	SuccessResponse bool `json:"success-response"`
}

// Info runs guest-info: the agent's version and the commands it knows,
// which the typed calls check against.
func (a *GuestAgent) Info(ctx context.Context) (GuestAgentInfo, error) {
	info, err := a.info(ctx)
	if err != nil {
		return info, fmt.Errorf("qga: %w", err)
	}
	return info, nil
}

// GuestOSInfo is the reply of guest-get-osinfo: the guest's uname and
// os-release. Fields the guest does not have are empty.
type GuestOSInfo struct {
	KernelRelease string `json:"kernel-release"`
	KernelVersion string `json:"kernel-version"`
	Machine       string `json:"machine"`
	ID            string `json:"id"`
	Name          string `json:"name"`
	PrettyName    string `json:"pretty-name"`
	Version       string `json:"version"`
	VersionID     string `json:"version-id"`
	Variant       string `json:"variant"`
	VariantID     string `json:"variant-id"`
}

// OSInfo runs guest-get-osinfo.
func (a *GuestAgent) OSInfo(ctx context.Context) (GuestOSInfo, error) {
	return callFor[GuestOSInfo](ctx, a, "guest-get-osinfo", "", nil)
}

// HostName runs guest-get-host-name.
func (a *GuestAgent) HostName(ctx context.Context) (string, error) {
	r, err := callFor[struct {
		HostName string `json:"host-name"`
	}](ctx, a, "guest-get-host-name", "", nil)
	return r.HostName, err
}

// GuestNetworkInterface is one interface of guest-network-get-interfaces.
type GuestNetworkInterface struct {
	Name            string           `json:"name"`
	HardwareAddress string           `json:"hardware-address"`
	IPAddresses     []GuestIPAddress `json:"ip-addresses"`
	// Statistics is nil when the guest does not report it.
	Statistics *GuestNetworkStats `json:"statistics"`
}

// GuestIPAddress is one address of a guest interface.
type GuestIPAddress struct {
	// Type is "ipv4" or "ipv6".
	Type    string `json:"ip-address-type"`
	Address string `json:"ip-address"`
	Prefix  int    `json:"prefix"`
}

// GuestNetworkStats are an interface's counters.
type GuestNetworkStats struct {
	RxBytes   uint64 `json:"rx-bytes"`
	RxPackets uint64 `json:"rx-packets"`
	RxErrs    uint64 `json:"rx-errs"`
	RxDropped uint64 `json:"rx-dropped"`
	TxBytes   uint64 `json:"tx-bytes"`
	TxPackets uint64 `json:"tx-packets"`
	TxErrs    uint64 `json:"tx-errs"`
	TxDropped uint64 `json:"tx-dropped"`
}

// NetworkInterfaces runs guest-network-get-interfaces.
func (a *GuestAgent) NetworkInterfaces(ctx context.Context) ([]GuestNetworkInterface, error) {
	return callFor[[]GuestNetworkInterface](ctx, a, "guest-network-get-interfaces", "", nil)
}

// Time runs guest-get-time: the guest's clock.
func (a *GuestAgent) Time(ctx context.Context) (time.Time, error) {
	ns, err := callFor[int64](ctx, a, "guest-get-time", "", nil)
	if err != nil {
		return time.Time{}, err
	}
	return time.Unix(0, ns), nil
}

// SetTime runs guest-set-time: the guest's clock is set to t, and its RTC
// from it. A zero t sets the clock from the RTC instead.
func (a *GuestAgent) SetTime(ctx context.Context, t time.Time) error {
	var args interface{}
	if !t.IsZero() {
		args = struct {
			Time int64 `json:"time"`
		}{t.UnixNano()}
	}
	return a.call(ctx, "guest-set-time", "", args, nil)
}

// sshKeysArgs are the arguments of guest-ssh-add-authorized-keys and
// guest-ssh-remove-authorized-keys.
type sshKeysArgs struct {
	Username string   `json:"username"`
	Keys     []string `json:"keys"`
	Reset    bool     `json:"reset,omitempty"`
}

// AddAuthorizedKeys runs guest-ssh-add-authorized-keys: keys (lines of
// authorized_keys) are added to the user's ~/.ssh/authorized_keys, which
// reset first empties.
func (a *GuestAgent) AddAuthorizedKeys(ctx context.Context, user string, keys []string, reset bool) error {
	return a.call(ctx, "guest-ssh-add-authorized-keys", user, sshKeysArgs{user, keys, reset}, nil)
}

// RemoveAuthorizedKeys runs guest-ssh-remove-authorized-keys: the keys are
// removed from the user's ~/.ssh/authorized_keys.
func (a *GuestAgent) RemoveAuthorizedKeys(ctx context.Context, user string, keys []string) error {
	return a.call(ctx, "guest-ssh-remove-authorized-keys", user, sshKeysArgs{Username: user, Keys: keys}, nil)
}

// Guest file system freeze states, as guest-fsfreeze-status reports them.
const (
	GuestFSThawed = "thawed"
	GuestFSFrozen = "frozen"
)

// FSFreezeStatus runs guest-fsfreeze-status: GuestFSThawed or
// GuestFSFrozen.
func (a *GuestAgent) FSFreezeStatus(ctx context.Context) (string, error) {
	return callFor[string](ctx, a, "guest-fsfreeze-status", "", nil)
}

// FSFreeze syncs and freezes the guest's local file systems, or only those
// mounted at mountpoints (guest-fsfreeze-freeze-list), and returns how
// many it froze. Writes in the guest then block until FSThaw. When ctx
// ends after the command was written and before its reply, the agent may
// still freeze: FSFreeze then thaws, with agentCleanupTimeout of its own,
// so that a freeze the caller began never outlives its failure. So it
// does after ErrAgentPortClosed, since a restarted agent remembers that
// it froze: that thaw waits up to agentCleanupTimeout (30 s) for the
// agent to come back. An error
// reply needs no thaw (the agent thaws what it froze before it fails), and
// must get none: a frozen agent refuses a second freeze, and a thaw then
// would undo the first caller's.
func (a *GuestAgent) FSFreeze(ctx context.Context, mountpoints ...string) (int, error) {
	name, args := "guest-fsfreeze-freeze", interface{}(nil)
	if len(mountpoints) > 0 {
		name, args = "guest-fsfreeze-freeze-list", struct {
			Mountpoints []string `json:"mountpoints"`
		}{mountpoints}
	}
	n, err := callFor[int](ctx, a, name, "", args)
	if err == nil || !unanswered(err) {
		return n, err
	}
	tctx, cancel := graceContext(ctx, agentCleanupTimeout)
	defer cancel()
	if _, terr := a.FSThaw(tctx); terr != nil {
		return 0, fmt.Errorf("%w; and the thaw after it: %w", err, terr)
	}
	return 0, err
}

// agentCleanupTimeout bounds what is sent to undo or end something after
// the caller's context is done: FSFreeze's thaw, GuestFile.Close.
const agentCleanupTimeout = 30 * time.Second

// FSThaw runs guest-fsfreeze-thaw and returns how many file systems it
// thawed.
func (a *GuestAgent) FSThaw(ctx context.Context) (int, error) {
	return callFor[int](ctx, a, "guest-fsfreeze-thaw", "", nil)
}

// Shutdown runs guest-shutdown with mode "powerdown" (also for an empty
// mode), "halt" or "reboot". The agent does not reply when it succeeds:
// Shutdown returns nil when the channel closes after the command was
// written (QEMU exited), or, with GuestAgentConfig.QMP (an Instance's
// agent has it), on QEMU's SHUTDOWN event (RESET for "reboot"). An error
// reply fails it at once. A guest whose halt stops its CPUs without ACPI
// tells QEMU nothing, so "halt" may complete only when ctx ends.
func (a *GuestAgent) Shutdown(ctx context.Context, mode string) error {
	if err := a.offers(ctx, "guest-shutdown"); err != nil {
		return fmt.Errorf("qga: guest-shutdown: %w", err)
	}
	var args interface{}
	if mode != "" {
		args = struct {
			Mode string `json:"mode"`
		}{mode}
	}
	var sub *Subscription
	if a.qmp != nil {
		// Before the command: the event may come before anything else.
		done := "SHUTDOWN"
		if mode == "reboot" {
			done = "RESET"
		}
		sub = a.qmp.Subscribe(EventFilter{Names: []string{done}})
		defer sub.Close()
	}
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	replied := make(chan error, 1)
	go func() {
		// Not guarded: the agent closes its port as the guest goes down.
		replied <- a.s.execute(wctx, "guest-shutdown", args, nil, nil)
		cancel()
	}()
	if sub != nil {
		if _, err := sub.Receive(wctx); err == nil {
			cancel() // gives the command up: the next call resynchronises
			<-replied
			return nil
		}
	}
	err := <-replied
	switch {
	case err == nil, lostToPeer(err):
		return nil
	case ctx.Err() != nil:
		return fmt.Errorf("qga: guest-shutdown: no shutdown seen: %w", contextError(ctx))
	}
	return fmt.Errorf("qga: guest-shutdown: %w", err)
}
