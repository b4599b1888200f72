"""Typed run configuration: dataclasses loaded from YAML recipes, validated once.

A recipe is a YAML mapping with the sections below; ``base: other.yaml`` (or a
list) merges other recipes underneath, so size recipes share one data setup.  Command-line overrides
take the form ``key.sub=value`` (the value is parsed as YAML).  Every error
names the key, the value and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from star_scale.models.presets import PRESETS
from star_scale.trust.credentials import take_credentials


class ConfigError(ValueError):
    pass


@dataclass
class ModelConfig:
    preset: str = "tiny"
    layers: Optional[int] = None  # None: from the preset
    heads: Optional[int] = None
    width: Optional[int] = None
    vocab_size: int = 16384  # must cover the tokenizer's codebook
    num_classes: int = 1000
    grid_size: int = 16  # image tokens per side
    class_dropout: float = 0.1
    token_dropout: float = 0.1
    resid_dropout: float = 0.1
    ffn_dropout: float = 0.1
    init_std: float = 0.02


@dataclass
class DataConfig:
    path: str = ""  # token store written by `star-scale tokenize` (.zarr) or the demo (.npz)
    global_batch: int = 256  # sequences (images) per optimizer step, all ranks together
    micro_batch: Optional[int] = None  # per rank per forward; None: global_batch / data-parallel size
    seed: int = 0
    shuffle_buffer_chunks: int = 4  # chunks mixed in memory before sampling
    prefetch: int = 2  # shuffle windows (buffer_chunks chunks each) read ahead by a background thread


@dataclass
class ObjectiveConfig:
    name: str = "ar"  # "ar" (LlamaGen baseline) or "star"
    mim: bool = True  # ST-AR terms, each switchable for the ablations
    step: bool = True
    view: bool = True
    mim_weight: float = 1.0  # a
    contrastive_weight: float = 0.5  # b, applied to (L_step + L_view) / 2 [inferred combination]
    mask_ratio: float = 0.25  # r
    positions: int = 4  # K sampled positions per sequence
    temperature: float = 0.2  # InfoNCE tau [inferred]
    layer: Optional[int] = None  # contrastive features' layer; None: depth / 2
    ema_decay: float = 0.9999  # d
    # [inferred] which "last-layer features" L_MIM compares: "norm" = after the final
    # RMSNorm (what the output head reads), "block" = the last block's raw output.
    mim_features: str = "norm"
    projector_hidden: Optional[int] = None  # [inferred] student projector MLP hidden width; None: model width


@dataclass
class OptimizerConfig:
    lr: float = 1e-4
    lr_batch: Optional[int] = 256  # lr is per this many sequences, scaled linearly; None: no scaling
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05  # only on parameters with >= 2 dims
    grad_clip: float = 1.0
    eps: float = 1e-8


@dataclass
class ParallelConfig:
    tp: int = 1  # tensor-parallel size
    zero_stage: int = 3
    activation_checkpointing: bool = False
    bf16_weights: bool = False  # bf16 weights, fp32 masters, bf16 reduction (ds_config.precision_policy)
    deepspeed_config: Optional[str] = None  # raw DeepSpeed JSON that overrides the generated one


@dataclass
class TrackingConfig:
    enabled: bool = True  # mlflow on rank 0
    uri: Optional[str] = None  # None: sqlite database inside the run folder; or http://server:5000
    experiment: str = "star-scale"
    experiment_id: Optional[str] = None  # set by `star-scale submit` (array tasks must not race to create it)
    run_name: Optional[str] = None


@dataclass
class ClusterConfig:
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU cluster (tasks_per_node ranks per node)
    tasks_per_node: Optional[int] = None  # None: one task per GPU
    cpus_per_task: int = 8
    partition: Optional[str] = None  # None: the cluster's default partition
    account: Optional[str] = None
    time: str = "24:00:00"
    constraint: Optional[str] = None
    signal_seconds: int = 300  # USR1 this long before the time limit: checkpoint and requeue
    mem: str = "auto"  # --mem per node: auto (star_scale/slurm/resources.py), node (all of it), none, or e.g. 200G
    ckpt_write_gbs: float = 1.0  # write bandwidth per node, GB/s: sizes signal_seconds to the checkpoint
    extra_sbatch: list = field(default_factory=list)  # more #SBATCH options, e.g. ["--qos=high"]
    tp_across_nodes: bool = False  # allow a tensor-parallel group to span nodes (every layer's all-reduce crosses the network)
    step_start_timeout: int = 600  # s for train.sbatch's training step to start, else it requeues the job (0: no limit)

    def ranks_per_node(self) -> int:
        return self.tasks_per_node or self.gpus_per_node

    def world_size(self) -> int:
        return self.nodes * self.ranks_per_node()


@dataclass
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    log_every: int = 10
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    out_dir: str = "runs/{name}"
    probe_every: int = 0  # live linear probe of the middle layer every N steps (0: off), logged as probe_acc
    probe_images: int = 2048  # first N images of the store, 80/20 train/val split, crop 0
    check_every: int = 100  # TP > 1: every N steps, check that the TP-replicated parameters agree (0: off)
    lock: bool = True  # one writer per run folder (flock); false on file systems without working locks
    restart: bool = False  # start over in a folder with history but no usable checkpoint (old files moved aside)
    compile: bool = False  # torch.compile each transformer block
    stop_check_every: int = 10  # distributed runs agree every N steps on a stop signal and a written async save
    async_save: bool = False  # distributed runs: write checkpoint shards from a thread while training goes on


@dataclass
class Config:
    name: str = "run"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---- derived values ---------------------------------------------------
    def model_dims(self) -> tuple[int, int, int]:
        layers, heads, width = PRESETS[self.model.preset]
        m = self.model
        return (m.layers or layers, m.heads or heads, m.width or width)

    def contrastive_layer(self) -> int:
        return self.objective.layer or max(1, self.model_dims()[0] // 2)

    def run_dir(self) -> Path:
        return Path(self.train.out_dir.format(name=self.name))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict:
        """{'model.width': 768, ...}: for tracking params and override round trips."""
        out = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    def validate(self, world_size: Optional[int] = None) -> "Config":
        """Cross-field checks; raise ConfigError naming the keys involved.

        world_size: the number of ranks; None skips the checks that need it
        (they run again at launch, and `plan`/`submit` use the cluster section).
        """
        m, o, p, d = self.model, self.objective, self.parallel, self.data
        flat = self.flat()
        for key, ok, expected in _RANGES:
            value = flat[key]
            if value is not None and not ok(value):
                raise ConfigError(f"{key}={value}: expected {expected}")
        if m.preset not in PRESETS:
            raise ConfigError(f"model.preset={m.preset!r}: expected one of {sorted(PRESETS)}")
        layers, heads, width = self.model_dims()
        for key, value in (("model.layers", layers), ("model.heads", heads), ("model.width", width)):
            if value < 1:
                raise ConfigError(f"{key}={value}: expected a positive integer")
        if width % heads:
            raise ConfigError(f"model.width={width} is not divisible by model.heads={heads}: expected width = heads x head_dim")
        if (width // heads) % 4:
            raise ConfigError(f"model.width={width} / model.heads={heads} = {width // heads}: 2D RoPE needs a head size divisible by 4")
        if heads % p.tp:
            raise ConfigError(f"parallel.tp={p.tp}: expected a divisor of model.heads={heads} (each tensor-parallel rank needs whole heads)")
        if world_size is not None and world_size % p.tp:
            raise ConfigError(f"parallel.tp={p.tp}: expected a divisor of the world size {world_size} (the number of processes launched)")
        if p.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage={p.zero_stage}: expected 0, 1, 2 or 3")
        if self.train.compile and p.zero_stage == 3 and ((world_size or 1) > 1 or p.tp > 1):  # untested: traces ZeRO-3's hooks
            raise ConfigError("train.compile=true with parallel.zero_stage=3: expected train.compile=false or "
                              "parallel.zero_stage<=2 on more than one rank (one process may compile)")
        if o.name not in ("ar", "star"):
            raise ConfigError(f"objective.name={o.name!r}: expected 'ar' or 'star'")
        if not 0.0 <= o.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio={o.mask_ratio}: expected 0 <= r < 1")
        if not 0.0 <= o.ema_decay <= 1.0:
            raise ConfigError(f"objective.ema_decay={o.ema_decay}: expected 0 <= d <= 1")
        if o.temperature <= 0:
            raise ConfigError(f"objective.temperature={o.temperature}: expected > 0")
        if o.layer is not None and not 1 <= o.layer <= layers:
            raise ConfigError(f"objective.layer={o.layer}: expected 1..model.layers={layers}")
        if o.mim_features not in ("norm", "block"):
            raise ConfigError(f"objective.mim_features={o.mim_features!r}: expected 'norm' or 'block'")
        if o.projector_hidden is not None and o.projector_hidden < 1:
            raise ConfigError(f"objective.projector_hidden={o.projector_hidden}: expected a positive integer or null")
        if o.name == "star" and (o.step or o.view) and not 1 <= o.positions <= m.grid_size**2 - 1:
            raise ConfigError(f"objective.positions={o.positions}: expected 1..{m.grid_size**2 - 1} "
                              f"(image positions of a model.grid_size={m.grid_size} sequence)")
        if o.positions < 2 and o.name == "star" and o.step:
            raise ConfigError(f"objective.positions={o.positions}: L_step needs at least 2 positions per sequence")
        dp = (world_size or p.tp) // p.tp
        if d.global_batch < 1 or d.global_batch % dp:
            raise ConfigError(f"data.global_batch={d.global_batch}: expected a positive multiple of the data-parallel "
                              f"size {dp} (world size {world_size or p.tp} / parallel.tp={p.tp}), so every rank gets "
                              "the same number of sequences")
        if d.micro_batch is not None and (d.micro_batch < 1 or (d.global_batch // dp) % d.micro_batch):
            raise ConfigError(f"data.micro_batch={d.micro_batch}: expected a divisor of the per-rank batch "
                              f"{d.global_batch // dp} (data.global_batch={d.global_batch} / data-parallel size {dp})")
        if self.train.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision={self.train.precision!r}: expected auto, fp32 or bf16")
        if p.bf16_weights and (self.train.precision == "fp32" or p.zero_stage < 2 or (world_size == 1 and p.tp == 1)):
            raise ConfigError(f"parallel.bf16_weights=true: expected train.precision bf16/auto (got {self.train.precision}), "
                              f"ZeRO-2/3 (got {p.zero_stage}) and more than one rank or parallel.tp > 1 (DeepSpeed)")
        if self.train.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"train.device={self.train.device!r}: expected auto, cpu or cuda")
        if self.train.stop_check_every < 1:
            raise ConfigError(f"train.stop_check_every={self.train.stop_check_every}: expected a positive integer")
        if len(self.optimizer.betas) != 2:
            raise ConfigError(f"optimizer.betas={self.optimizer.betas}: expected two numbers")
        return self


_RANGES = [(k, lambda v: v > 0, "a number > 0") for k in ("optimizer.lr", "optimizer.eps", "optimizer.grad_clip",
                                                           "optimizer.lr_batch")] + \
    [(k, lambda v: v >= 1, "an integer >= 1") for k in ("train.steps", "train.log_every", "train.ckpt_every",
                                                        "cluster.nodes", "parallel.tp", "data.shuffle_buffer_chunks")] + \
    [(k, lambda v: v >= 0, "a number >= 0") for k in ("train.probe_every", "data.prefetch", "train.keep_checkpoints",
                                                      "optimizer.weight_decay", "cluster.step_start_timeout")] + \
    [(k, lambda v: 0 <= v < 1, "a ratio in [0, 1)") for k in ("model.class_dropout", "model.token_dropout",
                                                              "model.resid_dropout", "model.ffn_dropout")] + \
    [("train.probe_images", lambda v: v >= 2, "at least 2")]


# ---- loading ----------------------------------------------------------------
def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(key: str, value: Any, tp) -> Any:
    """Check (and gently convert) one value against its annotated type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-4 as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is list or origin is list:
        if isinstance(value, (list, tuple)):
            return list(value)
    else:
        return value
    raise ConfigError(f"{key}={value!r}: expected {_type_name(tp)}, got {type(value).__name__}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'recipe'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"{full}: unknown key; expected one of {sorted(names)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if tp is ObjectiveConfig and isinstance(value, str):
                value = {"name": value}  # shorthand `objective: star`
            kwargs[key] = _build(tp, value or {}, f"{full}.")
        else:
            kwargs[key] = _coerce(full, value, tp)
    return cls(**kwargs)


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if isinstance(child, str) and part == "objective":
            child = {"name": child}
        if not isinstance(child, dict):
            child = {}
        node[part] = child
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw) if raw.strip() else None))
    return out


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif isinstance(value, dict) and isinstance(out.get(key), str) and key == "objective":
            out[key] = _merge({"name": out[key]}, value)
        else:
            out[key] = value
    return out


def read_recipe(path: Path, _seen: tuple = ()) -> dict:
    """A recipe's YAML tree, with ``base:`` recipes (paths relative to it) merged underneath."""
    if not path.is_file():
        raise ConfigError(f"recipe {str(path)!r}: file not found")
    if path.resolve() in _seen:
        raise ConfigError(f"recipe {str(path)!r}: circular base: chain {[str(p) for p in _seen]}")
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {str(path)!r}: invalid YAML: {e}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"recipe {str(path)!r}: expected a mapping of sections at the top level")
    bases = tree.pop("base", None) or []
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _merge(merged, read_recipe(path.parent / base, _seen + (path.resolve(),)))
    merged.pop("name", None)  # a run is named after its own recipe
    return _merge(merged, tree)


def load_config(recipe: Optional[str | os.PathLike] = None, overrides: list[str] = (),
                world_size: Optional[int] = None) -> Config:
    """Load a YAML recipe (or defaults), apply overrides, validate."""
    tree: dict = {}
    if recipe is not None:
        tree = read_recipe(Path(recipe))
        tree.setdefault("name", Path(recipe).stem)
    for key, value in parse_overrides(list(overrides)):
        _set_dotted(tree, key, value)
    try:
        cfg = _build(Config, tree, "")
    except ConfigError as e:
        where = f" (recipe {recipe})" if recipe else ""
        raise ConfigError(f"{e}{where}") from None
    cfg.tracking.uri = take_credentials(cfg.tracking.uri)  # nothing downstream prints or saves them
    return cfg.validate(world_size)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write the resolved config atomically (it sits next to every run's outputs)."""
    from star_scale import atomic

    atomic.write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
