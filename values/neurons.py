"""Value neurons (ValueLocate, arXiv 2505.17712): activation statistics of every gated-MLP neuron,
neuron selection by contrasting two value poles, and steering (docs/ARCHITECTURE.md section 9).

A gated MLP computes down(act(gate(x)) * up(x)); its neurons are the d_ff entries of
a = act(gate(x)), with the model's own `act_fn` (SiLU for Llama/Qwen, GeLU-tanh for Gemma).

    stats = ActivationStats.for_model(model)
    with record_activations(model, stats) as rec:
        rec.mask = response_mask                       # [B, T] bool: response tokens only
        model(input_ids=ids)
    summary = stats.compute()                          # .prob, .p95: [layers, d_ff]
    neurons = select_neurons(p_pos, p_neg, top_k=100, min_delta=0.2, scale=summary.p95)
    with steer(model, neurons, gamma=1.0):
        model.generate(...)                            # or any sampler of samplers/

Both contexts swap each MLP's `act_fn` for a wrapper (values/hooks.py) and put the
original back on exit, so they work inside the decode engine, `model.generate` and the training
forward alike. The statistics live in values/statistics.py and are re-exported here.
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from values.statistics import (ActivationStats, ActivationSummary,  # noqa: F401
                                      record_activations)
from values.hooks import (gated_mlps, mlp_width, model_signature,  # noqa: F401
                               steering_paused, wrap_activations)

DIMENSIONS = ("openness_to_change", "conservation", "self_enhancement", "self_transcendence")
OPPOSITE = {"openness_to_change": "conservation", "conservation": "openness_to_change",
            "self_enhancement": "self_transcendence", "self_transcendence": "self_enhancement"}


def check_dimension(name: str, setting: str = "dimension") -> str:
    if name not in DIMENSIONS:
        raise ValueError(f"{setting}={name!r} is not a value dimension; use one of "
                         f"{', '.join(DIMENSIONS)}")
    return name


def check_gamma(gamma: object, setting: str = "steer.gamma") -> float:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 0 \
            or math.isnan(gamma) or math.isinf(gamma):
        raise ValueError(f"{setting} must be a number >= 0 (0 = no push), got {gamma!r}; to "
                         "steer the other way, steer the opposite dimension's neurons")
    return float(gamma)


def check_fraction(fraction: object, setting: str = "steer.fraction") -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0.0 < fraction <= 1.0:
        raise ValueError(f"{setting} must be in (0, 1], got {fraction!r}")
    return float(fraction)


# ----------------------------------------------------------------------------- statistics


@torch.no_grad()
def activation_probability(model: Any, input_ids: torch.Tensor, response_mask: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[layers, d_ff]: fraction of response tokens (response_mask [B, T] True) at which each
    neuron's activation act_fn(gate_proj(x)) is > 0. Rows may be right-padded."""
    if not bool(response_mask.any()):
        raise ValueError("response_mask selects no token: nothing to count")
    stats = ActivationStats.for_model(model)
    device = next(model.parameters()).device
    with record_activations(model, stats) as recorder:
        recorder.mask = response_mask.to(device)
        model(input_ids=input_ids.to(device), use_cache=False,
              attention_mask=None if attention_mask is None else attention_mask.to(device))
    return stats.compute().prob


# ----------------------------------------------------------------------------- neuron sets


@dataclass
class ValueNeurons:
    """One row per neuron, sorted by delta descending."""
    layer: torch.Tensor  # long [K]
    index: torch.Tensor  # long [K]: neuron within the layer's d_ff
    delta: torch.Tensor  # float [K]: p_pole - p_opposite
    scale: torch.Tensor  # float [K]: the neuron's 95th-percentile activation on the pole
    meta: dict[str, Any] = field(default_factory=dict)  # dimension, method, model signature
    prob: torch.Tensor | None = None  # float [K]: its activation probability on the pole

    def __len__(self) -> int:
        return int(self.layer.numel())

    def scaled(self, scale: str) -> ValueNeurons:
        """The set whose push per neuron is `scale`: "p95" (its 95th-percentile activation,
        NPTI's choice) or "probability" (its activation probability on the pole, as the
        authors' ValueLocate code multiplies)."""
        if scale not in SCALES:
            raise ValueError(f"steer.scale must be one of {', '.join(SCALES)}, got {scale!r}")
        if scale == "p95":
            return self
        if self.prob is None:
            raise ValueError(f"the neuron set of {self.meta.get('dimension', '?')} has no "
                             "activation probabilities (written by an older run): use "
                             "steer.scale=p95 or locate it again")
        return ValueNeurons(self.layer, self.index, self.delta, self.prob,
                            {**self.meta, "scale": "probability"}, self.prob)

    def layer_histogram(self, layers: int) -> list[int]:
        return torch.bincount(self.layer, minlength=layers).tolist()

    def save(self, path: str | Path) -> None:
        """JSON: the meta block indented, each column on one line (floats to 6 decimals:
        a 2000-neuron set is ~100 KB)."""
        rows = {k: getattr(self, k).tolist() for k in ("layer", "index")}
        for k in ("delta", "scale", "prob"):
            if getattr(self, k) is not None:
                rows[k] = [round(x, 6) for x in getattr(self, k).tolist()]
        columns = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in rows.items())
        Path(path).write_text(f'{{"meta": {json.dumps(self.meta, indent=1)},\n"neurons": '
                              f'{{\n{columns}\n}}}}\n')

    @classmethod
    def load(cls, path: str | Path, model: Any | None = None) -> ValueNeurons:
        """Read a saved set; with `model`, refuse one located on another architecture."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"neuron file {path} does not exist (locate_values.py "
                                    "writes neurons_<dimension>.json in its run dir)")
        try:
            data = json.loads(path.read_text())
            rows = data["neurons"]
            neurons = cls(torch.tensor(rows["layer"], dtype=torch.long),
                          torch.tensor(rows["index"], dtype=torch.long),
                          torch.tensor(rows["delta"], dtype=torch.float32),
                          torch.tensor(rows["scale"], dtype=torch.float32), data.get("meta", {}),
                          torch.tensor(rows["prob"], dtype=torch.float32)
                          if "prob" in rows else None)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"neuron file {path} is not a neuron set: {err}") from err
        if model is not None:
            neurons.check_model(model, str(path))
        return neurons

    def check_model(self, model: Any, origin: str = "neuron set") -> None:
        expected, actual = self.meta.get("model"), model_signature(model)
        if expected is not None and expected != actual:
            raise ValueError(f"{origin} was located on {expected}, but this model is {actual}")
        if len(self) and (int(self.layer.max()) >= actual["layers"]
                          or int(self.index.max()) >= actual["d_ff"]):
            raise ValueError(f"{origin} names neurons outside this model ({actual['layers']} "
                             f"layers x {actual['d_ff']})")


def _sorted_set(layer: torch.Tensor, index: torch.Tensor, delta: torch.Tensor,
                scale: torch.Tensor, meta: dict[str, Any],
                prob: torch.Tensor | None = None) -> ValueNeurons:
    order = torch.argsort(delta, descending=True, stable=True)
    return ValueNeurons(layer[order], index[order], delta[order].float(),
                        scale[order].float(), meta,
                        None if prob is None else prob[order].float())


# The largest share of one layer a located set may hold (see select_neurons).
MAX_LAYER_FRACTION = 1 / 3


def select_neurons(p_pos: torch.Tensor, p_neg: torch.Tensor, top_k: int, min_delta: float,
                   scale: torch.Tensor | None = None,
                   max_layer_fraction: float = MAX_LAYER_FRACTION) -> ValueNeurons:
    """The top_k neurons by delta = p_pos - p_neg, plus every neuron with delta >= min_delta;
    positive deltas only; at most `max_layer_fraction` of any layer (its largest deltas), so
    that a random control of the same size per layer fits outside the set and its opposite
    (binding only on tiny models: SmolLM2's sets hold at most 12 % of a layer). `scale`
    [layers, d_ff] is the pole's 95th percentile (default 1); `prob` keeps p_pos at each
    neuron (the authors' push multiplies it)."""
    if p_pos.shape != p_neg.shape or p_pos.dim() != 2:
        raise ValueError(f"p_pos and p_neg must both be [layers, d_ff], got "
                         f"{tuple(p_pos.shape)} and {tuple(p_neg.shape)}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    delta = (p_pos - p_neg).float().flatten()
    chosen = delta >= min_delta
    if top_k > 0:
        chosen[torch.topk(delta, min(top_k, delta.numel())).indices] = True
    chosen &= delta > 0
    d_ff = p_pos.shape[1]
    cap = max(1, int(max_layer_fraction * d_ff))
    per_layer = torch.where(chosen, delta, torch.tensor(float("-inf"))).view(-1, d_ff)
    over = chosen.view(-1, d_ff).sum(1) > cap
    for layer in over.nonzero().flatten().tolist():
        keep = torch.topk(per_layer[layer], cap).indices
        row = torch.zeros(d_ff, dtype=torch.bool)
        row[keep] = True
        chosen.view(-1, d_ff)[layer] &= row
    flat = chosen.nonzero().flatten()
    scale = torch.ones_like(p_pos) if scale is None else scale
    return _sorted_set(flat // d_ff, flat % d_ff, delta[flat],
                       scale.flatten()[flat].to(delta.device), {"method": "contrast"},
                       p_pos.float().flatten()[flat])


def select_lape(probs: torch.Tensor, pole: int, top_k: int, opposite: int | None = None,
                scale: torch.Tensor | None = None, min_prob_quantile: float = 0.9) -> ValueNeurons:
    """LAPE-style ablation (language-specific neurons, Tang et al. 2024) over poles.

    probs [poles, layers, d_ff]. A neuron is specific to `pole` when that pole has its highest
    activation probability, the probability is in the top (1 - min_prob_quantile) of all, and
    the entropy of its probabilities normalised over the poles is low; the top_k lowest-entropy
    such neurons are kept. delta = p_pole - p_opposite (or minus the mean of the other poles).
    """
    q = probs / probs.sum(0, keepdim=True).clamp(min=1e-12)
    entropy = -(q * q.clamp(min=1e-12).log()).sum(0).flatten()  # [L*D]
    p = probs[pole].flatten()
    others = probs[opposite].flatten() if opposite is not None else \
        (probs.sum(0) - probs[pole]).flatten() / max(1, probs.shape[0] - 1)
    flat = probs.flatten().float()
    stride = max(1, flat.numel() // 2_000_000)  # torch.quantile's input limit: an even subsample
    threshold = torch.quantile(flat[::stride], min_prob_quantile)
    ok = (probs.argmax(0).flatten() == pole) & (p >= threshold) & (p > others)
    candidates = ok.nonzero().flatten()
    keep = candidates[torch.argsort(entropy[candidates])[:top_k]]
    d_ff = probs.shape[2]
    scale = torch.ones_like(probs[0]) if scale is None else scale
    return _sorted_set(keep // d_ff, keep % d_ff, (p - others)[keep],
                       scale.flatten()[keep], {"method": "lape"}, p[keep])


def random_control(neurons: ValueNeurons, d_ff: int, seed: int = 0,
                   exclude: list[ValueNeurons] = (), prob: torch.Tensor | None = None,
                   bins: int = 10) -> ValueNeurons:
    """A random set with the same count per layer (and the same delta and scale per row, so
    steering moves it by the same amounts), avoiding the located neurons and `exclude`.
    With `prob` ([layers, d_ff] activation probabilities) each row is also matched on its
    neuron's activation-probability decile within its layer (`bins` quantile bins), taking
    the nearest bin with a free neuron where its own has none left."""
    gen = torch.Generator().manual_seed(seed)
    own = {(int(layer), int(i)) for layer, i in zip(neurons.layer, neurons.index)}
    taken = own | {(int(layer), int(i)) for s in exclude for layer, i in zip(s.layer, s.index)}
    index = torch.empty_like(neurons.index)
    overlaps = []
    for layer in neurons.layer.unique().tolist():
        rows = (neurons.layer == layer).nonzero().flatten()
        free = torch.tensor([i for i in range(d_ff) if (layer, i) not in taken])
        if len(free) < len(rows):  # a small model: may overlap `exclude`, never the set itself
            free = torch.tensor([i for i in range(d_ff) if (layer, i) not in own])
            overlaps.append(layer)
        if len(free) < len(rows):
            raise ValueError(f"layer {layer}: the located set holds {len(rows)} of its {d_ff} "
                             "neurons, too many to draw a random control of the same size "
                             "outside it (lower locate.top_k)")
        if prob is None:
            index[rows] = free[torch.randperm(len(free), generator=gen)[: len(rows)]]
            continue
        p = prob[layer].double()
        edges = torch.quantile(p, torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1])
        bin_of = torch.bucketize(p, edges)  # [d_ff]: 0 .. bins-1
        pools = {b: free[bin_of[free] == b] for b in range(bins)}
        pools = {b: v[torch.randperm(len(v), generator=gen)].tolist() for b, v in pools.items()}
        for row in rows.tolist():
            want = int(bin_of[int(neurons.index[row])])
            for b in sorted(range(bins), key=lambda b: (abs(b - want), b)):
                if pools[b]:
                    index[row] = pools[b].pop()
                    break
    return ValueNeurons(neurons.layer.clone(), index, neurons.delta.clone(),
                        neurons.scale.clone(), {**neurons.meta, "method": "random",
                                                "matched": "layer" if prob is None else
                                                f"layer and activation probability ({bins} "
                                                "bins)", "overlaps_excluded_in_layers": overlaps},
                        None if neurons.prob is None else neurons.prob.clone())


# ----------------------------------------------------------------------------- steering


class Steering:
    """The active steering of one `steer` context: per layer, which neurons get how much.
    (`pausable`: `steering_paused(model)` switches it off for a forward.)

    `positions` ([B, T] bool), when set and matching a forward's shape, replaces the rule of
    which positions are steered (the training forward scores all response positions at once).
    """

    def __init__(self, model: Any, target: ValueNeurons, gamma: float,
                 opposite: ValueNeurons | None, fraction: float, seed: int) -> None:
        signature = model_signature(model)
        for name, neurons in (("target", target), ("opposite", opposite)):
            if neurons is not None:
                neurons.check_model(model, f"steer {name}")
        gen = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(target), generator=gen)[: math.ceil(fraction * len(target))]
        keep = keep.sort().values
        amount = gamma * target.scale * torch.sigmoid(10.0 * (target.delta - 0.15))  # [K]
        self.add: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.clamp: dict[int, torch.Tensor] = {}
        if gamma > 0:
            layers, index, amount = target.layer[keep], target.index[keep], amount[keep]
            for layer in layers.unique().tolist():
                rows = layers == layer
                self.add[layer] = (index[rows], amount[rows])
        if opposite is not None:
            for layer in opposite.layer.unique().tolist():
                self.clamp[layer] = opposite.index[opposite.layer == layer]
        self.layers = signature["layers"]
        self.positions: torch.Tensor | None = None
        self.pausable = True
        self._device_cache: dict[Any, Any] = {}

    def _on(self, device: torch.device, layer: int) -> tuple[Any, Any]:
        key = (device, layer)
        if key not in self._device_cache:
            add = self.add.get(layer)
            clamp = self.clamp.get(layer)
            self._device_cache[key] = (
                None if add is None else (add[0].to(device), add[1].to(device)),
                None if clamp is None else clamp.to(device))
        return self._device_cache[key]

    def __call__(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        add, clamp = self._on(a.device, layer)
        if add is None and clamp is None:
            return a
        if torch.is_grad_enabled() and a.requires_grad:
            a = a.clone()  # keep autograd's saved tensors intact
        if self.positions is not None and self.positions.shape == a.shape[:2]:
            mask = self.positions.to(a.device)
            sites = a[mask]  # [n, d_ff]: advanced indexing copies, so write it back
            self._apply(sites, add, clamp)
            a[mask] = sites
        elif a.shape[1] == 1:  # one new token per row: every position predicts a response token
            self._apply(a[:, 0], add, clamp)  # in place, through the view
        else:  # a forward over several tokens: its last position predicts the response
            self._apply(a[:, -1], add, clamp)
        return a

    @staticmethod
    def _apply(sites: torch.Tensor, add: Any, clamp: Any) -> None:
        """Steer sites [n, d_ff] in place (a view into the activations, or a copy)."""
        if add is not None:
            index, amount = add
            sites[:, index] += amount.to(sites.dtype)
        if clamp is not None:
            sites[:, clamp] = sites[:, clamp].clamp(max=0)


@contextmanager
def steer(model: Any, target: ValueNeurons, gamma: float, opposite: ValueNeurons | None = None,
          fraction: float = 0.9, seed: int = 0) -> Iterator[Steering]:
    """Steer `target` up by gamma * scale * sigmoid(10 * (delta - 0.15)) on a random `fraction`
    of it (chosen once from `seed`) and clamp `opposite` to min(a, 0), at every position that
    predicts a response token; gamma = 0 without `opposite` is the identity. Exit restores."""
    steering = Steering(model, target, check_gamma(gamma), opposite, check_fraction(fraction),
                        seed)
    with wrap_activations(model, steering):
        yield steering


SCALES = ("probability", "p95")


@dataclass
class SteerSettings:
    """One way of steering a model: `target` pushed by gamma (its `scale` chosen by name),
    `opposite` clamped to min(a, 0). Checked once, here. With `train` (`policy.steer`), the
    policy is also steered while its GRPO loss is scored, so that the update refers to the
    steered policy that sampled. `name` labels the arm in reports."""
    target: ValueNeurons
    gamma: float
    opposite: ValueNeurons | None = None
    fraction: float = 0.9
    seed: int = 0
    train: bool = True
    scale: str = "probability"
    name: str = ""

    def __post_init__(self) -> None:
        self.gamma = check_gamma(self.gamma, "steer.gamma")
        self.fraction = check_fraction(self.fraction, "steer.fraction")
        self.target = self.target.scaled(self.scale)

    @classmethod
    def from_config(cls, model: Any, neurons: str | None = None, gamma: float = 1.0,
                    opposite: str | None = None, fraction: float = 0.9, seed: int = 0,
                    train: bool = True, scale: str = "probability") -> SteerSettings:
        """`policy.steer`: paths to neuron files written by locate_values.py."""
        if not neurons:
            raise ValueError("policy.steer.neurons is empty: give a neurons_<dimension>.json "
                             "written by locate_values.py")
        check_gamma(gamma, "policy.steer.gamma")
        check_fraction(fraction, "policy.steer.fraction")
        return cls(ValueNeurons.load(neurons, model), gamma,
                   ValueNeurons.load(opposite, model) if opposite else None,
                   fraction, int(seed), bool(train), scale)

    def context(self, model: Any) -> Any:
        return steer(model, self.target, self.gamma, self.opposite, self.fraction, self.seed)
