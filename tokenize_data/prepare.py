"""Create (or reuse) the output token store: scan the source, resolve or fit the tokenizer, check options."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path

import numpy as np

from star_scale.data import schema
from tokenize_data.images import SkipImage, load_rgb, min_side_for, ten_crops
from tokenize_data.plan import CROPS, NAMES, JobError, Plan, _read_plan
from tokenize_data.sources import SourceList, load_sources
from star_scale import atomic

CROP_RECIPE = ("ADM center_crop_arr to int(image_size*crop_range), then torchvision TenCrop(image_size): "
               "tl, tr, bl, br, center, then the same five of the horizontally flipped image")
PATCH_SPEC = "patch-kmeans"


def _fit_patch_tokenizer(spec: str, sources: SourceList, image_size: int, crop_range: float, min_side: int,
                         fit_images: int, seed: int, log):
    from star_scale.tokenizer import PatchTokenizer

    k = int(spec.split(":", 1)[1]) if ":" in spec else 512
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(sources))
    crops, used = [], 0
    t0 = time.time()
    for i in order:
        if used >= fit_images:
            break
        try:
            im, _ = load_rgb(sources.abspath(int(i)), min_side)
        except SkipImage:
            continue
        crops.append(ten_crops(im, image_size, crop_range))
        used += 1
    if not crops:
        raise JobError("no readable image to fit the patch tokenizer on")
    tok = PatchTokenizer.fit(np.concatenate(crops), codebook_size=k, patch=4, seed=seed)
    log(f"fitted {tok.name} on {used} images ({used * CROPS} crops) in {time.time() - t0:.1f}s")
    return tok


def _resolve_tokenizer(spec, *, device: str, image_size: int | None):
    from star_scale.tokenizer import Tokenizer, load_tokenizer

    if isinstance(spec, Tokenizer):
        return spec
    return load_tokenizer(spec, device=device, image_size=image_size)


def prepare(source, out: Path, *, tokenizer, image_size: int | None, crop_range: float | None, shard_size: int | None,
            chunk_size: int | None, row_seed: int | None, min_side: int | None, device: str, fit_images: int, seed: int,
            overwrite: bool, log) -> tuple[Plan, object]:
    """Create the output group once (atomically: built under a temporary name, then renamed), or reuse it.
    Options left None take their defaults when creating and are not checked when resuming."""
    from star_scale.tokenizer import Tokenizer

    out = Path(out)
    given = {"--crop-range": crop_range, "--row-seed": row_seed, "--min-side": min_side}
    if overwrite and out.exists():
        if not (schema.is_token_store(out) or (out.is_dir() and not any(out.iterdir()))):
            raise JobError(f"--overwrite: {out} exists and is not a token store; refusing to delete it")
        shutil.rmtree(out)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    loaded = tokenizer if isinstance(tokenizer, Tokenizer) else None
    if not out.exists():
        if source is None:
            raise JobError(f"{out} does not exist: give the SOURCE folder or list file to create it")
        crop_range = 1.1 if crop_range is None else float(crop_range)
        row_seed = 0 if row_seed is None else int(row_seed)
        sources = load_sources(source)
        if len(sources) == 0:
            raise JobError(f"source {source} holds no image files")
        fitted = isinstance(tokenizer, str) and tokenizer.split(":", 1)[0] == PATCH_SPEC
        if fitted:
            size = image_size or 32
            tok = _fit_patch_tokenizer(tokenizer, sources, size, crop_range, min_side or min_side_for(size), fit_images,
                                       seed, log)
        else:
            tok = _resolve_tokenizer(tokenizer, device=device, image_size=image_size)
        if image_size is not None and image_size != tok.image_size:
            raise JobError(f"--image-size {image_size} but the tokenizer {tok.name} works on {tok.image_size} px images")
        loaded = tok
        size = tok.image_size
        min_side = min_side or min_side_for(size)
        n = len(sources)
        shard_size, chunk_size = schema.default_chunking(n, CROPS, tok.tokens_per_image, shard_size, chunk_size)
        order = np.arange(n) if row_seed < 0 else np.random.default_rng(row_seed).permutation(n)
        keep_copy = fitted or isinstance(tokenizer, Tokenizer) or tok.kind == "patch_kmeans"
        if keep_copy:
            tok_file = schema.TOKENIZER_FILE
        else:  # the big VQ weights stay where they are; the store records where (and their hash)
            tok_file = str(Path(str(tokenizer)).resolve()) if Path(str(tokenizer)).exists() else str(tokenizer)
        attrs = {
            "tokenizer": {**tok.describe(), "file": tok_file, "fitted": bool(fitted)},
            "image_size": size, "grid_size": tok.grid_size, "tokens_per_image": tok.tokens_per_image,
            "codebook_size": tok.codebook_size, "crops": CROPS, "crop_range": crop_range, "crop_recipe": CROP_RECIPE,
            "min_side": min_side, "num_classes": sources.num_classes, "class_names": sources.class_names,
            "source": {"kind": sources.kind, "root": sources.root, "list_file": sources.list_file, "count": n,
                       "sha256": sources.sha256(), "rows_file": schema.SOURCES_FILE,
                       "row_order": "as listed" if row_seed < 0 else f"permuted with numpy default_rng({row_seed})",
                       "row_seed": row_seed},
            "shard_size": shard_size, "chunk_size": chunk_size, "num_units": -(-n // shard_size),
            "label_skipped": schema.LABEL_SKIPPED, "label_unwritten": schema.LABEL_UNWRITTEN,
        }
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            schema.create_token_group(tmp, n, CROPS, tok.tokens_per_image, shard_size=shard_size, chunk_size=chunk_size,
                                      attrs=attrs)
            with open(tmp / schema.SOURCES_FILE, "w", encoding="utf-8", errors=NAMES, newline="\n") as f:
                for i in order:
                    f.write(f"{sources.paths[i]}\t{sources.labels[i]}\n")
            if keep_copy:
                tok.save(tmp / schema.TOKENIZER_FILE)
            atomic.write_text(tmp / schema.JOB_DIR / "plan.json",
                          json.dumps({"ignored": sources.ignored, "created_by": f"{socket.gethostname()}:{os.getpid()}"}, indent=1))
            (tmp / schema.JOB_DIR / "done").mkdir(parents=True, exist_ok=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.rename(tmp, out)
                atomic.fsync_dir(out.parent)
                log(f"created {out}: {n} images, {len(sources.ignored)} ignored files, {attrs['num_units']} units of "
                    f"{shard_size} rows (chunks of {chunk_size}), tokenizer {tok.name}")
            except OSError:
                if not schema.is_token_store(out):
                    raise
                log(f"{out} was created by another task meanwhile; using it")
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    if not schema.is_token_store(out):
        raise JobError(f"{out} exists and is not a star-scale token store (use a new output path)")
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a creator killed mid-way (an hour is plenty)
        try:
            if time.time() - stale.stat().st_mtime > 3600:
                shutil.rmtree(stale, ignore_errors=True)
        except OSError:
            pass
    plan = _read_plan(out)
    tok = _tokenizer_for(plan, loaded if loaded is not None else tokenizer, device)
    if image_size is not None and image_size != plan.attrs["image_size"]:
        raise JobError(f"{out} was made for {plan.attrs['image_size']} px images, not --image-size {image_size}")
    recorded_opts = {"--shard-size": plan.attrs["shard_size"], "--chunk-size": plan.attrs["chunk_size"],
                     "--crop-range": plan.attrs["crop_range"], "--row-seed": plan.attrs["source"]["row_seed"],
                     "--min-side": plan.attrs["min_side"]}
    given.update({"--shard-size": shard_size, "--chunk-size": chunk_size})
    for name, have in recorded_opts.items():
        if given.get(name) is not None and given[name] != have:
            raise JobError(f"{out} was made with {name} {have}, not {given[name]}: re-run with the same arguments or a new output")
    recorded = plan.attrs["source"]
    if source is not None and Path(source).is_dir() and str(Path(source).resolve()) != recorded["root"]:
        raise JobError(f"{out} was made from the folder {recorded['root']}, not {Path(source).resolve()}")
    if source is not None and Path(source).is_file() and str(Path(source).resolve()) != recorded.get("list_file"):
        raise JobError(f"{out} was made from {recorded.get('list_file') or recorded['root']}, not {Path(source).resolve()}")
    return plan, tok


def _tokenizer_for(plan: Plan, spec, device: str):
    """The tokenizer of an existing store; a given one must have the recorded weights hash."""
    from star_scale.tokenizer import Tokenizer, load_tokenizer

    rec = plan.attrs["tokenizer"]
    own = plan.out / schema.TOKENIZER_FILE
    if isinstance(spec, Tokenizer):
        tok = spec
    elif spec is not None and not str(spec).startswith(PATCH_SPEC):
        tok = load_tokenizer(spec, device=device, image_size=plan.attrs["image_size"])
    elif own.is_file():
        tok = load_tokenizer(own, device=device, image_size=plan.attrs["image_size"])
    else:
        tok = load_tokenizer(rec["file"], device=device, image_size=plan.attrs["image_size"])
    if tok.weights_hash != rec["weights_hash"]:
        raise JobError(f"{plan.out} was made with tokenizer {rec['name']} (weights {rec['weights_hash'][:12]}); "
                       f"{tok.name} has weights {tok.weights_hash[:12]}. Use the same tokenizer or a new output.")
    return tok
