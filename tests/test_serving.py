"""The served model: the ``torch.nn`` export scores like the TorchRec model for every bottom x top x head, loads from
a model folder, and the serving path imports no TorchRec, FBGEMM or Ray (exactly the modules the registered version
ships as code)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from safetensors.torch import save_file

from features.generator import GeneratorConfig, generate_logs
from features.spec import FeatureSpec, parse_feature_spec
from features.stats import DenseStats
from features.transform import BatchTransform, compute_dense_moments, dense_stats_from_moments
from models.config import ModelConfig
from models.drgrad import DRGradConfig
from models.io import load_model
from models.multitask import MultiTaskModel, build_model, predictions
from models.serving import MODEL_FILE, WEIGHTS_FILE, export_serving_model, load_serving_model
from pipeline.pyfunc import SERVING_MODULES

REPO = Path(__file__).resolve().parents[1]
BOTTOMS = ["plain", "dtrn"]
TOPS = ["shared_bottom", "mmoe", "cgc", "ple"]
HEADS = ["towers", "drgrad"]
SMALL = {
    "bottom_mlp": [32, 16],
    "tower_mlp": [8],
    "mmoe": {"num_experts": 3, "expert_mlp": [16]},
    "ple": {"num_levels": 2, "task_experts": 1, "shared_experts": 2, "expert_mlp": [16]},
    "dtrn": {"num_layers": 2, "num_heads": 2, "ffn_dim": 16, "hyper_hidden": 8, "attention_mlp": [8], "trm_hidden": 4},
}
# DRGrad's split head with the personalized gate over the id embeddings: the head that reads the most of the model.
DRGRAD = {"primary_task": "ctr", "personalized_gate": ["user_id", "item_id", "seller_id"]}


def small_spec() -> FeatureSpec:
    data = yaml.safe_load((REPO / "configs/features/behaviour_logs.yaml").read_text())
    for t in data["tables"]:
        t["num_buckets"] = min(t["num_buckets"], 500)
    data["sequences"][0]["pooling"] = "target_attention"  # the plain bottom's attention scorer is exported too
    # A multi-valued id feature (a bag of ids, mean-pooled; here the cart history's ids as one field).
    data["tables"].append({"name": "cart_bag", "num_buckets": 300, "dim": 8})
    data["sparse"].append({"name": "cart_bag", "column": "cart_seq", "table": "cart_bag", "max_values": 10})
    # Match features (computed from the raw rows by the served transform too).
    data["match"] = [
        {"name": "item_in_clicks", "candidate": "item_id", "sequence": "click_seq"},
        {"name": "item_in_carts", "candidate": "item_id", "sequence": "cart_seq"},
    ]
    return parse_feature_spec(data)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[FeatureSpec, DenseStats, pa.Table]:
    """Generated rows with few users, so behaviour sequences range from empty to full."""
    out = tmp_path_factory.mktemp("logs")
    cfg = GeneratorConfig(seed=3, num_days=2, impressions_per_day=800, num_users=40, num_items=300)
    result = generate_logs(cfg, out / "logs", out / "oracle.parquet")
    table = pa.concat_tables([pq.read_table(f) for f in result.files]).slice(0, 300)
    spec = small_spec()
    return spec, dense_stats_from_moments([compute_dense_moments(table, spec)], spec), table


def trained_like(spec: FeatureSpec, cfg: ModelConfig, drgrad: DRGradConfig | None) -> MultiTaskModel:
    """A TorchRec model whose every parameter and buffer is perturbed away from its initialisation (zero-initialised
    gates and mixing weights would otherwise hide a layer the export drops)."""
    torch.manual_seed(0)
    model = build_model(spec, cfg, drgrad=drgrad)
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.add_(0.1 * torch.randn_like(tensor))
    return model.eval()


def _in_file_mapping(tensor: torch.Tensor, path: Path) -> bool:
    """Whether the tensor's memory lies in this process's memory map of ``path`` (Linux ``/proc/self/maps``)."""
    address = tensor.data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            begin, end = (int(x, 16) for x in fields[0].split("-"))
            if begin <= address < end:
                return True
    return False


def configs(bottom: str, top: str, head: str) -> tuple[ModelConfig, DRGradConfig | None]:
    cfg = ModelConfig.model_validate({**SMALL, "bottom": bottom, "top": top})
    return cfg, (DRGradConfig.model_validate(DRGRAD) if head == "drgrad" else None)


@pytest.mark.parametrize("head", HEADS)
@pytest.mark.parametrize(("bottom", "top"), [(b, t) for b in BOTTOMS for t in TOPS])
def test_serving_model_scores_like_the_torchrec_model(
    data: tuple[FeatureSpec, DenseStats, pa.Table], bottom: str, top: str, head: str, tmp_path: Path
) -> None:
    spec, stats, table = data
    match = BatchTransform(spec, stats).dense_numpy(table)[:, len(spec.dense) :]
    assert match.shape[1] == 4 and (match[:, 0] > 0).any(), "some candidates are in their user's click history"
    cfg, drgrad = configs(bottom, top, head)
    model = trained_like(spec, cfg, drgrad)
    with torch.no_grad():
        expected = predictions(spec, model(BatchTransform(spec, stats)(table, with_labels=False)))

    # In memory: the export of the model object.
    served = export_serving_model(model)
    assert not any("torchrec" in type(m).__module__ for m in served.modules())
    encoder = BatchTransform(spec, stats)
    values, lengths = encoder.sparse_arrays(table)
    with torch.no_grad():
        direct = predictions(
            spec,
            served(torch.from_numpy(values), torch.from_numpy(lengths), torch.from_numpy(encoder.dense_numpy(table))),
        )
    # From a model folder as the train stage writes it (what the registered pyfunc loads).
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / WEIGHTS_FILE))
    gradients = {"method": "drgrad", "drgrad": DRGRAD} if drgrad else {"method": "equal"}
    description = {
        "spec": spec.model_dump(mode="json"),
        "model": cfg.model_dump(mode="json"),
        "gradients": gradients,
        "stats": {"mean": stats.mean, "std": stats.std, "count": stats.count},
    }
    (tmp_path / MODEL_FILE).write_text(json.dumps(description))
    served_from_folder = load_serving_model(tmp_path)
    assert all(_in_file_mapping(p, tmp_path / WEIGHTS_FILE) for p in served_from_folder.model.parameters()), (
        "the served model's parameters are allocated copies, not maps of the weights file"
    )
    from_folder = served_from_folder.score(table)
    # The evaluation stage's loader: built on meta, its parameters memory maps of the weights file.
    loaded = load_model(tmp_path).model
    assert not any(p.is_meta for p in loaded.parameters())
    assert all(_in_file_mapping(p, tmp_path / WEIGHTS_FILE) for p in loaded.parameters() if p.numel()), (
        "the loaded parameters are allocated copies, not maps of the weights file"
    )
    with torch.no_grad():
        reloaded = predictions(spec, loaded(BatchTransform(spec, stats)(table, with_labels=False)))

    assert set(direct) == set(expected) == set(from_folder)
    for name, want in expected.items():
        assert want.std() > 0, f"{name}: constant predictions would make the comparison blind"
        torch.testing.assert_close(direct[name], want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(reloaded[name], want, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(torch.from_numpy(from_folder[name]).float(), want, rtol=1e-5, atol=1e-6)


def test_serving_path_imports_no_torchrec_and_only_the_shipped_modules(
    data: tuple[FeatureSpec, DenseStats, pa.Table], tmp_path: Path
) -> None:
    """A fresh interpreter where importing torchrec, fbgemm_gpu, ray or polars fails loads the pyfunc, scores rows,
    and has imported exactly ``SERVING_MODULES`` of the project."""
    spec, stats, table = data
    cfg, drgrad = configs("dtrn", "ple", "drgrad")
    model = trained_like(spec, cfg, drgrad)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(model_dir / WEIGHTS_FILE))
    description = {
        "spec": spec.model_dump(mode="json"),
        "model": cfg.model_dump(mode="json"),
        "gradients": {"method": "drgrad", "drgrad": DRGRAD},
        "stats": {"mean": stats.mean, "std": stats.std, "count": stats.count},
    }
    (model_dir / MODEL_FILE).write_text(json.dumps(description))
    from pipeline.pyfunc import feature_columns

    table.select(feature_columns(spec)).to_pandas().to_parquet(tmp_path / "rows.parquet")
    script = f"""
import importlib.abc, json, sys
BLOCKED = ("torchrec", "fbgemm_gpu", "ray", "polars")
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"the serving path imported {{name}}")
sys.meta_path.insert(0, Block())
import pandas as pd
from types import SimpleNamespace
from pipeline.pyfunc import MultiTaskPyfunc
pyfunc = MultiTaskPyfunc()
pyfunc.load_context(SimpleNamespace(artifacts={{"model_dir": {str(model_dir)!r}}}))
out = pyfunc.predict(None, pd.read_parquet({str(tmp_path / "rows.parquet")!r}))
assert len(out) == {table.num_rows} and out.notna().all().all(), out
root = {str(REPO)!r} + "/"
loaded = sorted(
    m.__file__[len(root):] for m in list(sys.modules.values())
    if getattr(m, "__file__", None) and m.__file__.startswith(root)
    and m.__file__[len(root):].split("/")[0] in ("features", "models", "pipeline", "jobs")
)
print(json.dumps(loaded))
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert loaded == sorted(SERVING_MODULES), "SERVING_MODULES must list what the serving path imports"


def test_requirements_name_only_what_serving_imports() -> None:
    from pipeline.register import serving_requirements

    pins = serving_requirements()
    assert {line.split("==")[0] for line in pins} == {
        "torch",
        "numpy",
        "pandas",
        "pyarrow",
        "safetensors",
        "pydantic",
        "pyyaml",
        "mlflow",
    }
    assert all("+" not in line for line in pins), "local build tags (+cpu) cannot be installed from an index"
