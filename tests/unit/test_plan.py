import glob

import pytest
import torch

from star_scale.config import ConfigError, load_config
from star_scale.models.build import build_model
from star_scale.objectives.module import build_training_module
from star_scale.slurm.plan import _with, count_params, estimate, largest_param, main, suggest
from star_scale.train.local_engine import LocalEngine
from tests.conftest import TINY


def measured_bytes(cfg):
    """Params + grads + Adam state after one real step, and the activations saved for backward."""
    torch.manual_seed(0)
    engine = LocalEngine(build_training_module(cfg, build_model(cfg)), cfg)
    t = cfg.model.grid_size**2
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.global_batch, 1, t))
    labels = torch.randint(0, cfg.model.num_classes, (cfg.data.global_batch,))
    saved, seen = [0], set()
    params = {p.data_ptr() for p in engine.module.parameters()}

    def pack(x):
        key = (x.data_ptr(), x.numel(), x.dtype)
        if x.data_ptr() not in params and key not in seen:
            seen.add(key)
            saved[0] += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        engine.train_step(tokens, labels)
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts)
    weights = nbytes(engine.module.parameters())
    grads = nbytes(p.grad for p in engine.module.parameters() if p.grad is not None)
    opt = nbytes(v for s in engine.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    return {"weights": weights, "grads": grads, "optimizer": opt, "activations": saved[0]}


@pytest.mark.parametrize("width,batch", [(64, 8), (128, 16)])
def test_estimate_matches_measured_tiny_memory_on_cpu(width, batch):
    cfg = load_config(None, TINY + [f"model.width={width}", f"data.global_batch={batch}", "model.grid_size=8",
                                    "model.vocab_size=512"])
    m = measured_bytes(cfg)
    plan = estimate(cfg, gpus=1, gpu=False)
    assert plan.weights == m["weights"] == count_params(cfg)[0] * 4
    assert plan.grads == m["grads"] and plan.optimizer == m["optimizer"]
    assert plan.activations == pytest.approx(m["activations"], rel=0.2)
    assert plan.total == pytest.approx(sum(m.values()), rel=0.2)


def test_every_paper_recipe_fits_80gb(capsys):
    recipes = sorted(glob.glob("recipes/[BLX3]*.yaml"))
    assert len(recipes) == 10
    assert main(recipes) == 0
    out = capsys.readouterr().out
    assert out.count("fits in 80 GB") == 10 and "DOES NOT FIT" not in out


def test_zero3_shards_states_over_data_parallel_ranks():
    cfg = load_config("recipes/XL-star.yaml", ["parallel.zero_stage=3"])
    two, sixteen = estimate(cfg, gpus=2), estimate(cfg, gpus=16)
    for part in ("weights", "optimizer", "teacher"):
        assert getattr(sixteen, part) == pytest.approx(getattr(two, part) / 8)
    whole = largest_param(cfg) * 4  # the largest gradient, whole on every rank during backward
    assert sixteen.grads - whole == pytest.approx((two.grads - whole) / 8)
    for part in ("activations", "buckets", "zero3_gather"):  # micro batch 32 either way; per-rank windows
        assert getattr(sixteen, part) == getattr(two, part) > 0


@pytest.mark.parametrize("width,batch", [(64, 8), (128, 16)])
def test_bf16_activation_estimate_matches_cpu_autocast(width, batch):
    """The GPU (bf16) model against what CPU bf16 autocast saves for backward: fp32 norm and RoPE casts included."""
    cfg = load_config(None, TINY + [f"model.width={width}", f"data.global_batch={batch}", "model.grid_size=8",
                                    "model.vocab_size=512", "train.precision=bf16", "train.device=cpu"])
    plan = estimate(cfg, gpus=1, gpu=True)
    assert plan.activations == pytest.approx(measured_bytes(cfg)["activations"], rel=0.1)


def test_every_paper_recipe_is_the_cheapest_layout_that_fits():
    for path in sorted(glob.glob("recipes/[BLX3]*.yaml")):
        cfg = load_config(path)
        over, _ = suggest(cfg)
        got = {k: getattr(getattr(cfg, k.split(".")[0]), k.split(".")[1]) for k in over}
        assert got == over, f"{path}: layout {got}, `star-scale plan --suggest` gives {over}"


def test_suggest_falls_back_to_sharding_when_memory_is_short():
    cfg = load_config("recipes/3B-star.yaml")
    over, plan = suggest(cfg, gpu_gib=40)
    assert (over["parallel.tp"], over["parallel.zero_stage"]) != (1, 2) and plan.total < 0.9 * 40 * 2**30
    with pytest.raises(ValueError, match="no layout of 16 GPUs fits in 4 GB"):
        suggest(cfg, gpu_gib=4)


def test_suggest_picks_bf16_weights_when_fp32_weights_do_not_fit_at_that_tp():
    cfg = load_config("recipes/3B-star.yaml")
    over, plan = suggest(cfg, gpu_gib=40)
    assert over["parallel.bf16_weights"] and over["parallel.tp"] == 1 and plan.total < 0.9 * 40 * 2**30
    fp32 = _with(cfg, {**over, "parallel.bf16_weights": False})
    assert estimate(fp32, 16).total > 0.9 * 40 * 2**30  # the same layout with fp32 weights does not fit
    assert estimate(plan_cfg := _with(cfg, over), 16).weights == count_params(plan_cfg)[0] * 2 / 16
    over, _ = suggest(_with(cfg, {"train.precision": "fp32"}), gpu_gib=40)
    assert not over["parallel.bf16_weights"]  # fp32 training never gets bf16 weights


@pytest.mark.parametrize("overrides,world", [(["train.precision=fp32"], 16), (["parallel.zero_stage=1"], 16),
                                              (["parallel.tp=1"], 1)])
def test_bf16_weights_refusals(overrides, world):
    with pytest.raises(ConfigError, match=r"^parallel.bf16_weights=true: expected train.precision bf16/auto \(got "):
        load_config("recipes/3B-star.yaml", ["parallel.bf16_weights=true", "parallel.zero_stage=2", *overrides],
                    world_size=world)
    load_config("recipes/3B-star.yaml", ["parallel.bf16_weights=true", "parallel.zero_stage=2"], world_size=16)
