"""Every list policy by name: what a fitted bundle offers (`PolicyResources`) and the
registry that builds a policy from it. Above both `policies.py` (heuristics, the list-policy
interface) and `baselines.py` (the neural rankers and Generator-Evaluator), so neither needs
the other's registry entries.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from goalrank_core.baselines import GeneratorEvaluator, pointwise_policy, prm_policy
from goalrank_core.config_sections import PolicyConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.policies import (HeuristicStats, ListPolicy, LoggedPolicy, MMRPolicy, ScorePolicy, ctr_policy,
                                    first_stage_policy, history_policy, popularity_policy, random_policy)


@dataclass
class PolicyResources:
    """What policies are built from (a fitted bundle fills it). Anything in `extra` (e.g. the
    GoalRank generator or the supervised generator, wrapped as ListPolicy) wins over the
    registry under its name."""

    config: PolicyConfig = field(default_factory=PolicyConfig)
    stats: HeuristicStats | None = None
    pointwise: Any = None  # baselines.PointwiseDNN
    prm: Any = None  # baselines.PRM
    reward_model: Any = None  # anything with score(batch, lists (B, G, L)) -> (B, G)
    extra: dict[str, ListPolicy] = field(default_factory=dict)


PolicyFactory = Callable[[PolicyResources], ListPolicy]
POLICY_REGISTRY: dict[str, PolicyFactory] = {}


def register_policy(name: str, factory: PolicyFactory) -> None:
    POLICY_REGISTRY[name] = factory


def _need(res: PolicyResources, attr: str, name: str) -> Any:
    value = getattr(res, attr)
    if value is None:
        raise GoalRankInputError(f"policy '{name}' needs {attr.replace('_', ' ')}, which this model bundle lacks")
    return value


def _mmr(res: PolicyResources) -> MMRPolicy:
    cfg, stats = res.config, _need(res, "stats", "mmr")
    relevance = build_policy(cfg.mmr_relevance, res)
    if not isinstance(relevance, ScorePolicy):
        raise ConfigError(f"config 'policies.mmr_relevance' must name a score policy, got {cfg.mmr_relevance!r}")
    return MMRPolicy(relevance, cfg.mmr_lambda, stats.item_emb, cfg.mmr_similarity)


def _pointwise(res: PolicyResources, sample: bool) -> ListPolicy:
    return pointwise_policy(_need(res, "pointwise", "dnn-pl" if sample else "dnn"), res.config, sample)


def _prm(res: PolicyResources) -> ListPolicy:
    return prm_policy(_need(res, "prm", "prm"))


def _ge(res: PolicyResources) -> ListPolicy:
    reward = _need(res, "reward_model", "g-e")
    return GeneratorEvaluator(build_auxiliary(res), reward)


register_policy("popularity", lambda r: popularity_policy(_need(r, "stats", "popularity")))
register_policy("ctr", lambda r: ctr_policy(_need(r, "stats", "ctr")))
register_policy("random", lambda r: random_policy(r.config.random_lists))
register_policy("history", lambda r: history_policy(_need(r, "stats", "history")))
register_policy("mmr", _mmr)
register_policy("first-stage", lambda r: first_stage_policy())
register_policy("logged", lambda r: LoggedPolicy())
register_policy("dnn", lambda r: _pointwise(r, sample=False))
register_policy("dnn-pl", lambda r: _pointwise(r, sample=True))
register_policy("prm", _prm)
register_policy("g-e", _ge)


def known_policies(res: PolicyResources | None = None) -> list[str]:
    return sorted(set(POLICY_REGISTRY) | set(res.extra if res else ()))


def build_policy(name: str, res: PolicyResources) -> ListPolicy:
    """Any policy by name; unknown names and missing fitted parts are GoalRankInputErrors."""
    if name in res.extra:
        return res.extra[name]
    if name not in POLICY_REGISTRY:
        raise GoalRankInputError(f"unknown policy '{name}'; known: {', '.join(known_policies(res))}")
    return POLICY_REGISTRY[name](res)


def build_auxiliary(res: PolicyResources) -> list[ListPolicy]:
    """The auxiliary policies named in `policies.auxiliary` (they feed the group and G-E)."""
    names = res.config.auxiliary_names()
    bad = [n for n in names if n not in POLICY_REGISTRY and n not in res.extra]
    if bad:
        raise ConfigError(f"config 'policies.auxiliary' names unknown policy {bad[0]!r}; known: {', '.join(known_policies(res))}")
    if "g-e" in names or "logged" in names:
        raise ConfigError("config 'policies.auxiliary' may not contain 'g-e' or 'logged'")
    return [build_policy(n, res) for n in names]
