#!/usr/bin/env bash
# GPU check of the UCX backend, for a machine with one NVIDIA GPU and no package registry.
#
#   bash perf/gpu_check.sh            # from the repository root; prints one JSON object last
#
# 1. installs what the image lacks from wheels carried in .whl/ (or $WHEELS), without
#    resolving dependencies (the image's torch, numpy, cuda-core, cuda-bindings, numba-cuda,
#    nvidia-ml-py and xxhash stay); fetch them on a machine with a registry with
#      pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
#        --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#        ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 libucx-cu13==1.21.0 rmm-cu13==26.10.0 \
#        librmm-cu13==26.10.0 rapids-logger==0.3.0 msgspec
#    (with the device tool: `echo /.whl/ >> .git/info/exclude` first, then run
#    `bash perf/gpu_check.sh` with carry [".whl"] and a timeout_s of 600; the H200 image's
#    python3 is 3.12 with torch, numba-cuda, cupy, xxhash and ml-dtypes already there);
# 2. says what UCX sees there: CUDA support, transports, fabrics;
# 3. runs the kernel tests on the GPU (codes bit-identical to the CPU path, the GPU
#    blocksum equal to its definition), then the conformance suite with CUDA tensors
#    (KVWIRE_TEST_DEVICE=cuda) over tcp and ucx;
# 4. moves one CUDA buffer between two processes on the one GPU (perf/gpu_ucx.py): raw ucxx,
#    kvwire's UCX connection with same-host transports, and with its default options; every
#    byte checked on the GPU; GB/s next to a device-to-device copy;
# 5. a kvwire Sender with torch CUDA layers sends over UCX into a Receiver's CUDA expect()
#    buffers (perf/gpu_kv.py): no host staging, frames checksummed on the GPU at both ends,
#    bytes compared on the GPU; GB/s next to a device-to-device copy; then, with default
#    options only, two variants for A/B: two CUDA tensors per layer (chunks land in a
#    device buffer and are copied out, instead of in place) and a send window of 0 (each
#    64 MiB send waits for its completion, as before c7e21ca);
# 6. runs the codec kernels on the GPU (perf/gpu_codec.py): bit-identical to the CPU path,
#    and their throughput next to a device-to-device copy.
# It takes about five minutes (each step has a timeout; together they add up to 590 s). $OUT
# gets three files (the device tool brings back 8 at most): the JSON (also the last line of
# stdout) as gpu_check.json, a plot of it as gpu_check.png where matplotlib imports, and
# every step's log in gpu_check_logs.tgz. Commit the JSON of a run at the
# final commit as perf/results/gpu_check.json.
# GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python bash perf/gpu_check.sh is a dry run without a
# GPU (host memory; the codec step then reports its error).
set -u
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp}"
LOGS=$(mktemp -d)  # every step's log; $OUT gets gpu_check.json, .png and these logs as one .tgz
MIB="${GPU_CHECK_MIB:-256}"
DEVICE="${GPU_CHECK_DEVICE:-cuda}"  # cpu: a dry run of the script on a machine without a GPU
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UCX_WARN_UNUSED_ENV_VARS=n PYTHONUNBUFFERED=1
quote() { "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))'; }
# A step's result: the last line of its log when that is JSON, else the log's tail as an error.
result() { local line; line=$(tail -1 "$1" 2>/dev/null); case "$line" in "{"*) echo "$line" ;; *) echo "{\"error\": $(tail -c 800 "$1" | quote)}" ;; esac; }

echo "== versions" >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true
"$PY" -m pip list 2>/dev/null | grep -iE '^(torch|numpy|cupy|numba|cuda-|ucxx|libucx|rmm|msgspec|xxhash|ml.dtypes) ' >&2

echo "== install from $WHEELS" >&2
install_rc=0
if [ -d "$WHEELS" ] && [ "$DEVICE" = cuda ]; then  # (a dry run installs nothing)
  timeout 60 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir "$WHEELS"/*.whl >&2 || install_rc=$?
fi

echo "== what UCX sees" >&2
timeout 30 "$PY" - > "$LOGS/gpu_ucx_context.txt" 2>&1 <<'EOF'
import json
from kvwire.transport.ucx import UcxOptions, _Hub, context_transports
hub = _Hub.get(UcxOptions())
transports = sorted(context_transports(hub.context.info))
print(json.dumps({"takes_cuda_memory": hub.cuda, "transports": transports, "fabrics": hub.fabrics}))
EOF
context_json=$(result "$LOGS/gpu_ucx_context.txt")
echo "$context_json" >&2

SIM=0; [ "$DEVICE" = cuda ] || SIM=1  # a dry run checks the kernels on numba's simulator
echo "== kernel tests on the GPU" >&2
timeout 75 env KVWIRE_TEST_DEVICE="$DEVICE" NUMBA_ENABLE_CUDASIM=$SIM "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_kernels.py -k "not ptx" > "$LOGS/gpu_kernel_tests.txt" 2>&1
kernels_rc=$?
tail -3 "$LOGS/gpu_kernel_tests.txt" >&2

echo "== conformance with CUDA tensors" >&2
timeout 90 env KVWIRE_TEST_DEVICE="$DEVICE" NUMBA_ENABLE_CUDASIM=0 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_conformance.py > "$LOGS/gpu_conformance.txt" 2>&1
conformance_rc=$?
tail -5 "$LOGS/gpu_conformance.txt" >&2

echo "== one CUDA buffer between two processes: raw ucxx, kvwire's UCX connection" >&2
timeout 75 "$PY" -m perf.gpu_ucx --json --device "$DEVICE" --mib "$MIB" > "$LOGS/gpu_ucx.txt" 2>&1
ucx_json=$(result "$LOGS/gpu_ucx.txt")
echo "$ucx_json" >&2

echo "== kvwire Sender/Receiver: CUDA tensors over UCX into CUDA buffers, checksummed on the GPU" >&2
timeout 90 "$PY" -m perf.gpu_kv --json --device "$DEVICE" > "$LOGS/gpu_kv.txt" 2>&1
kv_json=$(result "$LOGS/gpu_kv.txt")
echo "$kv_json" >&2
timeout 45 "$PY" -m perf.gpu_kv --json --device "$DEVICE" --settings default --repeats 3 --tensors-per-layer 2 \
  > "$LOGS/gpu_kv_two_tensors.txt" 2>&1
kv_two_json=$(result "$LOGS/gpu_kv_two_tensors.txt")
timeout 45 "$PY" -m perf.gpu_kv --json --device "$DEVICE" --settings default --repeats 3 --send-window-mib 0 \
  > "$LOGS/gpu_kv_window0.txt" 2>&1
kv_window0_json=$(result "$LOGS/gpu_kv_window0.txt")
echo "two tensors per layer: $kv_two_json" >&2
echo "send window 0: $kv_window0_json" >&2

echo "== codec kernels (fused gather+quantize, dequantize+scatter) vs device-to-device copy" >&2
timeout 60 env NUMBA_ENABLE_CUDASIM=$SIM "$PY" -m perf.gpu_codec --json --device "$DEVICE" > "$LOGS/gpu_codec.txt" 2>&1
codec_json=$(result "$LOGS/gpu_codec.txt")

conformance_tail=$(tail -3 "$LOGS/gpu_conformance.txt" | quote)
kernels_tail=$(tail -3 "$LOGS/gpu_kernel_tests.txt" | quote)
cat > "$OUT/gpu_check.json" <<EOF
{"gpu_check": "kvwire ucx", "device": "$DEVICE", "commit": "$(git rev-parse --short HEAD 2>/dev/null)", "install_rc": $install_rc, "ucx_context": $context_json, "kernel_tests_rc": $kernels_rc, "kernel_tests_tail": $kernels_tail, "conformance_rc": $conformance_rc, "conformance_tail": $conformance_tail, "transfer": $ucx_json, "kvwire_device_path": $kv_json, "kvwire_device_path_two_tensors_per_layer": $kv_two_json, "kvwire_device_path_send_window_0": $kv_window0_json, "codec_kernels": $codec_json}
EOF
timeout 20 "$PY" -c 'import json, sys; from perf import plots; plots.plot_gpu_check(json.load(open(sys.argv[1])), sys.argv[2])' \
  "$OUT/gpu_check.json" "$OUT/gpu_check.png" >&2 || echo "(no plot: matplotlib missing or the result did not fit)" >&2
tar czf "$OUT/gpu_check_logs.tgz" -C "$LOGS" . 2>/dev/null
cat "$OUT/gpu_check.json"
