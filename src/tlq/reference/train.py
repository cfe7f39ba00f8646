"""Train tlq's reference VLMs from scratch on the procedural image-question data.

    python -m tlq.reference.train --family qwen2_vl --scale small --minutes 40 --focus digit --focus-after 0.5 --vision-lr-scale 4 --out DIR

Fresh examples are drawn every step (no epoch, no overfitting), up to five questions per image, loss on the
answers only. The run stops at the time budget or the step limit, keeps the checkpoint with the best
validation accuracy (teacher-forced answer token, on a split from another seed), and writes
`training.json` with the seed, command, time and accuracy. `--grow-from N` trains N text layers first and
grows them to the scale's depth part-way through (`deepen_state`; models/reference/attempts/README.md).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from tlq.data.batching import collate
from tlq.data.conversations import render_messages
from tlq.data.synthetic import SceneConfig, make_example, to_record, vocabulary
from tlq.reference.checkpoint import (
    FAMILIES,
    ModelSize,
    build_model_and_processor,
    save_checkpoint,
)

SCALES = {
    # DESIGN.md section 5: the small Qwen2-VL shape learned this task in ~10 CPU minutes.
    "small": ModelSize(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vision_hidden=64,
                       vision_layers=2, vision_heads=2, patch=8, image_size=128),
    # hidden 256 so that a 128-column quantization group is a real group (two per row). Two text layers:
    # with four, Qwen2-VL ran 3374 steps in 60 CPU minutes and reached only 0.82 held-out (notes in
    # models/reference/attempts/README.md); two cut a Qwen2-VL step to ~0.75 s (LLaVA-OneVision, ~0.92 s,
    # passed 0.94 held-out with them; Qwen2-VL still did not: attempts/README.md).
    "large": ModelSize(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vision_hidden=96,
                       vision_layers=2, vision_heads=2, patch=8, image_size=128),
    # Issue 13: depth, so that quantization error can accumulate over layers and exposure can show (or fail
    # to show) an effect. The small widths keep a step affordable with six text layers on two cores.
    "deep": ModelSize(hidden=128, intermediate=256, layers=6, heads=4, kv_heads=2, vision_hidden=64,
                      vision_layers=2, vision_heads=2, patch=8, image_size=128),
}
# AdamW moves every weight by about the learning rate per step, so a wider model's outputs move more per
# step: at width 256, 2e-3 sat at 0.72 validation for 1000 steps where 1e-3 passed 0.80 by step 200.
DEFAULT_LR = {"small": 2e-3, "large": 1e-3, "deep": 2e-3}
TRAIN_SCENES = SceneConfig(questions_per_image=5, one_per_type=False)
# Curriculum: half the training images are the bare 4x4-cell scene (no background, fewer tokens), which
# teaches grounding fast; the other half are full canvases like the held-out splits.
ZOOMED_SCENES = SceneConfig(grid=4, scene=4, questions_per_image=5, one_per_type=False)
ZOOMED_SHARE = 0.5
# A later stage can focus on what the model still gets wrong (--focus digit): half of each batch becomes
# bare scenes that always hold the focus item and ask only about it (all of their loss is on the weak
# type), the other half stays the normal mix so the other skills are not forgotten.
FOCUS_SHARE = 0.5
VALIDATION_SEED = 999
# Parameter names of the vision tower and its projector (Qwen2-VL / Qwen2.5-VL, LLaVA-OneVision).
VISION_MODULES = ("visual.", "vision_tower.", "multi_modal_projector.")


def size_for(family: str, scale: str) -> ModelSize:
    size = SCALES[scale]
    if family == "llava_onevision":
        # SigLIP has no patch merger: a 16 px patch is one image token, one cell of the scene grid.
        size = replace(size, patch=16)
    return size


def _sample(rng: np.random.Generator, processor, config: SceneConfig):
    from PIL import Image

    canvas, qas = make_example(rng, config)
    record = to_record("image.png", qas, "train")
    from tlq.data.conversations import _to_messages

    messages = _to_messages(record, 1, "generated")
    return render_messages(messages, [Image.fromarray(canvas)], processor)


def _training_batch(processor, pad_id: int, batch_seed: tuple[int, int], scenes: list[SceneConfig]):
    """One collated training batch; its images come from a generator seeded by (seed, step) alone, so the
    batch is the same whether it is drawn here or in the background process."""
    rng = np.random.default_rng(batch_seed)
    return collate([_sample(rng, processor, scene) for scene in scenes], pad_id)


# The background process's own processor (built once per process by _start_worker).
_WORKER: dict = {}


def _start_worker(family: str, scale: str) -> None:
    torch.set_num_threads(1)
    _, processor = build_model_and_processor(family, vocabulary(), size_for(family, scale))
    _WORKER.update(processor=processor, pad_id=processor.tokenizer.pad_token_id)


def _worker_batch(batch_seed: tuple[int, int], scenes: list[SceneConfig]):
    return _training_batch(_WORKER["processor"], _WORKER["pad_id"], batch_seed, scenes)


class _BatchSource:
    """Draws training batches inline, or one step ahead in a spawned process (--data-workers 1): drawing
    and tokenizing 32 images is 15-30% of a CPU step, which this overlaps where a core is spare (on the
    2-core machine, with 2 compute threads, it was no faster: models/reference/attempts/README.md)."""

    def __init__(self, family: str, scale: str, processor, pad_id: int, workers: int):
        self.processor, self.pad_id, self.pending = processor, pad_id, None
        self.pool = None
        if workers:
            import multiprocessing

            self.pool = multiprocessing.get_context("spawn").Pool(1, _start_worker, (family, scale))

    def next(self, batch_seed: tuple[int, int], scenes: list[SceneConfig], following: tuple) -> tuple:
        """The batch for (batch_seed, scenes); `following` is the (seed, scenes) of the step after it."""
        if self.pool is None:
            return _training_batch(self.processor, self.pad_id, batch_seed, scenes)
        batch = (self.pending.get() if self.pending is not None
                 else _training_batch(self.processor, self.pad_id, batch_seed, scenes))
        self.pending = self.pool.apply_async(_worker_batch, following)
        return batch

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()


def answer_accuracy(model, batches) -> float:
    """Fraction of answer tokens (the word and its end-of-turn) predicted exactly, teacher-forced."""
    correct = total = 0
    with torch.no_grad():
        for inputs, labels in batches:
            logits = model(**inputs).logits[:, :-1]
            target = labels[:, 1:]
            mask = target != -100
            correct += int((logits.argmax(-1)[mask] == target[mask]).sum())
            total += int(mask.sum())
    return correct / max(total, 1)


def make_optimizer(model: torch.nn.Module, lr: float, vision_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """AdamW with two parameter groups, the language model and the vision tower (with its projector); each
    group's `lr_scale` multiplies the scheduled rate, so the vision tower can learn faster than the text."""
    def is_vision(name: str) -> bool:
        return any(module in name for module in VISION_MODULES)

    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not is_vision(n)], "lr_scale": 1.0},
              {"params": [p for n, p in named if is_vision(n)], "lr_scale": vision_lr_scale}]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.01, betas=(0.9, 0.98))


def deepen_state(state: dict, adapter, from_layers: int, to_layers: int) -> dict:
    """The state dict of a `to_layers`-deep text model grown from a `from_layers`-deep one: deep layer j is
    a copy of shallow layer j * from_layers // to_layers. The Linears that write into the residual stream
    (each of the adapter's blocks' output) are divided by the number of copies, so the deep model starts as
    k smaller steps along each shallow layer's update: close to the shallow model's function, not equal (the
    copies see slightly different inputs), with every weight at a trained magnitude."""
    if to_layers % from_layers:
        raise ValueError(f"cannot grow {from_layers} layers into {to_layers}: use a divisor of {to_layers}")
    copies = to_layers // from_layers
    prefix = adapter.decoder_layers + "."
    writers = tuple(block.output + "." for block in adapter.blocks)
    grown = {}
    for name, tensor in state.items():
        if not name.startswith(prefix):  # not a text decoder layer
            grown[name] = tensor
            continue
        index, _, rest = name[len(prefix):].partition(".")
        for copy in range(copies):
            value = tensor.clone()
            if rest.startswith(writers):
                value /= copies
            grown[f"{prefix}{int(index) * copies + copy}.{rest}"] = value
    return grown


def _grown(model, family: str, size: ModelSize, seed: int, from_layers: int):
    """The `size`-deep model grown from the trained shallow `model` (deepen_state), in training mode."""
    from tlq.models import adapter_for

    deep, _ = build_model_and_processor(family, vocabulary(), size, seed=seed)
    adapter = adapter_for(deep.config.model_type)
    deep.load_state_dict(deepen_state(model.state_dict(), adapter, from_layers, size.layers))
    return deep.train()


def _validate(model, batches) -> float:
    model.eval()
    accuracy = answer_accuracy(model, batches)
    model.train()
    return accuracy


def train(family: str, scale: str, out_dir: Path, minutes: float, max_steps: int, batch_size: int, lr: float,
          seed: int, threads: int, init: Path | None = None, focus: tuple[str, ...] = (),
          focus_after: float = 0.0, data_workers: int = 0, vision_lr_scale: float = 1.0,
          grow_from: int = 0, grow_at: float = 0.35) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    size = size_for(family, scale)
    start_size = replace(size, layers=grow_from) if grow_from else size
    model, processor = build_model_and_processor(family, vocabulary(), start_size, seed=seed)
    if init is not None:  # continue from an earlier stage (same family and scale; with --grow-from, that depth)
        from tlq.models import load_model

        model.load_state_dict(load_model(init, dtype="float32")[0].state_dict())
    pad_id = processor.tokenizer.pad_token_id
    model.train()
    rng = np.random.default_rng(seed)
    val_rng = np.random.default_rng(VALIDATION_SEED)
    val_batches = [collate([_sample(val_rng, processor, TRAIN_SCENES) for _ in range(32)], pad_id) for _ in range(4)]
    focus_scenes = replace(ZOOMED_SCENES, always_ask=focus, questions_per_image=1,
                           digit_probability=1.0 if "digit" in focus else ZOOMED_SCENES.digit_probability)
    focus_batches = [collate([_sample(val_rng, processor, focus_scenes) for _ in range(32)], pad_id)] if focus else []
    optimizer = make_optimizer(model, lr, vision_lr_scale)
    budget = minutes * 60
    start = time.perf_counter()
    best, best_step, step, history = -1.0, 0, 0, []
    warmup, warmup_start, grown_at_step = 100, 0, None

    def scenes_for(progress: float) -> list[SceneConfig]:
        scenes = [ZOOMED_SCENES if rng.random() < ZOOMED_SHARE else TRAIN_SCENES for _ in range(batch_size)]
        if focus and progress >= focus_after:
            scenes[:int(batch_size * FOCUS_SHARE)] = [focus_scenes] * int(batch_size * FOCUS_SHARE)
        return scenes

    source = _BatchSource(family, scale, processor, pad_id, data_workers)
    scenes = scenes_for(0.0)
    while step < max_steps and time.perf_counter() - start < budget:
        progress = min(1.0, max((time.perf_counter() - start) / budget, step / max_steps))
        if grow_from and grown_at_step is None and progress >= grow_at:
            model = _grown(model, family, size, seed, grow_from)
            optimizer = make_optimizer(model, lr, vision_lr_scale)  # fresh moments for the new layers
            # Only the deep model's checkpoints count; a warm-up again, as the moments restart from zero.
            best, warmup_start, grown_at_step = -1.0, step, step
            history.append({"step": step, "grown_to_layers": size.layers,
                            "val_answer_token_accuracy": round(_validate(model, val_batches), 4)})
            print(json.dumps(history[-1]), flush=True)
        scale_lr = min(1.0, (step - warmup_start + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"] * max(scale_lr, 0.02)
        # The next step's scenes are chosen now (with this step's progress) so a background process can
        # draw them while this step computes.
        next_scenes = scenes_for(progress)
        inputs, labels = source.next((seed, step), scenes, ((seed, step + 1), next_scenes))
        scenes = next_scenes
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if step % 100 == 0:
            model.eval()
            accuracy = answer_accuracy(model, val_batches)
            entry = {"step": step, "seconds": round(time.perf_counter() - start, 1), "loss": round(loss.item(), 4),
                     "val_answer_token_accuracy": round(accuracy, 4)}
            if focus_batches:  # progress on the weak type alone (bare scenes), for the log
                entry["val_focus_accuracy"] = round(answer_accuracy(model, focus_batches), 4)
            model.train()
            history.append(entry)
            print(json.dumps(history[-1]), flush=True)
            if accuracy > best:
                best, best_step = accuracy, step
                model.eval()
                save_checkpoint(model, processor, out_dir)
                model.train()
    source.close()
    seconds = time.perf_counter() - start
    params = sum(p.numel() for p in model.parameters())  # after any growth: the saved model's count
    info = {
        "family": family, "scale": scale, "size": asdict(size), "parameters": params, "seed": seed,
        "steps": step, "best_step": best_step, "batch_size": batch_size, "learning_rate": lr,
        "training_seconds": round(seconds, 1), "threads": threads,
        "val_answer_token_accuracy": round(best, 4), "validation_seed": VALIDATION_SEED,
        "init": str(init) if init else None, "focus": list(focus), "focus_after": focus_after,
        "data_workers": data_workers, "vision_lr_scale": vision_lr_scale,
        "grow_from_layers": grow_from or None, "grow_at": grow_at if grow_from else None,
        "grown_at_step": grown_at_step,
        "torch": torch.__version__,
        "command": " ".join(["python -m tlq.reference.train", *sys.argv[1:]]),
        "history": history,
    }
    out_dir.mkdir(parents=True, exist_ok=True)  # a run shorter than one validation saved no checkpoint
    (out_dir / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", required=True, choices=FAMILIES)
    parser.add_argument("--scale", default="small", choices=sorted(SCALES))
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--minutes", type=float, default=12.0)
    parser.add_argument("--max-steps", type=int, default=100_000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: by scale, "
                        + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items()) + ")")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--init", type=Path, default=None, help="start from this checkpoint (a second stage)")
    parser.add_argument("--focus", default="", help="question types always asked when possible, e.g. digit")
    parser.add_argument("--focus-after", type=float, default=0.0,
                        help="start the focus once this share of the time/step budget is spent (default 0)")
    parser.add_argument("--data-workers", type=int, default=0, choices=[0, 1],
                        help="1: draw the next batch in a background process while this step computes")
    parser.add_argument("--vision-lr-scale", type=float, default=1.0,
                        help="the vision tower's learning rate as a multiple of --lr (default 1)")
    parser.add_argument("--grow-from", type=int, default=0,
                        help="train this many text layers first, then grow to the scale's depth (default: off)")
    parser.add_argument("--grow-at", type=float, default=0.35,
                        help="with --grow-from: grow once this share of the budget is spent (default 0.35; 0 grows "
                        "an --init model of that depth at once)")
    args = parser.parse_args(argv)
    focus = tuple(t for t in args.focus.split(",") if t)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.scale]
    info = train(args.family, args.scale, args.out, args.minutes, args.max_steps, args.batch_size, lr,
                 args.seed, args.threads, args.init, focus, args.focus_after, args.data_workers,
                 args.vision_lr_scale, args.grow_from, args.grow_at)
    print(f"done: {info['steps']} steps in {info['training_seconds']} s, best val accuracy "
          f"{info['val_answer_token_accuracy']} at step {info['best_step']}")


if __name__ == "__main__":
    main()
