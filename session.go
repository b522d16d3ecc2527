package qemu

// The session engine, which QMP and the guest agent both run on: one
// reader goroutine decodes every line; commands go out one at a time, each
// with a completion of its own; and one function, run by the reader, ends
// the session and fails the command in flight. What differs between peers
// is a protocol.

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"time"
)

// maxLineSize bounds one line from QEMU. query-qmp-schema alone is several
// hundred KiB, so the bound is generous; it exists so that a peer that never
// sends a newline cannot make the client grow its buffer without end.
const maxLineSize = 16 << 20

// frame is one line from the peer, as the protocol decoded it.
type frame struct {
	kind  frameKind
	ret   json.RawMessage // a reply's value, which the frame owns
	err   error           // an error reply's error
	event QMPEvent
	// delimited says that the reply followed a 0xFF byte, as the guest
	// agent's reply to guest-sync-delimited does.
	delimited bool
}

type frameKind int

const (
	frameSkip frameKind = iota // neither a reply nor an event: logged and skipped
	frameReply
	frameEvent
)

// protocol is what differs between the peers a session speaks to: how a
// line decodes, and where events go. The greeting or handshake, if any, is
// read by the protocol's own code before the session starts.
type protocol struct {
	// name prefixes the session's log lines.
	name string
	// decode reads one line, which it must not keep. An error says why
	// the line was skipped.
	decode func(line []byte) (frame, error)
	// event receives each event, on the reader goroutine.
	event func(QMPEvent)
	// end is called once, on the reader goroutine, when the session has
	// ended, with why.
	end func(error)
	// resync, when set, lets callers give up on a command: a caller
	// whose context ends before the reply takes its command out of the
	// slot, and the next command goes after the request resync returns,
	// whose reply (the one its accept takes) comes after every reply
	// still owed to the commands given up on. The session starts out
	// needing it. The guest agent needs this: an agent that is not
	// running never answers, so waiting for a late reply would wait for
	// good.
	resync func() request
}

// request is one command for the peer.
type request struct {
	prefix []byte // written just before the command
	name   string
	args   []byte // a JSON object, or nil for none
	files  []*os.File
	// accept says which reply is the command's, so that the reader skips
	// the others; nil takes the next one.
	accept func(frame) bool
	// synchronises marks a resync: its reply ends the need for one.
	synchronises bool
}

// pending is the command in the in-flight slot.
type pending struct {
	c            chan reply
	accept       func(frame) bool
	synchronises bool
}

// reply is what the reader hands to the caller of the command in flight.
type reply struct {
	ret json.RawMessage
	err error
}

// session runs one request/response connection: one reader goroutine,
// which decodes every line, and one command in flight at a time.
//
// The turn is a one-token semaphore: a caller takes it before it writes
// its command, and release gives it back as it takes the command out of
// the in-flight slot, whoever calls it: the reader when the reply comes,
// end when the session ends first, or the caller itself when its write
// sent nothing or, on a session with resync, when it gives up or its
// write is cut short. Each command has a completion of its own, so a
// caller that gives up just stops listening and the reader needs to know
// nothing about it.
type session struct {
	conn  net.Conn
	proto protocol
	log   QMPLog

	turn chan struct{}
	// wmu is held while a command is built and written, deadline cleanup
	// included: once a command's reply has given the turn to the next
	// caller, the previous write may still be running (QEMU can answer
	// as soon as it has the closing brace, before the newline has gone),
	// and the next caller must not touch wbuf or the deadline until it
	// has returned.
	wmu  sync.Mutex
	wbuf []byte // guarded by wmu

	// done is closed once the session has ended: the in-flight command
	// has been failed and the protocol told.
	done chan struct{}

	decoders sync.Pool // of *keptDecoder, for the callers' results

	mu       sync.Mutex // guards the fields below
	inflight *pending   // the command written, or nil
	err      error      // why the session ends, once it does
	writeSeq uint64     // counts writes, so a late deadline finds its own
	// unsynced says that replies may still come for commands given up on,
	// so the next command needs proto.resync's first.
	unsynced bool
}

// newSession starts a session on conn, whose lines are read through r
// (which may hold lines read ahead during a greeting).
func newSession(conn net.Conn, r *bufio.Reader, proto protocol, log QMPLog) *session {
	s := &session{
		conn:  conn,
		proto: proto,
		log:   log,
		turn:  make(chan struct{}, 1),
		done:  make(chan struct{}),
		// Whatever the peer says before the first resync may be owed
		// to an earlier client.
		unsynced: proto.resync != nil,
	}
	go s.readLoop(r)
	return s
}

// readLine returns the next line without its line ending. The slice is only
// valid until the next call. Lines longer than the reader's buffer are
// gathered in *big, up to maxLineSize.
func readLine(r *bufio.Reader, big *[]byte) ([]byte, error) {
	line, err := r.ReadSlice('\n')
	if err == bufio.ErrBufferFull {
		buf := append((*big)[:0], line...)
		for err == bufio.ErrBufferFull {
			line, err = r.ReadSlice('\n')
			if len(buf)+len(line) > maxLineSize {
				return nil, fmt.Errorf("line longer than %d bytes", maxLineSize)
			}
			buf = append(buf, line...)
		}
		*big = buf
		line = buf
	}
	if err != nil {
		return nil, err
	}
	return bytes.TrimSpace(line), nil
}

func truncate(line []byte) []byte {
	if len(line) > 80 {
		return line[:80]
	}
	return line
}

// readLoop decodes every line until the connection ends, then ends the
// session.
func (s *session) readLoop(r *bufio.Reader) {
	var big []byte
	for {
		line, err := readLine(r, &big)
		if err != nil {
			s.end(err)
			return
		}
		if cap(big) > 1<<20 {
			// Don't hold a huge buffer for the rest of the session
			// because of one large line.
			big = nil
		}
		if len(line) == 0 {
			continue
		}
		f, err := s.proto.decode(line)
		if err != nil {
			s.log.Warningf("%s: skipping a line: %v: %q", s.proto.name, err, truncate(line))
			continue
		}
		switch f.kind {
		case frameReply:
			s.complete(f)
		case frameEvent:
			s.proto.event(f.event)
		}
	}
}

// complete hands a reply to the command in flight, if it is the
// command's.
func (s *session) complete(f frame) {
	s.mu.Lock()
	p := s.inflight
	s.mu.Unlock()
	if p == nil || p.accept != nil && !p.accept(f) || !s.release(p, answered) {
		s.log.Warningf("%s: skipping a reply that no command in flight is waiting for", s.proto.name)
		return
	}
	p.c <- reply{ret: f.ret, err: f.err}
}

// end is the one place where a session ends: it records why, fails the
// command in flight and tells the protocol. Only the reader calls it.
func (s *session) end(cause error) {
	s.mu.Lock()
	if s.err == nil {
		if errors.Is(cause, io.EOF) {
			s.err = ErrDisconnected
		} else {
			s.err = fmt.Errorf("%w: %w", ErrDisconnected, cause)
		}
	}
	err := s.err
	p := s.inflight
	s.mu.Unlock()
	s.conn.Close()
	if p != nil && s.release(p, dropped) {
		p.c <- reply{err: &lostReplyError{err}}
	}
	s.proto.end(err)
	close(s.done)
}

// releaseKind says how a command left the in-flight slot.
type releaseKind int

const (
	answered releaseKind = iota // its reply came
	owed                        // its caller gave up, but the peer may still answer it
	dropped                     // it was never sent, or the session ended
)

// release takes p out of the in-flight slot, if it is still there, and
// gives the turn back. It is the only place the turn is given back,
// whoever ends the command: the reader with its reply, end, or its caller.
// A resync's answer ends the need for one; an answer owed makes it, so
// that the next command sends the resync's request first. It reports
// whether p was in the slot.
func (s *session) release(p *pending, how releaseKind) bool {
	s.mu.Lock()
	mine := s.inflight == p
	if mine {
		s.inflight = nil
		// Under the lock, so that a command given up on after a
		// resync's reply makes the need anew.
		switch {
		case how == answered && p.synchronises:
			s.unsynced = false
		case how == owed:
			s.unsynced = true
		}
	}
	s.mu.Unlock()
	if mine {
		<-s.turn
	}
	return mine
}

// shutdown ends the session with ErrShutdown, unless it has ended already,
// and returns once the reader has.
func (s *session) shutdown() {
	s.fail(ErrShutdown)
	<-s.done
}

// fail makes err the session's end, unless it has one already, and closes
// the connection, which makes the reader end the session.
func (s *session) fail(err error) {
	s.mu.Lock()
	if s.err == nil {
		s.err = err
	}
	s.mu.Unlock()
	s.conn.Close()
}

// ended returns why the session ended, or is ending.
func (s *session) ended() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.err
}

// endedErr returns nil until done is closed, then why the session ended.
func (s *session) endedErr() error {
	select {
	case <-s.done:
		return s.ended()
	default:
		return nil
	}
}

// execute sends one command, waits for its reply and decodes the reply's
// value into result, unless result is nil. args, when not nil, must encode
// to a JSON object; result, when not nil, must be a pointer; files must be
// sendable. All three are checked before anything is sent.
func (s *session) execute(ctx context.Context, name string, args, result interface{}, files []*os.File) error {
	argsJSON, err := encodeArgs(args)
	if err != nil {
		return err
	}
	if err := checkResult(result); err != nil {
		return err
	}
	if err := checkSendable(s.conn, files); err != nil {
		return err
	}
	// ctx bounds the wait for the turn, the write and the wait for the
	// reply; the files go beside the command, as SCM_RIGHTS on its write.
	ret, err := s.do(ctx, request{name: name, args: argsJSON, files: files})
	if err != nil || result == nil {
		return err
	}
	if err := s.decodeReply(ret, result); err != nil {
		return fmt.Errorf("decode reply: %w", err)
	}
	return nil
}

// do is call for any request. On a session with resync, the resync's
// request goes first when replies may still be owed to commands given up
// on.
func (s *session) do(ctx context.Context, req request) (json.RawMessage, error) {
	for {
		if err := s.takeTurn(ctx); err != nil {
			return nil, err
		}
		if !s.needsResync() {
			return s.exchange(ctx, req)
		}
		sync := s.proto.resync()
		sync.synchronises = true
		if _, err := s.exchange(ctx, sync); err != nil {
			return nil, fmt.Errorf("resynchronise: %w", err)
		}
	}
}

// takeTurn waits for the turn.
func (s *session) takeTurn(ctx context.Context) error {
	// The state first: a done context or an ended session gives the
	// same answer every time.
	if ctx.Err() != nil {
		return contextError(ctx)
	}
	if err := s.endedErr(); err != nil {
		return err
	}
	select {
	case s.turn <- struct{}{}:
		return nil
	case <-ctx.Done():
		return contextError(ctx)
	case <-s.done:
		return s.ended()
	}
}

func (s *session) needsResync() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unsynced
}

// exchange writes req while its caller holds the turn and waits for its
// reply. On a session with resync, a caller whose context ends first
// gives the command up.
func (s *session) exchange(ctx context.Context, req request) (json.RawMessage, error) {
	p, err := s.send(ctx, req)
	if err != nil {
		return nil, err
	}
	select {
	case r := <-p.c:
		return r.ret, r.err
	case <-ctx.Done():
		select {
		case r := <-p.c: // a reply that is already there wins
			return r.ret, r.err
		default:
		}
		if s.proto.resync != nil {
			s.release(p, owed)
		}
		if req.synchronises {
			// The caller's own command was never sent.
			return nil, contextError(ctx)
		}
		return nil, &unansweredError{contextError(ctx)}
	}
}

// send writes a request while its caller holds the turn and returns the
// command in the slot. On an error the command is out of the slot, and
// the turn given back.
func (s *session) send(ctx context.Context, req request) (*pending, error) {
	p := &pending{c: make(chan reply, 1), accept: req.accept, synchronises: req.synchronises}
	s.mu.Lock()
	err := s.err
	// Before the write: the reply can be read before the write returns.
	s.inflight = p
	s.mu.Unlock()
	if err != nil {
		s.release(p, dropped)
		return nil, err
	}
	s.wmu.Lock()
	buf := appendCommand(append(s.wbuf[:0], req.prefix...), req.name, req.args)
	n, err := s.write(ctx, buf, req.files)
	s.wbuf = buf
	if cap(buf) > 1<<20 {
		s.wbuf = nil // don't keep a huge buffer for one large command
	}
	s.wmu.Unlock()
	if err == nil {
		return p, nil
	}
	if ctx.Err() != nil && errors.Is(err, os.ErrDeadlineExceeded) {
		err = contextError(ctx)
	}
	err = fmt.Errorf("write: %w", err)
	switch {
	case n > 0 && s.proto.resync != nil:
		// The resync's request starts with what resets the peer's
		// parser (the guest agent's 0xFF), so the session goes on.
		s.release(p, owed)
	case n > 0:
		// Half a command leaves the peer's parser in an unknown state:
		// the session cannot go on. The reader ends it and takes the
		// command out of the slot.
		s.fail(fmt.Errorf("%w: %d of %d bytes of a command written: %w", ErrDisconnected, n, len(buf), err))
	default:
		s.release(p, dropped)
	}
	return nil, err
}

// write writes p, with files as SCM_RIGHTS on its first byte, until ctx
// ends. It returns how many bytes of p went out.
func (s *session) write(ctx context.Context, p []byte, files []*os.File) (int, error) {
	if ctx.Done() != nil {
		// A peer that does not read (a stopped QEMU, an absent guest
		// agent) would block the write for good: the context's end moves
		// the deadline to the past. The sequence number keeps a late
		// call of the function from touching a later write.
		s.mu.Lock()
		s.writeSeq++
		seq := s.writeSeq
		s.mu.Unlock()
		stop := context.AfterFunc(ctx, func() {
			s.mu.Lock()
			if s.writeSeq == seq {
				s.conn.SetWriteDeadline(time.Unix(1, 0))
			}
			s.mu.Unlock()
		})
		defer func() {
			if !stop() {
				s.mu.Lock()
				s.writeSeq++
				s.mu.Unlock()
				s.conn.SetWriteDeadline(time.Time{})
			}
		}()
	}
	if len(files) == 0 {
		return s.conn.Write(p)
	}
	return writeWithFiles(s.conn.(*net.UnixConn), p, files)
}

// writeWithFiles writes p with files attached to its first byte.
func writeWithFiles(conn *net.UnixConn, p []byte, files []*os.File) (int, error) {
	var n int
	err := withFDs(files, nil, func(fds []int) error {
		var err error
		n, _, err = conn.WriteMsgUnix(p, syscall.UnixRights(fds...), nil)
		return err
	})
	if err == nil && n < len(p) {
		// A stream socket may take part of the bytes; the files went
		// with the first of them.
		var m int
		m, err = conn.Write(p[n:])
		n += m
	}
	return n, err
}

// withFDs calls f with the descriptors of files, each held open (and so
// not reusable by another open) until f returns. It does not use Fd, which
// would put a pollable file, such as a tap, into blocking mode.
func withFDs(files []*os.File, fds []int, f func([]int) error) error {
	if len(files) == 0 {
		return f(fds)
	}
	rc, err := files[0].SyscallConn()
	if err != nil {
		return fmt.Errorf("file %d: %w", len(fds), err)
	}
	var inner error
	err = rc.Control(func(fd uintptr) {
		inner = withFDs(files[1:], append(fds, int(fd)), f)
	})
	if err != nil {
		return fmt.Errorf("file %d (%s): %w", len(fds), files[0].Name(), err)
	}
	return inner
}

// checkSendable refuses files that cannot be sent over conn, before anything
// is written.
func checkSendable(conn net.Conn, files []*os.File) error {
	if len(files) == 0 {
		return nil
	}
	if _, ok := conn.(*net.UnixConn); !ok {
		return fmt.Errorf("cannot send files: the session is not on a unix socket but on %s", conn.LocalAddr().Network())
	}
	for i, f := range files {
		if f == nil {
			return fmt.Errorf("cannot send files: file %d is nil", i)
		}
	}
	return nil
}
