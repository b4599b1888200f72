"""The DeepSpeed and megatron-core versions star-scale is tested with, and a start-up check of what it uses.

star-scale reaches into internals of both (ZeRO-3 partitions, fp32 master
shards, megatron's parallel state and layer attributes), which move between
minor releases. setup.py bounds both packages to the tested minor versions;
this check runs before either is imported by the distributed engine, so a
forced other version fails with one line naming the package, its version and
the missing name, not an AttributeError deep inside DeepSpeed.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import logging

log = logging.getLogger(__name__)

TESTED = {"deepspeed": ("0.19", "0.20"), "megatron-core": ("0.16", "0.17")}  # [low, high): setup.py says the same

# (distribution, module, names in it that star_scale/parallel/ uses)
USED = [
    ("deepspeed", "deepspeed", ["initialize", "init_distributed"]),
    ("deepspeed", "deepspeed.utils", ["safe_get_full_fp32_param", "safe_get_full_optimizer_state",
                                      "safe_set_full_fp32_param", "safe_set_full_optimizer_state",
                                      "safe_get_local_fp32_param", "safe_get_local_optimizer_state",
                                      "safe_set_local_fp32_param", "safe_set_local_optimizer_state"]),
    ("deepspeed", "deepspeed.runtime.zero.partition_parameters", ["GatheredParameters", "is_zero_param", "Init",
                                                                  # seeded_init.py overrides the one, calls the other
                                                                  "Init._zero_init_param",
                                                                  "Init._convert_to_deepspeed_param"]),
    ("deepspeed", "deepspeed.utils.tensor_fragment", ["tensor_fragment.get_optim_state_fragment"]),  # pieces.py
    ("deepspeed", "deepspeed.runtime.engine", ["DeepSpeedEngine.zero_optimization_stage",
                                               "DeepSpeedEngine.get_global_grad_norm"]),
    ("megatron-core", "megatron.core.parallel_state", [
        "initialize_model_parallel", "model_parallel_is_initialized", "destroy_model_parallel",
        "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size", "get_tensor_model_parallel_group",
        "get_tensor_model_parallel_src_rank", "get_data_parallel_rank", "get_data_parallel_world_size",
        "get_data_parallel_group"]),
    ("megatron-core", "megatron.core.tensor_parallel", ["ColumnParallelLinear", "RowParallelLinear",
                                                        "VocabParallelEmbedding", "model_parallel_cuda_manual_seed",
                                                        "vocab_parallel_cross_entropy"]),
    ("megatron-core", "megatron.core.tensor_parallel.layers", ["set_tensor_model_parallel_attributes"]),
    ("megatron-core", "megatron.core.model_parallel_config", ["ModelParallelConfig"]),
]


class VersionError(RuntimeError):
    pass


def _minor(version: str) -> tuple[int, int]:
    parts = [int("".join(c for c in p if c.isdigit()) or 0) for p in version.split(".")[:2]]
    return parts[0], parts[1] if len(parts) > 1 else 0


def in_tested_range(dist: str, version: str) -> bool:
    low, high = TESTED[dist]
    return _minor(low) <= _minor(version) < _minor(high)


def requirement(dist: str) -> str:
    low, high = TESTED[dist]
    return f"{dist}>={low},<{high}"


def check_versions(version_of=importlib.metadata.version, import_module=importlib.import_module) -> None:
    """Raise VersionError naming the first missing package or name; log once if a version is untested."""
    versions = {}
    for dist in TESTED:
        try:
            versions[dist] = version_of(dist)
        except importlib.metadata.PackageNotFoundError:
            raise VersionError(f"{dist} is not installed: the distributed engine needs it "
                               f"(pip install '{requirement(dist)}')") from None
        if not in_tested_range(dist, versions[dist]):
            log.warning("%s %s is outside the tested range %s; if start-up fails, pip install '%s'",
                        dist, versions[dist], requirement(dist), requirement(dist))
    for dist, module_name, names in USED:
        try:
            module = import_module(module_name)
        except ImportError as e:
            raise VersionError(f"{dist} {versions[dist]}: star-scale needs the module {module_name} ({e}); "
                               f"tested with {requirement(dist)}") from None
        for name in names:
            obj = module
            for part in name.split("."):
                obj = getattr(obj, part, None)
                if obj is None:
                    raise VersionError(f"{dist} {versions[dist]}: star-scale needs {module_name}.{name}, which this "
                                       f"version lacks; tested with {requirement(dist)} "
                                       f"(pip install '{requirement(dist)}')")
