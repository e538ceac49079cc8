# Portable builds of flip and the Debian 11 root the old-server tests deploy to.
#
#   make dist             dist/flip-VERSION-TARGET and the agent-only dist/flip-agent-VERSION-TARGET
#                         (what flip uploads to a server without flip): need only glibc (2.17 or
#                         newer), checked
#   make check-dist       re-run the checks on the existing dist binaries
#   make old-server-root  target/old-server/bullseye: a Debian 11 root without flip (debootstrap)
#
# `make dist` installs cargo-zigbuild and ziglang from PyPI into a virtualenv under target/ (once)
# and links against glibc 2.17 symbols with zig. OpenSSL is vendored (ssh2's vendored-openssl
# feature), so no libssl of any version is needed at run time. Needs python3 with venv, perl,
# make and a C compiler.

VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
ARCH := $(shell uname -m)
TARGET ?= $(ARCH)-unknown-linux-gnu
# Oldest glibc the binary may need (CentOS/RHEL 7 era; Debian 11 has 2.31).
GLIBC ?= 2.17
DIST := dist/flip-$(VERSION)-$(TARGET)
DIST_AGENT := dist/flip-agent-$(VERSION)-$(TARGET)
VENV := target/venv
CARGO_TARGET_DIR ?= target
# Shared libraries a portable binary may need: glibc's own.
GLIBC_LIBS := libc.so.6 libm.so.6 libpthread.so.0 libdl.so.2 librt.so.1 libutil.so.1 \
	ld-linux-x86-64.so.2 ld-linux-aarch64.so.1

OLD_ROOT := target/old-server/bullseye
# The Debian mirror apt is configured with (deb822 `URIs:` or a one-line `deb` entry).
DEBIAN_MIRROR ?= $(shell (grep -hs '^URIs:' /etc/apt/sources.list.d/*.sources; \
	grep -hs '^deb ' /etc/apt/sources.list | awk '{print "URIs: " $$2}') \
	| awk '{print $$2}' | grep -v -e security -e nodesource | head -n 1)

.PHONY: dist check-dist old-server-root print-debian-mirror clean-dist

# Fat LTO in one codegen unit (~7% smaller) and panic=abort (~5% smaller: no unwinding tables;
# a panic, a bug, ends the process instead of one thread, and the next session cleans up what it
# left). A slower build than `cargo build --release`. Both binaries in one cargo run (one build
# of the dependencies); flip uploads flip-agent, found beside it, on first contact with a server
# without flip: that is what first contact costs (gzip-compressed on a server without zstd).
dist: $(VENV)/.ok
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" FLIP_DIST_TARGET=$(TARGET) FLIP_DIST_GLIBC=$(GLIBC) \
		CARGO_PROFILE_RELEASE_LTO=fat CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_PANIC=abort \
		cargo zigbuild --release --locked -p flip --bin flip --bin flip-agent --target $(TARGET).$(GLIBC)
	mkdir -p dist
	cp $(CARGO_TARGET_DIR)/$(TARGET)/release/flip-agent $(DIST_AGENT).tmp
	cp $(CARGO_TARGET_DIR)/$(TARGET)/release/flip $(DIST).tmp
	mv -f $(DIST_AGENT).tmp $(DIST_AGENT)
	mv -f $(DIST).tmp $(DIST)
	$(MAKE) --no-print-directory check-dist

# Fails unless each binary needs glibc's libraries only, glibc symbols <= $(GLIBC) only, and
# runs (and says `flip VERSION`, as the upload check on a server wants).
check-dist:
	@for f in $(DIST) $(DIST_AGENT); do \
	test -x $$f || { echo "no $$f: run make dist" >&2; exit 1; }; \
	bad=$$(readelf -d $$f | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | \
		grep -vxF $(patsubst %,-e %,$(GLIBC_LIBS)) || true); \
	if [ -n "$$bad" ]; then echo "$$f needs shared libraries beyond glibc: $$bad" >&2; exit 1; fi; \
	newest=$$(objdump -T $$f | grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | \
		sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n 1); \
	if [ "$$(printf '%s\n%s\n' "$$newest" "$(GLIBC)" | sort -t. -k1,1n -k2,2n -k3,3n | tail -n 1)" != "$(GLIBC)" ]; then \
		echo "$$f needs GLIBC_$$newest, newer than $(GLIBC)" >&2; exit 1; fi; \
	echo "$$f: $$(stat -c %s $$f) bytes ($$(gzip -9 < $$f | wc -c) gzip -9), glibc symbols <= GLIBC_$$newest, needs only: $$(readelf -d $$f | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p' | tr '\n' ' ')"; \
	case "$(TARGET)" in $(ARCH)-*) v=$$($(CURDIR)/$$f --version); \
		[ "$$v" = "flip $(VERSION)" ] || { echo "$$f --version says '$$v', not 'flip $(VERSION)'" >&2; exit 1; } ;; esac; \
	done

$(VENV)/.ok:
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install --quiet cargo-zigbuild ziglang
	touch $@

# A minimal Debian 11 (glibc 2.31, no flip, no zstd/xz) for tests/old_server.rs. Built once
# (~1 minute, ~250 MB) into a temp dir and renamed, so a half-made root is never used.
old-server-root: $(OLD_ROOT)/.ok

$(OLD_ROOT)/.ok:
	@test -n "$(DEBIAN_MIRROR)" || { echo "no Debian mirror configured for apt (set DEBIAN_MIRROR)" >&2; exit 1; }
	rm -rf $(OLD_ROOT).tmp
	mkdir -p $(dir $(OLD_ROOT))
	debootstrap --variant=minbase bullseye $(OLD_ROOT).tmp $(DEBIAN_MIRROR) > $(OLD_ROOT).log 2>&1 || \
		{ tail -n 5 $(OLD_ROOT).log >&2; exit 1; }
	touch $(OLD_ROOT).tmp/.ok
	rm -rf $(OLD_ROOT)
	mv $(OLD_ROOT).tmp $(OLD_ROOT)

print-debian-mirror:
	@echo $(DEBIAN_MIRROR)

clean-dist:
	rm -rf dist
