#!/usr/bin/env bash
# GPU readiness check: on one CUDA GPU, with the project already installed (installs nothing), in under 10 minutes
# (the step timeouts add up to 570 s, inside the device tool's 600 s per call):
#   1. the tests that need a GPU (bf16 autocast train step, an nccl process group with 1 rank, nvJPEG decode via
#      data.decode_device=cuda) must pass, not skip;
#   2. vit-b-16 train-step images/s at 64, 112 and 224 px with bf16 autocast (batch sized for an 80+ GiB card);
#   3. the data pipeline's decode + resize images/s per core on this machine, and nvJPEG decode on the GPU;
#   4. vit-b-16 train-step time eager vs train.compile (torch.compile) at 64 px, bf16, and the compile/recompile times.
# Prints JSON lines, then one JSON table (a line starting with {"gpu_check":). Usage: bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
OUT="${OUT:-$(mktemp -d)}"
BATCH="${BATCH:-256}"

python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true

# 1. GPU tests: '-rs' lists skips; a skip here means the check failed.
timeout 120 python -m pytest -q -rs -m gpu tests/test_gpu.py -p no:cacheprovider | tee "$OUT/gpu_tests.txt"
if grep -q "skipped" "$OUT/gpu_tests.txt" || ! grep -q "3 passed" "$OUT/gpu_tests.txt"; then
    echo "gpu tests did not all pass" >&2
    exit 1
fi

# 2. Train-step throughput by resolution (bf16), and the measured speedup next to the FLOPs ratio.
timeout 150 python -m reclip_ray bench model --model vit-b-16 --sizes 64,112,224 --text-length 16 \
    --batch "$BATCH" --steps 10 --warmup 3 --device cuda --precision bf16 --table-models vit-b-16 \
    --table-sizes 64,112,224 --table-lengths 16 | tee "$OUT/model.jsonl"

# 3. Data pipeline images/s per core (project path vs plain PIL), 512 px JPEG sources; then data.decode_device=cuda:
#    images/s of nvJPEG decode + crop + resize on the GPU against one CPU core's decode of the same JPEGs.
timeout 90 python -m reclip_ray bench data --images 200 --sizes 64,112,224 --repeats 3 | tee "$OUT/data.jsonl"
timeout 60 python -m reclip_ray bench data --device cuda --images 256 --sizes 224 --repeats 3 | tee -a "$OUT/data.jsonl"

# 4. train.compile: median step eager vs compiled (first compiled step = the compile; then a short batch recompiles).
timeout 150 python -m reclip_ray bench step compile --model vit-b-16 --batch "$BATCH" --sizes 64 --text-length 16 \
    --steps 10 --warmup 3 --device cuda --precision bf16 | tee "$OUT/compile.jsonl"

python - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
rows = [json.loads(l) for f in ("model.jsonl", "data.jsonl", "compile.jsonl") for l in (out / f).read_text().splitlines() if l.startswith("{")]
print(json.dumps({"gpu_check": {"tests": "passed", "rows": [r for r in rows if r.get("bench") != "model_flops"]}}))
PY
