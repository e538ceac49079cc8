#!/usr/bin/env bash
# Runs every test of flip: unit tests of each crate and the integration tests of the real binary
# (local deploys, and SSH deploys against a private OpenSSH server the tests start themselves).
# Installs what the tests need when it is missing (Debian/Ubuntu, as root or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v ssh >/dev/null || need+=(openssh-client)
command -v ssh-keygen >/dev/null || need+=(openssh-client)
command -v rsync >/dev/null || need+=(rsync)
command -v pkg-config >/dev/null || need+=(pkg-config)
# libssh2 (bundled by the ssh2 crate) links the system OpenSSL.
pkg-config --exists openssl 2>/dev/null || need+=(libssl-dev)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "tests/run.sh: installing ${need[*]}" >&2
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo test --workspace --all-targets --locked "$@"
