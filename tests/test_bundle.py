"""ModelBundle: save/load without pickle, partial bundles, merge."""
from __future__ import annotations

import os
import zipfile

import numpy as np
import pytest
import torch

from goalrank_core.bundle import BundleError, ModelBundle
from goalrank_core.bundle import build_bundle, encode
from gr_helpers import synth_tables, tiny_config


@pytest.fixture(scope="module")
def data():
    splits, _ = synth_tables(n_users=12, requests_per_user=4)
    return splits


def _bundle(splits, seed=0):
    b = build_bundle(splits.train, tiny_config(**{"train.seed": seed}), splits.items)
    torch.manual_seed(seed)
    b.add("generator", "generator", b.build("generator").eval())
    b.add("reward", "reward", b.build("reward").eval())
    b.tensors["stats.popularity"] = torch.arange(b.dims.n_items, dtype=torch.float32)
    return b


def test_round_trip_gives_identical_outputs(data, tmp_path):
    b = _bundle(data)
    b.save(tmp_path / "m")
    loaded = ModelBundle.load(tmp_path / "m")
    assert loaded.config == b.config and loaded.dims == b.dims and loaded.kinds == b.kinds
    assert np.array_equal(loaded.item_vocab.ids, b.item_vocab.ids) and loaded.item_category == b.item_category
    enc, enc2 = encode(b, data.test), encode(loaded, data.test)
    assert np.array_equal(enc.candidates, enc2.candidates) and np.array_equal(enc.category, enc2.category)
    batch = enc.batch(slice(None))
    with torch.no_grad():
        g = b.models["generator"].sample(batch, 3, torch.Generator().manual_seed(0))
        assert torch.equal(g, loaded.models["generator"].sample(batch, 3, torch.Generator().manual_seed(0)))
        assert torch.equal(b.models["generator"].log_prob(batch, g), loaded.models["generator"].log_prob(batch, g))
        assert torch.equal(b.models["reward"].score(batch, g), loaded.models["reward"].score(batch, g))
    assert torch.equal(loaded.tensors["stats.popularity"], b.tensors["stats.popularity"])


def test_weights_are_plain_state_dicts(data, tmp_path):
    _bundle(data).save(tmp_path)
    for name in ("generator.pt", "reward.pt", "tensors.pt"):
        sd = torch.load(tmp_path / name, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in sd.values())
        with zipfile.ZipFile(tmp_path / name) as z:  # no pickled classes beyond tensors
            pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
            assert b"goalrank" not in z.read(pkl)


def test_partial_bundles_load_and_merge(data, tmp_path):
    full = _bundle(data)
    only_reward = ModelBundle(full.config, full.item_vocab, full.user_vocab, full.item_category, full.dims)
    only_reward.add("reward", "reward", full.models["reward"])
    only_gen = ModelBundle(full.config, full.item_vocab, full.user_vocab, full.item_category, full.dims)
    only_gen.add("generator", "generator", full.models["generator"])
    only_reward.save(tmp_path / "r")
    only_gen.save(tmp_path / "g")
    r, g = ModelBundle.load(tmp_path / "r"), ModelBundle.load(tmp_path / "g")
    assert set(r.models) == {"reward"} and set(g.models) == {"generator"}
    with pytest.raises(BundleError, match="no 'generator'"):
        r.require("generator")
    merged = r.merge(g)
    assert set(merged.models) == {"reward", "generator"}
    other = build_bundle(synth_tables(n_users=15, requests_per_user=4, seed=3)[0].train, full.config)
    with pytest.raises(BundleError, match="different vocabularies"):
        merged.merge(other)


def test_missing_or_broken_folder_is_a_clear_error(data, tmp_path):
    with pytest.raises(BundleError, match="no bundle.json"):
        ModelBundle.load(tmp_path / "nothing")
    _bundle(data).save(tmp_path / "m")
    os.remove(tmp_path / "m" / "reward.pt")
    with pytest.raises(BundleError, match="reward.pt is missing"):
        ModelBundle.load(tmp_path / "m")
