#!/usr/bin/env bash
# bench/bench_gpu.py as a lent GPU machine runs it, in one call (the device tool runs commands in a
# copy of the working tree, without datasets or evaluate installed, and brings back what is in $OUT):
#
#   mkdir -p .baseline && git archive BASE | tar -x -C .baseline   # optional: the code to compare with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
#       datasets evaluate dill multiprocess fsspec pyspng   # once, where the registry is reachable:
#       # wheels for the device's Python (3.12 on the machines lent so far; it has no internet)
#   (device, carrying .whl and .baseline)  bash bench/run_on_device.sh [bench_gpu.py options]
#
# Installs the wheels in .whl/ into /tmp/site, runs bench_gpu.py (with --baseline .baseline when that
# folder exists) under a time limit ($LIMIT seconds, default 400), and writes gpu.json, stdout.txt
# and log.txt to $OUT (default bench/device-run/). Prints each measurement's line. Then, with
# $STREAM_LIMIT seconds (default 150; 0 skips it), bench_streaming.py: the datasets route (streamed
# webdataset and parquet) against the folder route on the GPU, into $OUT/streaming.json. Exits as
# bench_gpu.py (124: the time limit; the JSON keeps what was measured by then).
# Sizing (run 5, an H200): with --head-steps 600 --raw-seconds 4 --models <one model> and a baseline,
# everything before full-mode training took 430 s and the default LIMIT cut it there: to measure that
# too, raise LIMIT (the call itself may run 600 s, streaming included) or leave recipes out
# (--recipes 1:fp32 saves about 60 s).
set -u
out=${OUT:-bench/device-run}
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: the wheels in .whl/ do not install here" >&2; exit 1; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1
baseline=()
[ -d .baseline ] && baseline=(--baseline .baseline)
timeout "${LIMIT:-400}" python3 bench/bench_gpu.py --out "$out/gpu.json" "${baseline[@]}" "$@" \
  > "$out/stdout.txt" 2> "$out/log.txt"
status=$?
grep -E "^[a-z_0-9]+: [0-9.]+s" "$out/log.txt"
[ "$status" = 0 ] || tail -20 "$out/log.txt"
if [ "${STREAM_LIMIT:-150}" != 0 ]; then
  timeout "${STREAM_LIMIT:-150}" python3 bench/bench_streaming.py --images 384 --shards 16 --repeat 1 \
    --out "$out/streaming.json" > "$out/streaming.txt" 2>&1
  tail -6 "$out/streaming.txt"
fi
exit "$status"
