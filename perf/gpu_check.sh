#!/usr/bin/env bash
# GPU check of the UCX backend, for a machine with one NVIDIA GPU and no package registry.
#
#   bash perf/gpu_check.sh            # from the repository root; prints one JSON object last
#
# 1. installs what the image lacks from wheels carried in .whl/ (or $WHEELS): ucxx-cu13,
#    libucxx-cu13, libucx-cu13 (<1.22), rmm-cu13, librmm-cu13, rapids-logger, cuda-core,
#    nvidia-ml-py, msgspec, xxhash; fetch them on a machine with a registry with
#      pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --platform manylinux_2_28_x86_64 -d .whl ucxx-cu13==0.52.0 libucxx-cu13==0.52.0 \
#        "libucx-cu13>=1.19,<1.22" rmm-cu13 librmm-cu13 rapids-logger "cuda-core>=0.5.1,<2" \
#        nvidia-ml-py msgspec xxhash
# 2. runs the conformance suite with CUDA tensors (KVWIRE_TEST_DEVICE=cuda) over tcp and ucx;
# 3. moves CUDA tensors between two processes on the one GPU over kvwire's UCX connection
#    (send / recv_into straight from and into device memory: cuda_ipc / cuda_copy), checks
#    every byte on the GPU, and prints GB/s next to a device-to-device copy of the same size;
# 4. a kvwire Sender with torch CUDA layers sends over UCX into a Receiver's CUDA expect()
#    buffers (perf/gpu_kv.py): no host staging, frames checksummed on the GPU at both ends,
#    bytes compared on the GPU; GB/s next to a device-to-device copy;
# 5. runs the codec kernels on the GPU (perf/gpu_codec.py): bit-identical to the CPU path,
#    and their throughput next to a device-to-device copy.
# It takes a few minutes at most; each step has a timeout.
set -u
cd "$(dirname "$0")/.."
WHEELS="${WHEELS:-.whl}"
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp}"
MIB="${GPU_CHECK_MIB:-256}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export UCX_WARN_UNUSED_ENV_VARS=n

echo "== versions" >&2
"$PY" -m pip show torch cupy-cuda13x numba-cuda cuda-bindings ucxx-cu13 2>/dev/null | grep -E '^(Name|Version)' >&2
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 || true

echo "== install from $WHEELS" >&2
install_rc=0
if [ -d "$WHEELS" ]; then
  timeout 180 "$PY" -m pip install -q --no-index --find-links "$WHEELS" ucxx-cu13 msgspec xxhash >&2 || install_rc=$?
fi

echo "== conformance with CUDA tensors" >&2
timeout 300 env KVWIRE_TEST_DEVICE=cuda NUMBA_ENABLE_CUDASIM=0 "$PY" -m pytest -q -p no:cacheprovider tests/test_conformance.py \
  > "$OUT/kvwire_gpu_conformance.txt" 2>&1
conformance_rc=$?
tail -5 "$OUT/kvwire_gpu_conformance.txt" >&2

echo "== two processes, one GPU, over UCX" >&2
cat > "$OUT/kvwire_gpu_peer.py" <<'EOF'
import json, sys, time
import torch
from kvwire.transport import get_backend

role, nbytes, repeats = sys.argv[1], int(sys.argv[2]), 5
torch.cuda.init()
device = torch.device("cuda", 0)
expected = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=device,
                         generator=torch.Generator(device=device).manual_seed(7))
backend = get_backend("ucx")
if role == "receiver":
    listener = backend.listen("127.0.0.1:0")
    print(listener.address, flush=True)
    conn = listener.start_tls(listener.accept(), 30.0)
    target = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    ok = True
    for _ in range(repeats):
        conn.recv_into(target)  # UCX writes device memory directly
        torch.cuda.synchronize()
        ok &= bool(torch.equal(target, expected))
        target.zero_()
        torch.cuda.synchronize()
        conn.send([b"1" if ok else b"0"])
    conn.close()
else:
    conn = backend.connect(sys.argv[3], timeout_s=30.0)
    ack = memoryview(bytearray(1))
    torch.cuda.synchronize()
    times, ok = [], True
    for _ in range(repeats):
        t0 = time.perf_counter()
        conn.send([expected])  # from device memory, no host staging
        conn.recv_into(ack)
        times.append(time.perf_counter() - t0)
        ok &= bytes(ack) == b"1"
    conn.close()
    copy = torch.empty_like(expected)
    d2d = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        copy.copy_(expected)
        torch.cuda.synchronize()
        d2d.append(time.perf_counter() - t0)
    print(json.dumps({
        "bytes": nbytes, "verified": ok, "transport": conn.transport,
        "ucx_gbps": round(nbytes / min(times) / 1e9, 3),
        "device_to_device_copy_gbps": round(nbytes / min(d2d) / 1e9, 3),
        "ucx_seconds": [round(t, 5) for t in times],
        "gpu": torch.cuda.get_device_name(0),
    }), flush=True)
EOF
transfer_json='{"error": "did not run"}'
receiver_log="$OUT/kvwire_gpu_receiver.txt"
timeout 180 "$PY" "$OUT/kvwire_gpu_peer.py" receiver $((MIB << 20)) > "$receiver_log" 2>&1 &
rx_pid=$!
for _ in $(seq 1 60); do
  address=$(head -1 "$receiver_log" 2>/dev/null | grep -E '^[0-9.]+:[0-9]+$' || true)
  [ -n "$address" ] && break
  sleep 1
done
if [ -n "${address:-}" ]; then
  line=$(timeout 150 "$PY" "$OUT/kvwire_gpu_peer.py" sender $((MIB << 20)) "$address" 2>"$OUT/kvwire_gpu_sender.txt" | tail -1)
  [ -n "$line" ] && transfer_json="$line" || transfer_json="{\"error\": $(tail -c 600 "$OUT/kvwire_gpu_sender.txt" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
else
  transfer_json="{\"error\": $(tail -c 600 "$receiver_log" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"
fi
wait "$rx_pid" 2>/dev/null

echo "== kvwire Sender/Receiver: CUDA tensors over UCX into CUDA buffers, checksummed on the GPU" >&2
kv_json=$(timeout 240 "$PY" -m perf.gpu_kv --json 2>"$OUT/kvwire_gpu_kv.txt" | tail -1)
[ -n "$kv_json" ] || kv_json="{\"error\": $(tail -c 600 "$OUT/kvwire_gpu_kv.txt" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"

echo "== codec kernels (fused gather+quantize, dequantize+scatter) vs device-to-device copy" >&2
codec_json=$(timeout 300 "$PY" -m perf.gpu_codec --json 2>"$OUT/kvwire_gpu_codec.txt" | tail -1)
[ -n "$codec_json" ] || codec_json="{\"error\": $(tail -c 600 "$OUT/kvwire_gpu_codec.txt" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')}"

conformance_tail=$(tail -3 "$OUT/kvwire_gpu_conformance.txt" | "$PY" -c 'import json,sys; print(json.dumps(sys.stdin.read()))')
cat <<EOF
{"gpu_check": "kvwire ucx", "install_rc": $install_rc, "conformance_rc": $conformance_rc, "conformance_tail": $conformance_tail, "transfer": $transfer_json, "kvwire_device_path": $kv_json, "codec_kernels": $codec_json}
EOF
