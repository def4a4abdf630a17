"""The train step's bookkeeping without host syncs, and the device's math settings.

Reading a CUDA tensor on the host (``float()``, ``.item()``, ``.tolist()``) waits for every queued kernel, so the
training loop keeps its running losses on the device and reads them once per ``train.log_every`` steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class LossWindow:
    """Per-task losses summed on the device between two log points."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0

    def add(self, total: torch.Tensor, losses: dict[str, torch.Tensor]) -> None:
        """Accumulate one step's losses (device ops only, no sync)."""
        for name, value in {"total": total, **losses}.items():
            value = value.detach()
            self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.steps += 1

    def mean_over_ranks(self, world: int) -> dict[str, float]:
        """The window's mean losses averaged over ranks (one all-reduce, one host read), then start a new window.
        Every rank must call it at the same step."""
        if not self.steps:
            return {}
        keys = sorted(self.sums)
        means = torch.stack([self.sums[k] for k in keys]).float() / self.steps
        if world > 1:
            dist.all_reduce(means)
        values = (means / world).tolist()
        self.sums, self.steps = {}, 0
        return dict(zip(keys, values, strict=True))


def configure_device_math(device: torch.device, tf32: bool) -> None:
    """TF32 for float32 matmuls and convolutions on CUDA (Ampere and later); a no-op on CPU."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype the dense part's forward runs in under autocast, None for plain float32."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp32":
        return None
    raise ValueError(f"train.precision: expected 'fp32' or 'bf16', got {precision!r}")
