"""Command line: `tlq quantize | demo` (also `python -m tlq ...`).

Every user mistake ends in one line on stderr and exit status 2, never a traceback; a failed run
leaves no output directory behind (export writes to a temporary sibling and renames at the end).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tlq.errors import TlqError
from tlq.recipe import METHODS, SCHEMES, Recipe


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", default="gptq", help=f"calibration algorithm: {', '.join(METHODS)} (default gptq)")
    parser.add_argument("--scheme", default="W4A16", help=f"{', '.join(SCHEMES)}; add -gN for a group size")
    parser.add_argument("--group-size", type=int, default=None, help="override the scheme's group (0 = per channel)")
    parser.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None,
                        help="override the scheme's weight symmetry")
    parser.add_argument("--num-samples", type=int, default=128, help="calibration records to use (default 128)")
    parser.add_argument("--seed", type=int, default=0, help="chooses the calibration subset (default 0)")
    parser.add_argument("--max-length", type=int, default=2048, help="truncate samples to this many tokens")
    parser.add_argument("--dampening", type=float, default=0.01, help="GPTQ damping, fraction of mean diag(H)")
    parser.add_argument("--block-size", type=int, default=128, help="GPTQ lazy-update block width")
    parser.add_argument("--act-order", action="store_true", help="GPTQ act-order (static groups)")
    parser.add_argument("--no-true-sequential", dest="true_sequential", action="store_false",
                        help="observe all Linears of a layer in one pass instead of group by group")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")


def _recipe_from(args: argparse.Namespace) -> Recipe:
    return Recipe(method=args.method, scheme=args.scheme, group_size=args.group_size, symmetric=args.symmetric,
                  num_samples=args.num_samples, seed=args.seed, max_length=args.max_length,
                  dampening=args.dampening, block_size=args.block_size, act_order=args.act_order,
                  true_sequential=args.true_sequential, device=args.device)


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tlq.api import quantize

    recipe = _recipe_from(args)
    report = quantize(args.model_dir, args.out, calib=args.calib, images=args.images, recipe=recipe,
                      overwrite=args.overwrite, progress=not args.quiet, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code)
    errors = ", ".join(f"{r.relative_error:.4f}" for r in report.calibration.layers)
    print(f"wrote {report.out_dir} ({report.num_samples} samples, {report.num_tokens} tokens, "
          f"{report.seconds:.1f} s); layer output errors: {errors}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tlq.demo import run_demo

    run_demo(Path(args.out), device=args.device, quick=args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tlq", description="Post-training quantization for vision-language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each layer")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="calibrate a VLM and write a compressed-tensors checkpoint")
    q.add_argument("model_dir", help="local Hugging Face checkpoint folder")
    q.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    q.add_argument("--calib", required=True, help="ShareGPT4V-style JSON/JSONL calibration conversations")
    q.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    q.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_recipe_arguments(q)
    q.set_defaults(func=_cmd_quantize)

    d = sub.add_parser("demo", help="quantize a small bundled model end to end and print the results")
    d.add_argument("--out", default="demo_out", help="folder for the demo's data, checkpoints and table")
    d.add_argument("--device", default="auto")
    d.add_argument("--quick", action="store_true", help="fewer samples (for smoke tests)")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' load/save bars
    if getattr(args, "quiet", False):
        os.environ["TQDM_DISABLE"] = "1"
    try:
        return args.func(args)
    except TlqError as exc:
        print(f"tlq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
