"""The learned part of the `minilm` and `hidden` length predictors: a small MLP head, its ONE
training loss, and the bounded example buffer + periodic refit used for online learning.

Both learned predictors are a `LearnedPredictor` (predictors/base.py) composing a featurizer,
which turns a `ProbeBatch` into a feature tensor, with a `HeadLearner`, which does the rest. The
offline Lightning module (predictors/module.py) trains the same `learner.module` with the
same `head_loss` and `make_optimizer`, so online refits and offline training optimise one
objective.

Head and loss: regression of log1p(remaining) with MSE (`log_target: true`, the default).
Remaining lengths are heavy-tailed (a few samples run to max_new_tokens), so a log target makes
the error relative, keeps one scale whatever max_new_tokens is, and gives the scheduler what it
needs: a scalar per sample that can be summed (FPTAS packing) and ordered (SJF/LPT). Length
buckets would tie the head to bucket edges chosen for one max_new_tokens and lose the order
inside a bucket. Known bias: exp(E[log]) is a geometric mean, below the mean when the spread is
wide; the order is unaffected. `log_target: false` regresses remaining / default instead.

    learner = HeadLearner(lambda size: MLPHead(size, 128, initial_output(True, 64.0)))
    learner.observe(features, remaining)   # features float [n, F], remaining long [n]
    learner.predict(features)              # float [n] >= 0 on CPU
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.checks import check_number

MAX_LOG = 20.0  # expm1(20) ~ 5e8 tokens: clamps a diverged head instead of returning inf


# ----------------------------------------------------------------------------- the one loss


def to_target(remaining: torch.Tensor, log_target: bool, default: float) -> torch.Tensor:
    """Remaining tokens [n] -> regression target [n] (float32)."""
    r = remaining.float().clamp_min(0)
    return torch.log1p(r) if log_target else r / default


def from_target(output: torch.Tensor, log_target: bool, default: float) -> torch.Tensor:
    """Head output [n] -> predicted remaining tokens [n], >= 0."""
    out = output.float()
    return (torch.expm1(out.clamp(max=MAX_LOG)) if log_target else out * default).clamp_min(0)


def initial_output(log_target: bool, default: float) -> float:
    """The output bias that makes an untrained head predict `default` tokens."""
    check_number("default", default, 0, strict=True)
    return math.log1p(default) if log_target else 1.0


def head_loss(output: torch.Tensor, remaining: torch.Tensor, log_target: bool,
              default: float) -> torch.Tensor:
    """MSE in target space; output float [n], remaining long [n]. Used online and offline."""
    return F.mse_loss(output.float(), to_target(remaining.to(output.device), log_target, default))


def make_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                             weight_decay=weight_decay)


# ----------------------------------------------------------------------------- modules


class Standardize(nn.Module):
    """(x - mean) / std with running statistics (Chan's parallel update) kept as buffers."""

    def __init__(self, size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(size, dtype=torch.float64))  # [F]
        self.register_buffer("m2", torch.zeros(size, dtype=torch.float64))  # [F] sum of sq. dev.

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the statistics of a batch x [n, F]."""
        if x.shape[0] == 0:
            return
        x = x.to(self.mean.device, torch.float64)
        n, mean = x.shape[0], x.mean(dim=0)
        m2 = ((x - mean) ** 2).sum(dim=0)
        total = self.count + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta**2 * self.count * n / total
        self.count.fill_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [n, F] -> [n, F]
        if self.count == 0:
            return x
        std = torch.sqrt(self.m2 / self.count + self.eps)
        return ((x - self.mean.to(x.dtype)) / std.to(x.dtype))


class MLPHead(nn.Module):
    """Standardize -> Linear -> GELU -> Linear -> [n]. Zero output weights: an untrained head
    predicts exactly `init` (in target space) for every input."""

    def __init__(self, in_features: int, width: int, init: float) -> None:
        super().__init__()
        self.standardize = Standardize(in_features)
        self.net = nn.Sequential(nn.Linear(in_features, width), nn.GELU(), nn.Linear(width, 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.constant_(self.net[-1].bias, init)

    def update_stats(self, features: torch.Tensor) -> None:
        self.standardize.update(features)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [n, F] -> [n]
        x = features.to(self.net[0].weight.device, self.net[0].weight.dtype)
        return self.net(self.standardize(x)).squeeze(-1)


def fit_steps(module: nn.Module, features: torch.Tensor, remaining: torch.Tensor, steps: int,
              batch_size: int, lr: float, weight_decay: float, log_target: bool,
              default: float, generator: torch.Generator) -> float:
    """`steps` AdamW steps of `head_loss` on random minibatches of (features [b, ...],
    remaining [b]); returns the last loss. The online refit; Lightning runs the offline one."""
    optimizer = make_optimizer(module, lr, weight_decay)
    module.train()
    loss = torch.zeros(())
    for _ in range(steps):
        rows = torch.randint(len(remaining), (min(batch_size, len(remaining)),),
                             generator=generator)
        loss = head_loss(module(features[rows]), remaining[rows], log_target, default)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    module.eval()
    return float(loss.detach())


# ----------------------------------------------------------------------------- learner


class HeadLearner:
    """A lazily built head, a bounded buffer of (features, remaining) and the refit schedule.

    `build(in_features) -> nn.Module` makes the head on the first call that shows a feature
    size (the hidden size is not known before the policy runs); the module maps features to
    target space [n] and has `update_stats(features)`. Every `refit_every` observe() calls the
    head trains for `refit_steps` steps (0 = never: use an offline-trained head as is) on the
    last `buffer_size` examples, with a fresh AdamW and a generator seeded by (seed, refit#).
    """

    def __init__(self, build: Callable[[int], nn.Module], refit_every: int = 1,
                 refit_steps: int = 20, buffer_size: int = 4096, batch_size: int = 64,
                 lr: float = 1e-3, weight_decay: float = 0.01, log_target: bool = True,
                 default: float = 64.0, seed: int = 0, device: str = "cpu") -> None:
        self.refit_every = check_number("refit_every", refit_every, 1, integer=True)
        self.refit_steps = check_number("refit_steps", refit_steps, 0, integer=True)
        self.buffer_size = check_number("buffer_size", buffer_size, 1, integer=True)
        self.batch_size = check_number("batch_size", batch_size, 1, integer=True)
        self.lr = check_number("lr", lr, 0, strict=True)
        self.weight_decay = check_number("weight_decay", weight_decay, 0)
        self.default = float(check_number("default", default, 0, strict=True))
        if not isinstance(log_target, bool):
            raise ValueError(f"log_target must be true or false, got {log_target!r}")
        self.log_target, self.seed, self.device, self.build = log_target, int(seed), device, build
        self.module: nn.Module | None = None
        self.in_features: int | None = None
        self.buffer_features: torch.Tensor | None = None  # [b, ...] raw features
        self.buffer_remaining = torch.zeros(0, dtype=torch.long)  # [b]
        self.calls = 0
        self.refits = 0

    def ensure(self, in_features: int) -> nn.Module:
        """Build the head for `in_features` inputs if needed (seeded, outside inference mode)."""
        if self.module is None:
            with torch.inference_mode(False), torch.random.fork_rng():
                torch.manual_seed(self.seed)
                # float32 even where `trainer.precision=*-true` made a half dtype the default
                self.module = self.build(in_features).to(self.device, torch.float32).eval()
            self.in_features = in_features
        elif in_features != self.in_features:
            raise ValueError(f"features have size {in_features}, but the head was built for "
                             f"{self.in_features} (a different policy or encoder?)")
        return self.module

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """features [n, F] -> predicted remaining tokens, float [n] on CPU."""
        if features.shape[0] == 0:
            return torch.zeros(0, dtype=torch.float32)
        module = self.ensure(features.shape[-1])
        module.eval()
        with torch.inference_mode():
            return from_target(module(features), self.log_target, self.default).cpu()

    def observe(self, features: torch.Tensor, remaining: torch.Tensor) -> bool:
        """Buffer the examples; refit when due. Returns whether it refitted."""
        if features.shape[0] != remaining.shape[0]:
            raise ValueError(f"observe() got {features.shape[0]} feature rows but "
                             f"{remaining.shape[0]} remaining lengths")
        with torch.inference_mode(False):  # the sampler may call this inside inference_mode
            self.calls += 1
            if features.shape[0]:
                module = self.ensure(features.shape[-1])
                module.update_stats(features)
                old = self.buffer_features
                new = features.detach().cpu().clone()
                joined = new if old is None else torch.cat([old, new])
                self.buffer_features = joined[-self.buffer_size:].clone()
                joined_r = torch.cat([self.buffer_remaining, remaining.detach().long().cpu()])
                self.buffer_remaining = joined_r[-self.buffer_size:].clone()
            if self.refit_steps == 0 or self.calls % self.refit_every or not len(
                    self.buffer_remaining):
                return False
            self.refit()
        return True

    def refit(self) -> float:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.refits)
        self.refits += 1
        with torch.inference_mode(False), torch.enable_grad():
            return fit_steps(self.module, self.buffer_features, self.buffer_remaining,
                             self.refit_steps, self.batch_size, self.lr, self.weight_decay,
                             self.log_target, self.default, generator)

    def state_dict(self) -> dict[str, Any]:
        module = None if self.module is None else {
            k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}
        return {"in_features": self.in_features, "module": module,
                "buffer_features": self.buffer_features, "buffer_remaining":
                self.buffer_remaining, "calls": self.calls, "refits": self.refits}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module, self.in_features = None, None
        if state["in_features"] is not None:
            self.ensure(int(state["in_features"]))
            with torch.inference_mode(False):
                self.module.load_state_dict(state["module"])
        self.buffer_features = state["buffer_features"]
        self.buffer_remaining = state["buffer_remaining"]
        self.calls, self.refits = int(state["calls"]), int(state["refits"])
