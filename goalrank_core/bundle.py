"""A fitted model bundle on disk, without pickle.

Layout of a bundle folder:
    bundle.json         config, dimensions, and for each model its kind (how to rebuild it)
    items.parquet       the item vocabulary (item_id in index order, from index 2) and category
    users.parquet       the user vocabulary
    <name>.pt           one state_dict per model, loaded with torch.load(weights_only=True)
    tensors.pt          optional named tensors (e.g. heuristic statistics), same loader

Pipeline stages save separately (a bundle with only "reward", one with only "generator"),
so loading accepts any subset of models; `merge` combines bundles of the same data.
Model kinds are rebuilt by factories in MODEL_KINDS; other modules (baselines) register
theirs with `register_model_kind`.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from goalrank_core.batch import EncodedRequests, Vocab, encode_requests
from goalrank_core.config import GoalRankConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.latent_categories import latent_categories

FORMAT_VERSION = 1


class BundleError(GoalRankInputError):
    """A model folder is missing, incomplete or inconsistent."""


@dataclass(frozen=True)
class Dims:
    """What every model is sized by, fixed by the training data."""

    n_items: int  # len(item vocabulary) including PAD and UNK
    n_users: int
    n_categories: int  # category indices 0 .. n_categories - 1 (0 = none)
    slate_len: int
    n_candidates: int  # N the models were trained with (PRM's position table)


ModelFactory = Callable[[GoalRankConfig, Dims], nn.Module]
MODEL_KINDS: dict[str, ModelFactory] = {}


def register_model_kind(kind: str, factory: ModelFactory) -> None:
    MODEL_KINDS[kind] = factory


def _generator(cfg: GoalRankConfig, d: Dims) -> nn.Module:
    from goalrank_core.generator import GoalRankGenerator

    return GoalRankGenerator(cfg.generator, d.n_items, d.n_users, d.n_categories, d.slate_len, cfg.policies.emb_dim)


def _reward(cfg: GoalRankConfig, d: Dims) -> nn.Module:
    from goalrank_core.reward_model import CrossFitReward, RewardModel

    cls = CrossFitReward if cfg.reward.folds > 1 else RewardModel
    return cls(cfg.reward, d.n_items, d.n_users, d.n_categories, d.slate_len, cfg.policies.emb_dim)


def _pointwise(cfg: GoalRankConfig, d: Dims) -> nn.Module:
    from goalrank_core.baselines import PointwiseDNN

    return PointwiseDNN(d.n_users, d.n_items, d.n_categories, cfg.policies)


def _prm(cfg: GoalRankConfig, d: Dims) -> nn.Module:
    from goalrank_core.baselines import PRM

    return PRM(d.n_users, d.n_items, d.n_categories, d.n_candidates, cfg.policies)


register_model_kind("generator", _generator)
register_model_kind("reward", _reward)
register_model_kind("pointwise", _pointwise)
register_model_kind("prm", _prm)


def _load_baseline_kinds() -> None:
    """Baselines register their model kinds on import; import them if they exist."""
    try:
        import goalrank_core.baselines  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name != "goalrank_core.baselines":
            raise


def _load_weights(file: str, map_location: str | torch.device) -> dict[str, torch.Tensor]:
    """A state dict of plain tensors. weights_only=True never runs pickled code: a file holding
    anything else (a pickled object, a payload) is refused with a BundleError naming it."""
    import pickle

    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"{file}: refused: not a plain weights file loadable with weights_only=True ({first})") from exc


@dataclass
class ModelBundle:
    config: GoalRankConfig
    item_vocab: Vocab
    user_vocab: Vocab
    item_category: dict[int, int]  # raw item id -> category (0 = none)
    dims: Dims
    models: dict[str, nn.Module] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)  # model name -> kind in MODEL_KINDS
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    fit_report: list[dict] = field(default_factory=list)  # per-round loop diagnostics of the last fit

    def add(self, name: str, kind: str, model: nn.Module) -> None:
        self.models[name], self.kinds[name] = model, kind

    def build(self, kind: str) -> nn.Module:
        """A fresh, untrained model of `kind` sized for this bundle's data."""
        if kind not in MODEL_KINDS:
            _load_baseline_kinds()
        if kind not in MODEL_KINDS:
            raise BundleError(f"unknown model kind '{kind}'; known: {', '.join(sorted(MODEL_KINDS))}")
        return MODEL_KINDS[kind](self.config, self.dims)

    def require(self, name: str) -> nn.Module:
        if name not in self.models:
            raise BundleError(f"model bundle has no '{name}' model (it has: {', '.join(sorted(self.models)) or 'none'})")
        return self.models[name]

    # -- disk ---------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        for name in self.models:
            if not name.replace("-", "").replace("_", "").isalnum():
                raise BundleError(f"model name '{name}' must be letters, digits, '-' or '_'")
        ids = self.item_vocab.ids.astype(np.int64)
        cats = np.array([self.item_category.get(int(i), 0) for i in ids], dtype=np.int64)
        pq.write_table(pa.table({"item_id": ids, "category": cats}), os.path.join(path, "items.parquet"))
        # Items only in the category map (not in the vocabulary) still need their category.
        extra = sorted(set(self.item_category) - set(int(i) for i in ids))
        pq.write_table(pa.table({"item_id": pa.array(extra, pa.int64()),
                                 "category": pa.array([self.item_category[i] for i in extra], pa.int64())}),
                       os.path.join(path, "categories_extra.parquet"))
        pq.write_table(pa.table({"user_id": self.user_vocab.ids.astype(np.int64)}), os.path.join(path, "users.parquet"))
        for name, model in self.models.items():
            torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(path, f"{name}.pt"))
        if self.tensors:
            torch.save({k: v.detach().cpu() for k, v in self.tensors.items()}, os.path.join(path, "tensors.pt"))
        if self.fit_report:  # read by people and MLflow, never by load
            with open(os.path.join(path, "fit_report.json"), "w") as f:
                json.dump(self.fit_report, f, indent=2, sort_keys=True)
        meta = {
            "format": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "dims": self.dims.__dict__,
            "models": dict(self.kinds),
            "tensors": sorted(self.tensors),
        }
        # Written last: a folder without bundle.json is incomplete.
        with open(os.path.join(path, "bundle.json"), "w") as f:
            json.dump(meta, f, indent=2, sort_keys=True)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu") -> "ModelBundle":
        meta_path = os.path.join(path, "bundle.json")
        if not os.path.isfile(meta_path):
            raise BundleError(f"{path}: not a model folder (no bundle.json); train one with `goalrank fit`")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format") != FORMAT_VERSION:
            raise BundleError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
        items = pq.read_table(os.path.join(path, "items.parquet"))
        ids = items.column("item_id").to_numpy().astype(np.int64)
        cats = items.column("category").to_numpy().astype(np.int64)
        item_category = {int(i): int(c) for i, c in zip(ids, cats) if c != 0}
        extra_path = os.path.join(path, "categories_extra.parquet")
        if os.path.isfile(extra_path):
            extra = pq.read_table(extra_path)
            item_category.update(zip(extra.column("item_id").to_pylist(), extra.column("category").to_pylist()))
        users = pq.read_table(os.path.join(path, "users.parquet")).column("user_id").to_numpy().astype(np.int64)
        # Bundles written before reward.context_layers existed have reward models without it.
        meta["config"].get("reward", {}).setdefault("context_layers", 0)
        meta["config"].get("reward", {}).setdefault("folds", 1)  # and before cross-fitting: one model
        meta["config"].get("reward", {}).setdefault("pairwise", False)  # and before the pairwise term
        meta["config"].get("reward", {}).setdefault("causal", False)  # and before causal list encoding
        meta["config"].get("reward", {}).setdefault("exposure_prior", False)  # and before the exposure prior
        bundle = cls(GoalRankConfig.from_dict(meta["config"]), Vocab(ids), Vocab(users), item_category,
                     Dims(**meta["dims"]))
        for name, kind in meta["models"].items():
            file = os.path.join(path, f"{name}.pt")
            if not os.path.isfile(file):
                raise BundleError(f"{path}: bundle.json lists model '{name}' but {name}.pt is missing")
            model = bundle.build(kind)
            model.load_state_dict(_load_weights(file, map_location))
            model.to(map_location).eval()
            bundle.add(name, kind, model)
        if meta.get("tensors"):
            bundle.tensors = _load_weights(os.path.join(path, "tensors.pt"), map_location)
        return bundle

    def merge(self, *others: "ModelBundle") -> "ModelBundle":
        """A bundle with this one's data and every model and tensor of all of them (later
        bundles win on a name clash). Bundles must come from the same vocabularies."""
        out = ModelBundle(self.config, self.item_vocab, self.user_vocab, dict(self.item_category), self.dims,
                          dict(self.models), dict(self.kinds), dict(self.tensors))
        for o in others:
            if o.dims != self.dims or not np.array_equal(o.item_vocab.ids, self.item_vocab.ids) \
                    or not np.array_equal(o.user_vocab.ids, self.user_vocab.ids):
                raise BundleError("cannot merge model bundles trained on different vocabularies or dimensions")
            out.models.update(o.models)
            out.kinds.update(o.kinds)
            out.tensors.update(o.tensors)
            out.item_category.update(o.item_category)
        return out


def build_bundle(train: pa.Table, config: GoalRankConfig, items: pa.Table | None = None) -> ModelBundle:
    """An empty bundle with the vocabularies and dimensions of a training impressions table."""
    missing = [n for n in config.reward.feedback_names if n not in train.column_names]
    if missing:
        raise ConfigError(f"config 'reward.feedback' names {', '.join(missing)}, not a column of the training "
                          f"impressions (its labels_<name> columns: "
                          f"{', '.join(c for c in train.column_names if c.startswith('labels_')) or 'none'})")
    cand = train.column("candidates").combine_chunks().flatten().to_numpy()
    hist = train.column("history").combine_chunks().flatten().to_numpy()
    item_vocab = Vocab.build(cand, hist)
    user_vocab = Vocab.build(train.column("user_id").to_numpy())
    item_category: dict[int, int] = {}
    if items is not None and items.num_rows:
        item_category = {int(i): int(c) for i, c in zip(items.column("item_id").to_pylist(), items.column("category").to_pylist())}
    if not any(item_category.values()) and config.policies.latent_categories > 0:  # none given: learn them
        item_category = latent_categories(train, config.policies.latent_categories, config.policies.emb_dim,
                                          config.train.seed)
    n_cat = max(item_category.values(), default=0) + 1
    slate_len = max((len(s) for s in train.column("shown").to_pylist()), default=config.protocol.slate_len)
    n_cand = max((len(c) for c in train.column("candidates").to_pylist()), default=config.protocol.n_candidates)
    dims = Dims(len(item_vocab), len(user_vocab), n_cat, slate_len, n_cand)
    return ModelBundle(config, item_vocab, user_vocab, item_category, dims)


def encode(bundle: ModelBundle, table: pa.Table) -> EncodedRequests:
    """A table (impressions or requests) encoded with the bundle's vocabularies and shapes."""
    return encode_requests(table, bundle.item_vocab, bundle.user_vocab, bundle.config.protocol.history_len,
                           n_candidates=max(bundle.dims.n_candidates, _max_len(table, "candidates")),
                           slate_len=bundle.dims.slate_len, item_category=bundle.item_category or None,
                           feedback_names=bundle.config.reward.feedback_names)


def _max_len(table: pa.Table, col: str) -> int:
    return max((len(c) for c in table.column(col).to_pylist()), default=1)
