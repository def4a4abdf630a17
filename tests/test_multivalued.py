"""Multi-valued id features (``sparse: [{..., max_values: N}]``): a list column of the row's ids (tags, genres),
mean-pooled into one field embedding; validation, encoding, the model's lookup, and a match against it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import torch

from features.batch import Batch
from features.match import match_block
from features.spec import FeatureSpec, SpecError, parse_feature_spec
from features.stats import DenseStats
from features.transform import BatchTransform
from features.validate import validate_rows
from models.config import ModelConfig
from models.multitask import build_model


def _spec(**tags: object) -> dict:
    return {
        "keys": {"user_id": "user_id", "timestamp": "ts"},
        "tables": [
            {"name": "user", "num_buckets": 50, "dim": 4},
            {"name": "item", "num_buckets": 50, "dim": 4},
            {"name": "tag", "num_buckets": 40, "dim": 4},
            {"name": "tag_seq", "num_buckets": 40, "dim": 4},
        ],
        "sparse": [
            {"name": "user_id", "column": "user_id", "table": "user"},
            {"name": "tags", "column": "tags", "table": "tag", "max_values": 3, **tags},
        ],
        "sequences": [
            {"name": "hist", "column": "hist", "behaviour": "view", "table": "item", "max_length": 4},
            {"name": "hist_tags", "column": "hist_tags", "behaviour": "view", "table": "tag_seq", "max_length": 6},
        ],
        "match": [{"name": "tags_in_history", "candidate": "tags", "sequence": "hist_tags"}],
        "tasks": [{"name": "ctr", "label": "click", "kind": "binary"}],
    }


ROWS = {
    "user_id": [1, 2, 3, 4],
    "ts": pa.array([0, 1, 2, 3], pa.timestamp("ms")),
    "tags": [[5, 6], [], None, [7, 8, 9, 10]],  # row 3: only the first 3 count
    "hist": [[1], [2, 3], [], None],
    "hist_tags": [[6, 1, 6], [5], [5], [10, 7]],
    "click": [1, 0, 1, 0],
}


def test_a_multi_valued_feature_cannot_share_a_sequence_table() -> None:
    data = _spec()
    data["sparse"][1]["table"] = "tag"
    data["sequences"][1]["table"] = "tag"
    data["tables"] = [t for t in data["tables"] if t["name"] != "tag_seq"]
    with pytest.raises(SpecError, match=r"multi-valued feature 'tags' uses table 'tag', which a sequence reads"):
        parse_feature_spec(data)


def test_validation_accepts_a_missing_list_and_quarantines_a_null_id() -> None:
    spec = parse_feature_spec(_spec())
    clean, bad = validate_rows(pa.table({**ROWS, "tags": [[5, 6], [], None, [7, None]]}), spec, "day.parquet")
    assert clean.num_rows == 3 and bad.num_rows == 1
    assert bad.column("reason").to_pylist() == ["null element in tags"]


def _model_and_batch() -> tuple[Any, Batch, FeatureSpec]:
    spec = parse_feature_spec(_spec())
    torch.manual_seed(0)
    model = build_model(spec, ModelConfig(bottom_mlp=[8], tower_mlp=[4])).eval()
    return model, BatchTransform(spec, DenseStats.identity([]))(pa.table(ROWS)), spec


def test_the_field_is_the_mean_of_its_ids_embeddings() -> None:
    model, batch, _ = _model_and_batch()
    lengths = batch.sparse.to_dict()["tags"].lengths().tolist()
    assert lengths == [2, 0, 0, 3]
    ids = batch.sparse.to_dict()["tags"].values()
    table = model.sparse.ebc.embedding_bags["tag"].weight.detach()
    with torch.no_grad():
        field = model.sparse(batch.sparse).fields["tags"]
    torch.testing.assert_close(field[0], table[ids[:2]].mean(dim=0))
    torch.testing.assert_close(field[3], table[ids[2:5]].mean(dim=0))
    assert torch.all(field[1] == 0) and torch.all(field[2] == 0)  # empty and missing lists pool to zeros


def test_serving_export_pools_the_same_way() -> None:
    from models.serving import export_serving_model

    model, batch, spec = _model_and_batch()
    served = export_serving_model(model)
    encoder = BatchTransform(spec, DenseStats.identity([]))
    values, lengths = encoder.sparse_arrays(pa.table(ROWS))
    with torch.no_grad():
        want = model(batch)
        got = served(torch.from_numpy(values), torch.from_numpy(lengths), batch.dense)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6)


def test_match_against_a_multi_valued_candidate() -> None:
    spec = parse_feature_spec(_spec())
    block = match_block(pa.table(ROWS), spec)
    # row 0: tags {5, 6} vs history [6, 1, 6] -> 2 hits, newest at 0; row 3: {7, 8, 9} vs [10, 7] -> 1 hit at 1
    np.testing.assert_allclose(block[:, 0], np.log1p([2, 0, 0, 1]), rtol=1e-6)
    np.testing.assert_allclose(block[:, 1], [1.0, 0.0, 0.0, 0.5])
