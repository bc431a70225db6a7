"""Typed configuration: `GoalRankConfig`, one section per concern (the section dataclasses, each
field with a short help and checked in `__post_init__`, are in `goalrank_core.config_sections`),
and what is done with a whole config: loading from a mapping, dotted overrides, the per-source
reward recipes (`SOURCE_RECIPES`) and the hash recorded in stage manifests.
`GoalRankConfig.from_dict` rejects unknown keys with their dotted path, so a typo in a config
file is an error, not a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from goalrank_core.config_sections import (GateConfig, GeneratorConfig, GroupConfig, PolicyConfig, ProtocolConfig,
                                           RewardConfig, TrainConfig, WindowConfig)
from goalrank_core.errors import ConfigError


SOURCES = {"interactions": "negative", "impressions": "unknown"}  # protocol.Splits.source -> unshown
# The recipe `reward.unshown: auto` brings with it, per source, for every field still at its
# default. Impression logs keep the list-wise reward model of the defaults (pairwise context term,
# causal reader) and get a loop that follows it (measured on the simulator,
# docs/simulator.md: with the item features the reward model's greedy search finds lists as good as
# the best proposer's, so the search list leads each group, pi_ref is sharp, tau 0.1, and the
# generator trains 4 epochs in each of 2 rounds; bench/results/simulator_quick_loop-search.json).
# One sweep of local search after the greedy construction (search.py) lifted the search list's
# true value on every effect of the simulator (docs/simulator.md).
# Each round keeps the generator's last epoch (`train.generator_select: last`): the logged hit rate
# that picks the epoch otherwise kept epoch 1 of every round on the simulator, the epoch nearest the
# warm start, while the list value kept rising (3 seeds, saturation 0.527 -> 0.562, pairs and cascade
# unchanged; bench/results/simulator_quick.json, docs/simulator.md).
# They fit ONE reward model on all training requests (`reward.folds: 1`) instead of 2 cross-fitted
# halves: the teacher the generator learns from is the reward model's search list, and a member fitted
# on half the logs searched worse lists on the requests it never saw than one model fitted on all of
# them did on its own training requests (saturation probe: 0.535 against 0.596 of the optimum; the
# 3-seed run is in docs/simulator.md). Cross-fitting stays available (`reward.folds: 2`).
# Their generator adds the list-context term to its pointer logits (`generator.list_bias`): each
# chosen item shifts every remaining candidate's logit by a learnt function of their shared category
# and similarity, so imitating a search list that spreads categories needs no approximation by one
# query per step (saturation probe: 0.591 -> 0.631; with the saturation penalty doubled 0.461 -> 0.522,
# above MMR's 0.477).
# Logs whose items carry no category (no items file) get categories learnt from the logs
# (`policies.latent_categories`: k-means of the items' low-rank vectors, goalrank_core/latent_categories.py),
# so the category-aware terms above still see which items are alike (a world of strong saturation without
# its items file, seed 0: GoalRank 0.303 -> 0.335, its teacher 0.317 -> 0.353; docs/simulator.md).
# The named data sets keep the default loop: it is what their results were measured with, and their
# logged labels cannot show a list-wise gain (docs/results.md). Interaction data sets get the recipe
# measured best there (docs/results.md, ML-100K over 3 seeds: GoalRank HR@6 0.576 against 0.566 with
# the defaults, at a third of the fit time): unshown candidates are labelled negatives, so the
# supervised generator's encoder is a good start and the list-wise terms only add variance.
SOURCE_RECIPES: dict[str, dict[str, Any]] = {
    "interactions": {"reward.init_from_supervised": True, "reward.context_layers": 2, "train.reward_epochs": 3,
                     "reward.pairwise": False, "reward.causal": False, "reward.folds": 1, "group.rounds": 1},
    "impressions": {"group.search_lists": True, "group.search_sweeps": 1, "group.tau": 0.1,
                    "train.epochs": 4, "train.generator_select": "last", "reward.folds": 1,
                    "generator.list_bias": True, "policies.latent_categories": 16},  # and the default 2 rounds
}


@dataclass
class GoalRankConfig:
    """Everything that changes what the pipeline computes (hashed into stage manifests)."""

    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    group: GroupConfig = field(default_factory=GroupConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    policies: PolicyConfig = field(default_factory=PolicyConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    gates: GateConfig = field(default_factory=GateConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> "GoalRankConfig":
        return _build(cls, data or {}, "")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, dotted: dict[str, Any]) -> "GoalRankConfig":
        """A copy with `{"group.size": 10, ...}` applied (unknown keys are errors)."""
        data = self.to_dict()
        for key, value in dotted.items():
            parts = key.split(".")
            node = data
            for p in parts[:-1]:
                if not isinstance(node.get(p), dict):
                    raise ConfigError(f"unknown config key '{key}'")
                node = node[p]
            if parts[-1] not in node:
                raise ConfigError(f"unknown config key '{key}'")
            node[parts[-1]] = value
        return GoalRankConfig.from_dict(data)

    def for_source(self, source: str) -> "GoalRankConfig":
        """`reward.unshown: auto` resolved for the data: `interactions` (a named data set, whose
        impressions the protocol builds from what users rated or clicked: the shown list is the
        user's own choice, so an unshown candidate is a negative) or `impressions` (logs of
        what a system showed: an unshown candidate's click is unknown). With `auto`, the source's
        reward recipe (SOURCE_RECIPES) also replaces every one of its fields still at its default;
        a field set to anything else stays, and an explicit `reward.unshown` keeps every field."""
        if source not in SOURCES:
            raise ConfigError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")
        if self.reward.unshown != "auto":
            return self
        default = GoalRankConfig()
        recipe = {key: value for key, value in SOURCE_RECIPES[source].items()
                  if _dotted(self, key) == _dotted(default, key)}
        return self.override({**recipe, "reward.unshown": SOURCES[source]})

    def hash(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _dotted(cfg: GoalRankConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _build(cls: type, data: Any, path: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config '{path or 'root'}' must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f" in '{path}'" if path else ""
        raise ConfigError(f"unknown config key(s){where}: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        value, typ, name = data[f.name], hints[f.name], f"{path}.{f.name}" if path else f.name
        if is_dataclass(typ):
            kwargs[f.name] = _build(typ, value, name)
        else:
            kwargs[f.name] = _coerce(value, typ, name)
    return cls(**kwargs)


def _coerce(value: Any, typ: Any, name: str) -> Any:
    if typ is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config '{name}' must be true or false, got {value!r}")
        return value
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config '{name}' must be an integer, got {value!r}")
        return value
    if typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config '{name}' must be a number, got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise ConfigError(f"config '{name}' must be finite, got {value!r}")
        return float(value)
    if typ is str:
        if not isinstance(value, str):
            raise ConfigError(f"config '{name}' must be a string, got {value!r}")
        return value
    return value
