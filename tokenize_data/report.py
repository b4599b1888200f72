"""The job's report (report.json / report.txt) and ``--verify``: re-check every shard of a token store."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from star_scale.data import schema
from tokenize_data.plan import CROPS, NAMES, _marker, _read_plan, _sha
from star_scale import atomic


# ---- report and verification --------------------------------------------------------
def _line(path: str) -> str:
    """A name on one line of report.txt (report.json keeps it exactly)."""
    return path.replace("\n", "\\n").replace("\r", "\\r")


def write_report(out: Path) -> dict:
    """Collect every unit's skips and conversions into report.json and report.txt (deterministic content)."""
    plan = _read_plan(out)
    skipped, converted, written = [], [], 0
    for u in range(plan.num_units):
        info = json.loads(_marker(out, u).read_text())
        skipped += info["skipped"]
        converted += info["converted"]
        written += info["written"]
    plan_extra = json.loads((out / schema.JOB_DIR / "plan.json").read_text())
    ignored = plan_extra.get("ignored", [])
    skipped.sort(key=lambda d: d["row"])
    converted.sort(key=lambda d: d["row"])
    rep = {"complete": True, "rows": plan.n, "written": written, "skipped_count": len(skipped),
           "ignored_count": len(ignored), "converted_count": len(converted),
           "skipped": skipped, "ignored": ignored, "converted": converted,
           "source_root": plan.attrs["source"]["root"]}
    lines = [f"token store {out.name}: {written} of {plan.n} images tokenized; {len(skipped)} skipped, "
             f"{len(ignored)} ignored (not images), {len(converted)} converted",
             f"source root: {plan.attrs['source']['root']}", ""]
    lines += [f"SKIPPED\t{_line(d['path'])}\t{d['reason']}" for d in skipped]
    lines += [f"IGNORED\t{_line(d['path'])}\t{d['reason']}" for d in ignored]
    lines += [f"CONVERTED\t{_line(d['path'])}\t{'; '.join(d['notes'])}" for d in converted]
    atomic.write_text(out / schema.REPORT_JSON, json.dumps(rep, indent=1) + "\n")
    atomic.write_bytes(out / schema.REPORT_TXT, ("\n".join(lines) + "\n").encode("utf-8", NAMES))
    return rep


def verify(out, *, print_report: bool = True) -> dict:
    """Check every shard: shapes, code range, label range and agreement with sources.tsv, no unwritten rows,
    skipped rows as the unit's marker says, data checksums as written.  Returns a dict with ``ok``."""
    import zarr

    out = Path(out)
    problems: list[str] = []
    if not schema.is_token_store(out):
        res = {"ok": False, "problems": [f"{out} is not a star-scale token store"]}
        if print_report:
            print(f"verify {out}: FAILED\n  {res['problems'][0]}")
        return res
    plan = _read_plan(out)
    a = plan.attrs
    g = zarr.open_group(str(out), mode="r")
    codes_arr, labels_arr = g[schema.CODES], g[schema.LABELS]
    T, K, C = int(a["tokens_per_image"]), int(a["codebook_size"]), a.get("num_classes")
    if codes_arr.shape != (plan.n, CROPS, T) or codes_arr.dtype != np.uint16:
        problems.append(f"codes: shape {codes_arr.shape} {codes_arr.dtype}, expected {(plan.n, CROPS, T)} uint16")
    if labels_arr.shape != (plan.n,) or labels_arr.dtype != np.int32:
        problems.append(f"labels: shape {labels_arr.shape} {labels_arr.dtype}, expected {(plan.n,)} int32")
    units_ok = missing = 0
    valid = skipped = 0
    if not problems:
        for u in range(plan.num_units):
            rows = plan.rows(u)
            lab = labels_arr[rows.start: rows.stop]
            cod = codes_arr[rows.start: rows.stop]
            unwritten = int((lab == schema.LABEL_UNWRITTEN).sum())
            bad = []
            if not plan.done(u):
                missing += 1
                bad.append("not done (no marker)" + (f", {unwritten} unwritten rows" if unwritten else ""))
            else:
                info = json.loads(_marker(out, u).read_text())
                if unwritten:
                    bad.append(f"{unwritten} unwritten rows")
                if cod.size and int(cod.max()) >= K:
                    bad.append(f"codes up to {int(cod.max())} >= codebook size {K}")
                good = lab >= 0
                if C is not None and good.any() and int(lab[good].max()) >= int(C):
                    bad.append(f"label {int(lab[good].max())} >= num_classes {C}")
                if ((lab < 0) & (lab != schema.LABEL_SKIPPED) & (lab != schema.LABEL_UNWRITTEN)).any():
                    bad.append("labels below -1")
                if not np.array_equal(lab[good], plan.labels[rows.start: rows.stop][good]):
                    bad.append("labels differ from sources.tsv")
                sk_rows = sorted(d["row"] - rows.start for d in info["skipped"])
                if sk_rows != np.flatnonzero(lab == schema.LABEL_SKIPPED).tolist():
                    bad.append("skipped rows differ from the unit's report")
                if (cod[lab == schema.LABEL_SKIPPED] != 0).any():
                    bad.append("skipped rows hold codes")
                if info.get("codes_sha256") != _sha(cod) or info.get("labels_sha256") != _sha(lab):
                    bad.append("data checksum differs from what was written (corrupt or overwritten shard)")
                valid += int(good.sum())
                skipped += int((lab == schema.LABEL_SKIPPED).sum())
            if bad:
                problems.append(f"unit {u} rows [{rows.start}, {rows.stop}): " + "; ".join(bad))
            else:
                units_ok += 1
    strays = sorted(str(p.relative_to(out)) for p in out.rglob("*.partial"))
    if strays:
        problems.append(f"{len(strays)} stray partial files (interrupted writes), e.g. {strays[0]}")
    res = {"ok": not problems, "units": plan.num_units, "units_ok": units_ok, "units_missing": missing, "rows": plan.n,
           "valid": valid, "skipped": skipped, "problems": problems}
    if not problems and not (out / schema.REPORT_JSON).is_file():
        write_report(out)
    if print_report:
        status = "OK" if res["ok"] else "FAILED"
        print(f"verify {out}: {status}")
        print(f"  units {units_ok}/{plan.num_units} ok, {missing} not done; rows {plan.n}: {valid} tokenized, {skipped} skipped")
        print(f"  codes (N={plan.n}, {CROPS}, T={T}) uint16 < {K}; labels in [-1, {C}); shards of {a['shard_size']}, "
              f"chunks of {a['chunk_size']}; tokenizer {a['tokenizer']['name']} ({a['tokenizer']['weights_hash'][:12]})")
        for p in problems[:50]:
            print(f"  PROBLEM {p}")
        if len(problems) > 50:
            print(f"  ... {len(problems) - 50} more problems")
    return res
