"""star-scale: train ST-AR autoregressive image generators at cluster scale.

The folders are the architecture (README, "Architecture"). Modules that moved
into them keep their old import path for one release: importing, say,
``star_scale.trainer`` warns and returns ``star_scale.train.loop``.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

_MOVED = {  # old module (before the folders) -> where it lives now; removed in 0.3
    "trainer": "train.loop", "engine": "train.local_engine", "checkpoint": "train.checkpoint",
    "preemption": "train.preemption", "tracking": "train.tracking", "throughput": "train.throughput",
    "launch": "parallel.launch", "teacher": "objectives.teacher", "training_module": "objectives.module",
    "probe": "evaluate.probe", "sample": "evaluate.sample", "submit": "slurm.submit",
    "submit_tokenize": "slurm.submit_tokenize", "plan": "slurm.plan", "scaling": "sweep.scaling",
    "bench_step": "bench.step", "bench_data": "bench.data", "bench_memory": "bench.memory",
    "demo_data": "demo.data", "repro": "demo.repro.cli",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves an old path to the module at its new place (the same module object, so state is shared)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, old = fullname.partition(".")
        if prefix == __name__ and old in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{_MOVED[spec.name.partition('.')[2]]}"
        warnings.warn(f"{spec.name} has moved to {new}; the old path will be removed in star-scale 0.3",
                      DeprecationWarning, stacklevel=2)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())
