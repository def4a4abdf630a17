"""Validation of Parquet behaviour logs against the feature spec.

Principle: nothing is dropped silently.

* File-level problems (unreadable or corrupt file, missing column, wrong type) fail loudly with a
  :class:`DataValidationError` that names the file and the column. :func:`check_files` collects every problem of every
  file first, so a user fixes everything in one go instead of one error per run.
* Row-level problems never fail the run by themselves: :func:`validate_rows` sends each bad row to a quarantine table
  with a ``reason`` (the first failing rule) and the ``source_file``. Only when the quarantined share goes above
  ``data.max_bad_fraction`` does :meth:`ValidationCounts.check` raise :class:`TooManyBadRowsError`.
* Counts always satisfy ``rows_read == rows_used + rows_quarantined`` (:class:`ValidationCounts` refuses anything else).

Every column name and bound comes from the :class:`~features.spec.FeatureSpec`; nothing here knows the names of
the built-in generator's columns.

Row rules, in the fixed order used to pick a row's single reason (the first rule that fails wins):

1. ``null <key>``: null in a key column (``spec.keys``: request id, user id, timestamp).
2. ``null <id>``: null in a single-valued sparse id column.
3. ``null <label>``: null in a task's label column.
4. Label values, per task in spec order: binary ``<label> not in {0,1}``; regression ``NaN <label>``,
   ``inf <label>``, ``<label> < min <v>``, ``<label> > max <v>``.
5. Label consistency, per task with ``given: P`` or ``esmm_parent: P``: a positive child (binary 1, regression > 0)
   where P's label is 0: ``<label>=1 without <P label>`` / ``<label> > 0 without <P label>``.
6. Dense features, per feature in spec order: ``null <col>`` (only without ``fill_null``), ``NaN <col>``,
   ``inf <col>``, ``<col> < min <v>``, ``<col> > max <v>``.
7. Sequences: ``null element in <col>``. A null list itself is fine: it means "no history" (an empty sequence).

Identity comes first (a row without a key cannot even be traced), then what the model learns from (labels), then its
inputs (features), so the reason shown is the most fundamental thing wrong with the row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from features.spec import FeatureSpec, IdType, TaskKind

__all__ = [
    "REASON_COLUMN",
    "SOURCE_COLUMN",
    "SUCCESS_MARKER",
    "DataValidationError",
    "Problem",
    "TooManyBadRowsError",
    "ValidationCounts",
    "check_file_schema",
    "check_files",
    "counts_of",
    "expected_columns",
    "validate_rows",
    "write_quarantine",
]

#: Written into a ``dt=`` folder by its writer once all its files are there (Spark, Hive and most log writers do
#: the same); the ingest stage takes only partitions that have it, unless ``data.complete`` says otherwise.
SUCCESS_MARKER = "_SUCCESS"

REASON_COLUMN = "reason"
SOURCE_COLUMN = "source_file"

# Logical kinds a column can be expected to have (see expected_columns).
INT = "int"
STRING = "string"
FLOAT = "float"
LIST_INT = "list<int>"
LIST_STRING = "list<string>"
TIMESTAMP = "timestamp"
LABEL_BINARY = "label_binary"
LABEL_FLOAT = "label_float"

# What each kind accepts, in words, for error messages.
_ACCEPTS = {
    INT: "any signed or unsigned integer",
    STRING: "string or large_string",
    FLOAT: "float32/float64 or integer",
    LIST_INT: "list or large_list of integers",
    LIST_STRING: "list or large_list of strings",
    TIMESTAMP: "timestamp of any unit, or int64 epoch",
    LABEL_BINARY: "integer or bool holding 0/1",
    LABEL_FLOAT: "float32/float64 or integer",
}

# When one column plays several roles (a key that is also a sparse feature, an id that is also a dense feature) it must
# satisfy all of them; expected_columns reports the most specific one, i.e. the lowest rank here.
_SPECIFICITY = {LABEL_BINARY: 0, LABEL_FLOAT: 1, LIST_INT: 2, LIST_STRING: 2, STRING: 3, TIMESTAMP: 4, INT: 5, FLOAT: 6}


# ---- errors --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Problem:
    """One file-level problem: which file, which column (None for the file as a whole) and what is wrong."""

    file: str | None
    column: str | None
    message: str

    def __str__(self) -> str:
        where = [p for p in (self.file, self.column) if p is not None]
        return ": ".join([*where, self.message])


class DataValidationError(ValueError):
    """Input data that cannot be used as it is; the message names the file and the column.

    ``file`` / ``column`` are set when every listed problem concerns the same file / column, else None. ``problems``
    holds each problem separately, for callers that want to render them their own way.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        column: str | None = None,
        problems: tuple[Problem, ...] = (),
    ) -> None:
        super().__init__(message)
        self.file = file
        self.column = column
        self.problems = problems

    @classmethod
    def from_problems(cls, problems: list[Problem], header: str | None = None) -> DataValidationError:
        files = {p.file for p in problems}
        columns = {p.column for p in problems}
        if header is None:
            header = f"{len(problems)} problem(s) in the input data" if len(problems) > 1 else "invalid input data"
        lines = [f"{header}:", *(f"  {p}" for p in problems)]
        return cls(
            "\n".join(lines),
            file=next(iter(files)) if len(files) == 1 else None,
            column=next(iter(columns)) if len(columns) == 1 else None,
            problems=tuple(problems),
        )


class TooManyBadRowsError(DataValidationError):
    """The quarantined share of rows is above ``data.max_bad_fraction``; the message gives counts per reason and the
    quarantine path, so the user can look at the rejected rows."""

    def __init__(self, message: str, *, counts: ValidationCounts, quarantine_path: str) -> None:
        super().__init__(message)
        self.counts = counts
        self.quarantine_path = quarantine_path


# ---- schema --------------------------------------------------------------------------------------------------------
def _column_kinds(spec: FeatureSpec) -> dict[str, list[str]]:
    """Every column the spec reads, with every kind it must satisfy (a column may play several roles)."""
    kinds: dict[str, list[str]] = {}

    def add(column: str, kind: str) -> None:
        col = kinds.setdefault(column, [])
        if kind not in col:
            col.append(kind)

    # Keys first so that messages and expected_columns list them first.
    for key in (spec.keys.request_id, spec.keys.user_id):
        if key is not None:
            kinds.setdefault(key, [])
    add(spec.keys.timestamp, TIMESTAMP)
    for f in spec.sparse:
        if f.max_values is not None:
            add(f.column, LIST_STRING if f.id_type == IdType.string else LIST_INT)
        else:
            add(f.column, STRING if f.id_type == IdType.string else INT)
    for s in spec.sequences:
        add(s.column, LIST_STRING if s.id_type == IdType.string else LIST_INT)
    for d in spec.dense:
        add(d.column, FLOAT)
    for t in spec.tasks:
        add(t.label, LABEL_BINARY if t.kind == TaskKind.binary else LABEL_FLOAT)
    # The spec gives no type for the request/user id keys; the logs use integer ids. A key that is also a feature
    # (user_id usually is) takes the feature's type instead, so a spec with string user ids works.
    for ks in kinds.values():
        if not ks:
            ks.append(INT)
    return kinds


def expected_columns(spec: FeatureSpec) -> dict[str, str]:
    """Column -> expected logical kind: 'int' | 'string' | 'float' | 'list<int>' | 'list<string>' | 'timestamp' |
    'label_binary' | 'label_float'. Keys first, then sparse, sequences, dense and labels, as in the spec.

    A column used in several roles reports its most specific kind; the file check enforces all of them.
    """
    return {col: min(ks, key=_SPECIFICITY.__getitem__) for col, ks in _column_kinds(spec).items()}


def _base_type(t: pa.DataType) -> pa.DataType:
    # Dictionary encoding is a storage detail (readers may produce it for strings); judge the values.
    return t.value_type if pa.types.is_dictionary(t) else t


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))


def _accepts(kind: str, t: pa.DataType) -> bool:
    t = _base_type(t)
    if kind == INT:
        return bool(pa.types.is_integer(t))
    if kind == STRING:
        return _is_string(t)
    if kind in (FLOAT, LABEL_FLOAT):
        return bool(pa.types.is_floating(t) or pa.types.is_integer(t))
    if kind == LABEL_BINARY:
        return bool(pa.types.is_integer(t) or pa.types.is_boolean(t))
    if kind == TIMESTAMP:
        return bool(pa.types.is_timestamp(t) or t == pa.int64())
    if kind in (LIST_INT, LIST_STRING):
        if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
            return False
        value = _base_type(t.value_type)
        return bool(pa.types.is_integer(value)) if kind == LIST_INT else _is_string(value)
    raise AssertionError(f"unknown kind {kind!r}")


def _schema_problems(schema: pa.Schema, spec: FeatureSpec, file: str | None) -> list[Problem]:
    """Missing and wrongly typed columns of ``schema``; one problem per column, in expected_columns order."""
    problems: list[Problem] = []
    names = schema.names
    for column, kinds in _column_kinds(spec).items():
        count = names.count(column)
        if count == 0:
            problems.append(Problem(file, column, f"missing column (expected {' and '.join(kinds)})"))
            continue
        if count > 1:
            problems.append(Problem(file, column, f"column appears {count} times"))
            continue
        t = schema.field(column).type
        bad = [k for k in kinds if not _accepts(k, t)]
        if bad:
            wanted = "; ".join(f"{k}: {_ACCEPTS[k]}" for k in bad)
            problems.append(Problem(file, column, f"wrong type {t}, expected {wanted}"))
    return problems


def _file_problems(path: Path, spec: FeatureSpec) -> tuple[pa.Schema | None, list[Problem]]:
    try:
        # read_schema only reads the footer: cheap even for large files, and enough to catch a truncated file.
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:  # missing, a directory, not Parquet, truncated, corrupt footer
        return None, [Problem(str(path), None, f"cannot read Parquet footer ({type(err).__name__}: {err})")]
    return schema, _schema_problems(schema, spec, str(path))


def check_file_schema(path: Path, spec: FeatureSpec) -> pa.Schema:
    """Check one Parquet file's schema against the spec, reading only its footer; return the schema.

    Raises :class:`DataValidationError` naming the file (and the column) when the file is unreadable, corrupt or not
    Parquet, or when a column is missing or of an incompatible type. Compatible widths are accepted: any integer for
    int ids, integer or bool for binary labels, float32/float64 or integers for floats, list/large_list,
    string/large_string, timestamps of any unit or int64 epochs.
    """
    schema, problems = _file_problems(Path(path), spec)
    if problems:
        raise DataValidationError.from_problems(problems, header=f"invalid Parquet file {path}")
    assert schema is not None
    return schema


def check_files(paths: list[Path], spec: FeatureSpec) -> None:
    """Check every file's schema; raise one :class:`DataValidationError` listing every problem (file: column: problem).

    All files are checked before raising, so one run shows everything there is to fix. An empty list is an error too:
    it almost always means a wrong data path, and training on nothing must not look like success.
    """
    if not paths:
        raise DataValidationError("no Parquet files to validate (is the data path right?)")
    problems: list[Problem] = []
    for path in paths:
        problems.extend(_file_problems(Path(path), spec)[1])
    if problems:
        bad_files = len({p.file for p in problems})
        header = f"{len(problems)} problem(s) in {bad_files} of {len(paths)} Parquet file(s)"
        raise DataValidationError.from_problems(problems, header=header)


# ---- rows ----------------------------------------------------------------------------------------------------------
def _np(mask: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow boolean mask -> numpy bool; null (comparison with a null value) counts as False, i.e. "rule not failed",
    because nulls have rules of their own."""
    return np.asarray(pc.fill_null(mask, False).to_numpy(zero_copy_only=False), dtype=bool)


def _fmt(v: float) -> str:
    return repr(float(v))  # 1 -> "1.0": the same text whether the YAML said 1 or 1.0


def _as_number(col: pa.ChunkedArray) -> pa.ChunkedArray:
    # Bool labels compare as 0/1; dictionary-encoded numbers compare by value.
    if pa.types.is_dictionary(col.type):
        col = col.cast(col.type.value_type)
    if pa.types.is_boolean(col.type):
        col = col.cast(pa.int8())
    return col


def _range_rules(
    col: pa.ChunkedArray, name: str, lo: float | None, hi: float | None
) -> Iterator[tuple[str, np.ndarray]]:
    """NaN, inf, below min, above max: the value rules shared by dense features and regression labels."""
    col = _as_number(col)
    if pa.types.is_floating(col.type):  # integers cannot be NaN or inf, and pc.is_nan rejects them
        yield f"NaN {name}", _np(pc.is_nan(col))
        yield f"inf {name}", _np(pc.is_inf(col))
    if lo is not None:
        yield f"{name} < min {_fmt(lo)}", _np(pc.less(col, pa.scalar(float(lo))))
    if hi is not None:
        yield f"{name} > max {_fmt(hi)}", _np(pc.greater(col, pa.scalar(float(hi))))


def _null_element_mask(col: pa.ChunkedArray) -> np.ndarray:
    """Rows whose list holds a null element. A null list is not flagged (it is an empty history)."""
    mask = np.zeros(len(col), dtype=bool)
    offset = 0
    for chunk in col.chunks:  # a loop over chunks, not rows; each chunk is handled with vector kernels
        # list_flatten and list_parent_indices both skip null lists, so they line up element for element.
        flat = pc.list_flatten(chunk)
        if flat.null_count:
            parents = pc.list_parent_indices(chunk).filter(pc.is_null(flat))
            mask[offset + parents.to_numpy(zero_copy_only=False)] = True
        offset += len(chunk)
    return mask


def _rules(table: pa.Table, spec: FeatureSpec) -> Iterator[tuple[str, np.ndarray]]:
    """(reason, failing-rows mask) for every rule, in the documented order; a generator, so masks are built lazily."""
    seen_null: set[str] = set()  # a key that is also a sparse feature is checked once

    def null(column: str) -> Iterator[tuple[str, np.ndarray]]:
        if column not in seen_null:
            seen_null.add(column)
            yield f"null {column}", _np(pc.is_null(table.column(column)))

    # 1-3: nulls in keys, ids and labels.
    for key in (spec.keys.request_id, spec.keys.user_id, spec.keys.timestamp):
        if key is not None:
            yield from null(key)
    for f in spec.sparse:
        if f.max_values is None:  # a missing list of a multi-valued feature means "none", like an empty one
            yield from null(f.column)
    for label in spec.label_columns:
        yield from null(label)

    # 4: label values.
    for t in spec.tasks:
        col = _as_number(table.column(t.label))
        if t.kind == TaskKind.binary:
            in_domain = pc.or_(pc.equal(col, 0), pc.equal(col, 1))
            yield f"{t.label} not in {{0,1}}", ~_np(in_domain) & ~_np(pc.is_null(col))
        else:
            yield from _range_rules(col, t.label, t.min, t.max)

    # 5: a child can only be positive where its parent is (no conversion or dwell without a click).
    for t in spec.tasks:
        parent_name = t.given or t.esmm_parent
        if parent_name is None:
            continue
        parent = spec.task(parent_name).label
        parent_zero = _np(pc.equal(_as_number(table.column(parent)), 0))
        child = _as_number(table.column(t.label))
        if t.kind == TaskKind.binary:
            yield f"{t.label}=1 without {parent}", parent_zero & _np(pc.equal(child, 1))
        else:
            yield f"{t.label} > 0 without {parent}", parent_zero & _np(pc.greater(child, 0))

    # 6: dense features.
    for d in spec.dense:
        if d.fill_null is None:  # with fill_null a null is an expected, documented value
            yield from null(d.column)
        yield from _range_rules(table.column(d.column), d.column, d.min, d.max)

    # 7: sequences.
    for s in spec.sequences:
        yield f"null element in {s.column}", _null_element_mask(table.column(s.column))
    for f in spec.sparse:
        if f.max_values is not None:
            yield f"null element in {f.column}", _null_element_mask(table.column(f.column))


def validate_rows(table: pa.Table, spec: FeatureSpec, source: str | None = None) -> tuple[pa.Table, pa.Table]:
    """Split ``table`` into (clean, quarantined) by the row rules in the module docstring.

    ``clean`` is the input's good rows, unchanged and in their original order (the input table itself when every row is
    good). ``quarantined`` has all original columns plus ``reason`` (the first failing rule) and ``source_file``
    (``source``). Vectorised: one Arrow/numpy pass per rule, no Python loop over rows.

    Raises :class:`DataValidationError` (naming ``source`` and the column) when the table itself does not match the
    spec, since no row-level rule can be applied then.
    """
    problems = _schema_problems(table.schema, spec, source)
    for reserved in (REASON_COLUMN, SOURCE_COLUMN):
        if reserved in table.schema.names:
            problems.append(Problem(source, reserved, "column name is reserved for the quarantine file"))
    if problems:
        header = f"invalid table {source}" if source else "invalid table"
        raise DataValidationError.from_problems(problems, header=header)

    n = table.num_rows
    reasons: list[str] = []
    # Index into ``reasons`` of each row's first failing rule; -1 while the row is still clean.
    first = np.full(n, -1, dtype=np.int32)
    for reason, mask in _rules(table, spec):
        newly = mask & (first < 0)
        if newly.any():
            first[newly] = len(reasons)
            reasons.append(reason)

    bad = first >= 0
    if not bad.any():
        return table, _with_reason(table.slice(0, 0), pa.array([], pa.string()), source)
    clean = table.filter(pa.array(~bad))
    reason_col = pa.array(reasons, pa.string()).take(pa.array(first[bad]))
    return clean, _with_reason(table.filter(pa.array(bad)), reason_col, source)


def _with_reason(rows: pa.Table, reason: pa.Array, source: str | None) -> pa.Table:
    rows = rows.append_column(pa.field(REASON_COLUMN, pa.string()), reason)
    return rows.append_column(pa.field(SOURCE_COLUMN, pa.string()), pa.array([source] * rows.num_rows, pa.string()))


# ---- counts --------------------------------------------------------------------------------------------------------
@dataclass
class ValidationCounts:
    """Row counts of a validation; ``rows_read == rows_used + rows_quarantined`` always holds (checked on creation)."""

    rows_read: int = 0
    rows_used: int = 0
    rows_quarantined: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A mismatch here means rows were lost or invented somewhere: fail rather than report wrong numbers.
        if self.rows_read != self.rows_used + self.rows_quarantined:
            raise ValueError(
                f"inconsistent counts: read {self.rows_read} != used {self.rows_used} + "
                f"quarantined {self.rows_quarantined}"
            )
        if sum(self.by_reason.values()) != self.rows_quarantined:
            raise ValueError(f"reasons {self.by_reason} do not add up to {self.rows_quarantined} quarantined rows")

    def merge(self, other: ValidationCounts) -> ValidationCounts:
        """Sum of two counts (e.g. of two files); neither input is changed."""
        by_reason = dict(self.by_reason)
        for reason, count in other.by_reason.items():
            by_reason[reason] = by_reason.get(reason, 0) + count
        return ValidationCounts(
            rows_read=self.rows_read + other.rows_read,
            rows_used=self.rows_used + other.rows_used,
            rows_quarantined=self.rows_quarantined + other.rows_quarantined,
            by_reason=by_reason,
        )

    def bad_fraction(self) -> float:
        """Quarantined share of the rows read; 0.0 when nothing was read."""
        return self.rows_quarantined / self.rows_read if self.rows_read else 0.0

    def check(self, max_bad_fraction: float, quarantine_path: str) -> None:
        """Raise :class:`TooManyBadRowsError` when the bad fraction is above ``max_bad_fraction`` (equal passes)."""
        fraction = self.bad_fraction()
        if fraction <= max_bad_fraction:
            return
        reasons = sorted(self.by_reason.items(), key=lambda kv: (-kv[1], kv[0]))
        lines = [
            f"{self.rows_quarantined} of {self.rows_read} rows ({fraction:.2%}) failed validation, above the limit "
            f"max_bad_fraction={max_bad_fraction:g} ({max_bad_fraction:.2%}); rows used: {self.rows_used}",
            "by reason:",
            *(f"  {reason}: {count}" for reason, count in reasons),
            f"quarantined rows: {quarantine_path}",
        ]
        raise TooManyBadRowsError("\n".join(lines), counts=self, quarantine_path=str(quarantine_path))


def counts_of(clean: pa.Table, quarantined: pa.Table) -> ValidationCounts:
    """Counts of one :func:`validate_rows` result (merge several with :meth:`ValidationCounts.merge`)."""
    by_reason: dict[str, int] = {}
    if quarantined.num_rows:
        for item in pc.value_counts(quarantined.column(REASON_COLUMN)).to_pylist():
            by_reason[str(item["values"])] = int(item["counts"])
    return ValidationCounts(
        rows_read=clean.num_rows + quarantined.num_rows,
        rows_used=clean.num_rows,
        rows_quarantined=quarantined.num_rows,
        by_reason=by_reason,
    )


# ---- quarantine file -----------------------------------------------------------------------------------------------
def write_quarantine(tables: list[pa.Table], path: Path, *, schema: pa.Schema | None = None) -> int:
    """Write the quarantined rows of several :func:`validate_rows` calls to one Parquet file; return its row count.

    The file is written even with zero rows, so "no bad rows" is a file anyone can open and inspect, with the columns of
    the logs plus ``reason`` and ``source_file``. Tables from files with different but compatible widths (int32 vs
    int64) are promoted to a common schema. With no tables at all, ``schema`` (the logs' schema) gives the columns;
    without it the file has only ``reason`` and ``source_file``. Written to a temporary name and renamed, so a crash
    never leaves a half-written quarantine file behind.
    """
    path = Path(path)
    if tables:
        # The empty quarantine tables validate_rows returns still carry the full schema, so concatenating keeps it.
        table = pa.concat_tables(tables, promote_options="permissive")
    else:
        fields = [f for f in (schema or pa.schema([])) if f.name not in (REASON_COLUMN, SOURCE_COLUMN)]
        fields += [pa.field(REASON_COLUMN, pa.string()), pa.field(SOURCE_COLUMN, pa.string())]
        table = pa.schema(fields).empty_table()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return table.num_rows
