"""Scale-out: FSDP2 under Lightning, rollouts on gathered weights, one gradient sync per step.

- `FSDP2Strategy` (configs/trainer/fsdp.yaml) is Lightning's `ModelParallelStrategy` with
  pure data parallelism: every process is one FSDP rank (tensor parallel size 1). The module
  shards itself in `configure_model` with PyTorch's FSDP2 `fully_shard`, one unit per decoder
  layer plus the root (embeddings, final norm, head), over a device mesh of the root device's
  type: gloo on CPU, NCCL on GPUs. Lightning's `FSDPStrategy` (FSDP1) refuses a CPU
  accelerator, so it could never be run or tested here.
- Checkpoints are full state dicts by default (`save_distributed_checkpoint: false`): rank 0
  writes one file through the trainer's `AtomicCheckpointIO` (temp file + rename), so a run
  killed mid-save keeps its previous `last.ckpt`, and the file resumes under FSDP, DDP or one
  process alike. Sharded folders (`true`) are written in place and are not atomic.
- Sampling (`sampling_weights`): with `gather: true` the policy's parameters are all-gathered
  once per sampling phase (one collective per FSDP unit), the engine decodes on them without
  any communication, and they are freed before the update. With `gather: false` each forward
  all-gathers layer by layer and frees again (peak: shard + one unit); the ranks then run
  their forwards in lockstep, each real forward announced by a one-element all-reduce, and a
  rank that has finished runs one-token dummy forwards until every rank has (as `generate`
  does with `synced_gpus` under ZeRO-3), since FSDP's collectives need every rank.
- `gradient_sync(trainer, policy, sync)`: micro-batches before the last of an optimizer step
  accumulate without communication (DDP's `no_sync`; FSDP2's `set_requires_gradient_sync`,
  which keeps unsharded gradients until the last micro-batch reduce-scatters them).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy

from samplers.memory import fsdp_units

try:  # PyTorch >= 2.6 exports FSDP2 here
    from torch.distributed.fsdp import FSDPModule, fully_shard
except ImportError:  # pragma: no cover - older PyTorch
    from torch.distributed._composable.fsdp import FSDPModule, fully_shard


class FSDP2Strategy(ModelParallelStrategy):
    """`ModelParallelStrategy` as plain FSDP2 data parallelism over all processes of all nodes.

    `reshard_after_forward` applies to the decoder layers (the root stays gathered between its
    forward and backward, FSDP2's own choice for the root). How sampling uses the shards is
    the sampler's setting (`sampler.gather_weights`).
    """

    def __init__(self, data_parallel_size: int | str = "auto", tensor_parallel_size: int = 1,
                 save_distributed_checkpoint: bool = False, reshard_after_forward: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(data_parallel_size=data_parallel_size,
                         tensor_parallel_size=tensor_parallel_size,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)
        self.reshard_after_forward = bool(reshard_after_forward)

    def setup_environment(self) -> None:
        if self._data_parallel_size == "auto":  # every process shards (no tensor parallelism)
            self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        """A full-state-dict file is read and checked as under one process (one clear error
        for a bad file or another model) before the strategy loads it into the shards.
        Lightning's loader takes a path and reads the file again; both reads are memory-mapped
        (`mmap=True`), so the second costs page-cache hits, not another copy."""
        from pathlib import Path

        from modules.checkpoints import CheckpointError, check_compatible, read_checkpoint

        path = Path(self.broadcast(checkpoint_path))
        if not (path.is_dir() and (path / ".metadata").exists()):  # not a sharded folder
            checkpoint = read_checkpoint(path, lambda: torch.load(
                path, mmap=True, map_location="cpu", weights_only=False))
            module = self.lightning_module
            trainable = sum(1 for p in module.parameters() if p.requires_grad)
            try:
                check_compatible(checkpoint, module, trainable)
            except CheckpointError as err:
                raise CheckpointError(f"ckpt_path={str(path)!r} {err}") from err
            del checkpoint
        return super().load_checkpoint(path, weights_only=False)


# ----------------------------------------------------------------------------- sharding

def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks to shard one by one: the classes the model names as not to be
    split (`_no_split_modules`, e.g. LlamaDecoderLayer), looked up through a PEFT wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"trainer=fsdp: cannot find the decoder layers of "
                         f"{type(base).__name__} (it lists no _no_split_modules)")
    return layers


def shard_model(model: torch.nn.Module, mesh: Any, reshard_after_forward: bool = True) -> None:
    """FSDP2 over `mesh`: one unit per decoder layer, then the root (the rest)."""
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    model._grpo_reshard_after_forward = reshard_after_forward  # restored after sampling


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective: every rank must call it), else the tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


# ----------------------------------------------------------------------------- sampling

@contextmanager
def sampling_weights(model: torch.nn.Module, gather: bool = True) -> Iterator[None]:
    """Inside the block `model` can decode; outside, it is sharded as before. A no-op for a
    model that is not sharded."""
    units = fsdp_units(model)
    if not units:
        yield
        return
    if not gather:
        try:
            with lockstep_forwards(model):
                yield
        finally:  # what the engine gathered under inference mode must not reach training
            for unit in units:
                unit.reshard()
        return
    layers = getattr(model, "_grpo_reshard_after_forward", True)
    model.set_reshard_after_forward(False)
    try:
        for unit in units:  # one all-gather per unit, for the whole phase
            unit.unshard()
        yield
    finally:
        for unit in units:
            unit.reshard()
        for unit in units[1:]:
            unit.set_reshard_after_forward(layers, recurse=False)


@contextmanager
def lockstep_forwards(model: torch.nn.Module) -> Iterator[None]:
    """Forwards of a layer-by-layer sharded model in step over all ranks (see module doc)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    device = next(model.parameters()).device

    def announce(module: Any, args: Any, kwargs: Any) -> None:
        dist.all_reduce(torch.ones(1, device=device))  # "one more forward from me"

    handle = model.register_forward_pre_hook(announce, prepend=True, with_kwargs=True)
    try:
        yield
    except BaseException:
        handle.remove()  # the other ranks fail on their own collective's timeout
        raise
    handle.remove()
    token = torch.zeros(1, 1, dtype=torch.long, device=device)
    while True:
        active = torch.zeros(1, device=device)
        dist.all_reduce(active)
        if int(active.item()) == 0:
            return
        with torch.no_grad():  # match the other ranks' collectives; discard the result
            model(input_ids=token, use_cache=False)


# ----------------------------------------------------------------------------- update

def gradient_sync(trainer_model: Any, policy: torch.nn.Module, sync: bool) -> Any:
    """A context for one micro-batch's backward: with `sync` False, gradients accumulate on
    this rank without communication (DDP `no_sync`, FSDP2 `set_requires_gradient_sync`)."""
    if sync:
        return nullcontext()
    if isinstance(trainer_model, torch.nn.parallel.DistributedDataParallel):
        return trainer_model.no_sync()
    if is_sharded(policy):
        return _fsdp_no_sync(policy)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(policy: Any) -> Iterator[None]:
    policy.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        policy.set_requires_gradient_sync(True)
