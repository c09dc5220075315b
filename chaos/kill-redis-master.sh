#!/usr/bin/env bash
# Resilience test 4: kill the Redis master under load. Expected: Sentinel promotes a replica
# within seconds, no lookup fails (reads are answered from the fallback cache meanwhile,
# flagged stale), registrations are refused with 503 for at most 5 s, nothing acknowledged is
# lost.
source "$(dirname "$0")/lib.sh"
start_load --expect-no-failed-reads --max-write-outage 5s
sleep $(( LOAD_SECONDS / 4 ))
old=$(master_index)
kill_redis "$old"
rc=0; finish_load || rc=$?
say "Sentinel now names node $(master_index) as master (was $old)"
restart_dead
exit "$rc"
