"""The shared-prefix decode attention alone, against PyTorch SDPA over the concatenated keys
(prompt KV + the row's own completion KV), with GQA, sliding windows and fully masked parts."""
from __future__ import annotations

import pytest
import torch

from samplers.prefix_attention import (SharedPrefix, attention_with_lse, merge,
                                       shared_prefix_attention)

HEADS, KV_HEADS, DIM, LAYER = 4, 2, 8, 0


class Layer:
    layer_idx = LAYER


def scenario(dtype: torch.dtype, seed: int = 0):
    """Five rows of three prompts (P = 9, 3, 14), rows at different completion steps."""
    gen = torch.Generator().manual_seed(seed)
    lengths = {0: 9, 1: 3, 2: 14}
    row_prompt = torch.tensor([1, 0, 2, 0, 1])
    fed = torch.tensor([0, 5, 2, 7, 3])  # completion column of the token fed this step
    width = int(fed.max()) + 1
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype)  # noqa: E731
    keys = {i: [rand(KV_HEADS, p, DIM)] for i, p in lengths.items()}
    values = {i: [rand(KV_HEADS, p, DIM)] for i, p in lengths.items()}
    n = len(row_prompt)
    query = rand(n, HEADS, 1, DIM)
    comp_k, comp_v = rand(n, KV_HEADS, width, DIM), rand(n, KV_HEADS, width, DIM)
    visible = torch.arange(width)[None, :] <= fed[:, None]
    mask = torch.zeros(n, 1, 1, width, dtype=dtype).masked_fill(~visible[:, None, None],
                                                                float("-inf"))
    groups = [(i, (row_prompt == i).nonzero().flatten()) for i in lengths]
    prompt_len = torch.tensor([lengths[int(i)] for i in row_prompt])
    return dict(lengths=lengths, row_prompt=row_prompt, fed=fed, keys=keys, values=values,
                query=query, comp_k=comp_k, comp_v=comp_v, mask=mask, groups=groups,
                prompt_len=prompt_len)


def reference(s, window: int | None) -> torch.Tensor:
    """Per row: SDPA over [prompt keys, completion keys 0..fed] with transformers' window rule
    (key position > query position - window), GQA by repeating the KV heads."""
    rows = []
    for r, i in enumerate(s["row_prompt"].tolist()):
        p, t = s["lengths"][i], int(s["fed"][r])
        k = torch.cat([s["keys"][i][LAYER], s["comp_k"][r, :, : t + 1]], 1)  # [Hk, p + t + 1, d]
        v = torch.cat([s["values"][i][LAYER], s["comp_v"][r, :, : t + 1]], 1)
        positions = torch.arange(p + t + 1)
        keep = torch.ones(p + t + 1, dtype=torch.bool)
        if window is not None:
            keep = positions > (p + t) - window
        mask = torch.zeros(p + t + 1, dtype=k.dtype).masked_fill(~keep, float("-inf"))
        k = k.repeat_interleave(HEADS // KV_HEADS, 0)
        v = v.repeat_interleave(HEADS // KV_HEADS, 0)
        out = torch.nn.functional.scaled_dot_product_attention(
            s["query"][r][None], k[None], v[None], attn_mask=mask[None])  # [1, H, 1, d]
        rows.append(out[0].transpose(0, 1))  # [1, H, d]
    return torch.stack(rows)  # [n, 1, H, d]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("window", [None, 6, 3, 1])
def test_shared_prefix_attention_equals_sdpa_over_the_concatenation(dtype, fused, window):
    """window 3 and 1 leave some rows with no visible prompt key (a fully masked prefix part:
    row 3 of prompt 0 at step 7 sees only its last keys)."""
    s = scenario(dtype)
    prefix = SharedPrefix(s["keys"], s["values"], s["groups"], s["prompt_len"], s["fed"],
                          s["mask"], fused=fused)
    out, weights = shared_prefix_attention(Layer(), s["query"], s["comp_k"], s["comp_v"],
                                           s["mask"], scaling=DIM ** -0.5,
                                           shared_prefix=prefix, sliding_window=window)
    assert weights is None and out.shape == (5, 1, HEADS, DIM)
    tol = dict(atol=1e-12, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(out, reference(s, window), **tol)


@pytest.mark.parametrize("fused", [True, False])
def test_attention_with_lse_against_logsumexp_and_fully_masked_queries(fused):
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 3, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.zeros(2, 1, 3, 3, dtype=torch.float64)
    mask[0, 0, 1] = float("-inf")  # query 1 of batch 0 sees nothing
    mask[1, 0, :, 2] = float("-inf")
    out, lse = attention_with_lse(q, k, v, mask, 8 ** -0.5, fused)
    scores = q @ k.transpose(-1, -2) * 8 ** -0.5 + mask
    expected = torch.logsumexp(scores, -1)
    torch.testing.assert_close(lse, expected, atol=1e-12, rtol=1e-12)
    assert torch.isneginf(lse[0, :, 1]).all() and torch.equal(out[0, :, 1],
                                                               torch.zeros_like(out[0, :, 1]))
    ok = torch.isfinite(expected)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    torch.testing.assert_close(out[ok.unsqueeze(-1).expand_as(out)],
                               (weights @ v)[ok.unsqueeze(-1).expand_as(out)])


def test_merge_of_two_halves_equals_attention_over_all_keys():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(1, 2, 10, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    a = attention_with_lse(q, k[:, :, :6], v[:, :, :6], None, 0.3)
    b = attention_with_lse(q, k[:, :, 6:], v[:, :, 6:], None, 0.3)
    full = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3)
    torch.testing.assert_close(merge(*a, *b), full)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    torch.testing.assert_close(merge(*a, *empty), a[0])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 3])
def test_shared_prefix_attention_on_cuda(dtype, window):
    s = scenario(torch.float32)
    cuda = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in s.items()}
    for name in ("keys", "values"):
        cuda[name] = {i: [t.cuda().to(dtype)] for i, (t,) in s[name].items()}
    for name in ("query", "comp_k", "comp_v", "mask"):
        cuda[name] = cuda[name].to(dtype)
    cuda["groups"] = [(i, rows.cuda()) for i, rows in s["groups"]]
    prefix = SharedPrefix(cuda["keys"], cuda["values"], cuda["groups"], cuda["prompt_len"],
                          cuda["fed"], cuda["mask"])
    out, _ = shared_prefix_attention(Layer(), cuda["query"], cuda["comp_k"], cuda["comp_v"],
                                     cuda["mask"], scaling=DIM ** -0.5, shared_prefix=prefix,
                                     sliding_window=window)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.float().cpu(), reference(s, window).float(), **tol)
