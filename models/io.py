"""Loading a trained model from the folder the train stage writes (unsharded safetensors weights + description)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from features.spec import FeatureSpec
from features.stats import DenseStats
from models.config import ModelConfig
from models.multitask import MultiTaskModel, build_model
from models.serving import MODEL_FILE, WEIGHTS_FILE, read_model_folder, with_mapped_weights

__all__ = ["MODEL_FILE", "WEIGHTS_FILE", "LoadedModel", "load_model"]


@dataclass
class LoadedModel:
    model: MultiTaskModel
    spec: FeatureSpec
    stats: DenseStats
    model_config: ModelConfig


def load_model(model_dir: str | Path, device: torch.device | None = None) -> LoadedModel:
    """Rebuild the model on ``device`` (CPU by default) and load its weights. safetensors holds tensors only, so
    loading a model folder never runs code from it.

    On the CPU the model is built on the meta device and its parameters become memory maps of the weights file
    (:func:`models.serving.with_mapped_weights`): a 100M-row model loads in no time and allocates nothing for its
    tables."""
    model_dir = Path(model_dir)
    folder = read_model_folder(model_dir)
    device = device or torch.device("cpu")
    if device.type != "cpu":
        model = build_model(folder.spec, folder.model_config, device=device, drgrad=folder.drgrad)
        model.load_state_dict(load_file(str(model_dir / WEIGHTS_FILE), device=str(device)), strict=True)
    else:
        model = with_mapped_weights(
            lambda on: build_model(folder.spec, folder.model_config, device=on, drgrad=folder.drgrad),
            model_dir / WEIGHTS_FILE,
        )
    model.eval()
    return LoadedModel(model=model, spec=folder.spec, stats=folder.stats, model_config=folder.model_config)


def model_hash(model_dir: str | Path) -> str:
    """Content hash of a trained model (weights + description): the same training output always gives the same key.
    Every stage result records it, so metrics can be checked to belong to the weights they describe."""
    digest = hashlib.sha256()
    for name in (MODEL_FILE, WEIGHTS_FILE):
        digest.update(name.encode())
        with open(Path(model_dir) / name, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]
