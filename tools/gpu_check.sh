#!/usr/bin/env bash
# The CUDA checks and GPU benchmark of hald.py in one short script, for a GPU that is lent briefly:
#   OUT=/tmp/gpu bash tools/gpu_check.sh          # bench-*.json and check.log land in $OUT
# Order: benchmark at the issue's sizes, the bundled demo on CUDA (eager and CUDA graphs), the test
# suite on CUDA, torch.compile last (it compiles for minutes). Each step has its own time limit.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
log="$OUT/check.log"
step() { echo "== $*" | tee -a "$log"; }

step "device"
{ nvidia-smi -L; $PY -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee -a "$log"

bench() {  # name, then bench.py flags
    local name=$1; shift
    step "bench $name: $*"
    timeout "${LIMIT:-90}" $PY tools/bench.py --device cuda --repeats 5 --replay-sizes "" --out "$OUT/bench-$name.json" "$@" 2>&1 | tail -16 | tee -a "$log"
}
bench r18-224-b16 --model resnet18 --image-size 224 --batch-size 16 --classes 1000 --ipc 2
# --whole-step-graph: the experiment of the next step (replay, loss and AdamW inside the graph too)
LIMIT=150 bench r18-224-b16-graph --model resnet18 --image-size 224 --batch-size 16 --classes 1000 --ipc 2 --cuda-graph --whole-step-graph
# where a graphed batch-16 step spends its time beyond the graph (the missing 0.90 efficiency)
step "profile r18-224-b16-graph"
timeout 120 $PY tools/bench.py --device cuda --repeats 2 --replay-sizes "" --out "$OUT/bench-profile.json" --model resnet18 --image-size 224 \
    --batch-size 16 --classes 1000 --ipc 2 --cuda-graph --profile 2>&1 | tail -22 | tee -a "$log"
bench r18-224-b16-fp32 --model resnet18 --image-size 224 --batch-size 16 --classes 1000 --ipc 2 --precision fp32
bench r18-224-b128 --model resnet18 --image-size 224 --batch-size 128 --classes 1000 --ipc 2
bench r18-224-b128-graph --model resnet18 --image-size 224 --batch-size 128 --classes 1000 --ipc 2 --cuda-graph
bench r18-32-b16 --model resnet18 --image-size 32 --batch-size 16 --classes 100 --ipc 10
LIMIT=150 bench r18-32-b16-graph --model resnet18 --image-size 32 --batch-size 16 --classes 100 --ipc 10 --cuda-graph --whole-step-graph
# the validation path at ImageNet size: JPEG decode rate, and an evaluation decoding again vs kept decoded as uint8
LIMIT=240 bench val-224 --model resnet18 --image-size 224 --batch-size 16 --classes 1000 --ipc 2 --val-jpegs 3000 --val-eval-images 3000

for flags in "" "--cuda-graph" "--precision fp32"; do
    step "demo on CUDA $flags"
    timeout 150 $PY hald.py --overwrite --out "/tmp/demo${flags// /}" $flags 2>&1 | grep -E "^hald|^validation|teacher check|soft labels:|final|comparison|^  " | tee -a "$log"
done

step "pytest on CUDA"
timeout 180 $PY -m pytest -q -p no:cacheprovider test_hald.py 2>&1 | tail -25 | tee -a "$log"

LIMIT=200 bench r18-224-b16-compile-graph --model resnet18 --image-size 224 --batch-size 16 --classes 1000 --ipc 2 --compile --cuda-graph

step "summary"
$PY - "$OUT" <<'EOF' 2>&1 | tee -a "$log"
import json, sys
from pathlib import Path
keys = ("model_step_ips", "soft_epoch_ips", "hard_epoch_ips", "efficiency_soft", "efficiency_hard",
        "relabel_vs_teacher_forward", "replay_speedup_vs_naive", "projected_imagenet_ipc10_minutes",
        "whole_graph_model_step_ips", "whole_graph_soft_epoch_ips", "efficiency_soft_whole_graph",
        "val_decode_ips", "val_eval_seconds_before_50k", "val_eval_seconds_after_50k")
print("run".ljust(28) + "".join(k[:14].rjust(15) for k in keys))
for path in sorted(Path(sys.argv[1]).glob("bench-*.json")):
    r = json.loads(path.read_text())
    print(path.stem[6:].ljust(28) + "".join(f"{r[k]:15.3f}" if k in r else "-".rjust(15) for k in keys))
    if "whole_step_graph_error" in r:
        print("  whole-step graph failed:", r["whole_step_graph_error"])
EOF
