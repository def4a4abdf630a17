"""Declarative feature and label spec, loaded from YAML.

The spec is the only place that knows the log's column names. A team whose logs use other names or other behaviour
types writes a new YAML; no code changes. Example (see ``configs/features/behaviour_logs.yaml``)::

    tables:
      - {name: item, num_buckets: 200000, dim: 16}
    sparse:
      - {name: item_id, column: item_id, table: item}
    sequences:
      - {name: click_seq, column: click_seq, behaviour: click, table: item, max_length: 20}
    dense:
      - {name: price, column: price, transform: log1p, min: 0}
    tasks:
      - {name: ctr, label: click, kind: binary}
      - {name: cvr, label: conversion, kind: binary, esmm_parent: ctr}
      - {name: dwell, label: dwell_seconds, kind: regression, given: ctr, label_transform: log1p, min: 0}
"""

from __future__ import annotations

import hashlib
import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """A feature spec that cannot be used; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class IdType(StrEnum):
    """Physical type of an id column in the logs. Both are hashed into buckets."""

    int = "int"
    string = "string"


class TableSpec(_Strict):
    """One embedding table. Several features may share it (sequence item ids share the item table)."""

    name: str
    num_buckets: int = Field(gt=0, description="rows of the table; ids are hashed into [0, num_buckets)")
    dim: int = Field(gt=0, description="embedding dimension")


class SparseFeature(_Strict):
    """A categorical id of the row (user, item, seller, device, ...). With ``max_values`` the column is a list (tags,
    genres: several ids of the row, unordered) whose first ``max_values`` ids are mean-pooled into one embedding; a
    missing or empty list pools to zeros. Unlike a behaviour sequence it is one field, never a history."""

    name: str
    column: str
    table: str
    id_type: IdType = IdType.int
    role: Literal["user", "item", "seller", "context", "other"] = "other"
    max_values: int | None = Field(default=None, gt=0, description="multi-valued: a list column, mean-pooled")


class SequenceFeature(_Strict):
    """A behaviour sequence: list of ids of one behaviour type, newest first, truncated to ``max_length``."""

    name: str
    column: str
    behaviour: str = Field(description="behaviour type, e.g. click, cart, purchase")
    table: str
    max_length: int = Field(gt=0)
    id_type: IdType = IdType.int
    pooling: Literal["mean", "sum", "target_attention"] | None = Field(
        default=None,
        description="how the plain bottom pools it (unset: model.sequence_pooling); target_attention weighs each "
        "position by a DIN-style scorer against the candidate (the single-valued feature on the same table)",
    )


class MatchFeature(_Strict):
    """Candidate-vs-history: how often, and how recently, the candidate's id(s) occur in a behaviour sequence.

    ``candidate`` names a single-valued id feature (the item) or a sequence feature holding the candidate's several
    ids (its genres or tags); ``sequence`` names the behaviour sequence searched, within its ``max_length``. Ids are
    compared before hashing, so the two columns must hold the same kind of id. Each match feature adds
    :data:`MATCH_OUTPUTS` inputs to the dense block (see :mod:`features.match`)."""

    name: str
    candidate: str = Field(description="a sparse feature (one id per row) or a sequence feature (several)")
    sequence: str = Field(description="the behaviour sequence searched, newest first")


#: What each match feature feeds the model: log1p(occurrences), 1 / (1 + position of the newest occurrence) or 0.
MATCH_OUTPUTS = ("count", "recency")


class DenseFeature(_Strict):
    """A numeric feature. Standardised with statistics computed on the training window."""

    name: str
    column: str
    transform: Literal["none", "log1p"] = "none"
    normalize: Literal["standard", "none"] = "standard"
    min: float | None = Field(default=None, description="rows below are quarantined")
    max: float | None = Field(default=None, description="rows above are quarantined")
    fill_null: float | None = Field(default=None, description="value for nulls; when unset, null rows are quarantined")


class TaskKind(StrEnum):
    binary = "binary"
    regression = "regression"


class TaskSpec(_Strict):
    """A prediction task: its label, kind, sample space and loss weight.

    ``given: <task>`` restricts the task to rows where that binary task's label is 1 (dwell is only observed after a
    click). ``esmm_parent: <task>`` makes the task an ESMM child: the model predicts p(child | parent), the loss is on
    p(parent) * p(child) against parent AND child over all rows (entire space), and evaluation reports the child's AUC
    on the parent's positives plus the product's AUC on all rows.
    """

    name: str
    label: str
    kind: TaskKind
    given: str | None = None
    esmm_parent: str | None = None
    loss_weight: float = Field(default=1.0, ge=0)
    label_transform: Literal["none", "log1p"] = "none"
    min: float | None = Field(default=None, description="regression labels below are quarantined")
    max: float | None = Field(default=None, description="regression labels above are quarantined")

    @model_validator(mode="after")
    def _one_space(self) -> TaskSpec:
        if self.given and self.esmm_parent:
            raise ValueError("set at most one of 'given' and 'esmm_parent'")
        if self.esmm_parent and self.kind != TaskKind.binary:
            raise ValueError("an ESMM child ('esmm_parent') must be a binary task")
        return self


#: The row key of logs without a request-id column (``keys.request_id`` unset): see :func:`row_ids`.
ROW_ID_COLUMN = "_row_id"


def row_ids(source: str | Path, start: int, count: int) -> np.ndarray:
    """Stable int64 ids for rows ``start .. start+count-1`` of the file ``source``: 31 bits of a hash of the file's
    partition folder and name (not the mount point, so the same file gets the same ids wherever it lies) above the
    row number. Used only where the logs have no request id."""
    path = Path(source)
    name = f"{path.parent.name}/{path.name}".encode()
    high = int.from_bytes(hashlib.blake2b(name, digest_size=4).digest(), "big") & 0x7FFFFFFF
    return (np.int64(high) << np.int64(32)) + np.arange(start, start + count, dtype=np.int64)


class KeyColumns(_Strict):
    """Columns that identify a row; not features. ``request_id`` is optional: it is needed only to join an oracle
    file or deduplicate; without it every row gets a stable id from its file and row number."""

    request_id: str | None = None
    user_id: str = "user_id"
    timestamp: str = "ts"


class FeatureSpec(_Strict):
    """The whole spec: tables, features and tasks."""

    keys: KeyColumns = KeyColumns()
    tables: list[TableSpec]
    sparse: list[SparseFeature] = []
    sequences: list[SequenceFeature] = []
    dense: list[DenseFeature] = []
    match: list[MatchFeature] = []
    tasks: list[TaskSpec]

    @model_validator(mode="after")
    def _consistent(self) -> FeatureSpec:
        tables = {t.name for t in self.tables}
        if len(tables) != len(self.tables):
            raise ValueError("table names must be unique")
        names = [f.name for f in self.sparse] + [f.name for f in self.sequences] + [f.name for f in self.dense]
        names += [f.name for f in self.match]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"feature names must be unique, repeated: {sorted(dup)}")
        id_features: list[SparseFeature | SequenceFeature] = [*self.sparse, *self.sequences]
        for i, f in enumerate(id_features):
            if f.table not in tables:
                raise ValueError(f"feature '{f.name}' (#{i}) uses table '{f.table}', which is not in 'tables'")
        used = {f.table for f in id_features}
        unused = tables - used
        if unused:
            raise ValueError(f"tables not used by any feature: {sorted(unused)}")
        task_names = [t.name for t in self.tasks]
        if len(set(task_names)) != len(task_names):
            raise ValueError("task names must be unique")
        if not self.tasks:
            raise ValueError("at least one task is required")
        by_name = {t.name: t for t in self.tasks}
        for t in self.tasks:
            ref = t.given or t.esmm_parent
            if ref is None:
                continue
            if ref not in by_name:
                raise ValueError(f"task '{t.name}' refers to unknown task '{ref}'")
            if by_name[ref].kind != TaskKind.binary or by_name[ref].given or by_name[ref].esmm_parent:
                raise ValueError(f"task '{t.name}' refers to '{ref}', which must be a binary task over all rows")
        sparse_by_name = {f.name: f for f in self.sparse}
        sequence_by_name = {f.name: f for f in self.sequences}
        for i, m in enumerate(self.match):
            candidate = sparse_by_name.get(m.candidate) or sequence_by_name.get(m.candidate)
            if candidate is None:
                raise ValueError(
                    f"match feature '{m.name}' (#{i}): candidate '{m.candidate}' is not a sparse or sequence feature"
                )
            searched = sequence_by_name.get(m.sequence)
            if searched is None:
                raise ValueError(
                    f"match feature '{m.name}' (#{i}): sequence '{m.sequence}' is not a sequence feature "
                    f"(sequences: {sorted(sequence_by_name)})"
                )
            if candidate.id_type != searched.id_type:
                raise ValueError(
                    f"match feature '{m.name}' (#{i}): candidate '{m.candidate}' holds {candidate.id_type.value} ids, "
                    f"sequence '{m.sequence}' {searched.id_type.value} ids: they cannot match"
                )
        seq_tables = {f.table for f in self.sequences}
        for f in self.sparse:
            if f.max_values is not None and f.table in seq_tables:
                raise ValueError(
                    f"multi-valued feature '{f.name}' uses table '{f.table}', which a sequence reads (looked up "
                    "unpooled); give it a table of its own"
                )
        # Tables read by sequences are looked up unpooled (EmbeddingCollection), which needs one dimension.
        seq_tables = {f.table for f in self.sequences}
        dims = {t.dim for t in self.tables if t.name in seq_tables}
        if len(dims) > 1:
            raise ValueError(
                f"tables used by sequences must share one 'dim', got {sorted(dims)} for {sorted(seq_tables)}"
            )
        return self

    # ---- derived views -------------------------------------------------------------------------------------------
    def table(self, name: str) -> TableSpec:
        return next(t for t in self.tables if t.name == name)

    def task(self, name: str) -> TaskSpec:
        return next(t for t in self.tasks if t.name == name)

    @property
    def sequence_tables(self) -> list[TableSpec]:
        """Tables looked up unpooled: those read by any sequence (their single-valued features too)."""
        names = {f.table for f in self.sequences}
        return [t for t in self.tables if t.name in names]

    @property
    def mean_pooled_tables(self) -> set[str]:
        """Pooled tables read by a multi-valued feature: their bags average (one id: the same row as a sum)."""
        return {f.table for f in self.sparse if f.max_values is not None}

    @property
    def pooled_tables(self) -> list[TableSpec]:
        names = {f.table for f in self.sequences}
        return [t for t in self.tables if t.name not in names]

    @property
    def sparse_keys(self) -> list[str]:
        """KeyedJaggedTensor keys, in order: single-valued ids, then sequences."""
        return [f.name for f in self.sparse] + [f.name for f in self.sequences]

    @property
    def dense_width(self) -> int:
        """Width of the model's dense input: the dense features, then each match feature's outputs."""
        return len(self.dense) + len(MATCH_OUTPUTS) * len(self.match)

    @property
    def label_columns(self) -> list[str]:
        return list(dict.fromkeys(t.label for t in self.tasks))

    @property
    def row_key(self) -> str:
        """The column that identifies an evaluated row: the request id, or the derived row id without one."""
        return self.keys.request_id or ROW_ID_COLUMN

    @property
    def behaviours(self) -> list[str]:
        return list(dict.fromkeys(f.behaviour for f in self.sequences))

    def fingerprint(self) -> str:
        """Stable hash of the spec's content, for tags and cache keys."""
        data = self.model_dump(mode="json")
        if not data["match"]:
            del data["match"]  # specs without match features keep the hash they had before the option existed
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _format_validation_error(source: str, err: ValidationError) -> str:
    lines = [f"invalid feature spec {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        lines.append(f"  {loc}: {e['msg']}")
    return "\n".join(lines)


def parse_feature_spec(data: object, source: str = "<dict>") -> FeatureSpec:
    try:
        return FeatureSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(_format_validation_error(source, err)) from None


def load_feature_spec(path: str | Path) -> FeatureSpec:
    """Load and validate a spec; errors name the file and the field path."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise SpecError(f"feature spec not found: {path}") from None
    except yaml.YAMLError as err:
        raise SpecError(f"feature spec {path} is not valid YAML: {err}") from None
    return parse_feature_spec(data, str(path))
