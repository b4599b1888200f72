"""The command line of the tokenization job (``star-scale tokenize`` == ``python -m tokenize_data``)."""
from __future__ import annotations

import argparse
import sys

from star_scale.data import schema
from tokenize_data.plan import JobError
from tokenize_data.prepare import PATCH_SPEC
from tokenize_data.report import verify
from tokenize_data.run import run


# ---- command line ----------------------------------------------------------------------
def build_parser(prog: str = "star-scale tokenize") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Tokenize images offline (LlamaGen recipe: 1.1x centre crop, ten crops, VQ codes) into a Zarr v3 "
                    "token store. Resumable: re-run the same command after any interruption.",
        epilog="examples:\n"
               "  star-scale tokenize data/train out/train.zarr --tokenizer vq_ds16_c2i.pt --image-size 256 --workers 8\n"
               "  star-scale tokenize demo_images out/demo.zarr --tokenizer patch-kmeans --image-size 32\n"
               "  sbatch --array=0-63 ... star-scale tokenize data/train out/train.zarr --tokenizer vq16 --device cuda\n"
               "  star-scale tokenize --verify out/train.zarr\n")
    p.add_argument("paths", nargs="*", metavar="SOURCE OUT",
                   help="SOURCE: ImageNet-layout folder (one sub-folder per class) or a list file (path<TAB>label per line); "
                        "OUT: the Zarr group to write. With --verify only OUT is needed.")
    p.add_argument("--verify", action="store_true", help="check every shard of OUT and print a report (after the job, if SOURCE is given)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file (star-scale tokenizer or LlamaGen vq_ds16_c2i.pt), 'vq16' (weights from $STAR_SCALE_VQ16), "
                        "or 'patch-kmeans[:K]' to fit the small CPU tokenizer on the images (default K=512). "
                        "Not needed to resume an existing OUT.")
    p.add_argument("--image-size", type=int, default=None, help="crop size in pixels (default: the tokenizer's; 32 for patch-kmeans)")
    p.add_argument("--crop-range", type=float, default=None, help="centre crop to this many times the image size before the ten crops (default 1.1)")
    p.add_argument("--shard-size", type=int, default=None, help=f"rows per shard = unit of work (default {schema.DEFAULT_SHARD_SIZE})")
    p.add_argument("--chunk-size", type=int, default=None, help="rows per inner chunk = the loader's read unit (default ~4 MiB)")
    p.add_argument("--workers", type=int, default=1, help="worker processes in this task (default 1)")
    p.add_argument("--task-id", type=int, default=None, help="this task's index (default $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, else 0)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of tasks sharing the job (default $SLURM_ARRAY_TASK_COUNT, else 1)")
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenizer call (x10 crops)")
    p.add_argument("--device", default=None, help="torch device for the tokenizer (default: cuda if available, else cpu)")
    p.add_argument("--row-seed", type=int, default=None, help="seed of the fixed row permutation (default 0; -1: keep the source order)")
    p.add_argument("--min-side", type=int, default=None, help="skip images whose shorter side is below this (default image_size/2)")
    p.add_argument("--fit-images", type=int, default=2048, help="images to fit patch-kmeans on")
    p.add_argument("--seed", type=int, default=0, help="seed for fitting patch-kmeans")
    p.add_argument("--overwrite", action="store_true", help="delete an existing OUT token store first")
    p.add_argument("--prepare-only", action="store_true",
                   help="create OUT (scan the source, fit patch-kmeans) and exit: run once before a large Slurm array")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--trust-pickle", action="store_true",
                   help="unpickle the --tokenizer file in full if it holds more than weights (and LlamaGen's "
                        "argparse.Namespace): this runs code from the file; only for files whose source you trust")
    return p


def trusted_tokenizer(args, device: str):
    """--trust-pickle: the one full unpickle happens here; the job gets the loaded tokenizer (workers read its
    weights-only copy in the store)."""
    from star_scale.tokenizer import load_tokenizer

    if args.tokenizer is None or str(args.tokenizer).startswith(PATCH_SPEC):
        return args.tokenizer
    return load_tokenizer(args.tokenizer, device=device, image_size=args.image_size, trust_pickle=True)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verify and len(args.paths) == 1:
        return 0 if verify(args.paths[0])["ok"] else 1
    if len(args.paths) != 2:
        parser.error("expected SOURCE OUT (or --verify OUT)")
    source, out = args.paths
    if args.tokenizer is None and not schema.is_token_store(out):
        parser.error("--tokenizer is required to create a new token store")
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        tokenizer = trusted_tokenizer(args, device) if args.trust_pickle else args.tokenizer
        summary = run(source, out, tokenizer=tokenizer, image_size=args.image_size, crop_range=args.crop_range,
                      shard_size=args.shard_size, chunk_size=args.chunk_size, workers=args.workers, task_id=args.task_id,
                      num_tasks=args.num_tasks, batch_size=args.batch_size, device=device, row_seed=args.row_seed,
                      min_side=args.min_side, fit_images=args.fit_images, seed=args.seed, progress=not args.no_progress,
                      overwrite=args.overwrite, prepare_only=args.prepare_only)
    except (JobError, FileNotFoundError, ValueError) as e:
        print(f"star-scale tokenize: error: {e}", file=sys.stderr)
        return 2
    if args.verify:
        return 0 if verify(out)["ok"] else 1
    return 3 if summary["busy"] else 0
