"""Why can tlq's AWQ lose to RTN at W3A16 when its grid contains alpha = 0 (RTN's own weights)?

For decoder layer 0 of a reference model, for every alpha of the scale grid, this scores the scaled and
fake-quantized group (q,k,v after input_layernorm; gate,up after post_attention_layernorm; everything
else in full precision) three ways on the calibration tokens:
  linear  - the squared error of the group's own Linear outputs (what tlq's scale search minimized
            until the block objective replaced it, docs/design-notes.md);
  block   - the squared error of the module the group feeds (the attention output for q,k,v, the MLP
            output for gate,up: what the AWQ paper and llm-compressor's AWQ minimize);
  layer   - the relative error of the whole decoder layer's output.
and splits `block` into image and text tokens. Writes results.json and table.md under
benchmarks/results/NAME/awq_objective/.

    .venv/bin/python benchmarks/awq_objective.py [--model models/reference/qwen2_vl-small] [--scheme W3A16]
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from tlq.activations import capture_layer_inputs, layer_output, to_device
from tlq.api import prepare_samples
from tlq.data import load_records
from tlq.models import IMAGE, load_model
from tlq.models.processing import load_processor
from tlq.quant.primitives import fake_quant_weight
from tlq.quant.scaling import apply_scales
from tlq.recipe import Recipe, parse_scheme

GROUPS = {"qkv": ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn"),
          "gate_up": ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp")}


def _capture(layer, inputs, names):
    """Per sample: each named module's input (Linears: the tensor; blocks: args and kwargs), and the output."""
    store = {name: [] for name in names}
    hooks = []
    for name in names:
        def hook(module, args, kwargs, name=name):
            store[name].append((args, kwargs))
        hooks.append(layer.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
    outputs = []
    with torch.no_grad():
        for hidden, kwargs in zip(inputs.hidden, inputs.kwargs):
            outputs.append(layer_output(layer(hidden, **to_device(kwargs, "cpu"))))
    for h in hooks:
        h.remove()
    return store, outputs


def _block_out(module, call):
    args, kwargs = call
    out = module(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def score_group(layer, inputs, kinds, group: str, scheme, grid: int = 20) -> list[dict]:
    source_name, targets, block_name = GROUPS[group]
    calls, fp_outputs = _capture(layer, inputs, [targets[0], block_name])
    x = torch.cat([args[0].reshape(-1, args[0].shape[-1]) for args, _ in calls[targets[0]]]).float()
    magnitude = x.abs().mean(0).clamp_min(1e-8)
    fp_block = [_block_out(layer.get_submodule(block_name), call) for call in calls[block_name]]
    fp_weights = torch.cat([layer.get_submodule(t).weight.float() for t in targets])
    image = torch.cat(kinds) == IMAGE
    rows = []
    for step in range(grid):
        alpha = step / grid
        scales = magnitude.pow(alpha)
        scales = scales / (scales.max() * scales.min()).sqrt() if alpha else torch.ones_like(magnitude)
        trial = copy.deepcopy(layer)
        modules = [trial.get_submodule(t) for t in targets]
        apply_scales(trial.get_submodule(source_name), modules, scales)
        for module in modules:
            module.weight.data = fake_quant_weight(module.weight.data, scheme).weight.to(module.weight.dtype)
        q = torch.cat([m.weight.float() for m in modules])
        linear = float(((x / scales) @ q.T - x @ fp_weights.T).pow(2).mean(-1).sum())
        # The block sees the scaled input through the rescaled norm: rerun the layer to get its calls.
        trial_calls, trial_out = _capture(trial, inputs, [block_name])
        block = torch.cat([(_block_out(trial.get_submodule(block_name), c) - f).pow(2).mean(-1).reshape(-1)
                           for c, f in zip(trial_calls[block_name], fp_block)])
        layer_err = torch.cat([(a - b).reshape(-1) for a, b in zip(trial_out, fp_outputs)]).norm() / torch.cat(
            [b.reshape(-1) for b in fp_outputs]).norm()
        rows.append({"alpha": alpha, "linear": linear, "block": float(block.sum()),
                     "block_image": float(block[image].sum()), "block_text": float(block[~image].sum()),
                     "layer_relative_error": float(layer_err)})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/reference/qwen2_vl-small")
    parser.add_argument("--calib", default="runs/data/vqa/calib.json")
    parser.add_argument("--images", default="runs/data/vqa")
    parser.add_argument("--scheme", default="W3A16")
    parser.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=False,
                        help="grid symmetry (default: asymmetric, as in the demo that raised the question)")
    parser.add_argument("--num-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    scheme = parse_scheme(args.scheme, symmetric=args.symmetric)
    model, adapter = load_model(args.model, dtype="float32")
    recipe = Recipe(num_samples=args.num_samples, seed=args.seed)
    records = load_records(args.calib, args.images, recipe.num_samples, recipe.seed)
    samples = prepare_samples(model, adapter, load_processor(args.model), args.calib, args.images, recipe,
                              records=records)
    inputs = capture_layer_inputs(model, adapter, samples, torch.device("cpu"))
    layer = adapter.layers(model)[0]
    kinds = [s.token_kinds for s in samples]
    results = {"model": args.model, "scheme": scheme.to_dict(), "samples": len(samples), "seed": args.seed,
               "layer": 0, "groups": {g: score_group(layer, inputs, kinds, g, scheme) for g in GROUPS}}
    out = Path("benchmarks/results") / Path(args.model).name / "awq_objective"
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    lines = [f"{args.model}, layer 0, {scheme.name} ({'symmetric' if scheme.symmetric else 'asymmetric'}), "
             f"{len(samples)} calibration samples (seed {args.seed}); each loss relative to alpha = 0 (RTN)", ""]
    for group, rows in results["groups"].items():
        base = rows[0]
        best_linear = min(rows, key=lambda r: r["linear"])
        best_block = min(rows, key=lambda r: r["block"])
        lines += [f"### {group}: the linear objective picks alpha {best_linear['alpha']:.2f}, the block objective "
                  f"{best_block['alpha']:.2f}", "",
                  "| alpha | linear | block | block, image tokens | block, text tokens | layer rel. error |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['alpha']:.2f} | {r['linear'] / base['linear']:.3f} | {r['block'] / base['block']:.3f} | "
                         f"{r['block_image'] / max(base['block_image'], 1e-30):.3f} | "
                         f"{r['block_text'] / max(base['block_text'], 1e-30):.3f} | {r['layer_relative_error']:.5f} |")
        lines.append("")
    (out / "table.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
