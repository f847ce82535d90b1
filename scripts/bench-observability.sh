#!/usr/bin/env bash
# Gateway throughput with hit attribution (+ traffic record) on and off, side by side:
# one `kvroute sim` (--speedup 1000: the engine costs ~nothing, so the gateway's own CPU
# shows) behind two routers, `hey` against each in turn, ROUNDS times, streaming and not.
#   scripts/bench-observability.sh [ROUNDS] [REQUESTS]     (needs `hey`: apt-get install hey)
#   NO_RECORD=1 scripts/bench-observability.sh …           (attribution alone against off)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}"; N="${2:-20000}"; C=32
BIN=target/release/kvroute
[ -x "$BIN" ] || cargo build --release
TMP=$(mktemp -d); trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
SIM=27101; ON=27102; OFF=27103
$BIN sim --port $SIM --model m --speedup 1000 >/dev/null 2>&1 &
RECORD=()
if [ -z "${NO_RECORD:-}" ]; then RECORD=(--record-trace "$TMP/trace.jsonl" --record-trace-salt-file "$TMP/salt"); fi
head -c 32 /dev/urandom > "$TMP/salt"
$BIN serve --listen 127.0.0.1:$ON --backend http://127.0.0.1:$SIM --no-zmq-bind \
    --admin-listen 127.0.0.1:27104 "${RECORD[@]}" >/dev/null 2>&1 &
$BIN serve --listen 127.0.0.1:$OFF --backend http://127.0.0.1:$SIM --no-zmq-bind \
    --admin-listen 127.0.0.1:27105 --no-hit-attribution >/dev/null 2>&1 &
for p in $SIM $ON $OFF; do until curl -sf localhost:$p/health >/dev/null; do sleep 0.1; done; done
sleep 1
PROMPT=$(python3 -c "print(' '.join(f'word{i}' for i in range(200)))")
echo "{\"model\":\"m\",\"prompt\":\"$PROMPT\",\"max_tokens\":16}" > "$TMP/plain.json"
echo "{\"model\":\"m\",\"prompt\":\"$PROMPT\",\"max_tokens\":16,\"stream\":true}" > "$TMP/stream.json"
# The same stream with the client asking for usage itself: sent to the router without
# attribution, the engine does the same work as for the router that asks on the client's
# behalf (the sim shares these cores, so its usage chunk would otherwise count as gateway cost).
echo "{\"model\":\"m\",\"prompt\":\"$PROMPT\",\"max_tokens\":16,\"stream\":true,\"stream_options\":{\"include_usage\":true}}" > "$TMP/stream-usage.json"
cp "$TMP/stream.json" "$TMP/stream-same-engine-work.json"
rate() { hey -n "$N" -c $C -m POST -T application/json -D "$2" "http://127.0.0.1:$1/v1/completions" \
    | awk '/Requests\/sec/{print $2}'; }
echo "| body | round | attribution${RECORD:+ + record} on (req/s) | off (req/s) | on/off |"
echo "|---|---|---|---|---|"
# Alternate which goes first (ABBA), so a drift in the machine's load favours neither.
for body in plain stream stream-same-engine-work; do
  ratios=()
  off_body="$TMP/$body.json"; [ "$body" = stream-same-engine-work ] && off_body="$TMP/stream-usage.json"
  for r in $(seq "$ROUNDS"); do
    if [ $((r % 2)) -eq 1 ]; then a=$(rate $ON "$TMP/$body.json"); b=$(rate $OFF "$off_body")
    else b=$(rate $OFF "$off_body"); a=$(rate $ON "$TMP/$body.json"); fi
    ratio=$(python3 -c "print(f'{$a/$b:.3f}')"); ratios+=("$ratio")
    printf '| %s | %s | %.0f | %.0f | %s |\n' "$body" "$r" "$a" "$b" "$ratio"
  done
  echo "| $body | median | | | $(printf '%s\n' "${ratios[@]}" | sort -n | awk '{v[NR]=$1} END{print v[int((NR+1)/2)]}') |"
done
if [ ${#RECORD[@]} -gt 0 ]; then echo "recorded: $(cat "$TMP"/trace.jsonl* | wc -l) lines"; fi
