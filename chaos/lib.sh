#!/usr/bin/env bash
# Helpers shared by the chaos scripts. They break a running rollcall cluster while
# `rollcall load` drives lookups and registrations through the load balancer, then print what
# failed and a verdict.
#
# Target: the cluster of `rollcall dev` (default; read from its state file) or docker compose
# (CHAOS_TARGET=compose, run from the repository root).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHAOS_TARGET=${CHAOS_TARGET:-dev}
LOAD_SECONDS=${LOAD_SECONDS:-20}
STATE_DIR=${ROLLCALL_DEV_DATA_DIR:-/tmp/rollcall-dev}

if [ -n "${ROLLCALL:-}" ]; then :
elif [ -x "$ROOT/target/release/rollcall" ]; then ROLLCALL="$ROOT/target/release/rollcall"
elif [ -x "$ROOT/target/debug/rollcall" ]; then ROLLCALL="$ROOT/target/debug/rollcall"
else ROLLCALL=rollcall
fi

case "$CHAOS_TARGET" in
  dev)
    if [ ! -f "$STATE_DIR/state.env" ]; then
      echo "no running cluster: $STATE_DIR/state.env is missing; start one with ./scripts/dev" >&2
      exit 2
    fi
    # shellcheck disable=SC1091
    source "$STATE_DIR/state.env"
    LB=$ROLLCALL_LB_URL
    ;;
  compose)
    LB=${ROLLCALL_LB_URL:-http://127.0.0.1:8888}
    ROLLCALL_GATEWAY_URL=${ROLLCALL_GATEWAY_URL:-http://127.0.0.1:8000}
    COMPOSE=(docker compose -f "$ROOT/docker-compose.yml")
    REGISTRY_COUNT=3
    REDIS_COUNT=3
    ;;
  *) echo "CHAOS_TARGET must be dev or compose" >&2; exit 2 ;;
esac

say() { printf '\n== %s\n' "$*"; }

# kill_node KIND I: SIGKILL node I (0-based) of KIND, REGISTRY or REDIS: by the pid in the
# state file (dev), or the compose service registry<I+1> / redis<I+1>.
kill_node() {
  local kind=$1 i=$2 lower
  lower=$(printf '%s' "$kind" | tr '[:upper:]' '[:lower:]')
  say "killing $lower node $i"
  if [ "$CHAOS_TARGET" = dev ]; then
    local pid="${kind}_${i}_PID"
    kill -9 "${!pid}"
  else
    "${COMPOSE[@]}" kill "$lower$(( i + 1 ))"
  fi
}

kill_registry() { kill_node REGISTRY "$1"; }
kill_redis() { kill_node REDIS "$1"; }

# master_index: which Redis node (0-based) the Sentinels name as master now.
master_index() {
  if [ "$CHAOS_TARGET" = dev ]; then
    local port i p
    port=$(redis-cli -p "$SENTINEL_0_PORT" SENTINEL get-master-addr-by-name "$SENTINEL_MASTER" | tail -n 1)
    for (( i = 0; i < REDIS_COUNT; i++ )); do
      p="REDIS_${i}_PORT"
      if [ "${!p}" = "$port" ]; then echo "$i"; return; fi
    done
    echo "no Redis node listens on the master port $port" >&2; return 1
  else
    local i
    for (( i = 1; i <= REDIS_COUNT; i++ )); do
      if "${COMPOSE[@]}" exec -T "redis$i" redis-cli role 2>/dev/null | head -n 1 | grep -q master; then
        echo $(( i - 1 )); return
      fi
    done
    echo "no Redis container says it is master" >&2; return 1
  fi
}

# restart_dead: bring every killed process back and wait until the LB answers again.
restart_dead() {
  say "restarting what was killed"
  if [ "$CHAOS_TARGET" = dev ]; then
    kill -USR1 "$ROLLCALL_DEV_PID"
  else
    "${COMPOSE[@]}" up -d
  fi
  local deadline=$(( SECONDS + 30 ))
  until curl -fsS -o /dev/null "$LB/health"; do
    if (( SECONDS > deadline )); then echo "the cluster did not come back within 30 s" >&2; return 1; fi
    sleep 0.5
  done
  if [ "$CHAOS_TARGET" = dev ]; then
    # rollcall dev rewrites the state file once everything runs again.
    until all_alive; do
      if (( SECONDS > deadline )); then echo "not every process came back within 30 s" >&2; return 1; fi
      sleep 0.5
    done
  fi
  echo "back: $LB/health answers"
}

# all_alive: (dev) every process in the state file is running.
all_alive() {
  # shellcheck disable=SC1091
  source "$STATE_DIR/state.env"
  local i v
  for (( i = 0; i < REGISTRY_COUNT; i++ )); do v="REGISTRY_${i}_PID"; kill -0 "${!v}" 2>/dev/null || return 1; done
  for (( i = 0; i < REDIS_COUNT; i++ )); do v="REDIS_${i}_PID"; kill -0 "${!v}" 2>/dev/null || return 1; done
  for (( i = 0; i < SENTINEL_COUNT; i++ )); do v="SENTINEL_${i}_PID"; kill -0 "${!v}" 2>/dev/null || return 1; done
}

# start_load ARGS...: run `rollcall load` in the background for LOAD_SECONDS. With a gateway
# in the cluster, requests also go through it, and none of those may fail.
start_load() {
  LOAD_OUT=$(mktemp)
  local gw=()
  if [ -n "${ROLLCALL_GATEWAY_URL:-}" ]; then
    gw=(--gateway "$ROLLCALL_GATEWAY_URL" --expect-no-failed-gateway)
  fi
  say "driving load for ${LOAD_SECONDS}s through $LB${ROLLCALL_GATEWAY_URL:+ and the gateway at $ROLLCALL_GATEWAY_URL}"
  "$ROLLCALL" load --url "$LB" --duration "${LOAD_SECONDS}s" "${gw[@]}" "$@" >"$LOAD_OUT" 2>&1 &
  LOAD_PID=$!
}

# finish_load: wait for the load, print its report, answer its verdict as exit status.
finish_load() {
  local rc=0
  wait "$LOAD_PID" || rc=$?
  say "report"
  cat "$LOAD_OUT"
  rm -f "$LOAD_OUT"
  return "$rc"
}
