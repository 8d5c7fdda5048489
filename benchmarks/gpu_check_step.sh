#!/usr/bin/env bash
# The GPU measurements of the training step in one call (~5-7 minutes on an H200, estimated;
# part 4 is capped at 200 s):
#   1. host syncs: synchronising calls per block of Trainer steps (fit's GPU default vs the loop Adam)
#      and per epoch of batches made on the device vs the DataLoader (benchmarks/gpu_sync_graphs.py sync);
#   2. the suite on the GPU, unet and prob_unet at 64x64: overhead (Trainer vs the hand-written step and vs
#      pyroseg's earlier step that waits for the host, interleaved, 20 steps per timed call),
#      throughput (images/s, now and with the earlier step),
#      data (data-wait share, --data-on-device off vs on); merged into benchmarks/results/gpu/ and copied
#      to OUT_DIR/gpu/ (SUITE_ITEMS=overhead,throughput,data,scaling adds the scaling epochs);
#   3. a tiny `pyroseg fit` on the GPU: the data goes on the device (log line), the run finishes and resumes;
#   4. the CUDA-graph trial: torch.compile(mode="reduce-overhead") of the networks inside the Pyro step
#      vs eager (benchmarks/gpu_sync_graphs.py graphs), under a time limit.
# Usage: bash benchmarks/gpu_check_step.sh OUT_DIR   (from the repository root, pyroseg importable)
# SKIP_GRAPHS=1 leaves out part 4; SUITE_ITEMS=overhead,throughput narrows part 2. Part 2 replaces the
# throughput item of benchmarks/results/gpu/ with these two models at 64x64; the full table again:
#   python -m benchmarks.run --device cuda --items throughput --merge --out benchmarks/results/gpu
set -uo pipefail
out=${1:?usage: gpu_check_step.sh OUT_DIR}
mkdir -p "$out/gpu"
export PYROSEG_CACHE_DIR=${PYROSEG_CACHE_DIR:-$(mktemp -d)} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
runs=$(mktemp -d)
step() { echo; echo "== $* ($(date +%T))"; }

step "machine"
nvidia-smi -L
$py -c "import torch, pyro; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyro', pyro.__version__, torch.cuda.get_device_name(0))"

step "1. host syncs per step"
$py benchmarks/gpu_sync_graphs.py sync --json "$out/sync.json"

step "2. the suite on the GPU (unet, prob_unet)"
$py -m benchmarks.run --device cuda --items "${SUITE_ITEMS:-overhead,throughput,data}" --models unet,prob_unet \
  --sizes 64 --merge --out benchmarks/results/gpu
cp benchmarks/results/gpu/results.json benchmarks/results/gpu/summary.md "$out/gpu/"

step "3. fit on the GPU with the data on the device, then resume"
$py -m pyroseg -v fit --model prob_unet --data synthetic-ambiguous --epochs 2 --image-size 64 --synthetic-patients 6 \
  --synthetic-slices 8 --batch-size 8 --device cuda --val-samples 2 --checkpoint-every 3 --out "$runs/pu" -q 2>&1 \
  | grep -E "training data on|Error" ; test -f "$runs/pu/checkpoint.pt" && echo "fit: OK"
$py -m pyroseg fit --resume "$runs/pu" --epochs 3 -q && echo "resume: OK"
$py -c "import csv; print([(r['epoch'], r['train_loss'], r['nonfinite_steps']) for r in csv.DictReader(open('$runs/pu/metrics.csv'))])"

if [ -z "${SKIP_GRAPHS:-}" ]; then
step "4. CUDA graphs: torch.compile(mode='reduce-overhead') of the networks, inside the Pyro step"
timeout 200 $py benchmarks/gpu_sync_graphs.py graphs --json "$out/graphs.json" || echo "graphs: stopped (exit $?)"
fi
echo; echo "== done ($(date +%T))"
