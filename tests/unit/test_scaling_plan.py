"""`star-scale sweep plan` and the checks `sweep submit` runs before sbatch (no Slurm, no mlflow needed)."""
import json
import math
import re
from pathlib import Path

import pytest

from star_scale import sweep as sw
from star_scale.config import load_config
from star_scale.slurm.plan import count_params
from tests.conftest import TINY

ROOT = Path(__file__).resolve().parents[2]
TINY_AR = ROOT / "recipes" / "tiny-ar.yaml"
SIZES = """
    w16: {model.layers: 1, model.heads: 1, model.width: 16}
    w32: {model: {layers: 2, heads: 2, width: 32}}"""


def write(tmp_path, body, name="sw.yaml"):
    path = tmp_path / name
    path.write_text(body)
    return path


def grid_spec(tokens="[1.0e5, 2.0e5]", extra=""):
    return f"base: {TINY_AR}\n{extra}grid:\n  sizes:{SIZES}\n  tokens: {tokens}\n"


def test_grid_plan_expands_sizes_x_tokens_and_writes_tasks(tmp_path):
    sweep = sw.load_sweep(write(tmp_path, grid_spec()), ["train.log_every=5"], out=str(tmp_path / "out"))
    assert [r.label for r in sweep.runs] == ["w16-D1e5", "w16-D2e5", "w32-D1e5", "w32-D2e5"]
    assert sweep.uri == f"sqlite:///{tmp_path / 'out' / 'mlflow.db'}" and sweep.experiment == "sw"
    for run in sweep.runs:
        cfg = load_config(run.args[0], run.args[1:])
        assert run.tokens_per_step == 32 * 64  # tiny-ar: 32 images x 8x8 tokens
        assert run.steps == round(run.budget / run.tokens_per_step)
        assert run.tokens == run.steps * run.tokens_per_step
        assert run.n_params == count_params(cfg)[0]
        assert run.flops == 6 * run.n_params * run.tokens
        assert cfg.train.steps == run.steps and cfg.train.log_every == 5
        assert cfg.name == f"sw-{run.label}" and cfg.run_dir() == tmp_path / "out" / "runs" / run.label
        assert cfg.tracking.uri == sweep.uri and cfg.tracking.experiment == "sw" and cfg.tracking.enabled
    assert load_config(sweep.runs[2].args[0], sweep.runs[2].args[1:]).model_dims() == (2, 2, 32)

    sw.write_plan(sweep)
    out = tmp_path / "out"
    assert (out / "tasks" / "3.args").read_text().splitlines() == sweep.runs[3].args
    assert json.loads((out / "tasks" / "1.tags.json").read_text()) == {
        "sweep": "sw", "sweep_run": "w16-D2e5", "sweep_size": "w16", "sweep_index": 1}
    state = json.loads((out / "sweep.json").read_text())
    assert state["name"] == "sw" and len(state["runs"]) == 4 and (out / "plan.md").is_file()

    # A re-plan with fewer runs leaves no stale task files behind.
    sw.write_plan(sw.load_sweep(write(tmp_path, grid_spec("[1.0e5]")), out=str(out)))
    assert sorted(p.name for p in (out / "tasks").iterdir()) == ["0.args", "0.tags.json", "1.args", "1.tags.json"]


def test_repo_sweep_recipes_plan():
    tiny = sw.load_sweep(ROOT / "recipes/sweeps/tiny.yaml")
    assert len(tiny.runs) == 9 and tiny.base == TINY_AR
    assert {r.steps for r in tiny.runs} == {49, 98, 195}
    assert all(load_config(r.args[0], r.args[1:]).cluster.gpus_per_node == 0 for r in tiny.runs)
    iso = sw.load_sweep(ROOT / "recipes/sweeps/tiny-isoflop.yaml")
    assert iso.mode == "compute" and len(iso.runs) == 8
    for run in iso.runs:  # D = C / 6N, rounded to whole steps
        assert abs(run.flops / run.budget - 1) <= 0.5 * run.tokens_per_step / (run.tokens - run.tokens_per_step / 2)
        assert run.tokens == round(run.budget / (6 * run.n_params) / run.tokens_per_step) * run.tokens_per_step


def test_compute_plan_with_model_flops_and_sweep_sets(tmp_path):
    spec = f"base: {TINY_AR}\nflops: model\ncompute:\n  budgets: [2e11]\n  sizes:{SIZES}\n"
    path = write(tmp_path, spec)
    sweep = sw.load_sweep(path, ["objective=star"], out=str(tmp_path / "o"))
    for run in sweep.runs:
        cfg = load_config(run.args[0], run.args[1:])
        per_token = sw.train_flops_per_token(cfg)
        assert per_token > 6 * run.n_params * 0.5  # the model's own count, teacher forward included
        assert run.tokens_per_step == 32 * 2 * 64  # ST-AR: two views per image
        assert run.steps == round(2e11 / per_token / run.tokens_per_step)
        assert run.flops == pytest.approx(per_token * run.tokens)
    dropped = sw.load_sweep(path, sets=["compute.sizes.w32=null", "compute.budgets=[1e11, 4e11]", "name=other"],
                            out=str(tmp_path / "o"))
    assert [r.label for r in dropped.runs] == ["w16-C1e11", "w16-C4e11"] and dropped.experiment == "other"


@pytest.mark.parametrize("body,message", [
    ("base: {base}\nbogus: 1\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "unknown key 'bogus'"),
    ("grid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "base: missing"),
    ("base: nope.yaml\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "base='nope.yaml': recipe"),
    ("base: {base}\n", "expected exactly one of grid"),
    ("base: {base}\ngrid: {{sizes: {{a: {{}}}}}}\n", "expected exactly one of tokens"),
    ("base: {base}\ngrid: {{sizes: {{a: {{model.widht: 32}}}}, tokens: [1e5]}}\n", "model.widht: unknown key"),
    ("base: {base}\ngrid: {{sizes: {{a: {{model.width: 30}}}}, tokens: [1e5]}}\n", "size a: model.width=30"),
    ("base: {base}\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5, abc]}}\n", "grid.tokens[1]='abc'"),
    ("base: {base}\ngrid: {{sizes: {{a: {{}}}}, tokens: [100]}}\n", "less than one step of 2048 tokens"),
    ("base: {base}\noverrides: {{train.steps: 5}}\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "override train.steps"),
    ("base: {base}\noverrides: [tracking.uri=x]\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "tracking: section"),
    ("base: {base}\nflops: 7ND\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "flops='7ND'"),
    ("base: {base}\nfit: {{tail: 2}}\ngrid: {{sizes: {{a: {{}}}}, tokens: [1e5]}}\n", "fit.tail=2.0"),
    ("base: {base}\ngrid: {{sizes: {{a b: {{}}}}, tokens: [1e5]}}\n", "size names"),
])
def test_bad_sweeps_name_the_key_and_file(tmp_path, body, message):
    path = write(tmp_path, body.format(base=TINY_AR))
    with pytest.raises(sw.SweepError) as e:
        sw.load_sweep(path, out=str(tmp_path / "o"))
    assert message in str(e.value) and str(path) in str(e.value)
    assert not (tmp_path / "o").exists()


def test_cli_plan_prints_the_table_and_errors_exit_2(tmp_path, capsys):
    path = write(tmp_path, grid_spec())
    assert sw.main(["plan", str(path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "N params" in out and "w32-D2e5" in out and "4 runs = 2 sizes x 2 token budgets" in out
    assert sw.main(["plan", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml': file not found" in capsys.readouterr().err


def test_dry_run_prints_one_array_script_and_writes_nothing(tmp_path, token_npz, capsys):
    path = write(tmp_path, grid_spec("[2560, 5120]", extra="max_parallel: 2\n"))
    cpu = [*TINY, f"data.path={token_npz}", "data.global_batch=16", "cluster.gpus_per_node=0",
           "cluster.tasks_per_node=1", "cluster.cpus_per_task=1"]
    out_dir = tmp_path / "o"
    assert sw.main(["submit", str(path), *cpu, "--out", str(out_dir), "--dry-run", "--time", "00:05:00"]) == 0
    script = capsys.readouterr().out
    assert "#SBATCH --array=0-3%2" in script and "#SBATCH --ntasks-per-node=1" in script
    assert "#SBATCH --time=00:05:00" in script and "--gpus-per-node" not in script
    assert f"{out_dir}/logs/%x-%A_%a.out" in script and 'tasks/$TASK.args' in script
    assert '-m star_scale.cli train "${ARGS[@]}"' in script and not re.search(r"@[A-Z_]+@", script)
    assert not out_dir.exists()

    # Before sbatch: missing data, mixed resource shapes, a TP layout that cannot fit.
    assert sw.main(["submit", str(path), *cpu[:-4], "data.path=/nonexistent.npz", *cpu[-3:],
                    "--out", str(out_dir), "--dry-run"]) == 2
    assert "data.path='/nonexistent.npz': not found" in capsys.readouterr().err
    mixed = write(tmp_path, grid_spec().replace("model.width: 16}", "model.width: 16, cluster.cpus_per_task: 2}"), "m.yaml")
    assert sw.main(["submit", str(mixed), *cpu, "--out", str(out_dir), "--dry-run"]) == 2
    assert "cluster.cpus_per_task differs between runs" in capsys.readouterr().err
    assert not out_dir.exists()


def test_config_from_params_round_trip():
    cfg = load_config(TINY_AR, ["model.width=48", "model.heads=3", "objective=star", "objective.layer=1"])
    params = {k: str(v) for k, v in cfg.flat().items()}  # as mlflow returns them
    back = sw.config_from_params(params)
    assert back.model == cfg.model and back.objective == cfg.objective
    assert sw.model_params(back) == count_params(cfg)[0]
    assert sw.model_params(back, "non_embedding") == cfg.model_dims()[0] * count_params(cfg)[1]


def test_tail_mean_and_short_numbers():
    steps = list(range(1, 11))
    assert sw.tail_mean(steps, [float(s) for s in steps], 0.2) == 9.5
    assert sw.tail_mean(steps, [float(s) for s in steps], 0.0) == 10.0
    assert [sw.short(x) for x in (49, 2048, 20480, 1e9, 2.5e18, 123456789)] == \
        ["49", "2048", "2.05e4", "1e9", "2.5e18", "1.23e8"]
    assert math.isclose(float(sw.short(2.05e4)), 2.05e4)


def test_sweep_tags_reach_mlflow_run_tags(monkeypatch, caplog):
    from star_scale.train.tracking import run_tags

    monkeypatch.setenv("STAR_SCALE_MLFLOW_TAGS", '{"sweep": "tiny", "sweep_index": 3}')
    tags = run_tags()
    assert tags["sweep"] == "tiny" and tags["sweep_index"] == "3" and "host" in tags
    monkeypatch.setenv("STAR_SCALE_MLFLOW_TAGS", "sweep=tiny")
    assert "sweep" not in run_tags() and "expected a JSON object" in caplog.text
