"""DeepSpeed's checkpoint files reach DeepSpeed only listed in meta.json, unchanged, and as weights."""
import hashlib

import pytest
import torch

pytest.importorskip("deepspeed")
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from star_scale.parallel.ds_files import ManifestLoad, refusal  # noqa: E402
from star_scale.trust import RefusedFile  # noqa: E402
from tests.payloads import CopyOnLoad, save_payload  # noqa: E402


def optimizer_file() -> dict:
    """What a ZeRO-1/2 optimizer partition holds beyond tensors (DeepSpeed 0.19)."""
    return {"optimizer_state_dict": {"loss_scaler": LossScaler(1.0), "zero_stage": ZeroStageEnum.optimizer_states,
                                     "param_slice_mappings": [{"w": fragment_address(numel=4, start=0)}],
                                     "single_partition_of_fp32_groups": [torch.arange(4.0)]},
            "ds_config": {"train_batch_size": 8}, "ds_version": "0.19.8"}


def manifest(folder) -> dict:
    return {str(f.relative_to(folder))[:-3]: {"bytes": f.stat().st_size,
                                              "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in folder.rglob("*.pt")}


def test_listed_unchanged_files_load_with_deepspeed_classes(tmp_path):
    (tmp_path / "ds").mkdir()
    torch.save(optimizer_file(), tmp_path / "ds" / "optim_states.pt")
    load = ManifestLoad(tmp_path, manifest(tmp_path))
    sd = load(str(tmp_path / "ds" / "optim_states.pt"), map_location=torch.device("cpu"))
    opt = sd["optimizer_state_dict"]
    assert isinstance(opt["loss_scaler"], LossScaler) and opt["zero_stage"] is ZeroStageEnum.optimizer_states
    assert opt["param_slice_mappings"][0]["w"] == fragment_address(numel=4, start=0)
    assert torch.equal(opt["single_partition_of_fp32_groups"][0], torch.arange(4.0))
    assert refusal(tmp_path, ["ds/optim_states"]) is None


def test_payload_with_a_valid_checksum_is_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    marker = tmp_path / "marker"
    target = save_payload(tmp_path / "ds" / "optim_states.pt", marker, optimizer_file())
    files = manifest(tmp_path)  # resealed: the checksum matches the payload
    with pytest.raises(RefusedFile, match=r"optim_states.pt: refusing to unpickle shutil.copyfile"):
        ManifestLoad(tmp_path, files)(str(target))
    path, reason = refusal(tmp_path, ["ds/optim_states"])
    assert path == str(target) and "shutil.copyfile" in reason
    assert not marker.exists()


def test_unlisted_or_changed_files_are_refused(tmp_path):
    (tmp_path / "ds").mkdir()
    torch.save(optimizer_file(), tmp_path / "ds" / "a.pt")
    files = manifest(tmp_path)
    torch.save(optimizer_file(), tmp_path / "ds" / "b.pt")
    with pytest.raises(RefusedFile, match=r"b.pt: DeepSpeed asked for a file that .*meta.json does not list"):
        ManifestLoad(tmp_path, files)(str(tmp_path / "ds" / "b.pt"))
    torch.save({**optimizer_file(), "ds_version": "9"}, tmp_path / "ds" / "a.pt")
    with pytest.raises(RefusedFile, match=r"a.pt: checksum differs from .*meta.json"):
        ManifestLoad(tmp_path, files)(str(tmp_path / "ds" / "a.pt"))


def test_legacy_format_payload_is_refused_by_the_scan(tmp_path):
    """torch's pre-zip format cannot be scanned: refused as unreadable, never unpickled."""
    (tmp_path / "ds").mkdir()
    marker = tmp_path / "marker"
    target = tmp_path / "ds" / "optim_states.pt"
    (tmp_path / "src.txt").write_text("the payload ran\n")
    torch.save({"w": torch.zeros(2), "x": CopyOnLoad(tmp_path / "src.txt", marker)}, target,
               _use_new_zipfile_serialization=False)
    path, reason = refusal(tmp_path, ["ds/optim_states"])
    assert path == str(target) and reason.startswith("cannot read as a torch checkpoint")
    with pytest.raises(RefusedFile, match="refusing to unpickle shutil.copyfile"):
        ManifestLoad(tmp_path, manifest(tmp_path))(str(target))
    assert not marker.exists()
