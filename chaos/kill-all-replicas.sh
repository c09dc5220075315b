#!/usr/bin/env bash
# Resilience test 3: kill every registry replica under load. The registry itself is then
# unreachable (nginx answers 502): this shows how long, and that the cluster comes back.
# Callers going through `rollcall gateway` keep being served from its cache meanwhile.
# Verdict: PASS when a second load after the restart sees no failure at all.
source "$(dirname "$0")/lib.sh"
start_load
sleep $(( LOAD_SECONDS / 4 ))
for (( i = 0; i < REGISTRY_COUNT; i++ )); do kill_registry "$i"; done
finish_load || true
restart_dead
say "after the restart"
LOAD_SECONDS=$(( LOAD_SECONDS / 2 > 5 ? LOAD_SECONDS / 2 : 5 ))
start_load --expect-no-failed-reads --expect-no-failed-writes
finish_load
