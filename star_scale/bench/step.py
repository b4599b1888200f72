"""`star-scale bench step`: time per training step of `objective: star` against `objective: ar`.

Both run on the same model and the same number of sequences: AR on 2B
sequences of one view, ST-AR on B images x 2 views (its student and teacher
both see all 2B sequences).  A step is the full ``LocalEngine.train_step``
(forward, backward, clipping, AdamW, and for ST-AR the EMA teacher update) on
random tokens.  The two are timed interleaved (ar, star, ar, star, ...) after
warm-up steps, and the medians are compared.  The ideal ratio is about 4/3
(one extra teacher forward per sequence, no output head); the target is
<= 1.40.

``--rope`` instead times one ST-AR engine with RoPE as one complex multiply (what
eager mode runs) against the real form on strided halves (what compiled code runs),
interleaved, and prints ``ratio rope-complex/real = X`` (step time; below 1 is faster).

Default configurations: ``tiny`` (the tiny preset) and ``B-2L`` (B's width
and heads, 2 layers), both with the paper's data shape (16384 codes, 16x16
grid, 1000 classes).  The last printed line is ``ratio star/ar = X``, X being
the largest ratio over the configurations run.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Optional

import torch

from star_scale.config import Config
from star_scale.models.build import build_model
from star_scale.objectives.module import build_training_module
from star_scale.train.local_engine import LocalEngine

# name -> (layers, heads, width, images per step B)
CONFIGS = {
    "tiny": (2, 4, 64, 4),
    "B-2L": (2, 12, 768, 2),
    "small": (4, 4, 128, 4),
}


def make_config(objective: str, layers: int, heads: int, width: int, sequences: int, device: str) -> Config:
    cfg = Config(name=f"bench-{objective}")
    cfg.model.layers, cfg.model.heads, cfg.model.width = layers, heads, width
    cfg.objective.name = objective
    cfg.train.device, cfg.train.precision = device, "auto"
    cfg.data.global_batch = sequences  # one micro-batch per step
    return cfg.validate()


def build_engine(cfg: Config, seed: int) -> LocalEngine:
    torch.manual_seed(seed)
    model = build_model(cfg)
    return LocalEngine(build_training_module(cfg, model), cfg)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(cfg: Config, n: int, views: int, gen: torch.Generator) -> tuple:
    t = cfg.model.grid_size ** 2
    return (torch.randint(0, cfg.model.vocab_size, (n, views, t), generator=gen),
            torch.randint(0, cfg.model.num_classes, (n,), generator=gen))


def _interleaved_medians(steps: dict, *, reps: int, warmup: int, device: torch.device) -> dict:
    """Median seconds of each named step, run interleaved (a, b, a, b, ...) after ``warmup`` rounds."""
    times: dict = {k: [] for k in steps}
    for rep in range(warmup + reps):
        for kind, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if rep >= warmup:
                times[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_config(name: str, layers: int, heads: int, width: int, images: int, *, reps: int, warmup: int,
                 device: str, seed: int = 0) -> dict:
    ar_cfg = make_config("ar", layers, heads, width, 2 * images, device)
    star_cfg = make_config("star", layers, heads, width, images, device)
    engines = {"ar": build_engine(ar_cfg, seed), "star": build_engine(star_cfg, seed)}
    gen = torch.Generator().manual_seed(seed)
    inputs = {"ar": _random_batch(ar_cfg, 2 * images, 1, gen), "star": _random_batch(star_cfg, images, 2, gen)}
    med = _interleaved_medians({k: (lambda k=k: engines[k].train_step(*inputs[k])) for k in engines},
                               reps=reps, warmup=warmup, device=engines["ar"].device)
    ar, star = med["ar"], med["star"]
    return {"name": name, "layers": layers, "heads": heads, "width": width, "images": images,
            "sequences": 2 * images, "tokens": ar_cfg.model.grid_size ** 2, "ar_s": ar, "star_s": star,
            "ratio": star / ar, "device": str(engines["ar"].device)}


def bench_rope(name: str, layers: int, heads: int, width: int, images: int, *, reps: int, warmup: int,
               device: str, seed: int = 0) -> dict:
    """Median ST-AR step time with each RoPE form, interleaved on one engine (same weights, same inputs)."""
    from star_scale.models import gpt

    cfg = make_config("star", layers, heads, width, images, device)
    engine = build_engine(cfg, seed)
    batch = _random_batch(cfg, images, 2, torch.Generator().manual_seed(seed))
    forms = {"complex": gpt.apply_rope,
             "real": lambda x, table: gpt.rope_real(x.float(), table).type_as(x)}

    def step_with(form):
        def step():
            gpt.apply_rope = form  # Attention.forward looks the function up at each call
            engine.train_step(*batch)
        return step

    try:
        med = _interleaved_medians({k: step_with(f) for k, f in forms.items()}, reps=reps, warmup=warmup,
                                   device=engine.device)
    finally:
        gpt.apply_rope = forms["complex"]
    return {"name": name, "complex_s": med["complex"], "real_s": med["real"], "ratio": med["complex"] / med["real"],
            "device": str(engine.device)}


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(
        prog="star-scale bench step",
        description="Time per training step of objective star vs objective ar on the same model and the "
                    "same number of sequences (AR: 2B sequences x 1 view; ST-AR: B images x 2 views); "
                    "interleaved repetitions, medians, printed as a ratio (ideal ~4/3, target <= 1.40).")
    p.add_argument("--configs", default="tiny,B-2L",
                   help=f"comma-separated configurations out of {', '.join(CONFIGS)} (default: tiny,B-2L)")
    p.add_argument("--images", type=int, default=None,
                   help="images B per ST-AR step (AR gets 2B sequences); default: per configuration "
                        f"({', '.join(f'{k} {v[3]}' for k, v in CONFIGS.items())})")
    p.add_argument("--reps", type=int, default=7, help="timed steps of each objective (default 7)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps of each objective first (default 2)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="default: cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--rope", action="store_true", help="instead: ST-AR step time with RoPE as one complex multiply "
                   "(eager mode) vs the real form (compiled code); last line `ratio rope-complex/real = X`")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names:
        p.error(f"--configs: unknown {unknown}; expected some of {list(CONFIGS)}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")

    if args.rope:
        return _print_rope(names, args)
    worst = 0.0
    for name in names:
        layers, heads, width, images = CONFIGS[name]
        r = bench_config(name, layers, heads, width, args.images or images,
                         reps=args.reps, warmup=args.warmup, device=args.device)
        print(f"{name}: {r['layers']} layers x {r['heads']} heads x width {r['width']}, T={r['tokens']}, "
              f"{r['sequences']} sequences per step, {r['device']}, median of {args.reps}")
        ar_label = f"ar   ({r['sequences']} seq x 1 view)"
        star_label = f"star ({r['images']} img x 2 views)"
        width = max(len(ar_label), len(star_label))
        print(f"  {ar_label:<{width}} {1e3 * r['ar_s']:9.1f} ms/step")
        print(f"  {star_label:<{width}} {1e3 * r['star_s']:9.1f} ms/step")
        print(f"  {name} ratio star/ar = {r['ratio']:.3f}")
        worst = max(worst, r["ratio"])
    print(f"ratio star/ar = {worst:.3f}")
    return 0


def _print_rope(names: list[str], args) -> int:
    worst = 0.0
    for name in names:
        layers, heads, width, images = CONFIGS[name]
        r = bench_rope(name, layers, heads, width, args.images or images, reps=args.reps, warmup=args.warmup,
                       device=args.device)
        print(f"{name}: star, {r['device']}, median of {args.reps}: RoPE complex {1e3 * r['complex_s']:.1f} ms/step, "
              f"real {1e3 * r['real_s']:.1f} ms/step, ratio {r['ratio']:.3f}")
        worst = max(worst, r["ratio"])
    print(f"ratio rope-complex/real = {worst:.3f}")
    return 0


if __name__ == "__main__":
    main()
