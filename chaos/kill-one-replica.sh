#!/usr/bin/env bash
# Resilience test 1: kill one registry replica under load. Expected: no request fails
# (nginx retries on the next replica), nothing acknowledged is lost.
source "$(dirname "$0")/lib.sh"
start_load --expect-no-failed-reads --expect-no-failed-writes
sleep $(( LOAD_SECONDS / 4 ))
kill_registry 0
rc=0; finish_load || rc=$?
restart_dead
exit "$rc"
