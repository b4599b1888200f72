"""`star-scale report`: curves PNG, last-values table, the PNG in mlflow, artifacts in the run folder."""
from pathlib import Path

from mlflow.tracking import MlflowClient
from PIL import Image

from star_scale.train.loop import train
from star_scale.train.report import main
from star_scale.train.tracking import default_uri


def test_report_of_a_tracked_star_run(tiny_cfg, tmp_path, monkeypatch, capsys, one_thread):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # artifacts must not land in ./mlruns of the current directory
    cfg = tiny_cfg("tracking.enabled=true", "objective.name=star", "train.probe_every=3", "train.probe_images=64")
    train(cfg)
    run_dir = cfg.run_dir()
    assert main([str(run_dir)]) == 0
    assert Image.open(run_dir / "report.png").size[0] > 600
    table = (run_dir / "report.md").read_text()
    for key in ("loss_ar", "loss", "loss_mim", "loss_step", "loss_view", "probe_acc", "tokens_per_s", "mfu",
                "grad_norm", "lr"):
        assert f"| {key} | " in table, key
    assert "| probe_acc | 6 |" in table and "| tokens_per_s | 6 |" in table
    assert not (elsewhere / "mlruns").exists()
    client = MlflowClient(default_uri(run_dir))
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "report.png"]
    assert Path(run.info.artifact_uri.removeprefix("file://")).resolve().is_relative_to(run_dir.resolve())
    assert f"mlflow run {run.info.run_id}: report.png" in capsys.readouterr().out


def test_report_of_a_folder_without_metrics_is_a_one_line_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"star-scale report: error: {tmp_path / 'metrics.jsonl'}: no metrics; "
                                               "expected a run folder written by `star-scale train`")
