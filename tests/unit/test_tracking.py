"""mlflow tracking against the default local store (sqlite in the run folder)."""
from mlflow.tracking import MlflowClient

from star_scale.train.loop import train
from star_scale.train.tracking import default_uri


def test_resumed_run_continues_one_mlflow_run(tiny_cfg):
    cfg = tiny_cfg("tracking.enabled=true", "train.log_every=1")
    first = train(cfg, stop_after=4)
    second = train(cfg)
    assert first["mlflow_run_id"] == second["mlflow_run_id"]

    client = MlflowClient(default_uri(cfg.run_dir()))
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    steps = sorted({m.step for m in client.get_metric_history(run.info.run_id, "loss")})
    assert steps == list(range(1, cfg.train.steps + 1))  # continuous, no gap at the resume
    for key in ("loss_ar", "lr", "grad_norm", "tokens_seen", "samples_per_s", "memory_gib"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert not client.get_metric_history(run.info.run_id, "mfu")  # a CPU has no peak in the table: unknown
    assert run.data.params["model.preset"] == "tiny"
    assert run.data.params["optimizer.lr"] == "0.001"  # params come back as strings
    assert "host" in run.data.tags
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config.yaml"]


def test_an_unusable_store_turns_tracking_off_with_one_warning_and_keeps_the_run_id(tiny_cfg, tmp_path, caplog):
    from star_scale.train.tracking import NullTracker, make_tracker

    (tmp_path / "a_file").write_text("x")
    cfg = tiny_cfg("tracking.enabled=true", f"tracking.uri=sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}")
    tracker = make_tracker(cfg, cfg.run_dir(), "abc123", is_main=True)
    assert isinstance(tracker, NullTracker) and tracker.run_id == "abc123"
    [record] = [r for r in caplog.records if r.name == "star_scale.train.tracking"]
    assert "unusable" in record.getMessage() and "\n" not in record.getMessage()
