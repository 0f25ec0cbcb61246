"""Weight digest: a checksum of the trained parameters per rank, written at the end of fit.

DDP and FSDP must leave every rank with identical weights; this callback makes that checkable
(`weights_rank{r}.txt` in the run dir) without loading checkpoints.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import lightning.pytorch as pl

from modules.parallel import full_tensor


def weight_digest(module: pl.LightningModule) -> str:
    """SHA-256 over every trainable parameter's bytes, in name order (FSDP shards gathered:
    under FSDP every rank must call it)."""
    digest = hashlib.sha256()
    for name, param in sorted(module.named_parameters(), key=lambda item: item[0]):
        if param.requires_grad:
            digest.update(name.encode())
            digest.update(full_tensor(param.detach()).float().cpu().numpy().tobytes())
    return digest.hexdigest()


class WeightDigest(pl.Callback):
    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"weights_rank{trainer.global_rank}.txt"
        path.write_text(weight_digest(pl_module) + "\n")
