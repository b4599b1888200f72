"""One torchrun launch computing several results, written as JSON for the pytest side to compare.

    python -m torch.distributed.run --nproc_per_node N tests/dist/worker.py SCENARIO OUT_DIR

Scenarios:
  dp2      2 ranks, ZeRO-3: ar and star losses on fixed global batches; the gathered
           teacher against an EMA of the gathered student history; ar with activation
           checkpointing; star at ZeRO-2 (whole teacher replica); star with 2 micro-batches per
           rank (negatives over the whole global batch); star at ZeRO-2 in bf16 (EMA of the masters).
  tp2dp2   4 ranks, TP = 2 x DP = 2: TP logits/gradients against the dense model;
           ar and star runs as above; a checkpoint of the star run at step 10.
  resume1  1 rank: the tp2dp2 checkpoint (other world, other TP) continued to step 20.
  tp2_perturb  2 ranks, TP = 2: the replica check before and after one rank's norm weight moves (by one
           ulp, then by 1e-3); the TP build of a meta-built module allocates nothing.
  whole_state_loads  2 ranks, ZeRO-3: private memory added by loading engine.pt and consolidated.pt.
  bf16     2 ranks, ZeRO-3, train.precision=bf16: star losses and the sharded teacher's EMA as in
           dp2; the consolidated state through a fresh engine and back; fp32 star with a chunked
           head cross-entropy.
  tp2recompute  2 ranks, TP = 2: star with and without activation checkpointing.
  bf16_weights  2 ranks, parallel.bf16_weights (bf16 weights, fp32 masters, bf16 reduction): star at
           ZeRO-2 and ZeRO-3, losses and the teacher's EMA as in dp2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from star_scale.objectives.teacher import ema_update_  # noqa: E402
from star_scale.parallel import checkpoint as dist_ckpt  # noqa: E402
from star_scale.parallel import whole_state  # noqa: E402
from star_scale.parallel.engine import DeepSpeedEngine  # noqa: E402
from star_scale.parallel.layout import init_layout, shutdown  # noqa: E402
from star_scale.train.checkpoint import CheckpointDir  # noqa: E402


def run(objective: str, world: int, tp: int, *extra: str, ckpt_dir: Path | None = None, meta: bool = True) -> dict:
    cfg = common.config(objective, f"parallel.tp={tp}", *extra, world=world)
    module = common.build(cfg, meta=meta)
    reference_teacher = None
    engine = DeepSpeedEngine(module, cfg)
    if engine.teacher is not None:
        reference_teacher = engine.teacher.full_state()  # = the initial student
    losses, norms, history = [], [], []
    for step, batch in enumerate(common.batches(common.STEPS, module.views), start=1):
        metrics = engine.train_step(*common.rank_slice(batch, engine.dp_rank, engine.dp_size))
        losses.append(metrics["loss"])
        norms.append(metrics["grad_norm"])
        history.append(metrics)
        if reference_teacher is not None:  # EMA of the gathered student history, in plain torch
            student = {k[len("student."):]: v for k, v in whole_state.consolidate_student(engine).items()}
            names = sorted(reference_teacher)
            ema_update_([reference_teacher[n] for n in names], [student[n] for n in names], cfg.objective.ema_decay)
        if ckpt_dir is not None and step == 10:
            dist_ckpt.save(engine, CheckpointDir(ckpt_dir), step, {"step": step})
    out = {"losses": losses, "grad_norms": norms, "metrics": history,
           "param_dtype": str(next(engine.module.parameters()).dtype)}
    if reference_teacher is not None:
        gathered = engine.teacher.full_state()
        out["teacher_max_diff"] = max((gathered[n] - reference_teacher[n]).abs().max().item() for n in gathered)
        out["teacher_moved"] = max((gathered[n] - student_init).abs().max().item()
                                   for n, student_init in engine_initial_student(cfg).items())
    return out


def engine_initial_student(cfg) -> dict:
    """The seeded initial student (TP = 1 names), to show the teacher actually moved."""
    return dict(common.build(cfg, meta=False).student.named_parameters())


def tp_check() -> dict:
    """TP = 2 GPT vs the dense GPT on the same weights: logits, loss and gradients."""
    from star_scale.parallel.tensor_parallel import LayerFactory, gather_full, to_tensor_parallel

    L = init_layout(2)
    cfg = common.config("ar", "parallel.tp=2", world=dist.get_world_size())
    dense = common.build(cfg, meta=False).student
    torch.nn.init.normal_(dense.output.weight, std=0.02)  # the zero-initialised head would hide logit errors
    tp_model = to_tensor_parallel(dense, LayerFactory(2), L.tp_rank)
    tokens, labels = common.batches(1, 1)[0]
    seq = tokens[:, 0]
    ref = dense(seq[:, :-1], labels)
    ref_loss = dense.next_token_loss(ref.logits, seq)
    ref_loss.backward()
    out = tp_model(seq[:, :-1], labels)
    parts = [torch.empty_like(out.logits) for _ in range(2)]
    dist.all_gather(parts, out.logits.detach().contiguous(), group=L.tp_group)
    logits = torch.cat(parts, dim=-1)  # vocab-sharded along the last dimension
    logits_diff = (logits - ref.logits.detach()).abs().max().item()
    loss = tp_model.next_token_loss(out.logits, seq)
    loss.backward()
    grads = {n: gather_full(p.grad, p, L.tp_group) for n, p in tp_model.named_parameters()}
    dense_grads = dict(dense.named_parameters())
    grad_diff = max((g - dense_grads[n].grad).abs().max().item() for n, g in grads.items())
    grad_scale = max(p.grad.abs().max().item() for p in dense.parameters())
    return {"logits_max_diff": logits_diff, "logits_scale": ref.logits.abs().max().item(),
            "loss": loss.item(), "ref_loss": ref_loss.item(), "grad_max_diff": grad_diff, "grad_scale": grad_scale}


def consolidation_roundtrip(objective: str, *extra: str) -> dict:
    """Train, consolidate, load into a fresh engine: the consolidated state comes back bit for bit
    and both engines take the same next step."""
    cfg = common.config(objective, *extra, world=dist.get_world_size())
    batches = common.batches(4, 2 if objective == "star" else 1)
    a = DeepSpeedEngine(common.build(cfg), cfg)
    for b in batches[:3]:
        a.train_step(*common.rank_slice(b, a.dp_rank, a.dp_size))
    shared = [a.state_dict()]  # consolidated on rank 0 (None elsewhere): every rank loads it
    dist.broadcast_object_list(shared, src=0)
    state = shared[0]
    b_engine = DeepSpeedEngine(common.build(cfg), cfg)
    b_engine.load_state_dict(state)
    b_engine.step = state["optimizer_step"]  # as load_checkpoint does: ST-AR's draws follow the step
    again = b_engine.state_dict() or state  # compared on rank 0

    def max_diff(x, y):
        if isinstance(x, dict):
            return max([max_diff(x[k], y[k]) for k in x] or [0.0])
        if isinstance(x, torch.Tensor):
            return (x.float() - y.float()).abs().max().item() if x.numel() else 0.0
        return 0.0 if x == y else float("inf")
    last = [e.train_step(*common.rank_slice(batches[3], e.dp_rank, e.dp_size))["loss"] for e in (a, b_engine)]
    return {"state_max_diff": max_diff(state, again), "next_losses": last, "dtype": str(a.dtype)}


def chunked_head_run() -> dict:
    """fp32 star under ZeRO-3 with the head's cross-entropy cut into 5-row chunks (the head module
    runs once per chunk, and again per chunk in backward)."""
    from star_scale.models import head_loss

    default, head_loss.CHUNK_ELEMENTS = head_loss.CHUNK_ELEMENTS, 5 * 64
    try:
        return run("star", 2, 1)
    finally:
        head_loss.CHUNK_ELEMENTS = default


def resume1(ckpt_dir: Path) -> dict:
    cfg = common.config("star", "parallel.tp=1", world=1)
    module = common.build(cfg)
    engine = DeepSpeedEngine(module, cfg)
    step, _ = engine.load_checkpoint(CheckpointDir(ckpt_dir))
    losses = [engine.train_step(*b)["loss"] for b in common.batches(common.STEPS, module.views)[step:]]
    return {"resumed_at": step, "losses": losses}


def tp2_perturb() -> dict:
    """The TP replica check passes on a fresh TP 2 engine and after rank 1's copy of a norm moves by one ulp
    per element, then fails once it moves by 1e-3. Also: the TP GPT of a meta-built module stays unallocated
    (what the engine builds on every device, CUDA included) until materialised."""
    from star_scale.parallel.replicas import ReplicaMismatch, check_replicas
    from star_scale.parallel.tensor_parallel import LayerFactory, tensor_parallelize

    cfg = common.config("ar", "parallel.tp=2", world=2)
    engine = DeepSpeedEngine(common.build(cfg), cfg)
    out = {"tp_meta": tp_build_allocates(LayerFactory, tensor_parallelize, cfg, engine.layout.tp_rank)}
    weight = dict(engine.module.named_parameters())["student.norm.weight"]
    local = weight.ds_tensor if hasattr(weight, "ds_tensor") else weight
    for when in ("before", "last_bit", "after"):
        try:
            check_replicas(engine.module, engine.layout.tp_group)
            out[when] = "agree"
        except ReplicaMismatch as e:
            out[when] = str(e)
        if engine.layout.tp_rank == 1:
            with torch.no_grad():
                if when == "before":  # what another reduction order can leave: the next float up
                    local.copy_(torch.nextafter(local, torch.full_like(local, float("inf"))))
                else:
                    local.add_(1e-3)
    return out


def tp_build_allocates(LayerFactory, tensor_parallelize, cfg, tp_rank: int) -> dict:
    """Build the engine's TP module from a meta-built one with every CUDA device query failing: megatron
    must not allocate (it did on CUDA: use_cpu_initialization=False puts weights on current_device())."""
    def no_cuda():
        raise AssertionError("a megatron layer asked for a CUDA device at construction")

    default, torch.cuda.current_device = torch.cuda.current_device, no_cuda
    try:
        module = tensor_parallelize(common.build(cfg), LayerFactory(2), tp_rank)
        return {"allocated": [n for n, p in module.named_parameters() if not p.is_meta]}
    except AssertionError as e:
        return {"error": str(e)}
    finally:
        torch.cuda.current_device = default


def private_peak(fn) -> int:
    """Bytes of private (anonymous) memory ``fn()`` adds at its peak, sampled every 2 ms: a file mapped
    into memory and shared by the node's ranks is not counted, a copy of it is."""
    import threading

    def anon() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))

    base, peak, done = anon(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], anon())
            done.wait(0.002)
    thread = threading.Thread(target=sample)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], anon()) - base


def whole_state_loads(out_dir: Path) -> dict:
    """2 ranks, ZeRO-3: a single-process checkpoint (engine.pt) and one of the first distributed format
    (consolidated.pt) of a model with a 270 MB state, loaded through checkpoint._load_one; the private
    memory each rank adds, and whether the loaded state equals the saved one."""
    from star_scale.parallel.consolidated import DISTRIBUTED_V1
    from star_scale.train.local_engine import LocalEngine

    cfg = common.config("star", "model.vocab_size=131072", world=2)
    engine = DeepSpeedEngine(common.build(cfg), cfg)
    batch = common.batches(1, engine.module.views)[0]
    engine.train_step(*common.rank_slice(batch, engine.dp_rank, engine.dp_size))  # AdamW's state exists
    rank, d = dist.get_rank(), out_dir / "whole"
    local, legacy = d / "local", d / "legacy"
    if rank == 0:
        one = LocalEngine(common.build(cfg), cfg)  # untrained: its negatives would gather over both ranks
        local.mkdir(parents=True)
        torch.save(one.state_dict(), local / "engine.pt")
        torch.save({"step": 1}, local / "trainer.pt")
    dist.barrier()
    out = {"file_bytes": (local / "engine.pt").stat().st_size,
           "largest_param_bytes": 4 * max(p.ds_numel for p in engine.module.parameters())}
    out["local_added"] = private_peak(lambda: dist_ckpt._load_one(engine, local, 1, {}))
    expected = engine.state_dict()  # the single-process state, now consolidated from the shards
    if rank == 0:
        (legacy / "trainer").mkdir(parents=True)
        torch.save(expected, legacy / "consolidated.pt")
        for r in range(2):
            torch.save({"step": 1}, legacy / "trainer" / f"rank_{r:05d}.pt")
    dist.barrier()
    meta = {"format": DISTRIBUTED_V1, "layout": whole_state.layout_of(engine), "optimizer_step": 1}
    out["legacy_added"] = private_peak(lambda: dist_ckpt._load_one(engine, legacy, 1, meta))
    again = engine.state_dict()
    if rank == 0:
        out["legacy_equal"] = all(torch.equal(again[k][n], expected[k][n]) for k in ("module", "teacher")
                                  for n in expected[k]) and all(
            torch.equal(again["moments"][n][m], v) for n in expected["moments"] for m, v in expected["moments"][n].items())
    return out


def main() -> None:
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    results = {}
    if scenario == "dp2":
        results["ar"] = run("ar", 2, 1)
        results["star"] = run("star", 2, 1)
        results["star_whole_build"] = run("star", 2, 1, meta=False)  # a module built whole, then partitioned
        results["ar_recompute"] = run("ar", 2, 1, "parallel.activation_checkpointing=true")
        results["star_zero2"] = run("star", 2, 1, "parallel.zero_stage=2")
        results["star_accum"] = run("star", 2, 1, "data.micro_batch=2")  # 2 ranks x 2 micro-batches of 2
        results["star_zero2_bf16"] = run("star", 2, 1, "parallel.zero_stage=2", "train.precision=bf16")
    elif scenario == "tp2dp2":
        results["tp_check"] = tp_check()
        results["ar"] = run("ar", 4, 2)
        results["star"] = run("star", 4, 2, ckpt_dir=out_dir / "ckpt")
    elif scenario == "tp2_perturb":
        results = tp2_perturb()
    elif scenario == "bf16":  # 2 ranks, ZeRO-3, train.precision=bf16 (the autocast policy)
        results["star"] = run("star", 2, 1, "train.precision=bf16")
        results["roundtrip"] = consolidation_roundtrip("star", "train.precision=bf16")
        results["star_chunked_ce"] = chunked_head_run()
    elif scenario == "tp2recompute":  # 2 ranks, TP = 2, ZeRO-3: activation checkpointing on vs off
        results["star"] = run("star", 2, 2)
        results["star_recompute"] = run("star", 2, 2, "parallel.activation_checkpointing=true")
    elif scenario == "bf16_weights":
        for stage in (2, 3):
            results[f"zero{stage}"] = run("star", 2, 1, f"parallel.zero_stage={stage}", "train.precision=bf16",
                                          "parallel.bf16_weights=true")
    elif scenario == "whole_state_loads":
        results = whole_state_loads(out_dir)
    elif scenario == "resume1":
        results["star"] = resume1(out_dir / "ckpt")
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
    rank = dist.get_rank()
    (out_dir / f"{scenario}.rank{rank}.json").write_text(json.dumps(results))
    shutdown()


if __name__ == "__main__":
    main()
