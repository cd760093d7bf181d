#!/usr/bin/env bash
# One prepared check of the GPU paths, writing every figure to one report file:
#   1. the test suite's CUDA tests (`pytest -m cuda`; they skip without a GPU),
#   2. LiteMedSAM on the real CT: prepare, train with a frozen encoder (cached embeddings) and with encoder
#      LoRA (both bf16 autocast), evaluate both adapters with simulated users, predict a volume from one liver
#      box (base model and adapter, volume Dice against the reference labels),
#   3. benchmarks/phpg_throughput.py at GPU batch sizes.
# Every section runs even when an earlier one failed; each records its exit status, wall time and peak memory
# (GPU memory allocated by torch, and the process's peak resident memory). About 5 minutes on one GPU.
#
#   benchmarks/gpu_check.sh [REPORT] [--cpu] [--data DIR] [--work DIR]
#
# REPORT: the report file (default $OUT/gpu_check.txt, or runs/gpu_check/gpu_check.txt without $OUT).
# --cpu: run on the CPU (GPU hidden) with tiny sizes, to know the script works before a GPU is at hand.
# --data: the TotalSegmentator example CT folder (default ../shared/data/totalseg_ct, else ./shared_data/totalseg_ct).
# --work: folder for the prepared data, runs and logs (default: a new temporary folder).
# Assumes `python3 -c "import sam_peft"` works; installs nothing and downloads nothing.
set -uo pipefail
cd "$(dirname "$0")/.."

REPORT="" CPU=0 DATA="" WORK=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) CPU=1 ;;
    --data) DATA="$2"; shift ;;
    --work) WORK="$2"; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
    *) REPORT="$1" ;;
  esac
  shift
done
REPORT="${REPORT:-${OUT:-runs/gpu_check}/gpu_check.txt}"
if [ -z "$DATA" ]; then
  DATA=../shared/data/totalseg_ct
  [ -f "$DATA/example_ct.nii.gz" ] || DATA=./shared_data/totalseg_ct
fi
WORK="${WORK:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$(dirname "$REPORT")" "$WORK/logs"
: > "$REPORT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TQDM_DISABLE=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
if [ "$CPU" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS=1
  DEVICE=cpu
else
  DEVICE=cuda
fi

# The Python side: runs a module or script in this process and reports its time and peak memory; prepares the
# CT split, the predict prompts and the volume Dice. Written next to the runs, not into the repository.
HELPER="$WORK/gpu_check_helper.py"
cat > "$HELPER" <<'PY'
import json, resource, runpy, sys, time
from pathlib import Path

ABDOMEN = {1: "spleen", 2: "kidney_right", 3: "kidney_left", 4: "gallbladder", 5: "liver", 6: "stomach",
           7: "pancreas", 52: "aorta", 63: "inferior_vena_cava"}


def run(kind, target, *argv):
    """Run `python -m target argv` (kind module) or `python target argv` (kind script); print time and peaks."""
    import torch
    sys.argv = [target, *argv]
    start, code = time.perf_counter(), 0
    try:
        if kind == "module":
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(target, run_name="__main__")
    except SystemExit as end:
        code = end.code if isinstance(end.code, int) else (0 if end.code is None else 1)
    finally:
        gpu = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB ({torch.cuda.get_device_name()})"
               if torch.cuda.is_available() and torch.cuda.is_initialized() else "n/a")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"[measure] {target}: {time.perf_counter() - start:.1f} s, peak GPU memory allocated {gpu}, "
              f"peak RSS {rss:.2f} GiB")
    sys.exit(code)


def split(prepared, output, cpu):
    """Hold out the top quarter of the CT's organ slices as `validation` (a contiguous block, as
    benchmarks/real_ct_results.py does); --cpu keeps 4 training and 2 validation slices."""
    from datasets import DatasetDict
    from sam_peft.data import load_prepared
    slices = load_prepared(prepared)["train"]
    cut = sorted(slices["slice_index"])[int(len(slices) * 0.75)]
    train = slices.filter(lambda s: s < cut, input_columns="slice_index")
    val = slices.filter(lambda s: s >= cut, input_columns="slice_index")
    if cpu == "1":
        train, val = (part.select(range(0, len(part), max(1, len(part) // n))[:n]) for part, n in ((train, 4), (val, 2)))
    DatasetDict(train=train, validation=val).save_to_disk(output)
    print(f"train {train.num_rows} slices, validation {val.num_rows} (slice_index >= {cut})")


def prompts(prepared, output):
    """One liver box on the slice with the most liver, in the display frame `predict` reads."""
    import numpy as np
    from sam_peft.data import load_prepared, read_metadata
    data = load_prepared(prepared)
    index = read_metadata(data)["organ_names"].index("liver") + 1
    rows = data["train"].with_format("numpy")
    best = max(range(rows.num_rows), key=lambda i: int((rows[i]["label"] == index).sum()))
    ys, xs = np.nonzero(rows[best]["label"] == index)
    z = int(rows[best]["slice_index"])
    box = [int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())]
    Path(output).write_text(json.dumps({"liver": {"slices": {str(z): {"box": box}}}}))
    print(f"liver box {box} on slice {z}")


def dice(prediction, reference):
    """Volume Dice of the liver (id 5 in both label maps) against the reference labels."""
    import nibabel as nib
    import numpy as np
    pred = np.asarray(nib.load(prediction).dataobj) == 5
    ref = np.asarray(nib.load(reference).dataobj) == 5
    both = pred.sum() + ref.sum()
    score = 2 * (pred & ref).sum() / both if both else 1.0
    slices = int(pred.any(axis=(0, 1)).sum())
    print(f"liver volume Dice {score:.4f} ({slices} of {int(ref.any(axis=(0, 1)).sum())} reference slices segmented)")


if __name__ == "__main__":
    if sys.argv[1] == "labelmap":
        Path(sys.argv[2]).write_text(json.dumps(ABDOMEN))
    else:
        globals()[sys.argv[1]](*sys.argv[2:])
PY

STATUS=()
note() { echo "$*" | tee -a "$REPORT"; }

# section NAME CMD...: run CMD (output to a log), append its output and a status line to the report.
section() {
  local name="$1"; shift
  local log="$WORK/logs/$name.log" start end rc
  note ""
  note "=== $name: $*"
  start=$(date +%s.%N)
  "$@" > "$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  # the report keeps each progress bar's final state only (bars redraw with carriage returns)
  tr '\r' '\n' < "$log" | grep -v '^\s*$' | grep -vE ' [0-9]{1,2}%\|' | uniq | tail -n 60 >> "$REPORT"
  local seconds
  seconds=$(python3 -c "print(f'{$end - $start:.1f}')")
  if [ "$rc" = 0 ]; then
    note "--- $name: PASS in ${seconds} s"
  else
    note "--- $name: FAIL (exit $rc) in ${seconds} s; full log: $log"
  fi
  STATUS+=("$(printf '%-28s %-5s %8s s' "$name" "$([ "$rc" = 0 ] && echo PASS || echo FAIL)" "$seconds")")
}

py() { timeout "${LIMIT:-600}" python3 "$HELPER" "$@"; }
cli() { py run module sam_peft.cli "$@"; }

note "gpu_check $(date -u '+%Y-%m-%d %H:%M:%S UTC'), mode: $([ "$CPU" = 1 ] && echo 'CPU (--cpu, tiny sizes)' || echo GPU)"
note "repository: $PWD ($(git rev-parse --short HEAD 2>/dev/null || echo 'not a git checkout'))"
note "data: $DATA; work folder: $WORK"
section environment bash -c 'python3 -c "
import sys, torch, transformers, peft, accelerate, sam_peft
print(\"python\", sys.version.split()[0], \"| torch\", torch.__version__, \"| transformers\", transformers.__version__,
      \"| peft\", peft.__version__, \"| accelerate\", accelerate.__version__)
print(\"cuda available:\", torch.cuda.is_available(), \"| devices:\",
      [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
      \"| bf16 supported:\", torch.cuda.is_available() and torch.cuda.is_bf16_supported())
"; command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv || true'

# 1. CUDA tests (device placement, bf16 autocast, cached embeddings on the GPU)
# (only the modules that hold CUDA tests: collecting the others may need packages a GPU machine lacks)
mapfile -t CUDA_TESTS < <(grep -lE 'mark\.cuda' tests/test_*.py)
LIMIT=300 section cuda-tests py run module pytest -q -rs -m cuda "${CUDA_TESTS[@]}" -p no:cacheprovider

# 2. LiteMedSAM on the real CT (training settings in YAML files, so they do not depend on option spellings)
if [ "$CPU" = 1 ]; then
  SIZES="{epochs: 1, pruning: none, batch_size: 2, max_regions: 2, rounds: 2, eval_behaviours: [tight_box]}"
  EVAL=(--behaviours tight_box center_click --no-noc --batch-size 2)
  PREDICT=(--no-propagate)
else
  SIZES="{epochs: 3, pruning: cbdp, batch_size: 16, max_regions: 8, rounds: 3}"
  EVAL=(--max-clicks 10 --batch-size 16)
  PREDICT=()
fi
for run in frozen encoder; do
  extra=""; [ "$run" = encoder ] && extra="frozen_encoder: false, lora_preset: encoder+decoder, "
  python3 -c "import sys, yaml; yaml.safe_dump({**yaml.safe_load(sys.argv[1]), **yaml.safe_load(sys.argv[2])},
    open(sys.argv[3], 'w'))" "{data: $WORK/ct, mixed_precision: bf16, log_with: null, lr: 0.001, seed: 0, \
    cache_dir: $WORK/cache, output_dir: $WORK/run_$run, ${extra%, }}" "$SIZES" "$WORK/train_$run.yaml"
done
section prepare-ct bash -c "python3 '$HELPER' labelmap '$WORK/abdomen.json' && \
  python3 '$HELPER' run module sam_peft.cli prepare --images '$DATA/example_ct.nii.gz' \
    --labels '$DATA/example_seg_fast_force_split.nii.gz' --label-map '$WORK/abdomen.json' \
    --ignore-unknown-labels --output '$WORK/ct_all' --overwrite && \
  python3 '$HELPER' split '$WORK/ct_all' '$WORK/ct' '$CPU' && python3 '$HELPER' prompts '$WORK/ct' '$WORK/prompts.json'"
section train-frozen-bf16 cli train --config "$WORK/train_frozen.yaml" --overwrite
section train-encoder-lora-bf16 cli train --config "$WORK/train_encoder.yaml" --overwrite
for run in frozen encoder; do
  section "evaluate-$run" cli evaluate --adapter "$WORK/run_$run/adapter" --data "$WORK/ct" --split validation \
    --device "$DEVICE" --output "$WORK/eval_$run" "${EVAL[@]}"
done
section evaluate-base cli evaluate --no-adapter --data "$WORK/ct" --split validation --device "$DEVICE" \
  --output "$WORK/eval_base" "${EVAL[@]}"
for run in base frozen; do
  adapter=(); [ "$run" = base ] || adapter=(--adapter "$WORK/run_$run/adapter")
  section "predict-$run" bash -c "python3 '$HELPER' run module sam_peft.cli predict ${adapter[*]} \
    --input '$DATA/example_ct.nii.gz' --prompts '$WORK/prompts.json' --label-map '$WORK/abdomen.json' \
    --output '$WORK/pred_$run.nii.gz' --device $DEVICE ${PREDICT[*]} && \
    python3 '$HELPER' dice '$WORK/pred_$run.nii.gz' '$DATA/example_seg_fast_force_split.nii.gz'"
done

# 3. PHPG step throughput (the README's GPU command, then a batch near the anchors' largest)
if [ "$CPU" = 1 ]; then
  section throughput py run script benchmarks/phpg_throughput.py --images 1 --regions 2 --repeats 1 --warmup 0 \
    --threads 1
else
  section throughput-16x8 py run script benchmarks/phpg_throughput.py --images 16 --regions 8
  section throughput-64x8 py run script benchmarks/phpg_throughput.py --images 64 --regions 8
fi

note ""
note "=== summary ($([ "$CPU" = 1 ] && echo CPU || echo GPU))"
for line in "${STATUS[@]}"; do note "$line"; done
note "report: $REPORT; logs and runs: $WORK"
