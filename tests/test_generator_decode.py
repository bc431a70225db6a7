"""Incremental (key/value-cached) decoding against the uncached reference: the same greedy and
sampled lists, and step log-probabilities that add up to the teacher-forced `log_prob`."""
from __future__ import annotations

import pytest
import torch

from goalrank_core.config_sections import GeneratorConfig
from goalrank_core.generator import GoalRankGenerator
from gr_helpers import random_batch

# (decoder_layers, n_heads, list_bias): one and several layers and heads, with and without the
# list-context term of the pointer logits.
CONFIGS = [(1, 1, False), (1, 4, False), (2, 4, False), (2, 1, False), (1, 4, True), (2, 1, True)]


def make(decoder_layers: int, n_heads: int, l: int = 5, seed: int = 0, dropout: float = 0.1,
         list_bias: bool = False) -> GoalRankGenerator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(d_model=16, n_layers=1, n_heads=n_heads, dropout=dropout, decoder_layers=decoder_layers,
                          list_bias=list_bias)
    model = GoalRankGenerator(cfg, n_items=40, n_users=10, n_categories=4, slate_len=l).eval()
    if list_bias:  # a trained-looking table, not the zero one a model starts from
        torch.nn.init.normal_(model.list_bias[2].weight, std=1.0)
    return model


@torch.no_grad()
def decode_reference(model: GoalRankGenerator, batch, n: int, greedy: bool, generator: torch.Generator | None,
                     temperature: float, length: int | None) -> torch.Tensor:
    """The decoder before the cache, verbatim: every step re-runs the causal decoder over the
    whole prefix (`_queries`) and keeps the last query."""
    enc = model.encode(batch)
    b, nc = enc.keys.shape[:2]
    length = min(length or model.slate_len, nc)
    chosen = torch.empty(b, n, 0, dtype=torch.long, device=enc.keys.device)
    blocked = torch.zeros(b, n, nc, dtype=torch.bool, device=enc.keys.device)
    for _ in range(length):
        q = model._queries(enc, chosen)[:, :, -1:]  # (B, n, 1, d)
        bias = None
        if enc.pair is not None:  # the table rows of the items chosen so far, summed
            bias = torch.stack([enc.pair[r][chosen[r]].sum(1) for r in range(b)])[:, :, None, :]  # (B, n, 1, N)
        logits = model._masked_logits(enc, q, blocked[:, :, None, :], temperature, bias)[:, :, 0]  # (B, n, N)
        if greedy:
            nxt = logits.argmax(-1)
        else:
            u = torch.rand(logits.shape, generator=generator,
                           device=generator.device if generator is not None else logits.device)
            gumbel = -torch.log(-torch.log(u.to(logits.device).clamp(1e-12, 1 - 1e-7)))
            nxt = (logits.float() + gumbel).argmax(-1)
        chosen = torch.cat([chosen, nxt[..., None]], dim=2)
        blocked = blocked.scatter(2, nxt[..., None], True)
    return chosen


def batch(seed: int = 0):
    # N = 10, the first 3 rows padded to 7 real candidates (cand_mask False at the end).
    return random_batch(b=6, n=10, l=5, seed=seed, short_rows=3)


@pytest.mark.parametrize("decoder_layers,n_heads,list_bias", CONFIGS)
@pytest.mark.parametrize("length", [None, 3])
def test_greedy_matches_the_uncached_reference(decoder_layers, n_heads, list_bias, length):
    model, b = make(decoder_layers, n_heads, list_bias=list_bias), batch()
    ref = decode_reference(model, b, 1, True, None, 1.0, length)[:, 0]
    got = model.greedy(b, length)
    assert got.shape == (6, length or 5)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("decoder_layers,n_heads,list_bias", CONFIGS)
@pytest.mark.parametrize("length,temperature", [(None, 1.0), (2, 0.5), (4, 3.0)])
def test_samples_match_the_uncached_reference_for_the_same_seed(decoder_layers, n_heads, list_bias, length, temperature):
    model = make(decoder_layers, n_heads, seed=decoder_layers * 10 + n_heads, list_bias=list_bias)
    for seed in range(3):
        b = batch(seed)
        ref = decode_reference(model, b, 7, False, torch.Generator().manual_seed(seed), temperature, length)
        got = model.sample(b, 7, torch.Generator().manual_seed(seed), temperature, length)
        assert torch.equal(got, ref)
        assert torch.gather(b.cand_mask[:, None, :].expand(-1, 7, -1), 2, got).all()  # never padding


@pytest.mark.parametrize("decoder_layers,n_heads,list_bias", CONFIGS)
def test_cached_step_log_probs_add_up_to_log_prob(decoder_layers, n_heads, list_bias):
    model, b = make(decoder_layers, n_heads, seed=3, list_bias=list_bias), batch(1)
    lists, steps = model.decode(model.encode(b), 6, False, torch.Generator().manual_seed(5), with_log_probs=True)
    assert steps.shape == lists.shape == (6, 6, 5)
    assert (steps < 0).all() and (steps > -1e6).all()
    with torch.no_grad():
        assert torch.allclose(model.step_log_probs(b, lists), steps, atol=1e-5)
        assert torch.allclose(model.log_prob(b, lists), steps.sum(-1), atol=1e-5)


def test_log_probs_follow_the_temperature():
    model, b = make(1, 4), batch()
    enc = model.encode(b)
    hot, cold = (model.decode(enc, 1, True, temperature=tau, with_log_probs=True) for tau in (5.0, 0.2))
    assert torch.equal(hot[0], cold[0])  # greedy ignores the temperature...
    assert (cold[1] > hot[1]).all()  # ...but its choices are surer at a low one


def test_shorter_than_the_slate_and_rows_with_few_candidates():
    model = make(2, 4, l=5)
    b = random_batch(b=4, n=8, l=5, short_rows=2)  # rows 0-1: 5 real candidates = L
    g = model.greedy(b)
    assert torch.equal(g, decode_reference(model, b, 1, True, None, 1.0, None)[:, 0])
    assert torch.equal(g.sort(1).values[:2], torch.arange(5).expand(2, -1))  # all five real ones, once each
    assert model.greedy(b, 1).shape == (4, 1)


def test_training_mode_decodes_valid_lists_with_dropout():
    model = make(2, 4, dropout=0.5).train()
    b = batch()
    lists = model.sample(b, 4, torch.Generator().manual_seed(0))
    srt = lists.sort(-1).values
    assert (srt[..., 1:] != srt[..., :-1]).all()
    assert torch.gather(b.cand_mask[:, None, :].expand(-1, 4, -1), 2, lists).all()
    assert model.training  # decoding leaves the mode alone


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("decoder_layers,n_heads", [(1, 4), (2, 1)])
def test_cuda_matches_the_reference(decoder_layers, n_heads):
    model, b = make(decoder_layers, n_heads).cuda(), batch().to("cuda")
    assert torch.equal(model.greedy(b), decode_reference(model, b, 1, True, None, 1.0, None)[:, 0])
    for dev in ("cuda", "cpu"):  # a CPU generator may drive a CUDA batch
        got = model.sample(b, 5, torch.Generator(device=dev).manual_seed(1))
        ref = decode_reference(model, b, 5, False, torch.Generator(device=dev).manual_seed(1), 1.0, None)
        assert got.device.type == "cuda" and torch.equal(got, ref)


def test_post_norm_relu_decoder_without_final_norm_matches_too():
    """The cached step follows the layer's own settings, not only what `layers.transformer` builds."""
    model = make(2, 4, seed=7)
    layer = torch.nn.TransformerEncoderLayer(16, 4, 32, dropout=0.1, batch_first=True, norm_first=False, activation="relu")
    model.decoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    b = batch(2)
    assert torch.equal(model.greedy(b), decode_reference(model, b, 1, True, None, 1.0, None)[:, 0])
    got = model.sample(b, 5, torch.Generator().manual_seed(2))
    assert torch.equal(got, decode_reference(model, b, 5, False, torch.Generator().manual_seed(2), 1.0, None))
    lists, steps = model.decode(model.encode(b), 5, False, torch.Generator().manual_seed(3), with_log_probs=True)
    with torch.no_grad():
        assert torch.allclose(model.log_prob(b, lists), steps.sum(-1), atol=1e-5)


def test_list_bias_steers_every_later_step_away_from_a_chosen_category():
    """A table that costs 100 logits per earlier item of the same category: greedy and sampled
    lists then take each category at most once while unseen ones remain (category 0 = unknown
    is never 'the same'), and teacher forcing scores those steps the way decoding drew them."""
    model = make(1, 4, list_bias=True)
    first, last = model.list_bias[0], model.list_bias[2]
    with torch.no_grad():
        first.weight.zero_(), first.bias.zero_(), last.weight.zero_(), last.bias.zero_()
        first.weight[0, 0] = 1.0  # hidden unit 0 = GELU(same category)
        last.weight[0, 0] = -100.0 / torch.nn.functional.gelu(torch.tensor(1.0))
    b = random_batch(b=8, n=12, l=5, n_categories=6, seed=4, short_rows=0)
    b = b._replace(category=torch.arange(1, 13).remainder(4).add(1).expand(8, -1).clone())  # 4 categories, 3 items each
    greedy, (sampled, steps) = model.greedy(b, 4), model.decode(model.encode(b), 5, False,
                                                                 torch.Generator().manual_seed(0), with_log_probs=True)
    for lists in (greedy[:, None], sampled[..., :4]):
        cats = torch.gather(b.category[:, None].expand(-1, lists.shape[1], -1), 2, lists)  # (B, n, 4)
        assert (cats.sort(-1).values == torch.arange(1, 5)).all()  # four different categories
    with torch.no_grad():
        assert torch.allclose(model.step_log_probs(b, sampled), steps, atol=1e-4)
    plain = make(1, 4)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("list_bias")})
    assert not torch.equal(plain.greedy(b, 4), greedy)  # the same weights without the table repeat categories


def test_a_new_list_bias_starts_as_the_plain_pointer_network():
    """Zero-initialised: a warm start or a fresh model decodes what the plain network would."""
    torch.manual_seed(0)
    cfg = GeneratorConfig(d_model=16, n_layers=1, n_heads=4, list_bias=True)
    model = GoalRankGenerator(cfg, n_items=40, n_users=10, n_categories=4, slate_len=5).eval()
    plain = make(1, 4)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("list_bias")})
    b = batch()
    assert torch.equal(model.greedy(b), plain.greedy(b))
    lists = model.sample(b, 3, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.log_prob(b, lists), plain.log_prob(b, lists))
