"""DeepSpeedEngine: LocalEngine's interface (device, dp_rank, dp_size, is_main, train_step,
save/load_checkpoint, state_dict) on DeepSpeed ZeRO with megatron-core tensor parallelism.

Construction, in order:
1. process groups (``layout``): world = tp x dp;
2. every GPT in the training module (student, teacher copy) becomes its
   tensor-parallel version holding this rank's shards of the seeded full model,
   so every layout starts from the same weights;
3. the EMA teacher is taken out of the module (the student's engine must not
   partition or optimise it) and the contrastive negatives are gathered over
   the data-parallel group only (tensor-parallel ranks hold the same images);
4. GPTs built on the meta device (the trainer's) are allocated, teacher and
   student together, one unit at a time, each weight drawn once for both, each
   unit ZeRO-3 partitioned before the next exists (``zero_init``): start-up
   holds 1/N of the model plus one block of each;
5. the teacher's engine (``sharded_teacher``), partitioned like the student;
6. the student's engine: torch AdamW as the client optimizer, the generated
   DeepSpeed config, the megatron mpu.

Randomness: tensor-parallel ranks of one replica must draw the same dropout
and masks, data-parallel replicas should not; data-parallel rank 0 keeps the
trainer's stream (so dp = 1 matches a single process), others reseed.
"""
from __future__ import annotations

import logging
from typing import Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from star_scale.config import Config
from star_scale.objectives.draws import begin_step, end_step, set_step_draws
from star_scale.parallel import checkpoint as dist_ckpt
from star_scale.parallel import whole_state
from star_scale.parallel.attention_choice import agree_masked_attention
from star_scale.parallel.devices import deepspeed_args
from star_scale.parallel.ds_config import batch_sizes, student_config, teacher_config
from star_scale.parallel.layout import init_layout
from star_scale.parallel.mpu import MegatronMPU
from star_scale.parallel.replicas import check_replicas
from star_scale.parallel.sharded_teacher import ReplicatedTeacher, ShardedTeacher, install_teacher, take_teacher
from star_scale.parallel.tensor_parallel import LayerFactory, materialize_shards, tensor_parallelize
from star_scale.parallel.zero_init import cast_whole_params, partitioner
from star_scale.train.checkpoint import CheckpointDir
from star_scale.train.local_engine import configure_models, make_optimizer, resolve_device, resolve_dtype
from star_scale.train.metrics import accumulate, read_metrics

log = logging.getLogger(__name__)


class DeepSpeedEngine:
    def __init__(self, module: nn.Module, cfg: Config):
        self.cfg = cfg
        device = resolve_device(cfg.train.device)
        self.layout = L = init_layout(cfg.parallel.tp, device.type, cfg.train.seed)
        cfg.validate(L.world)
        self.device, self.dtype = L.device, resolve_dtype(cfg.train.precision, L.device)
        self.dp_rank, self.dp_size, self.is_main = L.dp_rank, L.dp, L.is_main
        self.tp_size = L.tp  # MFU: a rank executes 1/tp of its tokens' FLOPs
        if not L.is_main:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

        module = tensor_parallelize(module, LayerFactory(L.tp), L.tp_rank)
        configure_models(module, cfg)
        ema = take_teacher(module)
        if hasattr(module, "negatives_group"):
            module.negatives_group = L.dp_group

        self.micro_batch, self.accumulation = batch_sizes(cfg, L.dp)
        agree_masked_attention(module, self.micro_batch, L.tp, self.device, self.dtype)
        self.ds_config = student_config(cfg, L.dp, self.dtype, self.device)
        zero3 = cfg.parallel.zero_stage == 3
        self.teacher = None
        # Teacher and student together, unit by unit, each weight drawn once for both (the teacher's unit
        # partitioned first); the teacher's engine exists before the student's: see ShardedTeacher.
        teachers = [ema] if ema is not None else []
        materialize_shards(teachers + [module], self.device, L.tp_rank, L.tp,
                           [partitioner(teacher_config(self.ds_config), MegatronMPU()) for _ in teachers]
                           + [partitioner(self.ds_config, MegatronMPU())] if zero3 else None)
        if ema is not None and zero3:
            self.teacher = ShardedTeacher(ema, teacher_config(self.ds_config), MegatronMPU(), self.dtype,
                                          L.tp_group, self.device)
        if zero3 and cfg.parallel.bf16_weights:
            cast_whole_params(module, torch.bfloat16)
        optimizer = make_optimizer(module, cfg, self.device)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=module, optimizer=optimizer, config=self.ds_config,
                                                             mpu=MegatronMPU(), dist_init_required=False,
                                                             args=deepspeed_args(self.device))
        self.module = module
        self.step = 0  # optimizer steps taken: seeds ST-AR's per-step draws
        self.pending_save = None  # an asynchronous checkpoint being written (parallel/checkpoint.py)
        self.zero_stage = self.ds.zero_optimization_stage()
        if ema is not None:
            if self.teacher is not None:
                self.teacher.start_from(module.student)
            else:
                self.teacher = ReplicatedTeacher(ema, self.device, self.dtype, L.tp_group)
            install_teacher(module, self.teacher)
        if L.dp_rank:
            torch.manual_seed(int(np.random.SeedSequence([cfg.train.seed, L.dp_rank]).generate_state(1)[0]))
        if L.is_main:
            log.info("DeepSpeed ZeRO-%d, %s, micro batch %d x %d accumulation x dp %d, teacher: %s",
                     self.zero_stage, str(self.dtype).replace("torch.", ""), self.micro_batch, self.accumulation,
                     L.dp, type(self.teacher).__name__ if self.teacher else "none")

    # ---- one optimizer step ------------------------------------------------------
    def train_step(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimizer step; metrics as floats (reads the device: use ``train_step_lazy`` in loops)."""
        return read_metrics(self.train_step_lazy(tokens, labels))

    def train_step_lazy(self, tokens: torch.Tensor, labels: torch.Tensor) -> dict:
        """One optimizer step; metrics as 0-dim device tensors, averaged over data-parallel ranks."""
        self.ds.train()
        tokens, labels = tokens.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
        n = tokens.shape[0]
        if n != self.micro_batch * self.accumulation:
            raise ValueError(f"batch of {n} on this rank, expected {self.micro_batch} x {self.accumulation}")
        totals: dict = {}
        set_step_draws(self.module, self.cfg.train.seed, self.step, self.dp_rank * n, n * self.dp_size)
        begin_step(self.module, tokens, labels, self.micro_batch)
        for start in range(0, n, self.micro_batch):
            sl = slice(start, start + self.micro_batch)
            set_step_draws(self.module, self.cfg.train.seed, self.step, self.dp_rank * n + start, n * self.dp_size)
            loss, metrics = self.ds(tokens[sl], labels[sl])
            self.ds.backward(loss)  # DeepSpeed divides by the accumulation steps itself
            self.ds.step()  # steps the optimizer only at the accumulation boundary
            accumulate(totals, {"loss": loss, **metrics}, 1.0 / self.accumulation)
        end_step(self.module)
        self.module.after_optimizer_step()  # the EMA teacher, shard by shard
        self.step += 1
        every = self.cfg.train.check_every
        if every and self.layout.tp > 1 and self.step % every == 0:
            check_replicas(self.module, self.layout.tp_group)
        out = self._data_parallel_mean(totals)
        norm = self.ds.get_global_grad_norm()
        if norm is not None:  # DeepSpeed does not compute it at ZeRO stage 0
            out["grad_norm"] = torch.as_tensor(norm, device=self.device)
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def _data_parallel_mean(self, values: dict) -> dict:
        """Every rank reports the global batch's metrics (tensor-parallel ranks already agree); stays on the device."""
        if self.dp_size == 1:
            return values
        keys = sorted(values)
        t = torch.stack([values[k].to(torch.float64) for k in keys])
        dist.all_reduce(t, group=self.layout.dp_group)
        return dict(zip(keys, (t / self.dp_size).unbind()))

    # ---- checkpoints -------------------------------------------------------------
    def save_checkpoint(self, ckpts: CheckpointDir, step: int, trainer_state: dict, wait: bool = False) -> None:
        """Per-rank shards; written by a thread under ``train.async_save`` unless ``wait`` (a stop signal)."""
        dist_ckpt.save(self, ckpts, step, trainer_state, asynchronous=self.cfg.train.async_save and not wait)

    def poll_checkpoint(self) -> None:
        """Commit an asynchronous save once every rank has written it (one small collective while one is pending)."""
        dist_ckpt.poll(self)

    def wait_checkpoint(self) -> None:
        dist_ckpt.wait(self)

    def load_checkpoint(self, ckpts: CheckpointDir) -> Optional[tuple[int, dict]]:
        latest = dist_ckpt.load_latest(self, ckpts)
        if latest is not None:
            self.step = latest[0]
        return latest

    def state_dict(self) -> dict:
        """Consolidated TP = 1 fp32 state (collective; returned on rank 0, None elsewhere)."""
        return whole_state.consolidate(self)

    def load_state_dict(self, state: dict) -> None:
        whole_state.load_consolidated(self, state)
