#!/usr/bin/env bash
# Reproduces benchmarks/results/: the retention benchmark on a bundled reference VLM.
#   benchmarks/reference.sh [rtn_gptq|methods|ablation|validation|symmetry|scale_form|scale_grid|scale_rescore|peers|conditions|depth|smooth_alpha|all]      (MODEL=models/reference/NAME to choose;
#   WEIGHT_SCHEMES / ACT_SCHEMES narrow the methods stage, e.g. WEIGHT_SCHEMES=W3A16 ACT_SCHEMES=W4A8)
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
# Outlier scale per kind. Weight outliers: s = 32 (DESIGN.md 5). Activation outliers: s = 256, chosen from
# arithmetic before any run on it: per-token int8 has steps of max|x|/127, so with one channel 256x the
# others, typical channels fall under half a step and round to zero (s = 32 left them ~4 levels, and RTN
# W4A8 lost only 1.6 points on qwen2_vl-small, commit 3238c6f).
WEIGHT_SCALE=${WEIGHT_SCALE:-32}
ACT_SCALE=${ACT_SCALE:-256}
WEIGHT_VARIANT=$VARIANTS-weight-s$WEIGHT_SCALE
ACT_VARIANT=$VARIANTS-activation-s$ACT_SCALE
[ -f "$WEIGHT_VARIANT/config.json" ] || $TLQ stress "$MODEL" --out "$WEIGHT_VARIANT" --kind weight --scale "$WEIGHT_SCALE" --channels 4 --overwrite
[ -f "$ACT_VARIANT/config.json" ] || $TLQ stress "$MODEL" --out "$ACT_VARIANT" --kind activation --scale "$ACT_SCALE" --channels 4 --overwrite
[ -f "$DATA/val.json" ] || $TLQ synth --out "$DATA" --calib 0 --test 0 --val 500
# --asymmetric-weight-only: the committed tables were measured with asymmetric weight-only grids (the
# preset until symmetric became the default for serving, issue 12; see the symmetry stage).
COMMON=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/test.json" --seeds 0,1,2 --num-samples 128
        --asymmetric-weight-only)
METHODS=rtn,gptq,awq,smoothquant,mbq,tlq
ABLATION=tlq,tlq+weighting=uniform,tlq+weighting=modality,tlq+keep-ratio=0.5,tlq+keep-ratio=0.25,\
tlq+keep-ratio=0.1,tlq+no-exposure,tlq+target=asymmetric,tlq+floor=0,tlq+floor=0.3,tlq+backend=gptq,tlq+backend=scale,\
tlq+clip=10,tlq+importance=layer_output,tlq+importance=l2,tlq+importance=gx
# Choosing TLQ's defaults: candidates scored on the validation split (seed 3), never on the test split
# (backend and target first; the importance floor and score were added after the ablation raised them).
CANDIDATES=tlq+backend=gptq,tlq+backend=both,tlq+backend=gptq+target=asymmetric,tlq+backend=both+target=asymmetric,\
tlq+floor=0,tlq+floor=0.3,tlq+importance=l2,tlq+importance=gx
VALIDATION=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/val.json" --seeds 0,1,2 --num-samples 128)
VALIDATION_ASYM=("${VALIDATION[@]}" --asymmetric-weight-only)

# Weight-only schemes on the weight-outlier variant, weight+activation schemes on the activation-outlier
# variant (DESIGN.md 5: s = 32, k = 4): each stresses what its schemes are sensitive to.
if [ "$STAGE" = methods ] || [ "$STAGE" = all ]; then
  $TLQ bench "$WEIGHT_VARIANT" "${COMMON[@]}" --methods $METHODS --schemes "${WEIGHT_SCHEMES:-W3A16,W4A16,W2A16}" --out "$OUT/methods/weight_outliers"
  $TLQ bench "$ACT_VARIANT" "${COMMON[@]}" --methods $METHODS --schemes "${ACT_SCHEMES:-W4A8,W8A8}" --out "$OUT/methods/activation_outliers"
fi
if [ "$STAGE" = ablation ] || [ "$STAGE" = all ]; then
  $TLQ bench "$WEIGHT_VARIANT" "${COMMON[@]}" --methods $ABLATION --schemes W3A16 --out "$OUT/ablation/weight_outliers"
  $TLQ bench "$ACT_VARIANT" "${COMMON[@]}" --methods $ABLATION --schemes W4A8 --out "$OUT/ablation/activation_outliers"
fi
if [ "$STAGE" = rtn_gptq ] || [ "$STAGE" = all ]; then   # issue 3: RTN and GPTQ on the model and both variants
  $TLQ bench "$MODEL" "${COMMON[@]}" --methods rtn,gptq --schemes W3A16,W4A8 --out "$OUT/rtn_gptq/as_trained"
  $TLQ bench "$WEIGHT_VARIANT" "${COMMON[@]}" --methods rtn,gptq --schemes W3A16,W4A8 --out "$OUT/rtn_gptq/weight_outliers"
  $TLQ bench "$ACT_VARIANT" "${COMMON[@]}" --methods rtn,gptq --schemes W3A16,W4A8 --out "$OUT/rtn_gptq/activation_outliers"
fi
# Issue 12: symmetric vs asymmetric weight-only grids (the default must load in plain transformers and
# vLLM; asymmetric pack-quantized does not load with compressed-tensors 0.20), on the validation split.
SYMMETRY=gptq+no-symmetric,gptq+symmetric,tlq+no-symmetric,tlq+symmetric
if [ "$STAGE" = symmetry ]; then
  $TLQ bench "$MODEL" "${VALIDATION[@]}" --methods $SYMMETRY --schemes W4A16,W3A16 --out "$OUT/symmetry/as_trained"
  $TLQ bench "$WEIGHT_VARIANT" "${VALIDATION[@]}" --methods $SYMMETRY --schemes W4A16,W3A16 --out "$OUT/symmetry/weight_outliers"
fi
if [ "$STAGE" = validation ]; then
  $TLQ bench "$WEIGHT_VARIANT" "${VALIDATION_ASYM[@]}" --methods $CANDIDATES --schemes W3A16 --out "$OUT/validation/weight_outliers"
  $TLQ bench "$ACT_VARIANT" "${VALIDATION[@]}" --methods $CANDIDATES --schemes W4A8 --out "$OUT/validation/activation_outliers"
fi
# Issue 13: which scale candidates (x^a; x^a / w^(1-a); both) the scale search tries, on the validation
# split, seeds 0,1 (symmetric grids): as-trained W3A16, and on the large model both outlier variants.
SCALE_FORMS=awq,awq+scale-form=activation,awq+scale-form=duo,mbq,mbq+scale-form=activation,mbq+scale-form=duo,\
tlq,tlq+scale-form=activation,tlq+scale-form=duo
if [ "$STAGE" = scale_form ]; then
  SF=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/val.json" --seeds 0,1 --num-samples 128 --methods $SCALE_FORMS)
  $TLQ bench "$MODEL" "${SF[@]}" --schemes W3A16 --out "$OUT/scale_form/as_trained"
  $TLQ bench "$WEIGHT_VARIANT" "${SF[@]}" --schemes W3A16 --out "$OUT/scale_form/weight_outliers"
  $TLQ bench "$ACT_VARIANT" "${SF[@]}" --schemes W4A8 --out "$OUT/scale_form/activation_outliers"
  # The same question for AWQ + GPTQ (llm-compressor's recipe uses duo only): the search scores candidates
  # with round-to-nearest, and GPTQ runs after it.
  SFG=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/val.json" --eval-samples 500 --seeds 0,1
       --num-samples 128 --methods awq_gptq+scale-form=both,awq_gptq+scale-form=activation,awq_gptq+scale-form=duo)
  $TLQ bench "$MODEL" "${SFG[@]}" --schemes W3A16 --out "$OUT/scale_form/awq_gptq_as_trained"
  $TLQ bench "$WEIGHT_VARIANT" "${SFG[@]}" --schemes W3A16 --out "$OUT/scale_form/awq_gptq_weight_outliers"
fi
# Issue 13: which alpha values the scale search tries (alpha = 1 added; 18 or 40 steps instead of 20), for
# AWQ + GPTQ and TLQ, validation split. Run so far: qwen2_vl-small as trained, qwen2_vl-large weight outliers.
SCALE_GRID=awq_gptq,awq_gptq+scale-alpha-one,awq_gptq+scale-grid=18,awq_gptq+scale-grid=40
if [ "$STAGE" = scale_grid ]; then
  SG=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/val.json" --seeds 0,1 --num-samples 128 --schemes W3A16)
  $TLQ bench "$MODEL" "${SG[@]}" --methods $SCALE_GRID --out "$OUT/scale_grid/as_trained"
  $TLQ bench "$WEIGHT_VARIANT" "${SG[@]}" --methods $SCALE_GRID,tlq,tlq+scale-alpha-one --out "$OUT/scale_grid/weight_outliers"
fi
# Issue 13: the scale search's pick scored after GPTQ (--scale-rescore-top k: the k best candidates by round to
# nearest are solved with GPTQ and scored again), AWQ + GPTQ and TLQ, validation split, seeds 0-3.
SCALE_RESCORE=${SCALE_RESCORE:-awq_gptq,awq_gptq+scale-rescore-top=4,awq_gptq+scale-rescore-top=21,tlq,tlq+scale-rescore-top=4,tlq+scale-rescore-top=8}
if [ "$STAGE" = scale_rescore ]; then
  SR=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/val.json" --seeds "${RESCORE_SEEDS:-0,1,2,3}" --num-samples 128 --schemes W3A16)
  $TLQ bench "$MODEL" "${SR[@]}" --methods $SCALE_RESCORE --out "$OUT/scale_rescore/as_trained"
  $TLQ bench "$WEIGHT_VARIANT" "${SR[@]}" --methods $SCALE_RESCORE --out "$OUT/scale_rescore/weight_outliers"
fi
# Issue 13: tlq's methods and baselines at their strongest next to the external peers (llm-compressor 0.14,
# AutoRound 0.16, each in its own venv), the same calibration samples, one evaluator, paired bootstrap.
# Symmetric weight grids for everyone. PEER_SEEDS / PEER_EVAL narrow it.
PEER_WEIGHT_METHODS=rtn,gptq,gptq+act-order,gptq+act-order+weight-grid=mse,awq,awq_gptq,mbq,tlq,\
llmc:gptq,llmc:awq,llmc:awq_gptq,autoround
PEER_ACT_METHODS=rtn,gptq,gptq+act-order,smoothquant,smoothquant_gptq,tlq,llmc:gptq,llmc:smoothquant_gptq
PEER_W2_METHODS=rtn,gptq,gptq+act-order,awq_gptq,tlq,llmc:gptq,llmc:awq_gptq,autoround
if [ "$STAGE" = peers ]; then
  [ -x .venv-llmc/bin/python ] || benchmarks/peers/build_venvs.sh llmc
  [ -x .venv-autoround/bin/python ] || benchmarks/peers/build_venvs.sh autoround
  PEERS=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/test.json" --eval-samples "${PEER_EVAL:-1000}"
         --seeds "${PEER_SEEDS:-0,1,2}" --num-samples 128)
  .venv/bin/python benchmarks/peers/run.py --model "$MODEL" "${PEERS[@]}" --schemes W3A16 \
    --methods $PEER_WEIGHT_METHODS --out "$OUT/peers/as_trained"
  .venv/bin/python benchmarks/peers/run.py --model "$WEIGHT_VARIANT" "${PEERS[@]}" --schemes W3A16 \
    --methods $PEER_WEIGHT_METHODS --out "$OUT/peers/weight_outliers"
  .venv/bin/python benchmarks/peers/run.py --model "$ACT_VARIANT" "${PEERS[@]}" --schemes W4A8 \
    --methods $PEER_ACT_METHODS --out "$OUT/peers/activation_outliers"
  # The harder cell as trained (2 bits, groups of 64), where FP is not the ceiling for every method.
  .venv/bin/python benchmarks/peers/run.py --model "$MODEL" "${PEERS[@]}" --schemes W2A16-g64 \
    --methods $PEER_W2_METHODS --out "$OUT/peers/as_trained_w2a16_g64"
fi
# Issue 13: calibration conditions where token importance should matter (tlq synth --condition): heatmaps of
# the per-token importance, and the ablation (importance vs uniform vs modality weights, a token-level set,
# exposure off, AWQ+GPTQ as the uniform baseline) calibrated on each condition's pool, scored on the
# standard test split. The weight-outlier variant at W3A16, seeds 0,1, 500 questions.
CONDITIONS=${CONDITIONS:-standard,background,padded,multi_image,long_prompt}
CONDITION_METHODS=tlq,tlq+weighting=uniform,tlq+weighting=modality,tlq+keep-ratio=0.25,tlq+no-exposure,awq_gptq
if [ "$STAGE" = conditions ]; then
  for condition in ${CONDITIONS//,/ }; do
    pool=runs/data/cond-$condition
    [ "$condition" = standard ] && pool=$DATA
    [ -f "$pool/calib.json" ] || $TLQ synth --out "$pool" --calib 512 --test 0 --condition "$condition"
    if [ "$NAME" != "${NAME#qwen2}" ]; then
      .venv/bin/python benchmarks/importance_heatmaps.py --model "$MODEL" --calib "$pool/calib.json" --images "$pool" \
        --out "$OUT/importance_conditions/heatmap_$condition.png"
    fi
    $TLQ bench "$WEIGHT_VARIANT" --calib "$pool/calib.json" --images "$pool" --eval "$DATA/test.json" --eval-images "$DATA" \
      --eval-samples 500 --seeds 0,1 --num-samples 128 --methods $CONDITION_METHODS --schemes W3A16 \
      --out "$OUT/importance_conditions/$condition"
  done
  .venv/bin/python benchmarks/conditions_table.py "$OUT/importance_conditions"
fi
# Issue 13: the six-layer reference model (MODEL=models/reference/qwen2_vl-deep), where quantization error can
# compound over depth: does calibrating each layer on the quantized layers' outputs (exposure, the default)
# beat calibrating on FP activations (--no-exposure)? As trained at W3A16 and W2A16 g64, the activation-outlier
# variant at W4A8; 3 seeds, 1000 questions, symmetric weight grids (the default).
DEPTH_WEIGHT_METHODS=rtn,gptq,gptq+no-exposure,awq_gptq,tlq,tlq+no-exposure
DEPTH_ACT_METHODS=rtn,smoothquant_gptq,smoothquant_gptq+no-exposure,tlq,tlq+no-exposure
if [ "$STAGE" = depth ]; then
  DEPTH=(--calib "$DATA/calib.json" --images "$DATA" --eval "$DATA/test.json" --seeds 0,1,2 --num-samples 128)
  $TLQ bench "$MODEL" "${DEPTH[@]}" --methods $DEPTH_WEIGHT_METHODS --schemes W3A16,W2A16-g64 --out "$OUT/depth/as_trained"
  $TLQ bench "$ACT_VARIANT" "${DEPTH[@]}" --methods $DEPTH_ACT_METHODS --schemes W4A8 --out "$OUT/depth/activation_outliers"
fi
# Issue 13: tlq's SmoothQuant strength (0.5, the SmoothQuant paper's) against llm-compressor's default (0.8) on
# the validation split, activation-outlier variant, W4A8 and W8A8, seeds 0,1.
if [ "$STAGE" = smooth_alpha ]; then
  $TLQ bench "$ACT_VARIANT" "${VALIDATION[@]}" --seeds 0,1 --schemes W4A8,W8A8 \
    --methods smoothquant,smoothquant+smooth-alpha=0.8,smoothquant_gptq,smoothquant_gptq+smooth-alpha=0.8 \
    --out "$OUT/validation/smooth_alpha"
fi
