"""`star-scale bench gpu`: the GPU path measured by one command (`make gpu-check` wraps it).

Prints one table, section by section:

  train      B, L, XL presets (full depth when `plan` says it fits, else halved), AR and ST-AR, bf16,
             32 images per step (ST-AR: 2 views; AR: 64 sequences): tokens/s, MFU against the GPU's
             spec-sheet peak ("unknown" for an unlisted GPU), allocator peak GiB vs `plan`'s estimate
  attention  the MIM student's masked attention, head sizes 64 (B..XL) and 100 (3B), per backend
             (SDPA memory-efficient, SDPA math, FlexAttention): forward + backward ms, max error vs an
             fp32 math reference; then the backend the trainer picks on this device (it times the
             same candidates once at a small shape and logs the pick)
  sampling   KV-cache generation of preset B at CFG 2.0: images/s for batch sizes 32..256
  zero3      one ST-AR step of DeepSpeed ZeRO-3 as a world of 1 (NCCL), in its own process
  tests      `pytest -m gpu tests/gpu` (bf16 vs fp32 loss, cached vs uncached generation,
             FlexAttention vs SDPA, flash-attn vs SDPA when installed)

Without a CUDA device it runs a reduced size (tiny preset, short sequences, fp32) so the
command cannot rot, and its last line says so: ``bench gpu: reduced CPU run (no CUDA device)``.
The model benches need torch only; zero3 reports "skipped" without DeepSpeed/megatron-core.
Every section has a time budget (7.5 minutes in all, ``SECTION_ENDS_S``). The exit status is 1 when
anything did not pass: a failed zero3 step, CUDA tests that failed, erred, timed out, collected
nothing or skipped every test on a GPU, or a row left out past its budget.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

from star_scale.bench import gpu_rows, gpu_zero3
from star_scale.models import attention

ROOT = Path(__file__).resolve().parents[2]
# Each section's end, in seconds from the start: the GPU run stays under 8 minutes with cold compile
# caches by design.  In-process sections stop starting rows at theirs (a row in flight finishes), the
# two subprocesses are killed at theirs; time a section leaves unused goes to the later ones.  A row or
# test that did not run fails the bench (rerun: compile caches are warm then, or --skip a section).
SECTION_ENDS_S = {"train": 120, "attention": 210, "sampling": 240, "zero3": 300, "tests": 450}
OVER_BUDGET = "not run: past the section's time budget"


def gpu_tests(timeout: float, cuda: bool, tests: Path = ROOT / "tests" / "gpu") -> tuple[bool, str]:
    """(passed, what to print) of ``pytest -m gpu`` on ``tests``.  Only a clean exit passes, and on CUDA
    only with at least one test passed: a timeout, an error, nothing collected or every test skipped
    fails the bench.  Without CUDA the tests skip themselves, and that passes."""
    if not tests.is_dir():
        return not cuda, f"{'failed' if cuda else 'skipped'}: {tests.name} not found (run from a checkout)"
    try:
        import pytest  # noqa: F401
    except ImportError:
        return not cuda, f"{'failed' if cuda else 'skipped'}: pytest not installed"
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", str(tests)]
    try:
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"failed: no result within {timeout:.0f}s"
    summary = [line for line in out.stdout.splitlines() if re.search(r"\d+ (passed|failed|skipped|errors?|deselected)", line)]
    text = summary[-1].strip("= ") if summary else f"exit {out.returncode}"
    passed = re.search(r"(\d+) passed", text)
    if out.returncode == 0 and (passed or not cuda):
        return True, text
    if out.returncode:
        sys.stdout.write(out.stdout[-4000:] + out.stderr[-2000:])
    why = "no tests collected" if out.returncode == 5 else f"exit {out.returncode}" if out.returncode else "nothing passed"
    return False, f"failed: {text} ({why})"


def _gib(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.1f}"


def table(device: torch.device, train, attn, picks, sampling, zero3, tests) -> list[tuple[str, str, str]]:
    rows = []
    for r in train:
        if r.get("over_budget"):
            rows.append(("train", f"{r['preset']} {r['objective']}", OVER_BUDGET))
            continue
        mfu = "unknown" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        rows.append(("train", f"{r['preset']} {r['objective']} ({r['layers']} layers, {r['sequences']} seq)",
                     f"{r['tokens_per_s']:,.0f} tok/s  MFU {mfu}  mem {_gib(r['memory_gib'])} GiB"
                     f" / plan {_gib(r['plan_gib'])} GiB  ({1e3 * r['step_s']:.0f} ms/step)"))
    for r in attn:
        result = OVER_BUDGET if r.get("over_budget") else r["error"] if "error" in r else \
            f"{r['ms']:.3f} ms  max err {r['max_err']:.2e}"
        rows.append(("attention", f"head {r['head_dim']} {r['backend']}", result))
    for d, pick in picks.items():
        rows.append(("attention", f"head {d} picked", pick))
    for r in sampling:
        rows.append(("sampling", f"CFG 2.0 batch {r['batch']}",
                     OVER_BUDGET if r.get("over_budget") else f"{r['images_per_s']:.1f} images/s"))
    if zero3.get("status") == "ok":
        rows.append(("zero3", f"world 1 {zero3['backend']} {zero3['device']}",
                     f"ok: ZeRO-{zero3['zero_stage']} step {zero3['step_s']:.2f} s, losses "
                     + ", ".join(f"{v:.4f}" for v in zero3["losses"])))
    else:
        rows.append(("zero3", "world 1", f"{zero3.get('status')}: {zero3.get('reason', '')}"))
    rows.append(("tests", "pytest -m gpu", tests))
    return rows


def header(device: torch.device) -> str:
    name = gpu_rows.device_name(device)
    cuda = f", CUDA {torch.version.cuda}" if device.type == "cuda" else ""
    return (f"bench gpu on {name}{cuda}: torch {torch.__version__}, Python {platform.python_version()}, "
            f"{'bf16' if device.type == 'cuda' else 'fp32'}")


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(prog="star-scale bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reduced", action="store_true", help="the reduced CPU size even on a GPU")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out (train,attention,sampling,zero3,tests)")
    p.add_argument("--json", default=None, help="also write every measurement to this JSON file")
    args = p.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    unknown = skip - {"train", "attention", "sampling", "zero3", "tests"}
    if unknown:
        p.error(f"--skip: unknown sections {sorted(unknown)}")
    # On CPU FlexAttention runs its eager reference; its advice to compile is noise in the table.
    warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    size = gpu_rows.CPU_SIZE if args.reduced or not cuda else gpu_rows.GPU_SIZE
    t0 = time.perf_counter()
    start = time.monotonic()
    until = {k: start + v for k, v in SECTION_ENDS_S.items()}

    def left(section: str) -> float:  # a subprocess's timeout
        return max(10.0, until[section] - time.monotonic())
    print(header(device), flush=True)
    train = [] if "train" in skip else gpu_rows.train_rows(size, device, until["train"])
    attn = [] if "attention" in skip else gpu_rows.attention_rows(size, device, until["attention"])
    dtype = torch.bfloat16 if cuda else torch.float32
    picks = {} if "attention" in skip else {d: OVER_BUDGET if gpu_rows.past(until["attention"])
                                            else attention.pick_masked(device, d, dtype) for d in size.head_dims}
    sampling = [] if "sampling" in skip else gpu_rows.sampling_rows(size, device, until["sampling"])
    zero3 = {"status": "skipped", "reason": "--skip"} if "zero3" in skip else gpu_zero3.run(left("zero3"))
    tests_ok, tests = (True, "skipped: --skip") if "tests" in skip else gpu_tests(left("tests"), cuda)
    rows = table(device, train, attn, picks, sampling, zero3, tests)
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    print(f"{'section':<{w0}}  {'case':<{w1}}  result")
    for a, b, c in rows:
        print(f"{a:<{w0}}  {b:<{w1}}  {c}")
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header(device), "train": train, "attention": attn,
                                               "picks": picks, "sampling": sampling, "zero3": zero3,
                                               "tests": tests}, indent=1))
    print(f"total {time.perf_counter() - t0:.0f} s")
    not_run = any(r.get("over_budget") for r in train + attn + sampling) or OVER_BUDGET in picks.values()
    failed = zero3.get("status") == "failed" or not tests_ok or not_run
    if size is gpu_rows.CPU_SIZE:
        print("bench gpu: reduced CPU run (no CUDA device)" if not cuda else "bench gpu: reduced run (--reduced)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
