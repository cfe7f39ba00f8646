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
for kind in weight activation; do
  [ -f "$VARIANTS-$kind/config.json" ] || $TLQ stress "$MODEL" --out "$VARIANTS-$kind" --kind "$kind" --scale 32 --channels 4
done
COMMON=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/test.json" --seeds 0,1,2 --num-samples 128)
METHODS=rtn,gptq,awq,smoothquant,mbq,tlq
ABLATION=tlq,tlq+weighting=uniform,tlq+weighting=modality,tlq+keep-ratio=0.5,tlq+keep-ratio=0.25,\
tlq+keep-ratio=0.1,tlq+no-exposure,tlq+target=asymmetric,tlq+floor=0,tlq+backend=both

# Weight-only schemes on the weight-outlier variant, weight+activation schemes on the activation-outlier
# variant (DESIGN.md 5: s = 32, k = 4): each stresses what its schemes are sensitive to.
if [ "$STAGE" = methods ] || [ "$STAGE" = all ]; then
  $TLQ bench "$VARIANTS-weight" "${COMMON[@]}" --methods $METHODS --schemes W3A16,W4A16,W2A16 --out "$OUT/methods/weight_outliers"
  $TLQ bench "$VARIANTS-activation" "${COMMON[@]}" --methods $METHODS --schemes W4A8,W8A8 --out "$OUT/methods/activation_outliers"
fi
if [ "$STAGE" = ablation ] || [ "$STAGE" = all ]; then
  $TLQ bench "$VARIANTS-weight" "${COMMON[@]}" --methods $ABLATION --schemes W3A16 --out "$OUT/ablation/weight_outliers"
  $TLQ bench "$VARIANTS-activation" "${COMMON[@]}" --methods $ABLATION --schemes W4A8 --out "$OUT/ablation/activation_outliers"
fi
if [ "$STAGE" = rtn_gptq ] || [ "$STAGE" = all ]; then   # the model as trained (variants: see methods/)
  $TLQ bench "$MODEL" "${COMMON[@]}" --methods rtn,gptq --schemes W3A16,W4A8 --out "$OUT/as_trained"
fi
