import json

from PIL import Image

from star_scale.demo.run import run_demo


def test_demo_end_to_end_small(tmp_path):
    result = run_demo(tmp_path / "demo", steps=4, per_class=32)
    assert result["images"] == 8 * 32 and result["train"]["step"] == 4
    grid = Image.open(tmp_path / "demo" / "samples.png")
    assert grid.size[0] > 100 and grid.size[1] > 100
    assert (tmp_path / "demo" / "reconstructions.png").is_file()
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert summary["tokenizer_psnr_db"] > 15
    assert 0 <= summary["metrics"]["probe_top1"] <= 1 and summary["metrics"]["pixel_fid"] > 0
    assert 0 <= summary["metrics"]["pixel_precision"] <= 1 and 0 <= summary["metrics"]["pixel_recall"] <= 1
    # Re-running resumes: nothing is redone, the same summary comes back.
    again = run_demo(tmp_path / "demo", steps=4, per_class=32)
    assert again["train"]["step"] == 4
