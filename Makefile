# The two commands of the README, on a fresh Debian 12 (or Ubuntu) machine:
#
#   make demo   install QEMU and the tools if missing, build the test guest,
#               run the examples (each boots the guest and drives it)
#   make test   the same set-up plus QEMU 10.0 and 11.1, then go vet, a gofmt
#               check and every test with the race detector, all real-VM
#               tests included, against Debian's QEMU 7.2, then QEMU 10.0,
#               then QEMU 11.1
#
# Smaller steps: make deps, make guest, make qemu10, make qemu11, make clean.
# make schema records the QAPI schemas of QEMU 7.2, 10.0 and 11.1, the
# properties of the devices and objects the package uses in each, and the
# guest agent's schema, into testdata/qapi, which the unit tests check every
# typed command and rendered property against.
# make flaketest hunts flaky tests: the tests that need no QEMU, 50 times
# with the race detector while a CPU hog keeps both cores busy, then the
# real-VM tests 3 times, two test binaries at once.
# make bench runs the benchmarks of the README's Performance section against
# Debian's QEMU 7.2 (ten runs, about 4 minutes) into bench.txt and
# summarises them with benchstat, fetched from the Go module proxy as a tool
# (it is not a dependency of the module).
# Run as root, or as a user who may sudo (only apt-get install and
# apt-get update need it).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
# deps, the guest build and QEMU 10.0 all use apt: one at a time.
.NOTPARALLEL:

GO ?= go
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

# What the guest build and the tests need from Debian. The guest build
# fetches its own kernel and busybox-static with apt-get download. The
# package itself needs none of xorriso and genisoimage (it writes ISO 9660
# images in Go): the tests use xorriso and isoinfo (from genisoimage) as
# independent readers of what it writes. qemu-utils is qemu-img.
PACKAGES := qemu-system-x86 qemu-utils busybox-static xorriso genisoimage cpio xz-utils

GUEST_OUT := testdata/guest/out
QEMU10 := $(CURDIR)/testdata/qemu10
QEMU11 := $(CURDIR)/testdata/qemu11
QEMU72_BIN := /usr/bin/qemu-system-x86_64
QEMU10_BIN := $(QEMU10)/usr/bin/qemu-system-x86_64
# QEMU_MODULE_DIR keeps QEMU 10.0 from loading QEMU 7.2's modules from
# /usr/lib/x86_64-linux-gnu/qemu (see testdata/qemu10.sh).
QEMU10_ENV := QEMU_BIN=$(QEMU10_BIN) \
	QEMU_FIRMWARE=$(QEMU10)/usr/share/qemu:$(QEMU10)/usr/share/seabios \
	QEMU_MODULE_DIR=$(QEMU10)/usr/lib/x86_64-linux-gnu/qemu
# The first run must use the system QEMU whatever the caller's environment says.
QEMU72_ENV := env -u QEMU_FIRMWARE -u QEMU_MODULE_DIR QEMU_BIN=$(QEMU72_BIN)
# QEMU 11.1 runs from a wrapper that sets its module directory, and finds its
# firmware in its own tree (see testdata/qemu11.sh).
QEMU11_BIN := $(QEMU11)/qemu-system-x86_64
QEMU11_ENV := env -u QEMU_FIRMWARE -u QEMU_MODULE_DIR QEMU_BIN=$(QEMU11_BIN)
GOTEST := QEMU_TEST_REQUIRE=1 $(GO) test -race -count=1 -timeout 30m ./...

.PHONY: deps guest qemu10 qemu11 demo test flaketest bench schema clean

BENCHSTAT := golang.org/x/perf/cmd/benchstat@v0.0.0-20260908200009-22c9c6c9d4da

# apt-get update runs only when a missing package is unknown to the local
# lists, or when installing fails (lists too old for the mirror).
deps:
	@command -v $(GO) >/dev/null || { \
		echo "make: '$(GO)' not found in PATH: install Go (https://go.dev/dl/)$$( \
			[ -x /usr/local/go/bin/go ] && echo ' or add /usr/local/go/bin to PATH')" >&2; \
		exit 1; }
	@missing=; \
	for p in $(PACKAGES); do \
		[ "$$(dpkg-query -W -f='$${Status}' "$$p" 2>/dev/null)" = "install ok installed" ] || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
		updated=; \
		for p in $$missing; do \
			apt-cache show "$$p" >/dev/null 2>&1 || { $(SUDO) apt-get update -q; updated=1; break; }; \
		done; \
		echo "apt-get install$$missing"; \
		apt_install() { $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; }; \
		apt_install || { [ -z "$$updated" ] && $(SUDO) apt-get update -q && apt_install; }; \
	fi

guest:
	@testdata/guest/build.sh $(GUEST_OUT)

qemu10:
	@testdata/qemu10.sh $(QEMU10)

qemu11:
	@testdata/qemu11.sh $(QEMU11)

demo: deps guest
	$(GO) test -v -count=1 -run '^Example' ./...

test: deps guest qemu10 qemu11
	$(GO) vet ./...
	@unformatted=$$(gofmt -l .); \
	if [ -n "$$unformatted" ]; then echo "gofmt -l lists files that need gofmt:" >&2; echo "$$unformatted" >&2; exit 1; fi
	@echo "=== go test -race: real-VM tests on $$($(QEMU72_BIN) --version | sed -n 1p)"
	$(QEMU72_ENV) $(GOTEST)
	@echo "=== go test -race: real-VM tests on $$($(QEMU10_ENV) $(QEMU10_BIN) --version | sed -n 1p)"
	$(QEMU10_ENV) $(GOTEST)
	@echo "=== go test -race: real-VM tests on $$($(QEMU11_BIN) --version | sed -n 1p)"
	$(QEMU11_ENV) $(GOTEST)

# Two busy loops of the shell, one per core, for as long as the recipe runs.
HOG := for i in 1 2; do sh -c 'while :; do :; done' & done; trap 'kill $$(jobs -p) 2>/dev/null' EXIT

flaketest: deps guest
	@echo "=== the tests that need no QEMU, -race -count=50, beside a CPU hog"
	@$(HOG); QEMU_BIN=/nonexistent $(GO) test -race -count=50 -timeout 60m .
	@echo "=== the real-VM tests on QEMU 7.2, -count=3, two test binaries at once"
	@$(GO) test -race -c -o flaketest.test . && trap 'rm -f flaketest.test' EXIT; \
	for i in 1 2; do $(QEMU72_ENV) QEMU_TEST_REQUIRE=1 ./flaketest.test -test.count=3 -test.timeout=90m >flaketest.$$i.log 2>&1 & done; \
	fail=0; for j in $$(jobs -p); do wait $$j || fail=1; done; \
	for i in 1 2; do tail -n 3 flaketest.$$i.log; done; \
	[ $$fail = 0 ] && rm -f flaketest.*.log

# The QAPI schemas the typed commands are checked against: query-qmp-schema
# of each QEMU, one entity a line, sorted, gzipped, in testdata/qapi; and the
# properties (device-list-properties, qom-list-properties) of the device and
# object types the package uses. qemu-ga has no introspection: its schema is
# converted from the qga/qapi-schema.json of Debian's source tarballs (this
# machine's mirror serves none of 11.1's, so the newest is 10.2's).
QGA_SOURCES := 7.2=qemu_7.2+dfsg.orig.tar.xz 10.0=qemu_10.0.2+ds.orig.tar.xz 10.2=qemu_10.2.2+ds.orig.tar.xz
QGA_POOL := http://deb.debian.org/debian/pool/main/q/qemu
RECORD := -count=1 -run '^TestRecordSchema$$' -record-schema -v .

schema: deps qemu10 qemu11
	$(QEMU72_ENV) $(GO) test $(RECORD) | grep wrote
	$(QEMU10_ENV) $(GO) test $(RECORD) | grep wrote
	$(QEMU11_ENV) $(GO) test $(RECORD) | grep wrote
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	for s in $(QGA_SOURCES); do \
		curl -fsS -o "$$tmp/src.tar.xz" "$(QGA_POOL)/$${s#*=}"; \
		tar -xJf "$$tmp/src.tar.xz" -C "$$tmp" --wildcards '*/qga/qapi-schema.json'; \
		$(GO) test -count=1 -run '^TestRecordAgentSchema$$' -v . \
			-record-qga-schema="$$(echo "$$tmp"/*/qga/qapi-schema.json)" -qga-version=$${s%%=*} | grep wrote; \
		rm -rf "$$tmp"/*; \
	done

bench: deps
	$(QEMU72_ENV) $(GO) test -run '^$$' -bench . -benchmem -count=10 -timeout 60m . | tee bench.txt
	$(GO) run $(BENCHSTAT) bench.txt

clean:
	rm -rf $(GUEST_OUT) $(QEMU10) $(QEMU11)
