"""`star-scale repro --dataset digits`: the ablation pipeline on the real digits, tiny setting."""
import json

from star_scale.demo.repro import cli as repro
from star_scale.demo.repro.plan import TITLES

TINY = ["--dataset", "digits", "--per-class", "6", "--val-per-class", "3", "--seeds", "0", "--configs", "baseline",
        "all", "--samples-per-class", "2", "--classifier-epochs", "1", "--probe-epochs", "2", "train.steps=2"]


def test_repro_on_digits_tiny(tmp_path, capsys):
    out = tmp_path / "repro"
    assert repro.main(["--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "data: 60 train / 30 val images, 10 classes" in printed
    table = (out / "table.md").read_text()
    assert table.strip() in printed
    assert "chance here is 10% (10 classes)" in table
    for config in ("baseline", "all"):
        assert f"| {TITLES[config]} | 1 |" in table
        run = out / "runs" / f"{config}-s0"
        result = json.loads((run / "result.json").read_text())
        assert result["steps"] == 2 and len(result["generation"]["cfg1"]["per_class_accuracy"]) == 10
        assert (run / "report.png").is_file() and "| loss_ar | 2 |" in (run / "report.md").read_text()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["dataset"] == "digits" and settings["data"]["class_names"] == [f"{d:02d}_{d}" for d in range(10)]
    # train and val are disjoint digits: no image index in both folders
    names = {split: {p.name for p in (out / "data" / f"{split}_images").glob("*/*.png")} for split in ("train", "val")}
    assert len(names["train"]) == 60 and len(names["val"]) == 30 and not names["train"] & names["val"]
