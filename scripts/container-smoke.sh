#!/usr/bin/env bash
# Container smoke test: build the image with podman, run it, and check that it serves.
#
#   scripts/container-smoke.sh                 # needs podman (and root for the local base image)
#
# 1. Builds the python:3.11-slim base locally when it is missing (shared/tools/local-base-image.sh;
#    LOCAL_BASE_IMAGE=path/to/local-base-image.sh to use another copy), then the image, with that
#    tool's --flags (runc, ulimits, the local torch wheel folder).
# 2. Checks that the image runs as a non-root user.
# 3. Starts a container with a profile volume holding one test profile, waits for /readyz and prints
#    the start-to-ready time (from the container's start; must be at most READY_LIMIT_S, default 20 s).
# 4. Runs the image's HEALTHCHECK, sends a steered chat completion and a streamed one.
# 5. Sends SIGTERM while a stream is running and checks that the stream still completes and the
#    container exits cleanly.
# Prints the build time and start-to-ready time; removes its container and volume folder on exit
# (the image stays, for reuse; SMOKE_REMOVE_IMAGE=1 removes it too). SMOKE_NO_CACHE=1 builds every
# layer again (a cold build); READY_LIMIT_S, SMOKE_PORT and SMOKE_IMAGE change the obvious.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${SMOKE_IMAGE:-localhost/rahf:smoke}
NAME=rahf-smoke-$$
PORT=${SMOKE_PORT:-$((18000 + RANDOM % 1000))}
READY_LIMIT_S=${READY_LIMIT_S:-20}
BASE_TOOL=${LOCAL_BASE_IMAGE:-../shared/tools/local-base-image.sh}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/rahf-smoke.XXXXXX")
URL=http://127.0.0.1:$PORT

say() { printf '[smoke] %s\n' "$*"; }
fail() { printf '[smoke] FAIL: %s\n' "$*" >&2; if podman container exists "$NAME" 2>/dev/null; then podman logs --tail 40 "$NAME" >&2 || true; fi; exit 1; }
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
cleanup() {
  podman rm -f -t 0 "$NAME" >/dev/null 2>&1 || true
  rm -rf "$WORK"
  if [ "${SMOKE_REMOVE_IMAGE:-0}" = 1 ]; then podman rmi -f "$IMAGE" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

command -v podman >/dev/null || fail "podman is not installed (apt-get install podman runc)"
[ -f "$BASE_TOOL" ] || fail "no $BASE_TOOL; set LOCAL_BASE_IMAGE to the local-base-image.sh script"

# -- 1. build ----------------------------------------------------------------------------------------
bash "$BASE_TOOL"
say "building $IMAGE"
t0=$(now)
# shellcheck disable=SC2046  # the tool prints several flags on purpose
podman build --format docker $(bash "$BASE_TOOL" --flags) $([ "${SMOKE_NO_CACHE:-0}" = 1 ] && echo --no-cache) -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1 \
  || { tail -40 "$WORK/build.log" >&2; fail "image build failed"; }
BUILD_S=$(elapsed "$t0" "$(now)")
say "build time: ${BUILD_S}s"
read -r -a RUN_FLAGS <<<"$(bash "$BASE_TOOL" --run-flags)"

# -- 2. non-root ----------------------------------------------------------------------------------------
uid=$(podman run --rm "${RUN_FLAGS[@]}" --no-healthcheck --entrypoint id "$IMAGE" -u)
[ "$uid" != 0 ] || fail "the image runs as root"
say "runs as uid $uid ($(podman image inspect --format '{{.Config.User}}' "$IMAGE"))"
# A serving image: the `train` extra is left out, and the training commands say how to add it.
podman run --rm "${RUN_FLAGS[@]}" --no-healthcheck --entrypoint python "$IMAGE" -c '
import importlib.util as u
present = [m for m in ("peft", "matplotlib") if u.find_spec(m) is not None]
assert not present, f"training-only packages in the serving image: {present}"
' || fail "the image carries training-only packages"
train_err=$(podman run --rm "${RUN_FLAGS[@]}" --no-healthcheck --entrypoint rahf "$IMAGE" \
  train --data /tmp/none.jsonl --name x 2>&1 >/dev/null) && fail "rahf train succeeded in the serving image"
grep -q "pip install 'rahf-steering\[train\]'" <<<"$train_err" || fail "rahf train in the image: $train_err"
say "no training-only packages; rahf train asks for the extra"
say "image size: $(podman image inspect --format '{{.Size}}' "$IMAGE") bytes"

# -- 3. start, wait for ready ---------------------------------------------------------------------------
# A profile volume with one test profile (a fixed random direction on a few middle layers), made with
# the image's own library so that it matches the embedded model's shape.
mkdir -p "$WORK/profiles"
chmod 0777 "$WORK/profiles"
podman run --rm "${RUN_FLAGS[@]}" --no-healthcheck -v "$WORK/profiles:/out" --entrypoint python "$IMAGE" -c '
import json, torch
from steering_vectors import Profile
from steering_vectors.core.models import ensure_embedded_cache
config = json.loads((ensure_embedded_cache()[0] / "config.json").read_text())
gen = torch.Generator().manual_seed(0)
hidden, layers = config["hidden_size"], config["num_hidden_layers"]
offsets = {i: torch.randn(hidden, generator=gen) * 3.0 for i in range(layers // 3, layers // 3 + 4)}
Profile(name="smoke", offsets=offsets, description="container smoke test").save("/out/smoke.safetensors")
'
chmod -R a+rX "$WORK/profiles"

say "starting $NAME on $URL"
t0=$(now)
# (Without systemd, podman reports that it cannot schedule the periodic health check; step 4 runs it.)
podman run -d --name "$NAME" "${RUN_FLAGS[@]}" -p "127.0.0.1:$PORT:8000" \
  -v "$WORK/profiles:/srv/rahf/profiles:ro" -e RAHF_SHUTDOWN_TIMEOUT_S=60 "$IMAGE" >/dev/null 2>"$WORK/run.err" \
  || { cat "$WORK/run.err" >&2; fail "podman run failed"; }
ready=""
for _ in $(seq 1 600); do
  if curl -fsS -o "$WORK/readyz.json" "$URL/readyz" 2>/dev/null; then ready=1; break; fi
  podman container exists "$NAME" && [ "$(podman inspect -f '{{.State.Running}}' "$NAME")" = true ] \
    || fail "the container stopped before it was ready"
  sleep 0.2
done
[ -n "$ready" ] || fail "not ready after 120 s"
t_ready=$(now)
READY_S=$(elapsed "$t0" "$t_ready")
# The same measured from the moment the container's process started (podman's own set-up excluded).
started=$(podman inspect -f '{{.State.StartedAt.Unix}}.{{printf "%09d" .State.StartedAt.Nanosecond}}' "$NAME" 2>/dev/null || echo "$t0")
INSIDE_S=$(elapsed "$started" "$t_ready")
say "start to ready: ${READY_S}s from podman run, ${INSIDE_S}s from the container's start  ($(cat "$WORK/readyz.json"))"
python3 -c "import sys; sys.exit(float(sys.argv[1]) > float(sys.argv[2]))" "$INSIDE_S" "$READY_LIMIT_S" \
  || fail "start to ready took ${INSIDE_S}s in the container, more than ${READY_LIMIT_S}s"
grep -q '"smoke"' "$WORK/readyz.json" || fail "the test profile was not loaded from the volume"

# -- 4. health check, a steered completion, a streamed one ----------------------------------------------
podman healthcheck run "$NAME" || fail "the image's HEALTHCHECK failed"
say "HEALTHCHECK passes"
curl -fsS --max-time 30 "$URL/v1/profiles" | grep -q '"id":"smoke"' || fail "GET /v1/profiles does not list the profile"

chat() {  # chat BODY OUTFILE [curl options...]
  local body=$1 out=$2
  shift 2
  curl -sS --max-time 120 -o "$out" -D "$out.headers" -w '%{http_code}' "$@" \
    -H 'Content-Type: application/json' -H 'X-Request-ID: smoke-1234' -d "$body" "$URL/v1/chat/completions"
}
MODEL=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["model"])' "$WORK/readyz.json")
ASK='"messages": [{"role": "user", "content": "Describe the sea in one sentence."}], "temperature": 0'

code=$(chat "{\"model\": \"$MODEL\", $ASK, \"max_tokens\": 24}" "$WORK/plain.json")
[ "$code" = 200 ] || fail "plain chat completion: HTTP $code $(cat "$WORK/plain.json")"
code=$(chat "{\"model\": \"$MODEL\", $ASK, \"max_tokens\": 24, \"steering\": {\"profile\": \"smoke\", \"strength\": 1.5}}" \
  "$WORK/steered.json")
[ "$code" = 200 ] || fail "steered chat completion: HTTP $code $(cat "$WORK/steered.json")"
grep -qi '^x-request-id: smoke-1234' "$WORK/steered.json.headers" || fail "X-Request-ID was not echoed"
python3 - "$WORK/plain.json" "$WORK/steered.json" "$WORK/steered.json.headers" <<'EOF' || fail "steered completion"
import json, sys
plain, steered = (json.load(open(p)) for p in sys.argv[1:3])
headers = open(sys.argv[3]).read().lower()
a, b = plain["choices"][0]["message"]["content"], steered["choices"][0]["message"]["content"]
print(f"[smoke] plain:   {a!r}\n[smoke] steered: {b!r}")
assert "smoke" in json.dumps(steered.get("steering")) or "x-steering: " in headers and "smoke" in headers, \
    "the response does not say that the profile was applied"
assert a != b, "steering did not change the greedy output"
EOF
say "steered chat completion OK"

code=$(chat "{\"model\": \"$MODEL\", $ASK, \"max_tokens\": 24, \"stream\": true, \"steering\": {\"profile\": \"smoke\"}}" \
  "$WORK/stream.txt" -N)
[ "$code" = 200 ] || fail "streamed chat completion: HTTP $code"
python3 - "$WORK/stream.txt" <<'EOF' || fail "streamed chat completion"
import json, sys
events = [line[6:] for line in open(sys.argv[1]).read().splitlines() if line.startswith("data: ")]
assert events and events[-1] == "[DONE]", f"no [DONE] at the end: {events[-3:]}"
chunks = [json.loads(e) for e in events[:-1]]
text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
assert len(chunks) >= 3 and text, f"{len(chunks)} chunks, text {text!r}"
print(f"[smoke] streamed {len(chunks)} chunks: {text!r}")
EOF
say "streamed chat completion OK"

# -- 5. SIGTERM while a stream is running ---------------------------------------------------------------
# A long stream, then SIGTERM once its first tokens have arrived: the server must stop taking new
# connections but finish this stream (finish_reason "length", then [DONE]) and exit with status 0.
: >"$WORK/drain.txt"
chat "{\"model\": \"$MODEL\", $ASK, \"max_tokens\": 160, \"stream\": true}" "$WORK/drain.txt" -N \
  >"$WORK/drain.code" 2>"$WORK/drain.err" &
curl_pid=$!
for _ in $(seq 1 300); do
  [ "$(grep -c '"content"' "$WORK/drain.txt" 2>/dev/null || true)" -ge 3 ] && break
  sleep 0.1
done
[ "$(grep -c '"content"' "$WORK/drain.txt" || true)" -ge 3 ] || fail "the long stream did not start"
t0=$(now)
podman kill --signal TERM "$NAME" >/dev/null
say "sent SIGTERM during a stream"
sleep 0.5
if curl -fsS --max-time 2 -o /dev/null "$URL/healthz" 2>/dev/null; then
  say "note: the server still accepts new connections while draining"
fi
wait "$curl_pid" || true
python3 - "$WORK/drain.txt" <<'EOF' || fail "the stream in flight did not complete after SIGTERM"
import json, sys
events = [line[6:] for line in open(sys.argv[1]).read().splitlines() if line.startswith("data: ")]
assert events and events[-1] == "[DONE]", f"no [DONE]: the stream was cut ({len(events)} events)"
chunks = [json.loads(e) for e in events[:-1]]
assert not any("error" in c for c in chunks), [c for c in chunks if "error" in c]
reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
assert reasons[-1] in ("length", "stop"), reasons[-3:]
print(f"[smoke] the stream finished after SIGTERM: {len(chunks)} chunks, finish_reason {reasons[-1]}")
EOF
status=$(podman wait "$NAME")
STOP_S=$(elapsed "$t0" "$(now)")
# 0, or 143 (128 + SIGTERM) where the server re-raises the signal it stopped for.
[ "$status" = 0 ] || [ "$status" = 143 ] || fail "the container exited with status $status after SIGTERM"
say "container stopped cleanly ${STOP_S}s after SIGTERM"

echo
say "PASS  build ${BUILD_S}s  start-to-ready ${INSIDE_S}s (${READY_S}s from podman run)  stop after SIGTERM ${STOP_S}s  (image $IMAGE)"
