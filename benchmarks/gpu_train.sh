#!/usr/bin/env bash
# A short, large GPU run of the current best design: `sar` (a causal context network over
# the clean bytes, a small per-step network over a chunk's beliefs), one joint 256-way
# output per byte, chunks of 1, 2 and 4 bytes mixed in training, the continuous-time loss
# plus the t = 0 cross-entropy (--aux-ce 1). d_model 512 x 8 layers (26M parameters),
# 1024 bytes of context, batch 64 x 1024 bytes, 8 minutes; then the EMA weights are
# exported to OUT/weights.pt.
#
#   benchmarks/gpu_train.sh                 # one GPU -> runs/gpu_sar (OUT=folder to change it)
#   NPROC=4 benchmarks/gpu_train.sh         # 4 GPUs of one machine: torchrun, one rank per GPU
#   DRY_RUN=1 benchmarks/gpu_train.sh       # the same design, tiny, on the CPU (about a minute)
#
# The dry run trains 5 steps, resumes the run on the CPU for 2 more, exports the weights
# and loads them. Extra arguments go to the first bfn-train (e.g. --minutes 20).
set -euo pipefail

DESIGN=(--arch sar --output bytes --chunk-len 4 --chunk-lens 1,2,4 --beta1 4 --loss continuous --aux-ce 1.0)

if [ "${DRY_RUN:-0}" = 1 ]; then
    OUT=${OUT:-$(mktemp -d)/gpu_sar_dry}
    bfn-train "$OUT" "${DESIGN[@]}" --d-model 32 --n-layers 1 --n-heads 2 --step-d-model 16 --step-layers 2 \
        --context-len 64 --batch-size 4 --lr 6e-4 --max-steps 5 --device cpu --threads 1 "$@"
    bfn-train "$OUT" --max-steps 7 --device cpu --threads 1          # resumes (the checkpoint's config)
    python - "$OUT/log.jsonl" <<'EOF'
import json, sys
steps = [json.loads(line)["step"] for line in open(sys.argv[1])]
assert steps == [0, 5, 7], f"logged steps {steps}, expected [0, 5, 7]"
EOF
    bfn-train "$OUT" --export "$OUT/weights.pt"
    python -c "import sys; from bfn_codec.model import load_weights; load_weights(sys.argv[1])" "$OUT/weights.pt"
    echo "dry run passed: $OUT (trained 5 steps, resumed to 7, exported, loaded)"
    exit 0
fi

OUT=${OUT:-runs/gpu_sar}
NPROC=${NPROC:-1}
LAUNCH=(bfn-train)
if [ "$NPROC" -gt 1 ]; then
    LAUNCH=(torchrun --nproc_per_node "$NPROC" --no-python bfn-train)
fi
"${LAUNCH[@]}" "$OUT" --device cuda "${DESIGN[@]}" --d-model 512 --n-layers 8 --n-heads 8 \
    --step-d-model 128 --step-layers 2 --context-len 1024 --batch-size 64 --lr 6e-4 \
    --minutes 8 --eval-minutes 2 --ckpt-minutes 2 --threads 4 "$@"
bfn-train "$OUT" --export "$OUT/weights.pt"
python -c "import sys; from bfn_codec.model import load_weights; print(load_weights(sys.argv[1])[0].cfg)" "$OUT/weights.pt"
