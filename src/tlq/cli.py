"""Command line: `tlq quantize | demo` (also `python -m tlq ...`).

Every user mistake ends in one line on stderr and exit status 2, never a traceback; a failed run
leaves no output directory behind (export writes to a temporary sibling and renames at the end).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import sys
from pathlib import Path

from tlq.errors import RankFailure, TlqError, one_line
from tlq.recipe import Recipe


_FLAG_TYPES = {"int": int, "int | None": int, "float": float, "float | None": float, "str": str}


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Recipe field (tlq.recipe.knob), named after it; defaults stay in the Recipe, so a flag
    that is not given leaves the field as the recipe file (--recipe) or the Recipe default has it."""
    parser.add_argument("--recipe", default=None, metavar="FILE",
                        help="start from a saved recipe (a tlq_recipe.json); flags given as well override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    defaults = Recipe()
    for spec in dataclasses.fields(Recipe):
        if "help" not in spec.metadata:
            continue
        meta, default = spec.metadata, getattr(defaults, spec.name)
        target = parser if not meta["group"] else groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flags = [f"--{spec.name.replace('_', '-')}", *meta["aliases"]]
        shown = "" if default is None or "default" in meta["help"] else f" (default {default})"
        if spec.type in ("bool", "bool | None"):
            target.add_argument(*flags, dest=spec.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                                help=meta["help"] + shown)
            continue
        choices = f": {', '.join(map(str, meta['choices']))}" if meta["choices"] else ""
        target.add_argument(*flags, dest=spec.name, type=_FLAG_TYPES[spec.type], default=argparse.SUPPRESS,
                            metavar=spec.name.split("_")[-1].upper(), help=f"{meta['help']}{choices}{shown}")


def _recipe_from(args: argparse.Namespace) -> Recipe:
    given = {spec.name: getattr(args, spec.name) for spec in dataclasses.fields(Recipe) if hasattr(args, spec.name)}
    if getattr(args, "recipe", None) is None:
        return Recipe(**given)
    return Recipe.from_dict({**Recipe.load(args.recipe).to_dict(), **given})


def _cmd_quantize(args: argparse.Namespace) -> int:
    from tlq.api import quantize

    recipe = _recipe_from(args)
    if not args.dist_timeout > 0:
        raise TlqError(f"--dist-timeout must be > 0 seconds, got {args.dist_timeout}")
    main_rank = int(os.environ.get("RANK", "0")) == 0

    def notify(line: str, warning: bool) -> None:  # where the scheme runs: always the warnings, else unless --quiet
        if main_rank and (warning or not args.quiet):
            print(line, file=sys.stderr, flush=True)

    report = quantize(args.model_dir, args.out, calib=args.calib, images=args.images, recipe=recipe,
                      overwrite=args.overwrite, progress=not args.quiet, dtype=args.dtype,
                      trust_remote_code=args.trust_remote_code, resume=args.resume,
                      dist_timeout_s=args.dist_timeout, lazy=args.lazy, offload_dir=args.offload_dir,
                      confine_images=not args.allow_outside_images, tp=_tp_sizes(args.tp), notify=notify)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    errors = ", ".join(f"{r.relative_error:.4f}" for r in report.calibration.layers)
    print(f"wrote {report.out_dir} ({report.num_samples} samples, {report.num_tokens} tokens, "
          f"{report.seconds:.1f} s); layer output errors: {errors}")
    return 0


def _positive(value: int | None, option: str) -> None:
    if value is not None and value < 1:
        raise TlqError(f"{option} must be >= 1, got {value}")


def _check_file_out(out: str, option: str, inputs: dict[str, str | None]) -> None:
    from tlq.guards import check_disjoint, check_file_output

    check_file_output(out, option)
    check_disjoint({option: out}, inputs)


def _tp_sizes(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        sizes = tuple(int(part) for part in _split(text))
    except ValueError:
        raise TlqError(f"--tp takes comma-separated tensor-parallel sizes, e.g. 2,4; got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise TlqError(f"--tp sizes must be >= 1, got {text!r}")
    return sizes


def _cmd_eval(args: argparse.Namespace) -> int:
    from tlq.activations import resolve_device
    from tlq.evaluate import evaluate

    _positive(args.num_samples, "--num-samples")
    _positive(args.batch_size, "--batch-size")
    resolve_device(args.device)
    if args.out is not None:
        _check_file_out(args.out, "--out", {"the model folder": args.model_dir, "--data": args.data,
                                            "--images": args.images, "--reference": args.reference})
    report = evaluate(args.model_dir, args.data, images=args.images, reference=args.reference,
                      num_samples=args.num_samples, batch_size=args.batch_size, device=args.device, out=args.out,
                      confine_images=not args.allow_outside_images)
    print(json.dumps(report, indent=2))
    return 0


def _cmd_importance(args: argparse.Namespace) -> int:
    from tlq.api import prepare
    from tlq.data import load_records
    from tlq.distributed import rank_device, ranks_from_environment, shutdown
    from tlq.activations import resolve_device
    from tlq.importance import GRADIENT_PASSES, compute_importance
    from tlq.models import adapter_for, read_model_type
    from tlq.models.weights import check_weight_files
    from tlq.phases import PhaseClock

    recipe = Recipe(num_samples=args.num_samples, seed=args.seed, max_length=args.max_length,
                    importance_score=args.score, device=args.device)
    adapter_for(read_model_type(args.model_dir))
    resolve_device(args.device)
    _check_file_out(args.out, "--out", {"the model folder": args.model_dir, "--calib": args.calib,
                                        "--images": args.images})
    check_weight_files(args.model_dir)
    records = load_records(args.calib, args.images, recipe.num_samples, recipe.seed,
                           confine=not args.allow_outside_images)
    ranks = ranks_from_environment(args.device)  # under torchrun each rank takes a shard of the samples
    prepared = prepare(Path(args.model_dir), Path(args.calib), args.images and Path(args.images), records, recipe,
                       ranks, PhaseClock(), dtype=args.dtype)  # the same step 1 as `tlq quantize`
    importance = compute_importance(prepared.model, prepared.adapter, prepared.samples, args.score,
                                    resolve_device(rank_device(ranks, args.device)),
                                    streamed=GRADIENT_PASSES[args.importance_pass], ranks=ranks)
    shutdown(ranks)
    if not ranks.main:
        return 0
    importance.save_atomic(args.out)
    kinds = importance.kept_summary()
    print(f"wrote {args.out}: {args.score} scores of {len(importance.scores)} modules over "
          f"{len(prepared.samples)} samples ({', '.join(f'{v} {k}' for k, v in kinds.items())} tokens); "
          f"FP answer loss {importance.loss:.4f}")
    return 0


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _cmd_bench(args: argparse.Namespace) -> int:
    from tlq.bench import BenchConfig, run_bench

    try:
        seeds = [int(s) for s in _split(args.seeds)]
    except ValueError:
        raise TlqError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    for path in (args.calib, args.eval):
        if not Path(path).is_file():
            raise TlqError(f"{path} does not exist: pass a ShareGPT4V-style JSON file")
    from tlq.guards import check_disjoint, check_output_location

    check_output_location(args.out)
    check_disjoint({"--out": args.out}, {"the model folder": args.model_dir, "--calib": args.calib,
                                         "--images": args.images, "--eval": args.eval,
                                         "--eval-images": args.eval_images})
    cfg = BenchConfig(model_dir=args.model_dir, calib=args.calib, eval_data=args.eval, out_dir=args.out,
                      calib_images=args.images, eval_images=args.eval_images or args.images,
                      methods=_split(args.methods), schemes=_split(args.schemes), seeds=seeds,
                      num_samples=args.num_samples, eval_samples=args.eval_samples, device=args.device,
                      keep_checkpoints=args.keep_checkpoints, asymmetric_weight_only=args.asymmetric_weight_only)
    results = run_bench(cfg)
    from tlq.bench import markdown_table

    print(markdown_table(results))
    print(f"results in {Path(args.out) / 'results.json'}, table.md, chart.png")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from tlq.data.synthetic import write_splits

    for name, path in write_splits(args.out, calib=args.calib, test=args.test, val=args.val,
                                   condition=args.condition).items():
        print(f"{name}: {path}")
    return 0


def _cmd_stress(args: argparse.Namespace) -> int:
    from tlq.models import adapter_for, read_model_type
    from tlq.reference.stress import make_variant

    from tlq.guards import check_disjoint, check_output_location

    adapter_for(read_model_type(args.model_dir))
    check_output_location(args.out)
    check_disjoint({"--out": args.out}, {"the model folder": args.model_dir})
    out = make_variant(args.model_dir, args.out, args.kind, args.scale, args.channels, args.seed, args.overwrite)
    print(f"wrote {args.kind}-outlier variant to {out}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from tlq.models import adapter_for, read_model_type
    from tlq.plan import format_plan, method_plan_inputs, model_shape, parse_size, plan_memory
    from tlq.recipe import parse_scheme
    from tlq.serving import check_tp, serving_lines, serving_shape

    adapter_for(read_model_type(args.model_dir))  # an unsupported architecture is refused first
    scheme = parse_scheme(args.scheme, args.group_size, args.symmetric)
    in_features, row_parallel, experts = serving_shape(args.model_dir)
    line, warnings = serving_lines(scheme, in_features, row_parallel, experts)
    check_tp(scheme, in_features, row_parallel, _tp_sizes(args.tp))
    plan = plan_memory(model_shape(args.model_dir), args.devices, parse_size(args.device_memory), args.samples,
                       args.tokens_per_sample, dtype_bytes=2 if args.dtype in ("bfloat16", "float16") else 4,
                       asymmetric=args.target == "asymmetric", lazy=args.lazy, **method_plan_inputs(args.method))
    plan["serving"] = {"runs": line, "warnings": warnings}
    print(json.dumps(plan, indent=2) if args.json else "\n".join([format_plan(plan), line] + [
        f"warning: {w}" for w in warnings]))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from tlq.demo import run_demo

    run_demo(Path(args.out), device=args.device, quick=args.quick)
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse's mistakes (unknown flag, a word where a number goes) as one line, like every other refusal."""

    def error(self, message: str):
        print(f"tlq: error: {self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="tlq", description="Post-training quantization for vision-language models")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each layer")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_OneLineParser)

    q = sub.add_parser("quantize", help="calibrate a VLM and write a compressed-tensors checkpoint")
    q.add_argument("model_dir", help="local Hugging Face checkpoint folder")
    q.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    q.add_argument("--calib", required=True, help="ShareGPT4V-style JSON/JSONL calibration conversations")
    q.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    q.add_argument("--trust-remote-code", action="store_true", help="allow the checkpoint's own Python code")
    q.add_argument("--quiet", action="store_true", help="no progress bar")
    q.add_argument("--no-resume", dest="resume", action="store_false",
                   help="do not keep finished layers in OUT.tlq-work/ (by default a rerun after a crash resumes)")
    q.add_argument("--lazy", action="store_true",
                   help="read decoder layers from the checkpoint one at a time (host RAM ~ one layer, not the model)")
    q.add_argument("--offload-dir", default=None,
                   help="keep per-sample activations in files under this folder instead of host RAM")
    q.add_argument("--allow-outside-images", action="store_true",
                   help="let records name images outside the --images folder (absolute paths, .., symlinks)")
    q.add_argument("--tp", default=None,
                   help="tensor-parallel sizes you will serve with, e.g. 2,4: refused now if the group size "
                        "cannot be split that way")
    q.add_argument("--dist-timeout", type=float, default=1800.0,
                   help="under torchrun: seconds a rank waits for the others before giving up (default 1800)")
    _add_recipe_arguments(q)
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="exact-match accuracy, answer NLL and KL to a reference model")
    e.add_argument("model_dir", help="checkpoint folder (FP or tlq output)")
    e.add_argument("--data", required=True, help="ShareGPT4V-style JSON/JSONL with reference answers")
    e.add_argument("--images", default=None, help="folder the records' image paths are relative to")
    e.add_argument("--reference", default=None, help="FP checkpoint to measure answer KL against")
    e.add_argument("--num-samples", type=int, default=None, help="evaluate only the first N records")
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--device", default="cpu")
    e.add_argument("--out", default=None, help="also write the JSON report here")
    e.add_argument("--allow-outside-images", action="store_true",
                   help="let records name images outside the --images folder")
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("importance", help="per-token, per-Linear gradient importance (safetensors)")
    i.add_argument("model_dir")
    i.add_argument("--calib", required=True)
    i.add_argument("--images", default=None)
    i.add_argument("--out", required=True, help="output .safetensors file")
    i.add_argument("--score", default="fisher", help="fisher, l2, gx, layer_output")
    i.add_argument("--importance-pass", default="auto", choices=["auto", "streamed", "full"],
                   help="full (autograd through the whole model), streamed (one layer on the device), "
                        "auto (full when it fits)")
    i.add_argument("--num-samples", type=int, default=128)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--max-length", type=int, default=2048)
    i.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    i.add_argument("--device", default="auto")
    i.add_argument("--allow-outside-images", action="store_true",
                   help="let records name images outside the --images folder")
    i.set_defaults(func=_cmd_importance)

    b = sub.add_parser("bench", help="methods x schemes x seeds: quantize, evaluate, tabulate")
    b.add_argument("model_dir")
    b.add_argument("--calib", required=True, help="calibration pool (each seed draws --num-samples from it)")
    b.add_argument("--images", default=None, help="image folder of the calibration pool")
    b.add_argument("--eval", required=True, help="held-out evaluation split")
    b.add_argument("--eval-images", default=None, help="image folder of the evaluation split (default --images)")
    b.add_argument("--methods", default="rtn,gptq",
                   help="comma-separated; options per method as +flag=value, e.g. tlq+keep-ratio=0.25")
    b.add_argument("--schemes", default="W3A16,W4A8")
    b.add_argument("--seeds", default="0,1,2")
    b.add_argument("--num-samples", type=int, default=128)
    b.add_argument("--eval-samples", type=int, default=None)
    b.add_argument("--device", default="auto")
    b.add_argument("--keep-checkpoints", action="store_true")
    b.add_argument("--asymmetric-weight-only", action="store_true",
                   help="weight-only cells with asymmetric grids (how the committed tables were measured)")
    b.add_argument("--out", required=True, help="folder for results.json, table.md, chart.png")
    b.set_defaults(func=_cmd_bench)

    g = sub.add_parser("synth", help="write the procedural image-question splits (calibration and test)")
    g.add_argument("--out", required=True)
    g.add_argument("--calib", type=int, default=512, help="calibration pool size")
    g.add_argument("--test", type=int, default=1000, help="held-out test split size")
    g.add_argument("--val", type=int, default=0, help="validation split size (seed 3; for choosing options)")
    g.add_argument("--condition", default="standard",
                   help="how the calibration pool is drawn: standard, background (mostly-background large images), "
                        "padded (letterboxed), multi_image (a distractor image first), long_prompt (unrelated "
                        "questions first), video (4-frame clips: video records for the Qwen-VL families); "
                        "tlq.data.synthetic.CONDITIONS says exactly")
    g.set_defaults(func=_cmd_synth)

    o = sub.add_parser("stress", help="write a function-preserving outlier variant of a checkpoint (benchmarks)")
    o.add_argument("model_dir")
    o.add_argument("--out", required=True)
    o.add_argument("--kind", choices=["weight", "activation", "both"], required=True)
    o.add_argument("--scale", type=float, default=32.0)
    o.add_argument("--channels", type=int, default=4)
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    o.set_defaults(func=_cmd_stress)

    p = sub.add_parser("plan", help="per-rank memory estimate of a calibration run, from config.json alone")
    p.add_argument("model_dir", help="checkpoint folder (only config.json is read)")
    p.add_argument("--devices", type=int, default=1, help="number of ranks / GPUs (default 1)")
    p.add_argument("--device-memory", default="24GiB", help="memory per device, e.g. 24GiB, 80GB (default 24GiB)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default 128)")
    p.add_argument("--tokens-per-sample", type=int, default=1024, help="tokens per sample (default 1024)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--target", default="symmetric", choices=["symmetric", "asymmetric"],
                   help="symmetric or asymmetric (keeps an FP stream)")
    p.add_argument("--lazy", action="store_true", help="plan a `tlq quantize --lazy` run")
    p.add_argument("--method", default="tlq", help="calibration method (TLQ and MBQ run the gradient pass; "
                                                    "default tlq)")
    p.add_argument("--scheme", default="W4A16", help="scheme to check serving support for (default W4A16)")
    p.add_argument("--group-size", type=int, default=None, help="override the scheme's group")
    p.add_argument("--symmetric", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--tp", default=None, help="tensor-parallel sizes to check the group size against, e.g. 2,4")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.set_defaults(func=_cmd_plan)

    d = sub.add_parser("demo", help="quantize a small bundled model end to end and print the results")
    d.add_argument("--out", default="demo_out", help="folder for the demo's data, checkpoints and table")
    d.add_argument("--device", default="auto")
    d.add_argument("--quick", action="store_true", help="fewer samples (for smoke tests)")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a one-line mistake (2)
        return int(exc.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' load/save bars
    if getattr(args, "quiet", False) or (args.command != "quantize" and not args.verbose):
        os.environ["TQDM_DISABLE"] = "1"  # library progress bars; our commands print their own lines
    signal.signal(signal.SIGTERM, _terminate)
    try:
        return args.func(args)
    except Terminated:
        print("tlq: terminated (a rerun of the same command resumes)", file=sys.stderr)
        return 143
    except RankFailure as exc:
        # A broken process group aborts the interpreter when it is destroyed at exit (gloo): leave
        # without running destructors, after the message is out. The work directory stays for resume.
        print(f"tlq: error: {exc}", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except TlqError as exc:
        print(f"tlq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tlq: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: a bug in tlq, still one line unless -v
        if args.verbose:
            raise
        print(f"tlq: internal error: {type(exc).__name__}: {one_line(exc)} (a bug in tlq: rerun with -v for the "
              f"traceback and report it)", file=sys.stderr)
        return 1


class Terminated(BaseException):
    """SIGTERM, raised where the process is, so `finally` blocks remove temporary output."""


def _terminate(signum, frame):
    raise Terminated()


if __name__ == "__main__":
    sys.exit(main())
