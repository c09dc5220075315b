#!/usr/bin/env bash
# Runs every chaos scenario in turn against the running cluster and sums up the verdicts.
set -uo pipefail
dir=$(dirname "$0")
failed=0
for s in kill-one-replica kill-two-replicas kill-all-replicas kill-redis-master ttl-expiry; do
  echo "######## $s"
  if "$dir/$s.sh"; then echo "######## $s: PASS"; else echo "######## $s: FAIL"; failed=$(( failed + 1 )); fi
done
echo "chaos: $(( 5 - failed )) passed, $failed failed"
exit "$failed"
