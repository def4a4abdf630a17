"""The ingest stage's per-file task, run by Ray Data on any node: validate one file, write what must be written, return
counts and moments. Its imports stay free of torch and TorchRec, so a fresh Ray worker starts it in a fraction of a
second instead of importing the training stack first."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from features.encode import compute_dense_moments
from features.spec import FeatureSpec
from features.validate import DataValidationError, counts_of, validate_rows


def _write_atomic(table: pa.Table, path: Path) -> None:
    """Readers (another day's run) never see a half-written part: write beside it, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)


def validate_file(row: dict[str, Any]) -> dict[str, Any]:
    """One Ray Data row = one input file. Writes the clean and quarantined parts; returns counts and moments.

    A file without bad rows is not written again: ``read_path`` is the source itself. With a cache entry
    (``meta_path``) the file is not read: the entry's counts, moments and read path are returned."""
    meta_path = Path(row["meta_path"]) if row["meta_path"] else None
    if meta_path is not None and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        return {
            "index": row["index"],
            "split": row["split"],
            "counts_json": json.dumps(meta["counts"]),
            "moments_json": json.dumps(meta["moments"] if row["split"] == "train" else {}),
            "bad_path": row["bad_path"] if meta["counts"]["rows_quarantined"] else "",
            "read_path": meta.get("read_path", row["clean_path"]),
            "cached": True,
        }
    spec = FeatureSpec.model_validate_json(row["spec_json"])
    src = row["path"]
    try:
        table = pq.read_table(src)
    except (OSError, pa.ArrowInvalid) as err:
        raise DataValidationError(f"{src}: cannot read file: {err}", file=src, column=None) from err
    clean, bad = validate_rows(table, spec, source=src)
    read_path = src  # every row good: later stages read the source, a copy would only cost a write
    if bad.num_rows:
        _write_atomic(clean, Path(row["clean_path"]))
        _write_atomic(bad, Path(row["bad_path"]))
        read_path = row["clean_path"]
    counts = counts_of(clean, bad)
    # A cached file is evaluated today and trained on tomorrow: its entry keeps the moments whatever its split now.
    moments = compute_dense_moments(clean, spec) if row["split"] == "train" or meta_path is not None else {}
    if meta_path is not None:  # last: an entry with its meta file is complete
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = meta_path.with_name(f".{meta_path.name}.tmp")
        entry = {"source": src, "counts": asdict(counts), "moments": moments, "read_path": read_path}
        tmp.write_text(json.dumps(entry))
        tmp.replace(meta_path)
    return {
        "index": row["index"],
        "split": row["split"],
        "counts_json": json.dumps(asdict(counts)),
        "moments_json": json.dumps(moments if row["split"] == "train" else {}),
        "bad_path": row["bad_path"] if bad.num_rows else "",
        "read_path": read_path,
        "cached": False,
    }
