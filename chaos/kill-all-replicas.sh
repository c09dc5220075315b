#!/usr/bin/env bash
# Resilience test 3: kill every registry replica under load. The registry itself is then
# unreachable (nginx answers 502), but callers going through `rollcall gateway` keep being
# served: it answers from its cache, then its stale window (60 s). Expected: no request
# through the gateway fails, and once the replicas are restarted a second load sees no
# failure at all.
source "$(dirname "$0")/lib.sh"
start_load
sleep $(( LOAD_SECONDS / 4 ))
for (( i = 0; i < REGISTRY_COUNT; i++ )); do kill_registry "$i"; done
rc=0; finish_load || rc=$?
restart_dead
say "after the restart"
LOAD_SECONDS=$(( LOAD_SECONDS / 2 > 5 ? LOAD_SECONDS / 2 : 5 ))
start_load --expect-no-failed-reads --expect-no-failed-writes
finish_load || rc=$?
exit "$rc"
