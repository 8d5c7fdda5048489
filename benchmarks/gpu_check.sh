#!/usr/bin/env bash
# Everything this project checks on a machine with one GPU, in one go (~3 minutes):
#   1. bf16 vs fp32 training throughput (benchmarks/gpu_ddp_bf16.py) at 128x128, batch 32 and 128;
#   2. the same step inside DDP on one nccl rank (what the wrapper costs);
#   3. `pyroseg fit` under torchrun on the GPU (nccl), resumed under torchrun and on one
#      process, then evaluated; and a plain `fit` next to a torchrun one for unet.
# Usage: bash benchmarks/gpu_check.sh OUT_DIR   (pyroseg importable: pip install -e . or PYTHONPATH)
set -uo pipefail
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYROSEG_CACHE_DIR=${PYROSEG_CACHE_DIR:-$(mktemp -d)} PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
runs=$(mktemp -d)
tiny=(--image-size 64 --synthetic-patients 6 --synthetic-slices 8 --batch-size 8 --device cuda --val-samples 2 -q)
step() { echo; echo "== $*"; }

step "machine"
nvidia-smi -L
$py -c "import torch, pyro; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'pyro', pyro.__version__, torch.cuda.get_device_name(0))"

if [ -z "${SKIP_BENCH:-}" ]; then  # SKIP_BENCH=1: only the fit checks (section 3)
step "1. throughput, batch 32"
$py benchmarks/gpu_ddp_bf16.py --batch-size 32 --json "$out/gpu_bf16_b32.json"
step "1. throughput, batch 128"
$py benchmarks/gpu_ddp_bf16.py --batch-size 128 --json "$out/gpu_bf16_b128.json"

step "2. the same inside DDP, one nccl rank, batch 32"
$py -m torch.distributed.run --standalone --nproc_per_node 1 benchmarks/gpu_ddp_bf16.py --ddp \
  --models unet,prob_unet --precisions fp32,bf16 --batch-size 32 --json "$out/gpu_ddp1_b32.json"

fi

step "3. fit under torchrun on the GPU (nccl), resume under torchrun and on one process, evaluate"
$py -m torch.distributed.run --standalone --nproc_per_node 1 -m pyroseg -v fit --model prob_unet --epochs 2 \
  --out "$runs/pu" "${tiny[@]}" && echo "fit: OK"
$py -m torch.distributed.run --standalone --nproc_per_node 1 -m pyroseg -v fit --resume "$runs/pu" --epochs 3 -q \
  && echo "torchrun resume: OK"
$py -m pyroseg fit --resume "$runs/pu" --epochs 4 -q && echo "one-process resume: OK"
$py -m pyroseg evaluate "$runs/pu" --device cuda && echo "evaluate: OK"
$py -c "import json; print(json.load(open('$runs/pu/config.json'))['distributed'])"

step "3. unet: plain fit vs torchrun fit on the GPU"
$py -m pyroseg fit --model unet --epochs 2 --out "$runs/u1" "${tiny[@]}"
$py -m torch.distributed.run --standalone --nproc_per_node 1 -m pyroseg fit --model unet --epochs 2 --out "$runs/u2" "${tiny[@]}"
$py -m pyroseg fit --model unet --epochs 2 --out "$runs/u3" "${tiny[@]}"  # plain again: the GPU's own run-to-run spread
$py - "$runs/u1" "$runs/u2" "$runs/u3" <<'EOF'
import sys, torch
u1, u2, u3 = (torch.load(f"{d}/checkpoint.pt", weights_only=True, map_location="cpu")["model_state"] for d in sys.argv[1:])
diff = lambda a, b: max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
print(f"unet max |diff|: plain vs torchrun(1) {diff(u1, u2):.3g}; plain vs plain again {diff(u1, u3):.3g}")
EOF
cp "$runs/pu/metrics.csv" "$out/prob_unet_ddp_metrics.csv" 2>/dev/null
echo; echo "== done"
