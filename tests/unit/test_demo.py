import json

from PIL import Image

from star_scale.demo.run import human_summary, run_demo


def test_demo_on_digits_end_to_end_small(tmp_path, one_thread):
    out = tmp_path / "demo"
    result = run_demo(out, steps=4, judge_epochs=1, samples_per_class=3, fid_per_class=2, fid_real=12)
    assert result["dataset"] == "digits" and result["images"] == 1797 and result["classes"] == 10
    assert result["train"]["step"] == 4
    grid = Image.open(out / "samples.png")
    assert grid.size[1] > grid.size[0] > 100  # 10 rows (one per digit) of 3 samples
    assert (out / "reconstructions.png").is_file() and (out / "run" / "report.png").is_file()
    assert (out / "report.png").read_bytes() == (out / "run" / "report.png").read_bytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokenizer_psnr_db"] > 15
    m = summary["metrics"]
    assert 0 <= m["probe_top1"] <= 1 and 0 <= m["judge_accuracy_cfg2"] <= 1 and m["inception_fid"] > 0
    assert summary["fid_images"] == {"samples": 20, "real": 12}
    text = human_summary(summary)
    assert "1797 real handwritten digits, 10 classes" in text and "Inception FID vs the real images" in text
    assert not text.lstrip().startswith("{")  # a summary for people; the JSON stays in summary.json
    # Re-running resumes: training is not redone.
    again = run_demo(out, steps=4, judge_epochs=1, samples_per_class=3, fid=False)
    assert again["train"]["step"] == 4 and "inception_fid" not in again["metrics"]


def test_demo_keeps_the_shapes(tmp_path, one_thread):
    result = run_demo(tmp_path / "demo", steps=2, dataset="shapes", per_class=8, judge_epochs=1,
                      samples_per_class=2, fid=False)
    assert result["dataset"] == "shapes" and result["images"] == 64 and result["classes"] == 8
