#!/usr/bin/env bash
# bash benchmarks/gpu_check.sh --e2e (issue 26): the real `reclip-ray train` job on the lent GPU, in one device call.
#
# Ray and MLflow are not on the device: `python benchmarks/gpu_wheels.py` puts the pinned wheel set in .whl/ here
# (`--verify` checks it against the tracked lock benchmarks/gpu_wheels.lock.json), the call carries it
# (carry: [".whl"]), and step 1 installs it into a fresh target folder that goes on PYTHONPATH (the project itself
# runs from the checkout, as in the other modes). Steps, each under its own `timeout` (sum 565 s < 570 s, inside the
# device's 600 s per call; in parallel steps not counted twice):
#   0. torch sees the GPU (20 s);
#   1. install .whl/ into $SITE (60 s), in parallel with the synthetic data (20,000 train rows at 256 px + 80 px
#      shrunk copies, 1,000 eval rows: ~20-30 s on 16 cores) and tests/test_gpu.py on the GPU (bf16 step, nccl,
#      nvJPEG, the pinned batch copy: ~15 s), both counted inside the same 60 s;
#   2. the set is complete and Ray/MLflow import from $SITE, not from elsewhere (25 s: gpu_wheels.py --check-env);
#   3. job 1, vit-b-16, bf16, 1 GPU worker: lowres 64 px (16 tokens, batch 1,024) then finetune 224 px (32 tokens,
#      batch 512), checkpoint every 81,920 samples (copied in Ray Train's thread: checkpoint.upload async, the
#      preset's, set here too so that the CPU dry run takes the same path). Started, killed (SIGKILL of its process
#      group) once Ray Train has registered its first checkpoint (90 s), then the SAME command rerun must FINISH from
#      that checkpoint (130 s);
#   4. job 1's per-phase table from MLflow (15 s); `reclip-ray eval` of its model (30 s);
#   5. job 2, the finetune phase alone from job 1's model: train.micro_batch_size=128 of 512, train.compile=true,
#      data.decode_device=cuda (170 s); meanwhile `reclip-ray export --format open_clip` and a check of the folder
#      (on CPU, 40 s, overlapping: not in the sum): open_clip loads it and embeds as our model does where open_clip
#      is installed; it is not in the carried set (64 MiB), so there its weights are loaded against the run's model
#      (tests/test_openclip.py has open_clip load a vit-b-16 export); then job 2's table (15 s), the final table (10 s).
# The device call: here `python benchmarks/gpu_wheels.py --fetch` (the lock's 59 wheels by URL, ~15 s, sha256 checked),
# then run(command="bash benchmarks/gpu_check.sh --e2e", carry=[".whl"], timeout_s=600).
# Sizing, from the H200 kernel loop (BENCHMARKS "GPU readiness": eager bf16 vit-b-16, 12,325 samples/s at 64 px with
# batch 1,024, 2,332 at 224 px with batch 256):
#   lowres 163,840 samples = 160 steps of 1,024: 13.3 s at the kernel's rate, 26.6 s at half of it; the first
#     checkpoint at 81,920 (step 80). Attempt 1: ~25 s start (Ray, worker group, CUDA, tokenizer, data) + ~7-13 s
#     of steps + a 1.8 GB checkpoint (150M params: fp32 weights + AdamW moments) -> killed at ~45 s.
#   finetune 40,960 samples = 80 steps of 512: 17.6 s at 2,332/s, 35 s at half. Attempt 2: ~25 s start + 3 s
#     restore + 7-13 s lowres + 2 phase-end checkpoints and evaluations (1,000 rows, ~5 s each) + finetune
#     + export: ~70-100 s.
#   job 2: 24,576 samples = 48 steps of 512 (10.5 s at 2,332/s); two compiled graphs (GradCache's no-grad encode and
#     the training forward; one compile took 59 s at 64 px on this machine) -> ~140 s with the start.
# Per phase it prints samples/s, step time, data wait (median of the logging windows, the first dropped), MFU
# (reclip_ray.flops per-sample training FLOPs x samples/s / the GPU's dense bf16 peak: 989e12 on an H100 SXM or H200,
# plan.device_gpu_peak by the name torch reports, printed in each row as peak_of) and the worker's
# peak GPU memory (worker_peak_gpu_mib, reset at each phase start), and data_cores: the cores Ray Data's tasks kept
# busy over the phase's steady windows (gpu_e2e.py cpu-sample reads every process's CPU time from /proc each 0.25 s
# through both jobs and sums it by process title), i.e. the decode cores one GPU took at that samples/s on the
# device's own cores (issue 26 item 2), with data_cores_per_1k_samples_s; and data_cpu_s, the data CPU-seconds
# spent for the phase over the whole run wherever they fell, with data_cores_from_cpu_s, what they come to per second
# at the steady samples/s (a phase that fits in the read-ahead is read before its steady windows: data_cores 0.0
# in the CPU dry run's lowres). JSON lines on stdout; the final line starts
# with {"gpu_e2e":. $OUT gets e2e.jsonl, e2e_table.json and e2e_logs.tar.gz (every step's log, Ray's run logs).
#
# E2E_CPU=1: the dry run on a machine without a GPU (by default with this machine's Python, 3.11 here, where the cp312
# wheels cannot install):
# the same steps, at tiny sizes (tiny preset, 32 -> 64 px, 512 + 128 samples, 1 CPU worker, use_gpu=false; job 2
# without compile and device decode, which need CUDA), with the lock's SAME pinned versions built for this
# interpreter (`gpu_wheels.py --cpu-set`: the pure-Python wheels copied from .whl/, the platform ones downloaded,
# Ray slimmed the same way), installed by the same command into a fresh target folder, and run by a virtual
# environment's python WITHOUT this machine's site-packages: on its path are only the checkout, the target folder
# and links to the packages the device provides (`gpu_wheels.py --device-sim`: torch, numpy, pyarrow, ... and what
# they need). So a wheel missing from the lock fails the dry run here, as it would fail there, and the Ray/MLflow
# installed on this machine cannot stand in for the carried ones (step 2 checks ray.__file__ is in the target).
# With PYTHON set to a Python 3.12 environment that holds the device's packages at its versions (torch 2.11, timm
# 1.0.29, numpy 2.5.2, ...: `python benchmarks/gpu_wheels.py --device-venv DIR --python python3.12`, ~4 GB), the
# dry run installs and runs the carried cp312 wheels themselves (every file of .whl/), on the device's torch.
# What it cannot prove: CUDA/nccl/bf16, compile and nvJPEG on a GPU; only the device can.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
CPU="${E2E_CPU:-0}"
OUT="${OUT:-$(mktemp -d)}"
WORK="${E2E_DIR:-${TMPDIR:-/tmp}/reclip_e2e$([[ $CPU == 1 ]] && echo _cpu)}"
SITE="$WORK/site"
LOGS="$WORK/logs"
JSONL="$OUT/e2e.jsonl"
PEAK_FLOPS="${PEAK_FLOPS:-0}"  # FLOP/s of one GPU; 0: the data sheet's for the GPU torch sees (gpu_e2e.peak_flops)
mkdir -p "$OUT" "$LOGS"
rm -rf "$SITE" "$WORK/runs" "$WORK/mlflow.db" "$WORK/mlartifacts" "$WORK/openclip"
: >"$JSONL"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}" PYTHONUNBUFFERED=1

say() { echo "$1" | tee -a "$JSONL"; }
since() { local ms=$((($(date +%s%N) - $1) / 1000000)); printf '%d.%03d' $((ms / 1000)) $((ms % 1000)); }  # no bc there

# step NAME TIMEOUT_S CMD...: run CMD under `timeout`, its output in $LOGS/NAME.log (tail shown), one JSON line.
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    t0=$(date +%s%N)
    timeout -k 5 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    tail -n 15 "$LOGS/$name.log" | cut -c1-400
    grep -h '^{"e2e"\|^{"check_env"' "$LOGS/$name.log" >>"$JSONL" || true
    say "{\"e2e\": \"step\", \"step\": \"$name\", \"rc\": $rc, \"wall_s\": $(since "$t0"), \"timeout_s\": $limit}"
    return $rc
}

if [[ $CPU == 1 ]]; then
    # Sizes for 2 loaded cores; timeouts generous (no device call to fit in).
    CONFIG=tiny LOW=32 FULL=64 LOW_BATCH=64 FULL_BATCH=64 LOW_SAMPLES=512 FULL_SAMPLES=128 CKPT_EVERY=256
    SYNTH="--train 512 --eval 128 --size 128 --shrink 40" LOG_EVERY=2 MICRO=32 FT_BATCH=64 FT_SAMPLES=128
    J2_EXTRA=(train.compile=false data.decode_device=cpu) GPU=false CPUS=0.5 SCALE=4
    DELAY=1.0  # s per step (fault.step_delay_s): the tiny job would pass its phase end before the kill lands
    export OMP_NUM_THREADS=1
    WHEELS="$WORK/whl_cpu"
    [[ -d .whl ]] || { echo ".whl/ is missing: run python benchmarks/gpu_wheels.py first" >&2; exit 1; }
    BASE_PY="${PYTHON:-python}"
    "$BASE_PY" benchmarks/gpu_wheels.py --cpu-set "$WHEELS" || exit 1
    "$BASE_PY" benchmarks/gpu_wheels.py --device-sim "$WORK/device_sim" >"$LOGS/device_sim.log" || exit 1
    rm -rf "$WORK/venv" && "$BASE_PY" -m venv --without-pip "$WORK/venv" || exit 1
    PY="$WORK/venv/bin/python"   # no site-packages of this machine: only PYTHONPATH below
    PIP=("$BASE_PY" -m pip)
    export PYTHONPATH="$REPO:$SITE:$WORK/device_sim"
    DATA_PATH="$REPO:$WORK/device_sim"
else
    CONFIG=vit-b-16 LOW=64 FULL=224 LOW_BATCH=1024 FULL_BATCH=512 LOW_SAMPLES=163840 FULL_SAMPLES=40960
    CKPT_EVERY=81920 SYNTH="--train 20000 --eval 1000 --size 256 --shrink 80" LOG_EVERY=10 MICRO=128 FT_BATCH=512
    FT_SAMPLES=24576 J2_EXTRA=(train.compile=true data.decode_device=cuda) GPU=true CPUS=2 SCALE=1 DELAY=0
    WHEELS="$REPO/.whl"
    PY="${PYTHON:-python3}"
    PIP=("$PY" -m pip)
    timeout 20 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')" \
        || exit 1
    timeout 5 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    export PYTHONPATH="$REPO:$SITE"
    DATA_PATH="$REPO"
fi
RUN_DIR="$WORK/runs/e2e-main"
URI="sqlite:///$WORK/mlflow.db"
T() { echo $(($1 * SCALE)); }

# 1. install (and the data, in parallel: it needs no Ray)
PYTHONPATH="$DATA_PATH" timeout -k 5 "$(T 60)" "$PY" benchmarks/gpu_e2e.py data "$WORK/data" $SYNTH \
    >"$LOGS/data.log" 2>&1 &
data_pid=$!
if [[ $GPU == true ]]; then  # the tests that need a GPU (tests/test_gpu.py), on the GPU while the CPUs install
    PYTHONPATH="$DATA_PATH" timeout -k 5 60 "$PY" -m pytest -q -rs -s -m gpu tests/test_gpu.py -p no:cacheprovider \
        >"$LOGS/gpu_tests.log" 2>&1 &
    tests_pid=$!
fi
step install "$(T 60)" "${PIP[@]}" install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
    "$WHEELS"/*.whl
wait $data_pid
data_rc=$?
grep -h '^{"e2e"' "$LOGS/data.log" >>"$JSONL" || tail -n 20 "$LOGS/data.log"
say "{\"e2e\": \"step\", \"step\": \"data\", \"rc\": $data_rc, \"timeout_s\": $(T 60), \"note\": \"in parallel with install\"}"
if [[ $GPU == true ]]; then
    wait $tests_pid
    tests_rc=$?
    tail -n 12 "$LOGS/gpu_tests.log" | cut -c1-400
    say "{\"e2e\": \"step\", \"step\": \"gpu_tests\", \"rc\": $tests_rc, \"skipped\": $(grep -c SKIPPED "$LOGS/gpu_tests.log"), \"timeout_s\": 60, \"note\": \"in parallel with install\"}"
fi

# 2. the installed set is complete and is the one imported
step check_env "$(T 25)" "$PY" benchmarks/gpu_wheels.py --check-env "$SITE"

# 3. job 1: start, kill after the first checkpoint, rerun the same command
# The config's 8 MB blocks (64-row read chunks), not vit-b-16's: the preset sizes its blocks for 64 workers sharing
# one split coordinator; on one worker they would only make each phase's first block come later.
JOB1=(--config "$CONFIG"
      --set "data.train=$WORK/data/train" --set "data.eval=$WORK/data/eval" --set data.synth_if_missing=false
      --set data.block_mb=8 --set data.chunk_rows=64
      --set "phases.0.image_size=$LOW" --set "phases.0.samples=$LOW_SAMPLES" --set "phases.0.batch_size=$LOW_BATCH"
      --set "phases.1.image_size=$FULL" --set "phases.1.samples=$FULL_SAMPLES" --set "phases.1.batch_size=$FULL_BATCH"
      --set "train.samples=$((LOW_SAMPLES + FULL_SAMPLES))" --set "train.batch_size=$LOW_BATCH"
      --set train.precision=$([[ $GPU == true ]] && echo bf16 || echo fp32) --set "train.log_every_steps=$LOG_EVERY"
      --set optim.warmup_samples=0.05 --set "checkpoint.every_samples=$CKPT_EVERY" --set checkpoint.num_to_keep=2
      --set checkpoint.every_minutes=0 --set checkpoint.upload=async
      --set scaling.min_workers=1 --set scaling.max_workers=1 --set "scaling.use_gpu=$GPU"
      --set "scaling.cpus_per_worker=$CPUS" --set "run.storage_path=$WORK/runs" --set run.name=e2e-main
      --set "tracking.uri=$URI" --set tracking.experiment=e2e-main --set "fault.step_delay_s=$DELAY")
# CPU time by what it feeds (Ray Data's tasks, the training worker, the rest), sampled from /proc through both jobs:
# the phases' data_cores (cores Ray Data kept busy while the GPU trained at the phase's samples/s)
CPU_LOG="$LOGS/cpu.jsonl"
timeout -k 5 "$(T 560)" "$PY" benchmarks/gpu_e2e.py cpu-sample "$CPU_LOG" --interval 0.25 2>"$LOGS/cpu_sample.log" &
sampler_pid=$!
t0=$(date +%s%N)
setsid timeout -k 5 "$(T 90)" "$PY" -m reclip_ray train "${JOB1[@]}" >"$LOGS/job1_attempt1.log" 2>&1 &
job_pid=$!
if timeout "$(T 90)" "$PY" benchmarks/gpu_e2e.py wait-checkpoint "$RUN_DIR" --timeout "$(T 85)" --pid "$job_pid" \
        >>"$LOGS/job1_attempt1.log" 2>&1; then
    sleep 1
    kill -KILL -- "-$job_pid" 2>/dev/null  # the driver, its local Ray (GCS, raylet) and the training worker
    killed=true
else
    killed=false
fi
wait $job_pid
a1_rc=$?
for _ in $(seq 20); do pgrep -g "$job_pid" >/dev/null || break; sleep 0.5; done
left=$(pgrep -g "$job_pid" | wc -l)
gpu_left=0  # a training worker that outlived the kill would share the GPU with the rerun and skew its numbers
for _ in $(seq 20); do
    [[ $GPU == true ]] && gpu_left=$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null | grep -c .)
    [[ $gpu_left == 0 ]] && break
    sleep 0.5
done
grep -h '^{"e2e"' "$LOGS/job1_attempt1.log" >>"$JSONL" || true
tail -n 8 "$LOGS/job1_attempt1.log" | cut -c1-400
say "{\"e2e\": \"step\", \"step\": \"job1_attempt1\", \"rc\": $a1_rc, \"killed_after_checkpoint\": $killed, \"processes_left\": $left, \"gpu_processes_left\": $gpu_left, \"wall_s\": $(since "$t0"), \"timeout_s\": $(T 90)}"
step job1_resume "$(T 130)" "$PY" -m reclip_ray train "${JOB1[@]}" --json
resume_rc=$?

# 4. job 1's numbers; reclip-ray eval of its model
step job1_phases "$(T 15)" "$PY" benchmarks/gpu_e2e.py phases --tracking-uri "$URI" --experiment e2e-main --label job1 \
    --peak-flops "$PEAK_FLOPS" --cpu-log "$CPU_LOG" "${JOB1[@]}"
step eval "$(T 30)" "$PY" -m reclip_ray eval --checkpoint "$RUN_DIR/model" --data "$WORK/data/eval"

# 5. job 2 (the finetune phase with accumulation, compile, device decode); export + open_clip load meanwhile, on CPU
timeout -k 5 "$(T 40)" bash -c 'export CUDA_VISIBLE_DEVICES=""; "$0" -m reclip_ray export "$1/model" --format open_clip \
    --out "$2" && "$0" benchmarks/gpu_e2e.py open-clip-check "$2" "$1/model"' "$PY" "$RUN_DIR" "$WORK/openclip" \
    >"$LOGS/export.log" 2>&1 &
export_pid=$!
INIT=()
[[ -f "$RUN_DIR/model/config.yaml" ]] && INIT=(--set "model.init_from=$RUN_DIR/model")
JOB2=(--config "$CONFIG"
      --set "data.train=$WORK/data/train" --set "data.eval=$WORK/data/eval" --set data.synth_if_missing=false
      --set data.block_mb=8 --set data.chunk_rows=64
      --set "phases=[{name: finetune, image_size: $FULL, text_length: 32, samples: 1.0, lr: 2.0e-4, warmup_samples: 0.1}]"
      --set "train.samples=$FT_SAMPLES" --set "train.batch_size=$FT_BATCH" --set "train.micro_batch_size=$MICRO"
      --set train.precision=$([[ $GPU == true ]] && echo bf16 || echo fp32) --set "train.log_every_steps=$LOG_EVERY"
      --set eval.at_phase_end=false --set checkpoint.every_samples=0
      --set scaling.min_workers=1 --set scaling.max_workers=1 --set "scaling.use_gpu=$GPU"
      --set "scaling.cpus_per_worker=$CPUS" --set "run.storage_path=$WORK/runs" --set run.name=e2e-finetune
      --set "tracking.uri=$URI" --set tracking.experiment=e2e-finetune)
for kv in "${J2_EXTRA[@]}"; do JOB2+=(--set "$kv"); done
step job2 "$(T 170)" "$PY" -m reclip_ray train "${JOB2[@]}" "${INIT[@]}" --json
job2_rc=$?
kill -TERM "$sampler_pid" 2>/dev/null
wait $export_pid
export_rc=$?
grep -h '^{"e2e"' "$LOGS/export.log" >>"$JSONL" || tail -n 20 "$LOGS/export.log"
say "{\"e2e\": \"step\", \"step\": \"export_open_clip\", \"rc\": $export_rc, \"timeout_s\": $(T 40), \"note\": \"in parallel with job2\"}"
step job2_phases "$(T 15)" "$PY" benchmarks/gpu_e2e.py phases --tracking-uri "$URI" --experiment e2e-finetune \
    --label job2 --peak-flops "$PEAK_FLOPS" --cpu-log "$CPU_LOG" "${JOB2[@]}"

# the final table; the logs (Ray's own too) in one archive: $OUT brings back at most 8 files
tar -czf "$OUT/e2e_logs.tar.gz" -C "$WORK" logs $(cd "$WORK" && ls -d runs/*/ray.log runs/*/*.log 2>/dev/null) \
    2>/dev/null || true
timeout 10 "$PY" - "$JSONL" "$OUT/e2e_table.json" "$CPU" "$WORK" <<'PY'
import glob, json, re, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
logs = glob.glob(f"{sys.argv[4]}/logs/*.log") + glob.glob(f"{sys.argv[4]}/runs/*/ray.log")
text = "".join(open(f, errors="replace").read() for f in logs)
resumed = re.search(r"resumed at ([0-9,]+) samples", open(f"{sys.argv[4]}/logs/job1_resume.log").read())
missing = sorted(set(re.findall(r"No module named '([^']+)'", text)))  # a wheel the set lacks, in any process
# Each job's local Ray must bring its dashboard up (Ray Train's placement-group cleaner and the state API need it;
# ray.init only logs its failure): every "Started a local Ray instance." goes on with "View the dashboard at".
ray_starts = len(re.findall(r"Started a local Ray instance\.", text))
no_dashboard = ray_starts - len(re.findall(r"Started a local Ray instance\. View the dashboard at", text)) \
    + text.count("Failed to start the dashboard")
steps = {r["step"]: r["rc"] for r in rows if r.get("e2e") == "step"}
must = ["install", "data", "check_env", "job1_resume", "job1_phases", "eval", "job2", "export_open_clip", "job2_phases"]
gpu_tests = next((r for r in rows if r.get("step") == "gpu_tests"), {})
if sys.argv[3] != "1":  # on the GPU: its tests ran, none skipped
    must.append("gpu_tests")
attempt1 = next((r for r in rows if r.get("step") == "job1_attempt1"), {})
resumed_at = int(resumed.group(1).replace(",", "")) if resumed else None
table = {"gpu_e2e": {"cpu_dry_run": sys.argv[3] == "1", "ok": all(steps.get(s) == 0 for s in must)
                     and attempt1.get("killed_after_checkpoint") is True and bool(resumed_at)
                     and ray_starts > 0 and no_dashboard == 0 and gpu_tests.get("skipped", 0) == 0,
                     "steps": steps, "killed_after_checkpoint": attempt1.get("killed_after_checkpoint"),
                     "resumed_at_samples": resumed_at, "modules_missing_in_logs": missing,
                     "ray_starts": ray_starts, "ray_starts_without_dashboard": no_dashboard,
                     "phases": [r for r in rows if r.get("e2e") == "phase"],
                     "open_clip": next((r for r in rows if r.get("e2e") == "open_clip_load"), None)}}
json.dump(table, open(sys.argv[2], "w"), indent=1)
print(json.dumps(table))
sys.exit(0 if table["gpu_e2e"]["ok"] else 1)
PY
