"""Export a run's newest whole checkpoint as single-file models for sampling: student.pt and teacher.pt.

    python -m star_scale.parallel.export RUN_DIR_OR_CHECKPOINTS_DIR --out DIR

Assembles the per-rank shards of a distributed checkpoint (any layout), one
tensor at a time, or reads the engine state of a single-process one; needs no
process group, no DeepSpeed.
The files are star-scale's model format (``models/model_file.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


from star_scale.config import load_config
from star_scale.models.build import gpt_args
from star_scale.models.gpt import GPT, GPTArgs
from star_scale.models.model_file import load_strict, save_model_file
from star_scale.parallel.consolidated import from_shards, is_distributed
from star_scale.train.checkpoint import CheckpointDir
from star_scale.trust.load import load_torch

log = logging.getLogger(__name__)


def _prefixed(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix) and not k.endswith("_extra_state")}


def newest_whole(path: Path) -> Path:
    """The newest checkpoint folder under a run dir or checkpoints dir that verifies."""
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ckpts = CheckpointDir(root)
    for step in reversed(ckpts.steps()):
        problem = ckpts.verify(step)
        if problem is None:
            return ckpts.path(step)
        log.warning("skipping damaged checkpoint: %s", problem)
    raise FileNotFoundError(f"no whole checkpoint under {root}")


def load_models(ckpt: Path) -> dict[str, GPT]:
    """{'student': GPT, 'teacher': GPT (ST-AR runs only)} from one checkpoint folder."""
    meta = json.loads((ckpt / "meta.json").read_text())
    if is_distributed(meta):
        state = from_shards(ckpt, meta)
        args, weights, teacher = GPTArgs(**state["args"]), state["module"], state["teacher"]
    else:  # single-process checkpoint: the training module's state dict holds both
        engine = load_torch(ckpt / "engine.pt")
        weights = engine["module"]
        teacher = _prefixed(weights, "teacher.model.") or None
        args = gpt_args(load_config(ckpt.parent.parent / "config.yaml"))  # the run's resolved config
    student = _prefixed(weights, "student.")
    out = {"student": load_strict(GPT(args), student, source=f"{ckpt} student")}
    if teacher:
        out["teacher"] = load_strict(GPT(args), teacher, source=f"{ckpt} teacher")
    return out


def export(path: str | Path, out_dir: str | Path) -> dict:
    ckpt = newest_whole(Path(path))
    written = {}
    for name, model in load_models(ckpt).items():
        target = Path(out_dir) / f"{name}.pt"
        save_model_file(model, str(target))
        written[name] = str(target)
    return {"checkpoint": str(ckpt), **written}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="star-scale export", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="run folder or its checkpoints/ folder")
    p.add_argument("--out", required=True, help="folder for student.pt (and teacher.pt)")
    args = p.parse_args(argv)
    print(json.dumps(export(args.path, args.out), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
