#!/usr/bin/env bash
# Resilience test 5: a service stops heartbeating. Expected: it leaves the registry once its
# TTL has run out (TTL_S, default 5 s), and its next heartbeat is answered 404.
source "$(dirname "$0")/lib.sh"
TTL_S=${TTL_S:-5}
name="chaos-ttl-$$"
say "registering $name with ttl_s=$TTL_S and heartbeating 3 times"
curl -fsS -o /dev/null -X POST "$LB/register" -H 'Content-Type: application/json' \
  -d "{\"service_name\": \"$name\", \"endpoint\": \"http://$name.invalid:80\", \"ttl_s\": $TTL_S}"
for _ in 1 2 3; do
  sleep 1
  curl -fsS -o /dev/null -X POST "$LB/heartbeat" -H 'Content-Type: application/json' -d "{\"service_name\": \"$name\"}"
done
say "heartbeats stopped; waiting for the entry to expire"
start=$(date +%s.%N)
deadline=$(( SECONDS + TTL_S + 10 ))
while [ "$(curl -s -o /dev/null -w '%{http_code}' "$LB/services/$name")" = 200 ]; do
  if (( SECONDS > deadline )); then echo "verdict: FAIL (still listed after $(( TTL_S + 10 )) s)"; exit 1; fi
  sleep 0.2
done
gone=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
hb=$(curl -s -o /dev/null -w '%{http_code}' -X POST "$LB/heartbeat" -H 'Content-Type: application/json' -d "{\"service_name\": \"$name\"}")
echo "gone ${gone} s after the last heartbeat (ttl ${TTL_S} s); its next heartbeat answered $hb"
if [ "$hb" = 404 ]; then echo "verdict: PASS"; else echo "verdict: FAIL (heartbeat answered $hb, expected 404)"; exit 1; fi
