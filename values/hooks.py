"""Hooks on the gated MLPs of a transformers causal LM: find them, describe the architecture,
and run a function on every layer's activation a = act_fn(gate_proj(x)).

`wrap_activations(model, fn)` swaps each MLP's `act_fn` for a wrapper that returns
`fn(layer, a)` and puts the original back on exit; value-neuron statistics and steering
(values/neurons.py) are both built on it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch


def gated_mlps(model: Any) -> list[Any]:
    """Every gated MLP (gate_proj, up_proj, down_proj, act_fn) of the model, in layer order."""
    mlps = [m for m in model.modules()
            if all(hasattr(m, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn"))]
    if not mlps:
        raise ValueError(f"{type(model).__name__} has no gated MLP (modules with gate_proj, "
                         "up_proj, down_proj and act_fn, as in Llama, Qwen, Mistral, Gemma): "
                         "value neurons are defined on act_fn(gate_proj(x))")
    return mlps


def mlp_width(mlp: Any) -> int:
    gate = mlp.gate_proj
    gate = getattr(gate, "base_layer", gate)  # a peft LoRA layer wraps the Linear
    return int(gate.out_features)


def model_signature(model: Any) -> dict[str, Any]:
    """What a neuron set is tied to: the architecture (not the weights, so that a policy
    being trained by GRPO still accepts the neurons located on its base model)."""
    mlps = gated_mlps(model)
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"model_type": getattr(text, "model_type", type(model).__name__),
            "layers": len(mlps), "d_ff": mlp_width(mlps[0]),
            "hidden_size": int(getattr(mlps[0].gate_proj, "in_features", 0) or
                               getattr(text, "hidden_size", 0)),
            "vocab_size": int(getattr(text, "vocab_size", 0))}


class ActivationHook(torch.nn.Module):
    """An MLP's activation function followed by a hook `fn(layer, a) -> a`."""

    def __init__(self, act: torch.nn.Module, layer: int, fn: Any) -> None:
        super().__init__()
        self.act, self.layer, self.fn = act, layer, fn
        self.paused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.act(x)
        return a if self.paused else self.fn(self.layer, a)


@contextmanager
def steering_paused(model: Any) -> Iterator[None]:
    """Run forwards inside a `steer` context as if it were not there (e.g. to compute KV that
    every steering condition shares)."""
    wrapped = [m for m in model.modules() if isinstance(m, ActivationHook)
               and getattr(m.fn, "pausable", False) and not m.paused]
    for m in wrapped:
        m.paused = True
    try:
        yield
    finally:
        for m in wrapped:
            m.paused = False


@contextmanager
def wrap_activations(model: Any, fn: Any) -> Iterator[list[Any]]:
    mlps = gated_mlps(model)
    originals = [mlp.act_fn for mlp in mlps]
    try:
        for layer, mlp in enumerate(mlps):
            mlp.act_fn = ActivationHook(mlp.act_fn, layer, fn)
        yield mlps
    finally:
        for mlp, act in zip(mlps, originals):
            mlp.act_fn = act
