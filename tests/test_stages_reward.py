"""The Ray reward stage after the policies stage (issues 3 and 4): it trains on the proposers'
lists that the in-process fit computes (same core calls, same seeds), validates on the same
measure, records the policies stage as an input, and still warm-starts from `init`."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from flow_helpers import TINY_OVERRIDES, synth_source
from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import ConfigError
from tasks.reward import proposals_array, proposals_column


def test_proposals_column_round_trips_with_slices_and_padding():
    rng = np.random.default_rng(0)
    lists = rng.integers(-1, 10, size=(7, 5, 3))
    col = proposals_column(lists)
    assert col.type == pa.list_(pa.list_(pa.int32(), 3), 5)
    assert np.array_equal(proposals_array(col), lists)
    chunked = pa.chunked_array([col.slice(0, 2), col.slice(2, 1), col.slice(3)])
    assert np.array_equal(proposals_array(chunked), lists)
    assert np.array_equal(proposals_array(col.slice(4, 2)), lists[4:6])
    assert proposals_array(proposals_column(lists[:0])).shape == (0, 5, 3)


def test_group_lists_without_policies_is_a_config_error(tmp_path):
    from tasks.reward import train_reward_model

    with pytest.raises(ConfigError, match="reward.group_lists"):
        train_reward_model(str(tmp_path / "p"), None, str(tmp_path / "r"), GoalRankConfig().override({"reward.group_lists": 2,
                                                                                                     "reward.unshown": "negative"}))


@pytest.fixture(scope="module")
def stages(tmp_path_factory, ray_session):
    from tasks.stages import DataSource, prepare, stage_uri, train_policies, train_reward_model

    root = tmp_path_factory.mktemp("reward-stage")
    imp, items = synth_source(root / "data")
    cfg = GoalRankConfig().override({**TINY_OVERRIDES, "train.reward_epochs": 2, "reward.group_lists": 2,
                                       "reward.unshown": "negative"})
    u = lambda s: stage_uri(str(root / "s"), "d", "r", s)  # noqa: E731
    prep = prepare(DataSource(impressions=str(imp), items=str(items)), u("prepare"), cfg)
    pol = train_policies(prep.uri, u("policies"), cfg)
    rew = train_reward_model(prep.uri, pol.uri, u("reward"), cfg)
    return {"cfg": cfg, "prepare": prep, "policies": pol, "reward": rew, "u": u}


@pytest.mark.ray
def test_reward_stage_uses_the_in_process_proposals_and_valid_measure(stages):
    from goalrank_core.bundle import encode
    from goalrank_core.fit import proposer_lists
    from goalrank_core.policy_registry import build_auxiliary
    from goalrank_core.ranking import policy_resources
    from goalrank_core.trainer import mean_reward_loss
    from tasks import object_store, storage
    from tasks.stage_io import load_bundle
    from tasks.reward import PROPOSALS, _proposals

    cfg, prep, pol, rew = stages["cfg"], stages["prepare"], stages["policies"], stages["reward"]
    m = rew.manifest
    assert m["inputs"]["policies"]["fingerprint"] == pol.manifest["fingerprint"]
    props = m["training"]["proposals"]
    assert "supervised" in props["policies"] and props["lists_per_request"] > 1
    epochs = m["training"]["epochs"]
    assert len(epochs) == 2 and epochs[-1]["loss"] < epochs[0]["loss"], epochs

    # What the in-process fit computes (fit.train_reward), on the policies stage's bundle.
    bundle = load_bundle(object_store.join(pol.uri, "model"), "policies")
    res = policy_resources(bundle)
    aux = build_auxiliary(res) + [res.extra["supervised"]]
    train_t = storage.read_table(object_store.join(prep.uri, "train"), None, "train")
    valid_t = storage.read_table(object_store.join(prep.uri, "valid"), None, "valid")
    want = proposer_lists(encode(bundle, train_t), aux, bundle.models["supervised"], cfg, seed=cfg.train.seed + 101)
    valid = encode(bundle, valid_t)
    want_v = proposer_lists(valid, aux, bundle.models["supervised"], cfg, seed=cfg.train.seed + 102)
    got = _proposals(prep.uri, pol.uri, cfg.to_dict(), 1)
    assert got["train"].column("request_id").equals(train_t.column("request_id"))
    assert np.array_equal(proposals_array(got["train"].column(PROPOSALS)), want.lists)
    assert np.array_equal(got["valid"], want_v.lists) and got["valid_ids"] == list(valid.request_id)

    # best_valid is trainer.mean_reward_loss on the valid proposals, of the saved (best) model.
    model = load_bundle(object_store.join(rew.uri, "model"), "reward").require("reward")
    with_props = mean_reward_loss(model, valid, 4 * cfg.train.batch_size, want_v.lists)
    logged_only = mean_reward_loss(model, valid, 4 * cfg.train.batch_size)
    assert m["training"]["best_valid"] == pytest.approx(with_props, rel=1e-5)
    assert with_props != pytest.approx(logged_only, rel=1e-4)


@pytest.mark.ray
def test_reward_worker_batch_loss_is_the_core_loss(stages):
    """A worker's batch (its shard's rows, proposals column attached) gives exactly the core
    training step's loss: pick_lists, then reward_loss with the list term, from one generator."""
    from goalrank_core.bundle import encode
    from goalrank_core.reward_model import request_folds
    from goalrank_core.trainer import pick_lists, reward_loss
    from tasks import object_store
    from tasks.reward import PROPOSALS, RewardSpec, _proposals

    cfg, prep, pol = stages["cfg"], stages["prepare"], stages["policies"]
    table = _proposals(prep.uri, pol.uri, cfg.to_dict(), 1)["train"].take([5, 1, 17, 3])
    cfg = cfg.override({"reward.list_weight": 0.5})  # the list term on, so the worker must pass it
    spec = RewardSpec(cfg.to_dict(), object_store.normalize(prep.uri))
    torch.manual_seed(0)
    model = spec.setup(rank=1).eval()  # not rank 0: no validation data; eval: no dropout draws
    assert spec.k == cfg.reward.group_lists == 2 and spec.list_weight == 0.5
    args = spec.batch_args(table, "cpu", torch.Generator().manual_seed(3))
    assert args[3].shape == (4, 2, cfg.protocol.slate_len)
    got = spec.loss(model, *args)
    gen = torch.Generator().manual_seed(3)
    batch = encode(spec.bundle, table).batch(slice(None))
    extra = pick_lists(torch.from_numpy(proposals_array(table.column(PROPOSALS))), 2, gen)
    folds = args[-1]  # cross-fitting: the rows' folds, from their request ids
    assert torch.equal(folds, torch.from_numpy(request_folds(table.column("request_id").to_pylist(), cfg.reward.folds)))
    want = reward_loss(model, batch, cfg.reward.labelled_lists[0], gen, extra, cfg.reward.list_weight, folds)
    assert torch.equal(got, want)
    assert not torch.equal(got, reward_loss(model, batch, cfg.reward.labelled_lists[0], torch.Generator().manual_seed(3)))


@pytest.mark.slow  # one more DDP run (~20 s quiet, ~50 s loaded); the daily_ops flow test covers warm starts too
@pytest.mark.ray
def test_reward_stage_reruns_skip_and_warm_start_from_init(stages):
    from tasks import object_store
    from tasks.stages import train_reward_model

    cfg, prep, pol, rew, u = stages["cfg"], stages["prepare"], stages["policies"], stages["reward"], stages["u"]
    assert train_reward_model(prep.uri, pol.uri, rew.uri, cfg).skipped
    warm_cfg = cfg.override({"train.reward_epochs": 1})
    warm = train_reward_model(prep.uri, pol.uri, u("reward-warm"), warm_cfg, init=rew.uri)
    assert not warm.skipped and warm.manifest["inputs"]["init"]["uri"] == object_store.normalize(rew.uri)
    assert warm.manifest["inputs"]["policies"]["uri"] == object_store.normalize(pol.uri)
    # Starting from trained weights: the first warm epoch's loss is below the cold first epoch's.
    assert warm.manifest["training"]["epochs"][0]["loss"] < rew.manifest["training"]["epochs"][0]["loss"]


@pytest.mark.ray
def test_reward_worker_starts_from_the_supervised_generator_as_fit_does(stages):
    from tasks import object_store
    from tasks.stage_io import load_bundle
    from tasks.reward import RewardSpec

    prep, pol = stages["prepare"], stages["policies"]
    sup = load_bundle(object_store.join(pol.uri, "model"), "policies").require("supervised")
    for ctx, expect in ((1, True), (2, False)):  # fit.init_reward: only when the encoder shapes match
        cfg = stages["cfg"].override({"reward.context_layers": ctx, "reward.init_from_supervised": True,
                                      "reward.folds": 1})  # one model, so its embeddings are the start's
        model = RewardSpec(cfg.to_dict(), object_store.normalize(prep.uri), policies=object_store.normalize(pol.uri)).setup(1)
        got = model.embed.state_dict()
        same = all(torch.equal(v, got[k]) for k, v in sup.embed.state_dict().items())
        assert same == expect, ctx
