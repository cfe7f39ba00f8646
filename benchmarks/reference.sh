#!/usr/bin/env bash
# Reproduces benchmarks/results/: the retention benchmark on a bundled reference VLM.
#   benchmarks/reference.sh [rtn_gptq|methods|ablation|all]      (MODEL=models/reference/NAME to choose)
# Calibration pool (seed 1) and test split (seed 2) come from `tlq synth`; every cell is mean/std over
# calibration seeds 0,1,2 (each draws 128 samples from the pool). Reruns skip finished cells.
set -euo pipefail
cd "$(dirname "$0")/.."
TLQ=${TLQ:-.venv/bin/tlq}
MODEL=${MODEL:-models/reference/qwen2_vl-small}
NAME=$(basename "$MODEL")
DATA=runs/data/vqa
VARIANTS=runs/variants/$NAME
OUT=benchmarks/results/$NAME
STAGE=${1:-all}

[ -f "$DATA/test.json" ] || $TLQ synth --out "$DATA" --calib 512 --test 1000
for kind in weight activation both; do
  [ -f "$VARIANTS-$kind/config.json" ] || $TLQ stress "$MODEL" --out "$VARIANTS-$kind" --kind "$kind" --scale 32 --channels 4
done
COMMON=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/test.json" --seeds 0,1,2 --num-samples 128)

if [ "$STAGE" = rtn_gptq ] || [ "$STAGE" = all ]; then   # issue 3: room for calibration to show
  for model in "$MODEL" "$VARIANTS-weight" "$VARIANTS-activation"; do
    $TLQ bench "$model" "${COMMON[@]}" --methods rtn,gptq --schemes W3A16,W4A8 --out "$OUT/rtn_gptq/$(basename "$model")"
  done
fi
if [ "$STAGE" = methods ] || [ "$STAGE" = all ]; then    # issue 4: every method, every scheme
  $TLQ bench "$VARIANTS-both" "${COMMON[@]}" --methods rtn,gptq,awq,smoothquant,mbq,tlq \
    --schemes W3A16,W4A8,W4A16,W8A8,W2A16 --out "$OUT/methods"
fi
if [ "$STAGE" = ablation ] || [ "$STAGE" = all ]; then   # issue 4: what TLQ's parts are worth
  $TLQ bench "$VARIANTS-both" "${COMMON[@]}" --schemes W3A16,W4A8 --out "$OUT/ablation" --methods \
tlq,tlq+weighting=uniform,tlq+weighting=modality,tlq+keep-ratio=0.5,tlq+keep-ratio=0.25,tlq+keep-ratio=0.1,\
tlq+no-exposure,tlq+target=asymmetric,tlq+floor=0,tlq+floor=0.3
fi
