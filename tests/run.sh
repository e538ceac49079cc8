#!/usr/bin/env bash
# Runs every test of flip: unit tests of each crate and the integration tests of the real binary
# (local deploys, SSH deploys against a private OpenSSH server the tests start themselves, and
# deploys to a Debian 11 root without flip, where the portable build uploads its agent).
# Installs what the tests need when it is missing (Debian/Ubuntu, as root or with sudo), builds
# the portable binary (`make dist`) and the Debian 11 root (`make old-server-root`, kept under
# target/ between runs). Where the Debian mirror cannot be reached, the old-server tests print
# SKIP lines naming the reason.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
# Building: OpenSSL is vendored (compiled from source), which needs perl, make and a C compiler.
command -v perl >/dev/null || need+=(perl)
command -v make >/dev/null || need+=(make)
command -v cc >/dev/null || need+=(gcc)
# make dist: a virtualenv for cargo-zigbuild and ziglang, readelf/objdump for its checks.
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)
command -v readelf >/dev/null || need+=(binutils)
# The old-server tests: debootstrap for the Debian 11 root; zstd for the upload codec test.
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v zstd >/dev/null || need+=(zstd)
# The launcher runs under whatever login shell the server has: its test runs it under these.
command -v tcsh >/dev/null || need+=(tcsh)
command -v csh >/dev/null || need+=(csh)
command -v fish >/dev/null || need+=(fish)
if [ ${#need[@]} -gt 0 ]; then
  echo "tests/run.sh: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The portable build the old-server tests upload.
make dist

# The Debian 11 root (kept under target/ between runs).
if [ -f target/old-server/bullseye/.ok ]; then
  :
elif [ "$(id -u)" -ne 0 ]; then
  export FLIP_TEST_OLD_SERVER_SKIP="not root: debootstrap and chroot need root"
else
  mirror=$(make -s --no-print-directory print-debian-mirror)
  if [ -z "$mirror" ]; then
    export FLIP_TEST_OLD_SERVER_SKIP="no Debian mirror configured for apt"
  elif ! wget -q -T 20 -t 2 -O /dev/null "$mirror/dists/bullseye/Release"; then
    export FLIP_TEST_OLD_SERVER_SKIP="cannot fetch $mirror/dists/bullseye/Release (the Debian mirror cannot be reached, or has no bullseye)"
  else
    make old-server-root
  fi
fi
if [ -n "${FLIP_TEST_OLD_SERVER_SKIP:-}" ]; then
  echo "tests/run.sh: SKIP old-server tests (Debian 11 root): $FLIP_TEST_OLD_SERVER_SKIP" >&2
fi

cargo test --workspace --all-targets --locked "$@"
