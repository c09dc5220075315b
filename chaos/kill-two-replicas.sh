#!/usr/bin/env bash
# Resilience test 2: kill two of the three registry replicas under load, one after the other.
# Expected: the last replica serves everything; no request fails.
source "$(dirname "$0")/lib.sh"
start_load --expect-no-failed-reads --expect-no-failed-writes
sleep $(( LOAD_SECONDS / 4 ))
kill_registry 0
sleep $(( LOAD_SECONDS / 4 ))
kill_registry 1
rc=0; finish_load || rc=$?
restart_dead
exit "$rc"
