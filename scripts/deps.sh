#!/usr/bin/env bash
# Installs what rollcall's cluster and tests run on: redis-server, redis-sentinel, nginx and
# prometheus from Debian's packages (with sudo when not root), and checks for a Rust toolchain.
# Sourced by scripts/dev, scripts/test and .ci/run.
set -euo pipefail

rollcall_need() {
  local missing=()
  command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
  command -v redis-sentinel >/dev/null 2>&1 || missing+=(redis-sentinel)
  command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
  command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  if [ "${#missing[@]}" -gt 0 ]; then
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "installing ${missing[*]} (apt-get)" >&2
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # Debian's packages start system-wide daemons where systemd runs; rollcall starts its own
  # on other ports and never needs those.
  if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust 1.88 or newer (https://rustup.rs), then run this again" >&2
    exit 1
  fi
}

rollcall_need
