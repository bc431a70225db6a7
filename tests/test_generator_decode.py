"""Incremental (key/value-cached) decoding against the uncached reference: the same greedy and
sampled lists, and step log-probabilities that add up to the teacher-forced `log_prob`."""
from __future__ import annotations

import pytest
import torch

from goalrank_core.config_sections import GeneratorConfig
from goalrank_core.generator import GoalRankGenerator
from gr_helpers import random_batch

# (decoder_layers, n_heads): one and several layers and heads.
CONFIGS = [(1, 1), (1, 4), (2, 4), (2, 1)]


def make(decoder_layers: int, n_heads: int, l: int = 5, seed: int = 0, dropout: float = 0.1) -> GoalRankGenerator:
    torch.manual_seed(seed)
    cfg = GeneratorConfig(d_model=16, n_layers=1, n_heads=n_heads, dropout=dropout, decoder_layers=decoder_layers)
    return GoalRankGenerator(cfg, n_items=40, n_users=10, n_categories=4, slate_len=l).eval()


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
        logits = model._masked_logits(enc, q, blocked[:, :, None, :], temperature)[:, :, 0]  # (B, n, N)
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


@pytest.mark.parametrize("decoder_layers,n_heads", CONFIGS)
@pytest.mark.parametrize("length", [None, 3])
def test_greedy_matches_the_uncached_reference(decoder_layers, n_heads, length):
    model, b = make(decoder_layers, n_heads), batch()
    ref = decode_reference(model, b, 1, True, None, 1.0, length)[:, 0]
    got = model.greedy(b, length)
    assert got.shape == (6, length or 5)
    assert torch.equal(got, ref)


@pytest.mark.parametrize("decoder_layers,n_heads", CONFIGS)
@pytest.mark.parametrize("length,temperature", [(None, 1.0), (2, 0.5), (4, 3.0)])
def test_samples_match_the_uncached_reference_for_the_same_seed(decoder_layers, n_heads, length, temperature):
    model = make(decoder_layers, n_heads, seed=decoder_layers * 10 + n_heads)
    for seed in range(3):
        b = batch(seed)
        ref = decode_reference(model, b, 7, False, torch.Generator().manual_seed(seed), temperature, length)
        got = model.sample(b, 7, torch.Generator().manual_seed(seed), temperature, length)
        assert torch.equal(got, ref)
        assert torch.gather(b.cand_mask[:, None, :].expand(-1, 7, -1), 2, got).all()  # never padding


@pytest.mark.parametrize("decoder_layers,n_heads", CONFIGS)
def test_cached_step_log_probs_add_up_to_log_prob(decoder_layers, n_heads):
    model, b = make(decoder_layers, n_heads, seed=3), batch(1)
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
