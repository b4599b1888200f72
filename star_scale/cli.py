"""`star-scale`: thin subcommands that parse arguments, load a config and call the library."""
from __future__ import annotations

import argparse
import json
import os
import sys

OVERRIDES_HELP = "config overrides as key.sub=value (value parsed as YAML), e.g. model.preset=B train.steps=100"


def cmd_train(args) -> int:
    from star_scale.config import load_config
    from star_scale.train.loop import setup_logging, train

    setup_logging()
    recipe, overrides = args.recipe, list(args.overrides)
    if recipe is not None and "=" in recipe:  # no recipe given: defaults + overrides
        recipe, overrides = None, [recipe, *overrides]
    from star_scale.parallel.launch import detect

    cfg = load_config(recipe, overrides, world_size=detect().world_size)  # layout checked before any start-up
    summary = train(cfg, recipe=recipe)
    print(json.dumps(summary))
    return 0


def model_table() -> dict:
    import torch

    from star_scale.models.gpt import GPT, GPTArgs
    from star_scale.models.presets import PAPER_DATA, PAPER_PARAMS, PRESETS

    table = {}
    for name, (layers, heads, width) in PRESETS.items():
        with torch.device("meta"):  # shapes only: no memory for 3B parameters
            model = GPT(GPTArgs(layers=layers, heads=heads, width=width, **PAPER_DATA))
        params = model.num_params()
        table[name] = {
            "layers": layers, "heads": heads, "width": width, "params": params,
            "paper_params": int(PAPER_PARAMS[name]) if name in PAPER_PARAMS else None,
            "flops_per_token_fwd": model.flops_per_token(training=False),
            "flops_per_token_train": model.flops_per_token(training=True),
        }
    return table


def cmd_model_info(args) -> int:
    table = model_table()
    if args.json:
        print(json.dumps(table, indent=1))
        return 0
    print("Presets at ImageNet 256 (16384 codes, 1000 classes, 16x16 tokens); FLOPs per token incl. attention")
    print(f"{'preset':<7}{'layers':>7}{'heads':>6}{'width':>7}{'params':>10}{'paper':>8}{'diff':>8}{'fwd GFLOP':>11}{'train GFLOP':>13}")
    for name, r in table.items():
        paper = r["paper_params"]
        diff = f"{100 * (r['params'] / paper - 1):+.2f}%" if paper else "-"
        paper_s = f"{paper / 1e6:.0f}M" if paper else "-"
        print(f"{name:<7}{r['layers']:>7}{r['heads']:>6}{r['width']:>7}{r['params'] / 1e6:>9.1f}M{paper_s:>8}{diff:>8}"
              f"{r['flops_per_token_fwd'] / 1e9:>11.3f}{r['flops_per_token_train'] / 1e9:>13.3f}")
    return 0


def cmd_import_llamagen(args) -> int:
    from star_scale.models.llamagen_import import convert_checkpoint

    try:
        summary = convert_checkpoint(args.checkpoint, args.out, heads=args.heads, grid_size=args.grid_size,
                                     trust_pickle=args.trust_pickle)
    except ValueError as e:  # not a LlamaGen c2i checkpoint, or refused: one line, exit 2
        message = "; ".join(line.strip() for line in str(e).splitlines())
        prefix = "" if message.startswith(args.checkpoint) else f"{args.checkpoint}: "
        print(f"star-scale import-llamagen: error: {prefix}{message}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=1, default=str))
    return 0


def cmd_tokenize(args) -> int:
    # The offline job is its own program (tokenize_data/); star_scale never imports it. exec, not a child:
    # a signal or kill -9 of this command must reach the process doing the work.
    sys.stdout.flush(), sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "tokenize_data", *args.rest])


def cmd_demo(args) -> int:
    from star_scale.demo.run import human_summary, run_demo
    from star_scale.train.loop import setup_logging

    setup_logging()
    summary = run_demo(args.out, steps=args.steps, dataset=args.dataset)
    print(human_summary(summary))
    return 0


# Subcommands that own their arguments: `star-scale NAME ...` runs MODULE.main(...).
PASSTHROUGH = {
    "submit": ("star_scale.slurm.submit", "render a recipe into an sbatch script and submit it to Slurm"),
    "submit-tokenize": ("star_scale.slurm.submit_tokenize", "run the offline tokenizer as a Slurm array, then a verify job"),
    "sweep": ("star_scale.sweep", "scaling-law sweeps: plan a grid, submit one Slurm array, fit L(N, D) from mlflow"),
    "export": ("star_scale.parallel.export", "export a run's newest checkpoint as single-file student.pt / teacher.pt"),
    "repro": ("star_scale.demo.repro.cli", "the paper's loss ablation at CPU scale: runs every config x seed, prints the table"),
    "plan": ("star_scale.slurm.plan", "per-GPU memory estimate of recipes' parallel layouts"),
    "sample": ("star_scale.evaluate.sample", "class-conditional samples to an ADM-format .npz + PNG grid (multi-rank, resumable)"),
    "evaluate": ("star_scale.evaluate", "FID, sFID, IS, precision/recall of an .npz against a reference batch"),
    "probe": ("star_scale.evaluate.probe", "linear-probe accuracy of a model's middle-layer features"),
    "report": ("star_scale.train.report", "a run's curves as report.png and its last values as report.md"),
}


def cmd_passthrough(args) -> int:
    import importlib

    return importlib.import_module(PASSTHROUGH[args.command][0]).main(args.rest) or 0


BENCHES = {"data": "star_scale.bench.data", "step": "star_scale.bench.step", "memory": "star_scale.bench.memory",
           "gpu": "star_scale.bench.gpu"}


def cmd_bench(args) -> int:
    import importlib

    return importlib.import_module(BENCHES[args.what]).main(args.rest) or 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-scale", description="Train ST-AR autoregressive image generators, from a laptop to Slurm clusters.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model from a YAML recipe (resumes from the run folder's latest checkpoint)")
    t.add_argument("recipe", nargs="?", help="YAML recipe, e.g. recipes/tiny-ar.yaml (omit to start from the defaults)")
    t.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    t.set_defaults(fn=cmd_train)

    m = sub.add_parser("model-info", help="print the model presets: layers, heads, width, parameters, FLOPs per token")
    m.add_argument("--json", action="store_true", help="print {preset: {params, layers, ...}} as JSON")
    m.set_defaults(fn=cmd_model_info)

    i = sub.add_parser("import-llamagen", help="convert an official LlamaGen c2i GPT checkpoint into a star-scale model file")
    i.add_argument("checkpoint", help="LlamaGen .pt (weights under model/module/state_dict, or a bare state dict)")
    i.add_argument("--out", required=True, help="star-scale model file to write")
    i.add_argument("--heads", type=int, default=None, help="attention heads (inferred from the preset table when omitted)")
    i.add_argument("--grid-size", type=int, default=16, help="tokens per side: 16 for 256px, 24 for 384px checkpoints")
    i.add_argument("--trust-pickle", action="store_true", help="unpickle the checkpoint in full if it holds more than "
                   "weights and LlamaGen's argparse.Namespace: this runs code from the file; only for files you trust")
    i.set_defaults(fn=cmd_import_llamagen)

    k = sub.add_parser("tokenize", help="offline tokenization into Zarr shards (`star-scale tokenize --help` for options)", add_help=False)
    k.add_argument("rest", nargs=argparse.REMAINDER)
    k.set_defaults(fn=cmd_tokenize)

    d = sub.add_parser("demo", help="end to end on real digits: tokenize, train tiny, sample, probe, judge, FID, report")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    d.add_argument("--steps", type=int, default=None, help="training steps (default: 1000 digits, 600 shapes)")
    d.add_argument("--dataset", choices=["digits", "shapes"], default="digits",
                   help="digits: scikit-learn's real handwritten digits (default); shapes: generated shapes")
    d.set_defaults(fn=cmd_demo)

    for name, (_, help_text) in PASSTHROUGH.items():
        sp = sub.add_parser(name, help=help_text, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(fn=cmd_passthrough)

    b = sub.add_parser("bench", help="benchmarks: `data` (loader vs raw reads), `step` (ST-AR vs AR step time), "
                                     "`memory` (ZeRO-3 per-rank memory, 2 ranks vs 1), "
                                     "`gpu` (the GPU path's table: throughput, MFU, kernels, sampling)")
    b.add_argument("what", choices=sorted(BENCHES))
    b.add_argument("rest", nargs=argparse.REMAINDER, help="options of the benchmark (--help for them)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    from star_scale.config import ConfigError
    from star_scale.parallel.launch import strip_launcher_args
    from star_scale.parallel.versions import VersionError
    from star_scale.trust import RefusedFile
    from star_scale.train.errors import RunError

    argv = strip_launcher_args(sys.argv[1:] if argv is None else list(argv))  # deepspeed adds --local_rank
    # Subcommands with their own parsers get their arguments verbatim (argparse's
    # REMAINDER would swallow a leading --help).
    if argv and argv[0] in PASSTHROUGH:
        args = argparse.Namespace(command=argv[0], rest=argv[1:], fn=cmd_passthrough)
    elif argv and argv[0] == "tokenize":
        args = argparse.Namespace(command="tokenize", rest=argv[1:], fn=cmd_tokenize)
    elif len(argv) >= 2 and argv[0] == "bench" and argv[1] in BENCHES:
        args = argparse.Namespace(command="bench", what=argv[1], rest=argv[2:], fn=cmd_bench)
    else:
        args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"star-scale: config error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, RefusedFile) as e:
        print(f"star-scale: error: {e}", file=sys.stderr)
        return 2
    except VersionError as e:
        print(f"star-scale: error: {e}", file=sys.stderr)
        return 2
    except RunError as e:  # run folder in use or unusable, a failed checkpoint write: one line
        if not e.quiet:
            print(f"star-scale: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
