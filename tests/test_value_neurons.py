"""Value neurons: statistics, selection and steering checked against forward hooks, hand
computations and `model.generate` on tiny random-init models."""
from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from tests.helpers import (PLANTED, POLE_A, POLE_B, full_sampler, hooked_acts, infinite_sampler,
                           planted_model, pole_batch, tiny_lm)
from values.neurons import (ActivationStats, ValueNeurons, activation_probability,
                                   gated_mlps, model_signature, random_control,
                                   record_activations, select_lape, select_neurons, steer)
from samplers.base import GenerationSpec
from common.compat import cache_keyword, output_cache

def test_activation_probability_matches_forward_hooks():
    model = planted_model()
    ids, mask = pole_batch(POLE_A, seed=0)
    prob = activation_probability(model, ids, mask)
    acts = hooked_acts(model, ids)
    expected = torch.stack([(a[mask] > 0).double().mean(0) for a in acts])
    assert prob.shape == (2, 64)
    torch.testing.assert_close(prob.double(), expected, atol=1e-6, rtol=0)


def test_planted_neuron_is_ranked_first():
    model = planted_model()
    p_a = activation_probability(model, *pole_batch(POLE_A, seed=0))
    p_b = activation_probability(model, *pole_batch(POLE_B, seed=1))
    assert p_a[0, PLANTED] == 1.0 and p_b[0, PLANTED] == 0.0
    neurons = select_neurons(p_a, p_b, top_k=5, min_delta=2.0)
    assert (int(neurons.layer[0]), int(neurons.index[0])) == (0, PLANTED)
    assert float(neurons.delta[0]) == 1.0
    assert float(neurons.delta[1]) < 1.0
    # the reverse contrast never selects it (positive deltas only)
    reverse = select_neurons(p_b, p_a, top_k=128, min_delta=0.0)
    assert (0, PLANTED) not in set(zip(reverse.layer.tolist(), reverse.index.tolist()))


def test_percentile_and_reduction_of_the_statistics():
    model = planted_model()
    with torch.no_grad():  # activations of a realistic size (random init gives ~1e-2)
        model.model.layers[1].mlp.gate_proj.weight.mul_(100.0)
    batches = [pole_batch(POLE_A, seed=s, rows=8, width=40) for s in range(3)]
    whole = ActivationStats.for_model(model)
    halves = [ActivationStats.for_model(model), ActivationStats.for_model(model)]
    for k, (ids, mask) in enumerate(batches):
        for stats in (whole, halves[k % 2]):
            with record_activations(model, stats) as rec:
                rec.mask = mask
                with torch.no_grad():
                    model(input_ids=ids)
    halves[0].merge_state(halves[1])  # what the DDP sum reduction does
    assert torch.equal(halves[0].compute().prob, whole.compute().prob)
    assert torch.equal(halves[0].hist, whole.hist)
    summary = whole.compute()
    assert summary.tokens == 3 * 8 * 36
    acts = torch.cat([hooked_acts(model, ids)[1][mask] for ids, mask in batches])  # layer 1
    exact = torch.quantile(acts.double(), 0.95, dim=0)
    positive = exact > 0.01
    assert positive.sum() > 20
    ratio = summary.p95[1][positive].double() / exact[positive]
    assert ratio.min() > 0.88 and ratio.max() < 1.12  # bins are ~10% wide


def test_select_neurons_by_hand():
    """The authors' rule with the per-layer cap lifted (tests/test_value_location.py has the
    cap)."""
    p_pos = torch.tensor([[0.9, 0.5, 0.3], [0.6, 0.1, 0.8]])
    p_neg = torch.tensor([[0.2, 0.4, 0.6], [0.5, 0.1, 0.1]])
    scale = torch.arange(6.0).view(2, 3)
    # deltas: 0.7, 0.1, -0.3 / 0.1, 0.0, 0.7 -> top 1 (0,0 ties 1,2: both >= min_delta)
    n = select_neurons(p_pos, p_neg, top_k=1, min_delta=0.5, scale=scale,
                       max_layer_fraction=1.0)
    assert n.layer.tolist() == [0, 1] and n.index.tolist() == [0, 2]
    assert n.scale.tolist() == [0.0, 5.0]
    n = select_neurons(p_pos, p_neg, top_k=4, min_delta=9.0, max_layer_fraction=1.0)
    assert len(n) == 4 and n.delta.tolist() == pytest.approx([0.7, 0.7, 0.1, 0.1])
    # zero and negative deltas are never selected, whatever top_k
    assert len(select_neurons(p_pos, p_neg, top_k=6, min_delta=9.0,
                              max_layer_fraction=1.0)) == 4
    assert len(select_neurons(p_neg, p_neg, top_k=3, min_delta=0.0,
                              max_layer_fraction=1.0)) == 0


def test_lape_picks_the_pole_specific_neuron():
    probs = torch.full((4, 1, 5), 0.5)
    probs[2, 0, 3] = 0.95  # specific to pole 2
    probs[:, 0, 3] = torch.tensor([0.05, 0.1, 0.95, 0.05])
    probs[2, 0, 1] = 0.9  # high on pole 2 but high everywhere else too
    probs[:, 0, 1] = torch.tensor([0.85, 0.85, 0.9, 0.85])
    n = select_lape(probs, pole=2, top_k=1, opposite=3, min_prob_quantile=0.5)
    assert n.index.tolist() == [3] and n.delta.tolist() == pytest.approx([0.9])


def test_random_control_keeps_layers_and_avoids_located():
    located = ValueNeurons(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([3, 5, 7, 8, 9]),
                           torch.tensor([.9, .8, .7, .6, .5]), torch.ones(5))
    control = random_control(located, d_ff=64, seed=3)
    assert control.layer_histogram(2) == located.layer_histogram(2)
    pairs = set(zip(control.layer.tolist(), control.index.tolist()))
    assert not pairs & set(zip(located.layer.tolist(), located.index.tolist()))
    assert len(pairs) == 5 and torch.equal(control.delta, located.delta)


# ----------------------------------------------------------------------------- steering


def neuron_set(model, rows: list[tuple[int, int]], delta: float = 0.5) -> ValueNeurons:
    layer, index = zip(*rows)
    return ValueNeurons(torch.tensor(layer), torch.tensor(index),
                        torch.full((len(rows),), delta), torch.linspace(0.5, 1.5, len(rows)),
                        {"model": model_signature(model)})


def down_inputs(model, **kwargs) -> torch.Tensor:
    """The input of layer 0's down_proj = act(gate(x)) * up(x), by a forward pre-hook."""
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        model(**kwargs)
    hook.remove()
    return seen[0]


def up_outputs(model, **kwargs) -> torch.Tensor:
    seen = []
    hook = model.model.layers[0].mlp.up_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.detach().clone()))
    with torch.no_grad():
        model(**kwargs)
    hook.remove()
    return seen[0]


def test_steering_arithmetic_at_the_response_positions():
    model = tiny_lm(seed=2)
    target = neuron_set(model, [(0, 1), (0, 4), (0, 9), (0, 12), (0, 30), (1, 2)], delta=0.3)
    opposite = neuron_set(model, [(0, 20), (0, 21)])
    ids = torch.randint(0, 48, (3, 7), generator=torch.Generator().manual_seed(0))
    plain = down_inputs(model, input_ids=ids)
    up = up_outputs(model, input_ids=ids)
    gamma = 1.5
    with steer(model, target, gamma, opposite=opposite, fraction=0.5, seed=4) as steering:
        steered = down_inputs(model, input_ids=ids)
    diff = steered - plain  # [3, 7, 64]
    # a forward over several tokens: only its last position changes
    assert diff[:, :-1].abs().max() == 0
    index, amount = steering.add[0]
    assert len(index) + len(steering.add.get(1, ([],))[0]) == math.ceil(0.5 * 6)
    rows = {int(i): k for k, i in enumerate(index)}
    weight = torch.sigmoid(torch.tensor(10 * (0.3 - 0.15), dtype=torch.float64))
    for n in range(64):
        got = diff[:, -1, n]
        if n in rows:
            scale = float(target.scale[target.index.tolist().index(n)])
            torch.testing.assert_close(got, gamma * scale * weight * up[:, -1, n])
        elif n in (20, 21):  # clamped to min(a, 0): a = plain / up
            act = plain[:, -1, n] / up[:, -1, n]
            torch.testing.assert_close(steered[:, -1, n], act.clamp(max=0) * up[:, -1, n])
        else:
            assert got.abs().max() == 0


def test_steering_every_row_of_a_one_token_forward():
    model = tiny_lm(seed=2)
    target = neuron_set(model, [(0, 5)])
    ids = torch.randint(0, 48, (3, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        cache = output_cache(model(input_ids=ids[:, :5], use_cache=True))
    step = dict(input_ids=ids[:, 5:], position_ids=torch.full((3, 1), 5))
    plain = down_inputs(model, **{cache_keyword(model): _copy(cache)}, **step)
    with steer(model, target, 1.0, fraction=1.0):
        steered = down_inputs(model, **{cache_keyword(model): _copy(cache)},
                               **step)
    diff = (steered - plain)[:, 0]  # [3, 64]
    others = [n for n in range(64) if n != 5]
    assert (diff[:, 5].abs() > 0).all() and diff[:, others].abs().max() == 0


def _copy(cache):
    import copy
    return copy.deepcopy(cache)


def test_gamma_zero_is_the_identity_and_exit_restores():
    model = tiny_lm(seed=3)
    acts = [mlp.act_fn for mlp in gated_mlps(model)]
    ids = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with steer(model, neuron_set(model, [(0, 3), (1, 7)]), 0.0):
            inside = model(input_ids=ids).logits
        with steer(model, neuron_set(model, [(0, 3), (1, 7)]), 3.0):
            changed = model(input_ids=ids).logits
        after = model(input_ids=ids).logits
    assert torch.equal(before, inside) and torch.equal(before, after)
    assert not torch.equal(before, changed)
    assert [mlp.act_fn for mlp in gated_mlps(model)] == acts


def test_steered_engine_matches_steered_generate():
    """Greedy steered sampling in our engine (full and infinite samplers) equals
    `model.generate` under the same steering, and differs from unsteered decoding."""
    model = tiny_lm(seed=4)
    target = neuron_set(model, [(0, i) for i in range(0, 64, 3)] + [(1, 5)])
    for n, s in enumerate(target.scale):
        target.scale[n] = 4.0
    prompt = [5, 9, 11, 2, 7]
    spec = GenerationSpec(max_new_tokens=12, temperature=0.0, seed=0)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:]
        with steer(model, target, 2.0, fraction=1.0):
            expected = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 5:]
            full = full_sampler().sample(model, [prompt], 2, spec)
            infinite = infinite_sampler(2, probe_tokens=3).sample(model, [prompt], 2, spec)
    assert not torch.equal(plain, expected)
    for rollouts in (full, infinite):
        for row in range(2):
            assert rollouts.completion_ids[row, :12].tolist() == expected.tolist()


def test_neuron_file_round_trip_and_wrong_model(tmp_path):
    model = tiny_lm(seed=0)
    neurons = neuron_set(model, [(0, 3), (1, 60)])
    neurons.save(tmp_path / "n.json")
    loaded = ValueNeurons.load(tmp_path / "n.json", model)
    assert torch.equal(loaded.index, neurons.index) and torch.equal(loaded.scale, neurons.scale)
    other = AutoModelForCausalLM.from_config(tiny_lm(seed=0).config.__class__(
        vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=96, head_dim=8))
    with pytest.raises(ValueError, match="was located on"):
        ValueNeurons.load(tmp_path / "n.json", other)
    with pytest.raises(ValueError, match="was located on"):
        with steer(other, neurons, 1.0):
            pass
    (tmp_path / "bad.json").write_text("{\"neurons\": 3}")
    with pytest.raises(ValueError, match="not a neuron set"):
        ValueNeurons.load(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ValueNeurons.load(tmp_path / "missing.json")


def test_bad_steering_arguments():
    model = tiny_lm(seed=0)
    neurons = neuron_set(model, [(0, 3)])
    for gamma in (-0.5, float("nan")):
        with pytest.raises(ValueError, match="steer.gamma"):
            with steer(model, neurons, gamma):
                pass
    for fraction in (0.0, 1.5):
        with pytest.raises(ValueError, match="steer.fraction"):
            with steer(model, neurons, 1.0, fraction=fraction):
                pass
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=16, n_head=2,
                                                       vocab_size=32))
    with pytest.raises(ValueError, match="no gated MLP"):
        with steer(gpt2, neurons, 1.0):
            pass
    with pytest.raises(ValueError, match="no gated MLP"):
        activation_probability(gpt2, torch.zeros(1, 3, dtype=torch.long),
                               torch.ones(1, 3, dtype=torch.bool))


def _stats_worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    model = planted_model()
    stats = ActivationStats.for_model(model)
    for k in range(rank, 4, 2):  # rank r sees batches r, r + 2
        ids, mask = pole_batch(POLE_A, seed=k, rows=4, width=16)
        with record_activations(model, stats) as rec, torch.no_grad():
            rec.mask = mask
            model(input_ids=ids)
    summary = stats.compute()  # torchmetrics all-reduces the sum states here
    torch.save({"prob": summary.prob, "p95": summary.p95, "tokens": summary.tokens},
               f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow
def test_statistics_reduce_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_stats_worker, args=(f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    model = planted_model()
    stats = ActivationStats.for_model(model)
    for k in range(4):
        ids, mask = pole_batch(POLE_A, seed=k, rows=4, width=16)
        with record_activations(model, stats) as rec, torch.no_grad():
            rec.mask = mask
            model(input_ids=ids)
    whole = stats.compute()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["tokens"] == whole.tokens == 4 * 4 * 12
        assert torch.equal(got["prob"], whole.prob) and torch.equal(got["p95"], whole.p95)
