"""The in-process trainer: losses fall, parameters move, seeds repeat, and GoalRank beats a
point-wise sort on synthetic data with a context effect."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from goalrank_core.bundle import build_bundle, encode
from goalrank_core.fit import fit_tables, propose_groups
from goalrank_core.ranking import rank_positions
from goalrank_core.trainer import (generator_group_loss, positive_lists, set_seed, supervised_list_loss,
                                   train_generator_group, train_generator_supervised, train_reward_model)
from gr_helpers import synth_tables, tiny_config


@pytest.fixture(scope="module")
def data():
    splits, world = synth_tables(n_users=30, requests_per_user=6)
    cfg = tiny_config(**{"train.batch_size": 32, "train.lr": 5e-3})
    bundle = build_bundle(splits.train, cfg, splits.items)
    return bundle, encode(bundle, splits.train), encode(bundle, splits.valid)


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_reward_training_lowers_loss_and_changes_params(data):
    bundle, tr, va = data
    set_seed(0)
    model = bundle.build("reward")
    before = _params(model)
    lines = []
    hist = train_reward_model(tr, va, model, bundle.config.train, lines.append, epochs=4)
    assert hist[-1].loss < hist[0].loss
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(lines) == 4 and "samples/s" in lines[0] and "loss" in lines[0]


def test_supervised_generator_training_lowers_loss(data):
    bundle, tr, va = data
    set_seed(0)
    model = bundle.build("generator")
    b = tr.batch(slice(0, 64))
    model.eval()
    first = float(supervised_list_loss(model, b))
    train_generator_supervised(tr, None, model, bundle.config.train, lambda s: None, epochs=4)
    assert float(supervised_list_loss(model.eval(), b)) < first


def test_positive_lists_keep_display_order():
    from goalrank_core.batch import RequestBatch

    b = RequestBatch(*(torch.zeros(2, 1, dtype=torch.long) for _ in range(5)),
                     shown=torch.tensor([[4, 7, 1, 2], [3, 5, 6, 0]]),
                     labels=torch.tensor([[0.0, 1.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]))
    assert positive_lists(b).tolist() == [[[7, 2, -1, -1]], [[-1, -1, -1, -1]]]


def test_same_seed_gives_same_weights(data):
    bundle, tr, va = data
    states = []
    for _ in range(2):
        set_seed(3)
        m = bundle.build("reward")
        train_reward_model(tr, None, m, bundle.config.train, lambda s: None, epochs=1)
        states.append(m.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_group_training_raises_likelihood_of_preferred_lists(data):
    bundle, tr, va = data
    cfg = bundle.config
    set_seed(0)
    reward = bundle.build("reward")
    train_reward_model(tr, None, reward, cfg.train, lambda s: None, epochs=2)
    gen_model = bundle.build("generator")
    from goalrank_core.policies import random_policy

    groups, names = propose_groups(tr, [random_policy(4)], gen_model, reward, cfg, seed=0)
    assert groups.lists.shape == (len(tr), cfg.group.size, cfg.protocol.slate_len)
    assert set(names) == {"logged", "random", "goalrank"}  # group.logged_list: training groups hold the logged list
    assert np.allclose(groups.pi_ref.sum(1), 1.0, atol=1e-5)
    lists, pi, mask = groups.batch(np.arange(64))
    b = tr.batch(np.arange(64))

    def expected_pi_weighted_logp():
        gen_model.eval()
        with torch.no_grad():
            lp = gen_model.log_prob(b, lists.clamp(min=0)).masked_fill(~mask, -1e9).log_softmax(1)
        return float((pi * lp * mask).sum(1).mean())

    before = _params(gen_model)
    start = expected_pi_weighted_logp()
    first_loss = float(generator_group_loss(gen_model, b, lists, pi, mask, 0.5))
    train_generator_group(tr, groups, gen_model, cfg.train, None, lambda s: None, epochs=3)
    assert expected_pi_weighted_logp() > start
    assert float(generator_group_loss(gen_model.eval(), b, lists, pi, mask, 0.5)) < first_loss
    assert any(not torch.equal(before[k], v) for k, v in gen_model.state_dict().items())


@pytest.mark.parametrize("select", ["hit_rate", "last"])
def test_generator_select_keeps_best_or_last_epoch(data, select, monkeypatch):
    """`train.generator_select`: hit_rate keeps the epoch with the best valid hit rate, last the
    last epoch's weights (the hit rate is still logged). A valid measure that falls every epoch
    makes the two differ: hit_rate must keep epoch 1's weights."""
    import goalrank_core.trainer as trainer
    from goalrank_core.policies import random_policy

    bundle, tr, va = data
    cfg = bundle.config.override({"train.generator_select": select})
    set_seed(0)
    reward = bundle.build("reward")
    model = bundle.build("generator")
    groups, _ = propose_groups(tr, [random_policy(4)], model, reward, cfg, seed=0)
    states, falling = [], iter([0.9, 0.5, 0.1])

    def fake_hit_rate(m, data, batch_size):  # records each epoch's weights as it validates them
        states.append({k: v.clone() for k, v in m.state_dict().items()})
        return next(falling)

    monkeypatch.setattr(trainer, "greedy_hit_rate", fake_hit_rate)
    lines = []
    train_generator_group(tr, groups, model, cfg.train, va, lines.append, epochs=3)
    kept = states[0] if select == "hit_rate" else states[-1]
    assert all(torch.equal(kept[k], v) for k, v in model.state_dict().items())
    assert not all(torch.equal(states[0][k], states[-1][k]) for k in kept)
    assert "valid 0.1000" in lines[-1]  # logged either way


def test_generator_select_reaches_the_ray_spec():
    from tasks.generator import GeneratorSpec

    for select, keep in (("hit_rate", True), ("last", False)):
        cfg = tiny_config(**{"train.generator_select": select})
        assert GeneratorSpec(cfg.to_dict(), "/nowhere", None).keep_best is keep


def test_generator_select_refuses_unknown_value():
    from goalrank_core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.generator_select"):
        tiny_config(**{"train.generator_select": "best"})


@pytest.mark.slow
def test_goalrank_beats_pointwise_sort_on_context_effect():
    """On synthetic logs where a second item of a category is worth less, GoalRank's lists
    get more true expected clicks than the point-wise DNN sorted by its own scores."""
    splits, world = synth_tables(n_users=300, requests_per_user=8, gamma=2.0)
    cfg = tiny_config(**{
        "generator.d_model": 32, "reward.d_model": 32, "reward.n_layers": 2, "reward.augment_lists": 0,
        "train.epochs": 3, "train.reward_epochs": 6, "train.aux_epochs": 4, "train.batch_size": 64,
        "group.rounds": 2, "group.generator_samples": 6, "group.size": 16,
    })
    bundle = fit_tables(splits.train, splits.valid, cfg, splits.items, log=lambda s: None)
    test = encode(bundle, splits.test)
    users = splits.test.column("user_id").to_numpy()
    value = {}
    for policy in ("goalrank", "dnn"):
        ids = test.positions_to_ids(slice(None), rank_positions(bundle, test, policy))
        value[policy] = float(world.list_value(users, ids).mean())
    assert value["goalrank"] > value["dnn"], value
