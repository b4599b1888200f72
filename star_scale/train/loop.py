"""The one training loop: batches -> engine steps -> logs, metrics and checkpoints.

Pieces are built separately (model, training module, engine, loader,
checkpoints) so a distributed engine can replace the local one unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from star_scale.config import Config, ConfigError, save_config
from star_scale.console.progress import progress
from star_scale.data.loader import TokenLoader
from star_scale.models.build import build_model
from star_scale.objectives.module import build_training_module
from star_scale.parallel.launch import cpu_summary, detect, is_main_process
from star_scale.train import run_folder
from star_scale.train.checkpoint import CheckpointDir
from star_scale.train.errors import RunError, is_write_error, run_write_error
from star_scale.train.inputs import open_token_store
from star_scale.train.metrics import PendingMetrics
from star_scale.train.preemption import StopSignals
from star_scale.train.rng import rng_state, set_rng_state
from star_scale.train.throughput import Meter, memory_stats
from star_scale.train.tracking import make_tracker

log = logging.getLogger(__name__)


def select_engine(cfg):
    """The engine class for this process: DeepSpeed for more than one rank (or TP > 1), else LocalEngine.

    One process, launched or not, stays the dependency-free local engine;
    checkpoints move between the two through their consolidated form.
    """
    if detect().world_size > 1 or cfg.parallel.tp > 1:
        from star_scale.parallel.versions import check_versions

        check_versions()  # one line naming package, version and missing name; before DeepSpeed is imported
        from star_scale.parallel.engine import DeepSpeedEngine
        return DeepSpeedEngine
    from star_scale.train.local_engine import LocalEngine
    return LocalEngine


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_store_matches(cfg: Config, store) -> None:
    """The model's vocabulary and grid must fit the tokens it will read."""
    t = store.tokens_per_image
    if t != cfg.model.grid_size**2:
        raise ConfigError(f"model.grid_size={cfg.model.grid_size}: expected {int(t**0.5)} ({t} tokens per image in "
                          f"data.path={cfg.data.path})")
    codebook = store.attrs.get("codebook_size")
    if codebook is not None and int(codebook) > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size}: expected at least the codebook size {codebook} "
                          f"of data.path={cfg.data.path}")
    classes = store.attrs.get("num_classes")
    if classes is not None and int(classes) > cfg.model.num_classes:
        raise ConfigError(f"model.num_classes={cfg.model.num_classes}: expected at least the {classes} classes "
                          f"of data.path={cfg.data.path}")


def live_probe(cfg: Config, student, store) -> float:
    """Linear-probe accuracy of the student's middle layer on the store's first images (all ranks call it)."""
    from star_scale.evaluate.probe import probe_accuracy, read_tokens

    tokens, labels = read_tokens(cfg.data.path, crop=0, limit=cfg.train.probe_images)
    split = int(0.8 * len(labels))
    with torch.random.fork_rng(devices=[]):  # the probe must not move the training RNG (exact resume)
        return probe_accuracy(student, tokens[:split], labels[:split], tokens[split:], labels[split:],
                              layer=cfg.contrastive_layer())


class MetricsLog:
    """Per-step metrics as JSON lines; on resume, lines past the checkpoint are dropped."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        kept = []
        if path.exists() and resume_step > 0:
            kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.f = open(path, "a")

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def train(cfg: Config, *, recipe: Optional[str] = None, stop_after: Optional[int] = None,
          engine_factory=None) -> dict:
    """Train (resuming from the run folder's latest checkpoint) to cfg.train.steps.

    recipe: the YAML it came from, kept with the run as an artifact.
    stop_after: return after this many steps of the current call (tests use it
    to interrupt a run without killing it).
    """
    log.info(cpu_summary())
    store = open_token_store(cfg)  # every input is checked before the run folder is touched
    check_store_matches(cfg, store)
    with run_folder.claim(cfg, is_main_process()) as run_dir:
        try:
            return _train(cfg, store, run_dir, recipe=recipe, stop_after=stop_after, engine_factory=engine_factory)
        except OSError as e:  # a full disk while writing metrics or the config: one line, not a traceback
            if not is_write_error(e):
                raise
            raise run_write_error(e) from None


def _train(cfg: Config, store, run_dir: Path, *, recipe, stop_after, engine_factory) -> dict:
    seed_everything(cfg.train.seed)

    model = build_model(cfg, meta=True)  # allocated by the engine, in the shards its layout gives this rank
    module = build_training_module(cfg, model)
    expected_bytes = run_folder.checkpoint_bytes(module)
    if is_main_process():
        run_folder.warn_if_short_of_space(cfg, expected_bytes)
    engine = (engine_factory or select_engine(cfg))(module, cfg)
    loader = TokenLoader(store, cfg.data.global_batch // engine.dp_size, views=module.views,
                         rank=engine.dp_rank, world_size=engine.dp_size, seed=cfg.data.seed,
                         buffer_chunks=cfg.data.shuffle_buffer_chunks, prefetch=cfg.data.prefetch)

    ckpts = CheckpointDir(run_dir / "checkpoints", keep=cfg.train.keep_checkpoints)
    ckpts.expected_bytes = expected_bytes
    step, run_id = 0, None
    latest = engine.load_checkpoint(ckpts)  # the engine restores itself; trainer state comes back
    if latest is None:
        run_folder.check_history(cfg, ckpts, engine.is_main)  # never start over a run's history silently
    else:
        step, trainer_state = latest
        loader.load_state_dict(trainer_state["loader"])
        set_rng_state(trainer_state["rng"])
        run_id = trainer_state.get("mlflow_run_id")
        log.info("resumed from %s", ckpts.path(step))
    if is_main_process():  # one writer: ranks racing on the same temp file lose the rename
        save_config(cfg, run_dir / "config.yaml")

    tracker = make_tracker(cfg, run_dir, run_id, engine.is_main)
    if latest is None:
        for artifact in (recipe, run_dir / "config.yaml"):
            if artifact:
                tracker.log_artifact(artifact)

    def save(wait: bool = False) -> None:
        trainer_state = {"step": step, "loader": loader.state_dict(), "rng": rng_state(),
                         "mlflow_run_id": tracker.run_id}
        engine.save_checkpoint(ckpts, step, trainer_state, wait=wait)

    metrics_log = MetricsLog(run_dir / "metrics.jsonl", step) if engine.is_main else None
    tokens_per_step = cfg.data.global_batch * module.views * store.tokens_per_image
    meter = Meter(model.flops_per_token() * getattr(module, "flops_factor", 1.0), engine.device,
                  tp=getattr(engine, "tp_size", 1))
    def report(record: dict, rate: dict) -> None:
        step = record["step"]
        extra = {"tokens_seen": step * tokens_per_step,
                 "samples_per_s": rate["tokens_per_s"] / (module.views * store.tokens_per_image)}
        known = {k: v for k, v in rate.items() if v is not None}  # MFU of an unknown device is not logged
        tracker.log_metrics({**{k: v for k, v in record.items() if k != "step"}, **known,
                             **memory_stats(engine.device), **extra}, step)
        record.update(rate)  # into metrics.jsonl too, for `star-scale report`
        if engine.is_main:
            mfu = "unknown" if rate["mfu"] is None else f"{100 * rate['mfu']:.2f}%"
            log.info("step %d | loss %.4f | %s | %.0f tok/s | MFU %s", step, record["loss"],
                     " ".join(f"{k} {v:.4f}" for k, v in record.items() if k.startswith(("loss_", "probe_"))),
                     rate["tokens_per_s"], mfu)

    pending = PendingMetrics()


    batches = iter(loader)
    stop = StopSignals()
    last = {}
    start = step
    # In a log file the report line every train.log_every steps is the progress; time-based lines fill long gaps.
    bar = progress(total=cfg.train.steps, initial=step, desc=cfg.name, unit="step", disable=not engine.is_main)
    try:
        while step < cfg.train.steps and (stop_after is None or step - start < stop_after):
            batch = next(batches)
            step += 1
            pending.add(step, engine.train_step_lazy(batch.tokens, batch.labels))  # device tensors: no sync
            meter.add(tokens_per_step // engine.dp_size)
            probed = cfg.train.probe_every and step % cfg.train.probe_every == 0
            if probed:
                pending.update_last(probe_acc=live_probe(cfg, module.student, store))
            bar.update(1)
            stopping = stop.should_stop(engine.device, step, cfg.train.stop_check_every)
            logged = step % cfg.train.log_every == 0 or step == cfg.train.steps
            flushed = []
            if logged or probed or stopping or step % cfg.train.ckpt_every == 0 or stop_after == step - start:
                flushed = pending.flush()  # one device read for every step since the last one
                last = flushed[-1] if flushed else last
            if logged:
                report(last, meter.read())
                bar.set_postfix(loss=f"{last['loss']:.4f}")
            elif probed:
                tracker.log_metrics({"probe_acc": last["probe_acc"]}, step)
            for record in flushed if metrics_log else ():  # after report(), which adds tokens/s and MFU
                metrics_log.write(record)
            if stopping:
                save(wait=True)  # committed before the requeue
                stop.requeue_if_asked(engine.is_main)
                break
            if step % cfg.train.ckpt_every == 0 or step == cfg.train.steps:
                save()
            else:
                engine.poll_checkpoint()  # an asynchronous save is committed once written
        engine.wait_checkpoint()
    except BaseException as e:
        tracker.close(status="FAILED", timeout=0 if isinstance(e, RunError) else 10)  # a full disk: no retries
        raise
    else:
        tracker.close(status="FINISHED" if step >= cfg.train.steps else None)
    finally:
        stop.restore()
        bar.close()
        if metrics_log:
            metrics_log.close()
    return {"step": step, "run_dir": str(run_dir), "mlflow_run_id": tracker.run_id, "stopped_by": stop.signal_name, **last}


def setup_logging(level: str = os.environ.get("STAR_SCALE_LOG", "INFO")) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
