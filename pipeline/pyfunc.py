"""The served model: an MLflow pyfunc that owns the feature transform, so it scores raw feature rows.

Input: a pandas DataFrame with the spec's feature columns (ids raw, not hashed; sequences as lists; dense raw).
Output: one column per prediction (each task, plus the ESMM product), one row per input row.

The serving path imports torch, numpy, pandas, pyarrow, safetensors, pydantic, pyyaml and mlflow only: the model is
the ``torch.nn`` export of the trained TorchRec model (``models/serving.py``) and the transform the numpy/pyarrow
encoder (``features/encode.py``). ``SERVING_MODULES`` are the project's modules it imports, the code a registered
version ships (``tests/test_serving.py`` checks the list against what loading and scoring really import).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pandas as pd
import pyarrow as pa
from mlflow.pyfunc import PythonModel

from features.spec import FeatureSpec, IdType

if TYPE_CHECKING:
    from mlflow.models.signature import ModelSignature

MODEL_DIR_ARTIFACT = "model_dir"
#: The project's modules the served model imports (paths relative to the repository root).
SERVING_MODULES = (
    "features/__init__.py",
    "features/encode.py",
    "features/ids.py",
    "features/match.py",
    "features/spec.py",
    "features/stats.py",
    "models/__init__.py",
    "models/config.py",
    "models/drgrad.py",
    "models/dtrn.py",
    "models/dtrn_layers.py",
    "models/gradient_methods.py",
    "models/gradient_rules.py",
    "models/gradients.py",
    "models/mlp.py",
    "models/net.py",
    "models/serving.py",
    "models/sparse_output.py",
    "models/tops.py",
    "pipeline/__init__.py",
    "pipeline/pyfunc.py",
)


def feature_columns(spec: FeatureSpec) -> list[str]:
    """Raw columns the model reads, in a stable order."""
    cols = [f.column for f in spec.sparse] + [f.column for f in spec.sequences] + [f.column for f in spec.dense]
    return list(dict.fromkeys(cols))


def _arrow_schema(spec: FeatureSpec) -> pa.Schema:
    fields: dict[str, pa.DataType] = {}
    for f in spec.sparse:
        fields[f.column] = pa.string() if f.id_type == IdType.string else pa.int64()
        if f.max_values is not None:
            fields[f.column] = pa.list_(fields[f.column])
    for s in spec.sequences:
        fields[s.column] = pa.list_(pa.string() if s.id_type == IdType.string else pa.int64())
    for d in spec.dense:
        fields[d.column] = pa.float64()
    return pa.schema(list(fields.items()))


def model_signature(spec: FeatureSpec) -> ModelSignature:
    """Explicit signature: MLflow cannot infer list columns (behaviour sequences) from pandas."""
    from mlflow.models.signature import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    from models.net import joint_name

    inputs: list[ColSpec | TensorSpec] = []
    for name, typ in zip(_arrow_schema(spec).names, _arrow_schema(spec).types, strict=True):
        if pa.types.is_list(typ):
            inner = DataType.string if pa.types.is_string(typ.value_type) else DataType.long
            inputs.append(ColSpec(Array(inner), name))
        elif pa.types.is_string(typ):
            inputs.append(ColSpec(DataType.string, name))
        elif pa.types.is_integer(typ):
            inputs.append(ColSpec(DataType.long, name))
        else:
            inputs.append(ColSpec(DataType.double, name))
    outputs: list[ColSpec | TensorSpec] = [ColSpec(DataType.double, t.name) for t in spec.tasks]
    outputs += [ColSpec(DataType.double, joint_name(t.esmm_parent, t.name)) for t in spec.tasks if t.esmm_parent]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema(outputs))


class MultiTaskPyfunc(PythonModel):
    """Loads the model folder logged as the ``model_dir`` artifact into the ``torch.nn`` serving model."""

    def load_context(self, context: Any) -> None:
        from models.serving import load_serving_model

        self.served = load_serving_model(context.artifacts[MODEL_DIR_ARTIFACT])
        self.schema = _arrow_schema(self.served.folder.spec)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        missing = [c for c in self.schema.names if c not in model_input.columns]
        if missing:
            raise ValueError(f"input lacks feature columns {missing}")
        frame = model_input[self.schema.names]
        for col in self.schema.names:  # MLflow's schema enforcement may hand list cells over as numpy arrays
            if pa.types.is_list(self.schema.field(col).type):
                frame = frame.assign(**{col: [list(v) if v is not None else None for v in frame[col]]})
        table = pa.Table.from_pandas(frame, schema=self.schema, preserve_index=False)
        return pd.DataFrame(self.served.score(table))
