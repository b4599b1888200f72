"""The ST-AR teacher under DeepSpeed: an EMA copy partitioned exactly like the student.

Under ZeRO-3 the teacher GPT is wrapped by its own ``deepspeed.initialize``
without an optimizer: same shapes, same data-parallel group, so rank i holds
partition i of every teacher parameter, just as it holds partition i of the
student's.  The EMA then runs on local partitions only, no all-gather:

    teacher_i <- d * teacher_i + (1 - d) * student_fp32_i

with ``star_scale.objectives.teacher.ema_update_`` (the single-process arithmetic, so the
gathered teacher equals the EMA of the gathered student).  The student side is
its fp32 master partition; the teacher keeps fp32 masters too (in bf16 runs a
bf16 EMA would lose the 1e-4 updates), copied into its bf16 partitions for the
forward.  Per rank that is 1/N of the teacher's weights.

At ZeRO stages 0-2 parameters are not partitioned: the teacher stays a whole
fp32 replica on every rank (``ReplicatedTeacher``).

Both stand in for ``EMATeacher`` inside the training module: callable like it,
``.model``, ``.update(student)``, ``.copy_from(student)``.
"""
from __future__ import annotations

import contextlib

import deepspeed
import torch
import torch.nn as nn

from star_scale.objectives.teacher import EMATeacher, ema_update_
from star_scale.parallel.devices import deepspeed_args
from star_scale.parallel.tensor_parallel import gather_full, shard
from star_scale.parallel.tensor_parallel import partition_of as tp_partition
from star_scale.parallel.zero_state import full_fp32, gather_partitions, partition_of


def take_teacher(module: nn.Module):
    """The training module's EMATeacher, unregistered so the student's engine neither partitions nor optimises it."""
    take = getattr(module, "take_teacher", None)
    return take() if take is not None else None


def install_teacher(module: nn.Module, teacher) -> None:
    module.use_teacher(teacher)


class ShardedTeacher:
    """Partitioned before the student's engine exists: built on the meta device, the teacher is allocated
    and partitioned unit by unit with the student's initial values (zero_init.py); a teacher deep-copied
    from a whole student is partitioned here, before the student is."""

    def __init__(self, ema: EMATeacher, ds_config: dict, mpu, dtype: torch.dtype, tp_group, device: torch.device):
        self.decay = ema.decay
        self.model = ema.model
        self.engine, *_ = deepspeed.initialize(model=self.model, config=ds_config, mpu=mpu, dist_init_required=False,
                                               args=deepspeed_args(device))
        self.engine.eval()
        self.tp_group = tp_group
        self.names = [n for n, _ in self.model.named_parameters()]
        self.params = [p for _, p in self.model.named_parameters()]
        # fp32 masters: the partitions themselves when they are fp32 (fp32 runs, and bf16 runs under the
        # autocast policy of ds_config.precision_policy); separate copies under DeepSpeed's own bf16 mode.
        self.fp32 = dtype == torch.float32 or not ds_config.get("bf16", {}).get("enabled", False)
        self.masters = [p.ds_tensor for p in self.params] if self.fp32 else None

    def start_from(self, student: nn.Module) -> None:
        """Once the student is partitioned: in bf16 runs the masters are the student's fp32 partitions
        (the teacher starts as the student, not as its bf16 cast)."""
        if not self.fp32:
            self.masters = [s.clone() for s in self._student_partitions(student)]
            self._refresh()

    def __call__(self, tokens, labels, **kwargs):
        kwargs.setdefault("logits", False)
        with torch.no_grad():
            return self.engine(tokens, labels, **kwargs)

    def train(self, mode: bool = True):
        return self  # always eval

    def _student_partitions(self, student: nn.Module) -> list[torch.Tensor]:
        from deepspeed.utils import safe_get_local_fp32_param
        named = dict(student.named_parameters())
        out = []
        for name, t in zip(self.names, self.params):
            s = named[name]
            local = safe_get_local_fp32_param(s) if s.requires_grad else s.ds_tensor.float()
            if local.numel() != t.ds_tensor.numel():
                raise RuntimeError(f"teacher/student partitions of {name} differ: {t.ds_tensor.numel()} vs {local.numel()}")
            out.append(local.view_as(t.ds_tensor))
        return out

    def _refresh(self) -> None:
        if not self.fp32:
            with torch.no_grad():
                for p, m in zip(self.params, self.masters):
                    p.ds_tensor.copy_(m)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        ema_update_(self.masters, self._student_partitions(student), self.decay)
        self._refresh()

    @torch.no_grad()
    def copy_from(self, student: nn.Module) -> None:
        for m, s in zip(self.masters, self._student_partitions(student)):
            m.copy_(s)
        self._refresh()

    # ---- checkpoints -----------------------------------------------------------
    def full_state(self) -> dict:
        """Whole TP = 1 fp32 weights (collective: every rank calls it; every rank gets them)."""
        out = {}
        for n, p, m in zip(self.names, self.params, self.masters):
            out[n] = gather_full(gather_partitions(p, m.float()), p, self.tp_group).cpu()
        return out

    @torch.no_grad()
    def load_full_state(self, state: dict, tp_rank: int, tp: int) -> None:
        for n, p, m in zip(self.names, self.params, self.masters):
            dim, stride = tp_partition(p)
            local = shard(state[n], dim, stride, tp_rank, tp).to(m.device, torch.float32)
            m.copy_(partition_of(p, local))
        self._refresh()


class ReplicatedTeacher:
    """ZeRO 0-2: the EMATeacher as it is, whole on every rank, fp32, autocast forward in bf16 runs."""

    def __init__(self, ema: EMATeacher, device: torch.device, dtype: torch.dtype, tp_group):
        self.ema = ema.to(device)
        self.model, self.decay, self.tp_group = ema.model, ema.decay, tp_group
        self.autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                         else contextlib.nullcontext())

    def __call__(self, tokens, labels, **kwargs):
        with self.autocast:
            return self.ema(tokens, labels, **kwargs)

    def train(self, mode: bool = True):
        return self

    def update(self, student: nn.Module) -> None:
        # The EMA follows the optimizer's fp32 masters, not the bf16 weights of a bf16 run (whose rounding
        # would accumulate into the teacher). At ZeRO-1/2 the masters are sharded over the data-parallel
        # ranks: reading them whole is one fp32 all-gather of the student per step, only in bf16 runs.
        named = dict(student.named_parameters())
        pairs = [(p, self._master(named[n])) for n, p in self.model.named_parameters()]
        ema_update_([t for t, _ in pairs], [s for _, s in pairs], self.decay)

    @staticmethod
    def _master(p: torch.Tensor) -> torch.Tensor:
        return p.detach() if p.dtype == torch.float32 else full_fp32(None, p)

    def copy_from(self, student: nn.Module) -> None:
        self.ema.copy_from(student)

    def full_state(self) -> dict:
        # A copy even at TP = 1 on CPU, where .cpu() would hand out the live parameters.
        return {n: gather_full(p.detach(), p, self.tp_group).to("cpu", copy=True)
                for n, p in self.model.named_parameters()}

    @torch.no_grad()
    def load_full_state(self, state: dict, tp_rank: int, tp: int) -> None:
        for n, p in self.model.named_parameters():
            dim, stride = tp_partition(p)
            p.copy_(shard(state[n], dim, stride, tp_rank, tp))
