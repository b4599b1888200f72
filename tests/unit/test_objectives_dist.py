"""Negatives gathered across two gloo ranks equal the single-process loss over the whole batch."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from star_scale.objectives.contrastive import contrastive_losses, gather_negatives


def _data():
    g = torch.Generator().manual_seed(0)
    b, m, k, s, w = 4, 2, 3, 7, 8
    anchors = torch.randn(b, m, k, w, generator=g)
    teacher = torch.randn(b, m, s, w, generator=g)
    positions = torch.stack([torch.randperm(s - 1, generator=g)[:k] + 1 for _ in range(b * m)]).view(b, m, k)
    return anchors, teacher, positions


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        anchors, teacher, positions = _data()
        local = slice(rank * 2, rank * 2 + 2)
        x = torch.arange(3.0)[None].repeat(2, 1) + 10 * rank
        gathered, offset = gather_negatives(x)
        a = anchors[local].clone().requires_grad_(True)
        out = contrastive_losses(a, teacher[local], positions[local], 0.2)
        (out["loss_step"] + out["loss_view"]).backward()
        torch.save({"gathered": gathered, "offset": offset, "grad": a.grad,
                    **{k: v.detach() for k, v in out.items()}}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_negatives_gathered_across_ranks(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert torch.equal(results[0]["gathered"], results[1]["gathered"])
    assert results[0]["gathered"][:, 0].tolist() == [0, 0, 10, 10]
    assert [r["offset"] for r in results] == [0, 2]
    anchors, teacher, positions = _data()
    full = contrastive_losses(anchors, teacher, positions, 0.2)  # one process, the whole batch
    for key in ("loss_step", "loss_view", "acc_step", "acc_view"):
        # Each rank has as many pairs, so the global mean is the mean of the two ranks.
        mean = (results[0][key] + results[1][key]) / 2
        assert mean.item() == pytest.approx(full[key].item(), rel=1e-5), key
    assert all(r["grad"] is not None and r["grad"].abs().sum() > 0 for r in results)
