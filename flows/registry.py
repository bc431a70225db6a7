"""Model registry: register every run as a `challenger`, promote it to `champion` only when its
validation metric is no worse than the champion's on the same validation data.

Invariants (docs/reliability.md, issue 8):
- A version is created with its evaluation already in its tags (`create_model_version` takes
  the tags in the same call), so no version exists without its metrics, and `champion` is
  only ever set on a version whose metric tag is present.
- The champion alias moves in one registry call, after the decision; a crash anywhere before
  that call leaves the previous champion in place.
- A rerun of the same pipeline run (same run id and config hash) finds its version by tag and
  registers nothing new.

Comparison on different validation data: the champion's metric is only comparable if it was
computed on the same validation split (tag `goalrank.data_version`). When the data differ,
`decide` re-evaluates the champion on the current validation data through the `reevaluate`
callable (the flow passes one that runs the evaluate stage on the champion's bundle); with no
re-evaluator it refuses to compare and keeps the champion.

Rule: promote when `challenger >= champion + margin` (margin 0: "no worse"; a positive margin
asks for an improvement, a negative one tolerates a small loss).

Promotion by estimated value (`ope:<estimator>`, flows/promotion.py): the metric is an
off-policy estimate of the expected slate reward on the logged validation split, tagged like
the other metrics (`goalrank.metric.valid.ope:snips`) with its bootstrap 95% interval and
effective sample size beside it (`....ci_low`, `....ci_high`, `....ess`). The rule compares the
point estimates, as for NDCG; the intervals and ESS are recorded in the Decision, not used.
"""
from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Callable

from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

CHAMPION = "champion"
CHALLENGER = "challenger"

# Version tags (also searched by `find_version`).
TAG_RUN_ID = "goalrank.run_id"  # the pipeline run id (storage layout), not the MLflow run id
TAG_CONFIG_HASH = "goalrank.config_hash"
TAG_DATASET = "goalrank.dataset"
TAG_DATA_VERSION = "goalrank.data_version"  # hash of the prepared data (validation split included)
TAG_METRIC_PREFIX = "goalrank.metric."  # + "valid.ndcg@6" etc.
TAG_EVALUATED = "goalrank.evaluated"
OPE_PREFIX = "ope:"  # promotion metric "ope:snips": an off-policy estimate (flows/promotion.py)
MEASURE_PARTS = ("ci_low", "ci_high", "ess")  # tagged beside an ope metric: "{metric}.ci_low", ...


@dataclass
class Measured:
    """A metric value with, for an off-policy estimate, its 95% interval and effective sample
    size (None where not known, as for NDCG)."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    ess: float | None = None


@dataclass
class Decision:
    """What `decide`/`promote` concluded; logged on the MLflow run and returned by the flow."""

    version: str
    promoted: bool
    reason: str
    metric: str
    challenger_value: float | None
    champion_version: str | None  # the champion before this decision
    champion_value: float | None  # on the challenger's validation data
    margin: float
    # Off-policy metrics (`ope:<estimator>`) only, else None: each side's 95% interval and
    # effective sample size. The decision compares the point estimates above.
    challenger_ci_low: float | None = None
    challenger_ci_high: float | None = None
    challenger_ess: float | None = None
    champion_ci_low: float | None = None
    champion_ci_high: float | None = None
    champion_ess: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def with_measures(self, challenger: Measured | None, champion: Measured | None) -> "Decision":
        for side, m in (("challenger", challenger), ("champion", champion)):
            if m is not None:
                for part in MEASURE_PARTS:
                    setattr(self, f"{side}_{part}", getattr(m, part))
        return self


def mlflow_key(name: str) -> str:
    """MLflow names allow only [A-Za-z0-9_-. :/]: "ndcg@6" -> "ndcg_at_6"."""
    return re.sub(r"[^\w\-. :/]", "_", name.replace("@", "_at_"))


def metric_tag(metric: str, split: str = "valid") -> str:
    return mlflow_key(f"{TAG_METRIC_PREFIX}{split}.{metric}")


def ensure_registered_model(client: MlflowClient, name: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        try:
            client.create_registered_model(name)
        except MlflowException:  # created concurrently
            client.get_registered_model(name)


def find_version(client: MlflowClient, name: str, run_id: str, config_hash: str) -> ModelVersion | None:
    """The version registered earlier for this pipeline run and config, if any."""
    ensure_registered_model(client, name)
    found = client.search_model_versions(
        f"name = {_q(name)} and tags.`{TAG_RUN_ID}` = {_q(run_id)}"
        f" and tags.`{TAG_CONFIG_HASH}` = {_q(config_hash)}"
    )
    found = sorted(found, key=lambda v: int(v.version))
    return found[0] if found else None


def register(
    client: MlflowClient,
    name: str,
    source: str,
    mlflow_run_id: str,
    run_id: str,
    config_hash: str,
    metrics: dict[str, float],
    tags: dict[str, str] | None = None,
) -> tuple[ModelVersion, bool]:
    """Register `source` (a logged model "models:/m-<id>", or "runs:/<mlflow run>/path") as a new version of `name` with its
    evaluation `metrics` ({"valid.ndcg@6": 0.41, ...}) in its tags, and point `challenger` at it.

    Returns (version, created); created is False when this run id + config hash was already
    registered, in which case nothing new is written except re-pointing `challenger`.
    """
    if not metrics:
        raise ValueError("register: no evaluation metrics; a version is only registered after evaluation")
    existing = find_version(client, name, run_id, config_hash)
    if existing is not None:
        client.set_registered_model_alias(name, CHALLENGER, existing.version)
        return existing, False
    all_tags = {
        TAG_RUN_ID: run_id,
        TAG_CONFIG_HASH: config_hash,
        TAG_EVALUATED: "true",
        **{mlflow_key(f"{TAG_METRIC_PREFIX}{k}"): repr(float(v)) for k, v in metrics.items()},
        **(tags or {}),
    }
    # MLflow 3 logs models as LoggedModels ("models:/m-<id>"): link the version to it.
    model_id = source[len("models:/"):] if re.fullmatch(r"models:/m-[0-9a-f]+", source) else None
    mv = client.create_model_version(name, source, run_id=mlflow_run_id, tags=all_tags, model_id=model_id)
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    return mv, True


def get_alias(client: MlflowClient, name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def is_ope(metric: str) -> bool:
    return metric.startswith(OPE_PREFIX)


def version_metric(mv: ModelVersion, metric: str, split: str = "valid") -> float | None:
    value = (mv.tags or {}).get(metric_tag(metric, split))
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def version_measure(mv: ModelVersion | None, metric: str, split: str = "valid") -> Measured | None:
    """The metric of a version with, for an ope metric, its interval and ESS tags."""
    value = None if mv is None else version_metric(mv, metric, split)
    if value is None:
        return None
    if not is_ope(metric):
        return Measured(value)
    return Measured(value, *(version_metric(mv, f"{metric}.{part}", split) for part in MEASURE_PARTS))


def _describe(m: Measured) -> str:
    if m.ci_low is None and m.ess is None:
        return f"{m.value:.6f}"
    num = lambda x: "nan" if x is None else f"{x:.4f}"  # noqa: E731
    return f"{m.value:.6f} [{num(m.ci_low)}, {num(m.ci_high)}] ESS {num(m.ess)}"


def decide(
    client: MlflowClient,
    name: str,
    version: str,
    metric: str,
    margin: float = 0.0,
    reevaluate: Callable[[ModelVersion], float | Measured] | None = None,
) -> Decision:
    """Whether `version` should become champion (does not move any alias). `reevaluate`
    returns the champion's metric on the current validation data: a float, or a Measured
    with the interval and ESS of an ope metric."""
    mv = client.get_model_version(name, version)
    mine = version_measure(mv, metric)
    value = None if mine is None else mine.value
    champ = get_alias(client, name, CHAMPION)

    def result(promoted: bool, reason: str, theirs: Measured | None = None) -> Decision:
        return Decision(str(mv.version), promoted, reason, metric, value, str(champ.version) if champ else None,
                        None if theirs is None else theirs.value, margin).with_measures(mine, theirs)

    if mine is None:
        if (mv.tags or {}).get(metric_tag(metric)) is not None:  # NaN: e.g. an estimate with no weight
            return result(False, f"version {mv.version} has '{metric_tag(metric)}' = nan (undefined: for an "
                                 f"off-policy estimate, no logged list matched its lists)")
        return result(False, f"version {mv.version} has no '{metric_tag(metric)}' tag (not evaluated)")
    if champ is None:
        return result(True, "no champion yet")
    if champ.version == mv.version:
        return result(True, "already champion", mine)
    same_data = (champ.tags or {}).get(TAG_DATA_VERSION) == (mv.tags or {}).get(TAG_DATA_VERSION)
    if same_data:
        theirs = version_measure(champ, metric)
        if theirs is None:
            # A champion without the metric cannot be beaten fairly; keep it unless forced.
            return result(False, f"champion v{champ.version} has no '{metric_tag(metric)}' tag")
    elif reevaluate is not None:
        got = reevaluate(champ)
        theirs = got if isinstance(got, Measured) else Measured(float(got))
    else:
        return result(False, "champion was evaluated on different validation data and no re-evaluation is available")
    better = value >= theirs.value + margin
    how = "same validation data" if same_data else "champion re-evaluated on current validation data"
    if is_ope(metric):
        how += "; point estimates compared, intervals recorded"
    verdict = ">=" if better else "<"
    return result(better, f"{metric} {_describe(mine)} {verdict} champion {_describe(theirs)} "
                          f"+ margin {margin} ({how})", theirs)


def promote(
    client: MlflowClient,
    name: str,
    version: str | None = None,
    metric: str = "ndcg@6",
    margin: float = 0.0,
    force: bool = False,
    reevaluate: Callable[[ModelVersion], float | Measured] | None = None,
) -> Decision:
    """Move `champion` to `version` (default: the current `challenger`) if `decide` says so, or
    unconditionally with `force` (an unevaluated version is never promoted, even forced)."""
    if version is None:
        chal = get_alias(client, name, CHALLENGER)
        if chal is None:
            raise ValueError(f"model '{name}' has no '{CHALLENGER}' alias; give a version")
        version = chal.version
    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as exc:
        raise ValueError(f"model '{name}' has no version {version}") from exc
    if (mv.tags or {}).get(TAG_EVALUATED) != "true":
        champ = get_alias(client, name, CHAMPION)
        return Decision(str(mv.version), False, "version has no evaluation; never promoted", metric,
                        None, str(champ.version) if champ else None, None, margin)
    if force:
        champ = get_alias(client, name, CHAMPION)
        mine, theirs = version_measure(mv, metric), version_measure(champ, metric)
        d = Decision(str(mv.version), True, "forced", metric, mine.value if mine else None,
                     str(champ.version) if champ else None, theirs.value if theirs else None,
                     margin).with_measures(mine, theirs)
    else:
        d = decide(client, name, str(mv.version), metric, margin, reevaluate)
    if d.promoted:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return d


def _q(s: str) -> str:
    """A quoted literal for MLflow's search filter (which has no escape for quotes)."""
    s = str(s)
    if "'" not in s:
        return f"'{s}'"
    if '"' not in s:
        return f'"{s}"'
    raise ValueError(f"registry: a name or id holding both quote characters is not searchable: {s!r}")
