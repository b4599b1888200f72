"""`star-scale repro`: the whole ablation pipeline on a very small setting, and the table's arithmetic."""
import json

import pytest

from star_scale.demo.repro import cli as repro
from star_scale.demo.repro.plan import TITLES
from star_scale.demo.repro.table import make_table

SMALL = ["--per-class", "12", "--val-per-class", "6", "--seeds", "0", "--samples-per-class", "2",
         "--classifier-epochs", "1", "--probe-epochs", "2", "--cfg-scale", "1.5", "train.steps=2"]


def test_repro_end_to_end_small(tmp_path, capsys):
    out = tmp_path / "repro"
    assert repro.main(["--out", str(out), *SMALL]) == 0
    printed = capsys.readouterr().out
    table = (out / "table.md").read_text()
    assert table.strip() in printed  # the saved table is what was printed
    assert "chance here is 12.5% (8 classes)" in table
    for config in repro.CONFIGS:
        assert f"| {TITLES[config]} | 1 |" in table
        result = json.loads((out / "runs" / f"{config}-s0" / "result.json").read_text())
        assert result["steps"] == 2 and result["model"]["layers"] == 4 and result["probe_layer"] == 2
        assert 0.0 <= result["probe_top1"] <= 1.0 and result["val_loss"] > 0
        assert set(result["generation"]) == {"cfg1", "cfg1.5"}
        assert (out / "runs" / f"{config}-s0" / "samples.png").is_file()
    objectives = {c: json.loads((out / "runs" / f"{c}-s0" / "result.json").read_text())["objective"]
                  for c in repro.CONFIGS}
    assert objectives["baseline"]["name"] == "ar"
    assert [(objectives[c]["mim"], objectives[c]["step"], objectives[c]["view"]) for c in repro.CONFIGS[1:]] == \
        [(False, False, False), (True, False, False), (True, True, False), (True, False, True), (True, True, True)]
    assert {objectives[c]["name"] for c in repro.CONFIGS[1:]} == {"star"}
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["runs"]) == len(repro.CONFIGS) and saved["wall_seconds"] > 0

    # Resumable: a second invocation trains nothing and prints the same table.
    assert repro.main(["--out", str(out), *SMALL]) == 0
    again = capsys.readouterr().out
    assert f"{len(repro.CONFIGS)} runs already done, 0 to go" in again
    strip = lambda t: [line for line in t.splitlines() if not line.startswith("Wall time")]
    assert strip((out / "table.md").read_text()) == strip(table)

    # --table-only prints the table and leaves the saved files (with their wall time) alone.
    assert repro.main(["--out", str(out), "--table-only", *SMALL]) == 0
    assert "Wall time" not in capsys.readouterr().out and "Wall time" in (out / "table.md").read_text()

    # Results made under other settings are never mixed with new ones.
    with pytest.raises(SystemExit, match="other settings"):
        repro.main(["--out", str(out), *SMALL[:-1], "train.steps=3"])


def test_list_and_help(capsys):
    assert repro.main(["--list", "--seeds", "0", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    n = len(repro.CONFIGS)
    assert lines[0] == "0\tbaseline-s0" and lines[n] == f"{n}\tbaseline-s1" and len(lines) == 2 * n
    with pytest.raises(SystemExit) as e:
        repro.main(["--help"])
    assert e.value.code == 0
    assert "Table 3" in capsys.readouterr().out


def _fake(config, seed, probe, loss, acc, fid):
    gen = {"cfg1": {"cfg_scale": 1.0, "accuracy": acc, "fid": fid},
           "cfg2": {"cfg_scale": 2.0, "accuracy": acc, "fid": fid}}
    return {"config": config, "seed": seed, "probe_top1": probe, "val_loss": loss, "generation": gen,
            "probe_layer": 2, "steps": 10, "global_batch": 4,
            "model": {"layers": 4, "heads": 4, "width": 64, "params": 330000}}


def test_table_mean_std_and_paired_differences():
    results = [_fake("baseline", 0, 0.50, 2.0, 0.5, 10.0), _fake("baseline", 1, 0.60, 2.2, 0.7, 12.0),
               _fake("all", 0, 0.70, 2.1, 0.6, 8.0), _fake("all", 1, 0.90, 2.1, 0.8, 9.0)]
    judge = {"val_accuracy": 0.9, "reference_images": 16, "fid_real_train_vs_val": 0.5}
    table = make_table(results, ["baseline", "all"], [0, 1], 2.0, judge, wall_seconds=60)
    rows = {line.split(" | ")[0]: line for line in table.splitlines()}
    # baseline probe: 50, 60 -> 55.0 ± 7.1 (sample std); all: 70, 90 -> 80.0 ± 14.1
    assert "| 55.0 ± 7.1 | 2.1000 ± 0.1414 | 60.0 ± 14.1 | 11.00 ± 1.41 |" in rows["| baseline (AR)"]
    assert rows["| baseline (AR)"].endswith("| 31.35 / 18.68 |")
    assert "| 80.0 ± 14.1 |" in table
    # paired: probe +20, +30 -> +25.0 ± 7.1; FID -2, -3 -> -2.50 ± 0.71
    paired = [line for line in table.splitlines() if line.startswith("| +MIM+step+view (ST-AR) | 2 |")]
    assert len(paired) == 2 and "+25.0 ± 7.1" in paired[1] and "-2.50 ± 0.71" in paired[1]  # [0]: the means table
    assert "Wall time of this invocation: 1.0 min." in table


def test_demo_data_palette_and_clutter_options():
    import numpy as np

    from star_scale.demo.data import PALETTE, draw_shape

    # The defaults draw exactly what they drew before the options existed (same random stream).
    a = np.asarray(draw_shape("star", 36, np.random.default_rng(3)))
    b = np.asarray(draw_shape("star", 36, np.random.default_rng(3), palette=None, clutter=3))
    assert (a == b).all()
    # palette=4, no clutter: exactly two palette colours (shape != background).
    for seed in range(10):
        img = np.asarray(draw_shape("square", 36, np.random.default_rng(seed), palette=4, clutter=0))
        colours = {tuple(c) for c in img.reshape(-1, 3)}
        assert colours <= set(PALETTE[:4]) and len(colours) == 2
    with pytest.raises(ValueError, match="palette"):
        draw_shape("star", 36, np.random.default_rng(0), palette=1)
