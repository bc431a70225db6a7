"""The Parquet contracts between pipeline stages: one pyarrow schema per hand-off.

Writers call `conform(table, SCHEMA, what)` before writing and readers call it after reading,
so two stages cannot drift apart. Lists of items are lists of raw item ids (int64) as they
appear in the logs, never internal vocabulary indices.
"""
from __future__ import annotations

import pyarrow as pa

from goalrank_core.errors import GoalRankInputError

ITEM_LIST = pa.list_(pa.int64())

# One row per logged request (the input contract).
IMPRESSIONS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),  # unique per request
        pa.field("user_id", pa.int64(), nullable=False),
        pa.field("timestamp", pa.int64(), nullable=False),  # seconds since epoch
        pa.field("history", ITEM_LIST, nullable=False),  # earlier positives, most recent last
        pa.field("candidates", ITEM_LIST, nullable=False),  # (N,) first-stage output, contains shown
        pa.field("shown", ITEM_LIST, nullable=False),  # (L,) displayed items, in display order
        pa.field("labels", pa.list_(pa.float32()), nullable=False),  # (L,) feedback per shown position
    ]
)

# Optional impressions columns: validated when present (goalrank_core.validate) and carried
# through the splits; any other column is ignored with a notice. `labels_<name>` columns are
# further feedback types, each (L,) float32 like `labels` (for example labels_like, labels_watch).
LABELS_PREFIX = "labels_"
LABEL_LIST = pa.list_(pa.float32())
IMPRESSIONS_OPTIONAL = pa.schema(
    [
        pa.field("propensity", pa.float64(), nullable=False),  # logging policy's P(this whole shown list), (0, 1]
        pa.field("log_propensity", pa.float64(), nullable=False),  # or its natural log, <= 0 (not both)
        # (L,) P(logging policy puts shown[j] at position j), (0, 1]: the pseudo-inverse estimator's input
        pa.field("position_propensities", pa.list_(pa.float64()), nullable=False),
    ]
)


def is_extra_label(name: str) -> bool:
    """A `labels_<name>` feedback column (a non-empty name after the prefix)."""
    return name.startswith(LABELS_PREFIX) and len(name) > len(LABELS_PREFIX)


def impressions_schema(names: list[str]) -> pa.Schema:
    """IMPRESSIONS plus the optional columns among `names`, in the order of `names`."""
    extra = [pa.field(n, LABEL_LIST, nullable=False) if is_extra_label(n) else IMPRESSIONS_OPTIONAL.field(n)
             for n in names if is_extra_label(n) or n in IMPRESSIONS_OPTIONAL.names]
    return pa.schema(list(IMPRESSIONS) + extra)


# The logging policy's propensities: the prepare stage carries these (only these optional
# columns) into the prepared valid and test splits, where the evaluate stage's off-policy
# estimates read them; the train split is IMPRESSIONS exactly.
PROPENSITY_COLUMNS = tuple(IMPRESSIONS_OPTIONAL.names)


def prepared_schema(names: list[str]) -> pa.Schema:
    """The schema of a prepared valid/test split holding `names`: IMPRESSIONS plus the
    propensity columns among `names` (in PROPENSITY_COLUMNS order). Writers and readers of
    the prepared splits conform to it; any other extra column is an error there."""
    return pa.schema(list(IMPRESSIONS) + [IMPRESSIONS_OPTIONAL.field(n) for n in PROPENSITY_COLUMNS if n in names])


def unknown_impression_columns(names: list[str]) -> list[str]:
    """Columns of `names` that are neither in IMPRESSIONS nor optional: read and ignored."""
    known = set(impressions_schema(names).names)
    return [n for n in names if n not in known]


# Requests to rank: the impressions without feedback.
REQUESTS = pa.schema([f for f in IMPRESSIONS if f.name not in ("shown", "labels")])

# Optional item side table.
ITEMS = pa.schema(
    [
        pa.field("item_id", pa.int64(), nullable=False),
        pa.field("category", pa.int64(), nullable=False),
    ]
)

# Ranked output of any policy: one list per request.
RANKED = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("ranked", ITEM_LIST, nullable=False),  # (L,) distinct items inside candidates
    ]
)

# generate_candidates -> score: the group B of lists proposed for one request.
CANDIDATE_GROUPS = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("lists", pa.list_(ITEM_LIST), nullable=False),  # (|B|, L) deduplicated lists
        pa.field("policies", pa.list_(pa.string()), nullable=False),  # (|B|,) policy behind each list
    ]
)

# score -> train_generator: the group with its rewards and reference policy.
SCORED_GROUPS = pa.schema(
    list(CANDIDATE_GROUPS)
    + [
        pa.field("rewards", pa.list_(pa.float32()), nullable=False),  # (|B|,) reward-model scores
        pa.field("pi_ref", pa.list_(pa.float32()), nullable=False),  # (|B|,) softmax of normalised rewards
    ]
)

# evaluate: one row per (split, policy, metric).
METRICS = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),  # "valid" or "test"
        pa.field("policy", pa.string(), nullable=False),
        pa.field("metric", pa.string(), nullable=False),  # e.g. "hr@6", "ndcg@6", "map@6"
        pa.field("value", pa.float64(), nullable=False),  # mean over requests
        pa.field("ci_low", pa.float64(), nullable=False),  # bootstrap 95% interval
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("n_requests", pa.int64(), nullable=False),
    ]
)


# evaluate: off-policy estimates (goalrank_core.ope) of each policy's lists, one row per
# (split, policy, estimator), written only when the split carries the logging propensities.
OPE = pa.schema(
    [
        pa.field("split", pa.string(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("estimator", pa.string(), nullable=False),  # "ips", "snips", "pi", "snpi"
        pa.field("value", pa.float64(), nullable=False),  # estimated expected slate reward (sum of labels)
        pa.field("ci_low", pa.float64(), nullable=False),  # bootstrap 95% interval
        pa.field("ci_high", pa.float64(), nullable=False),
        pa.field("ess", pa.float64(), nullable=False),  # Kish's effective sample size of the weights
        pa.field("n_requests", pa.int64(), nullable=False),
    ]
)


class SchemaError(GoalRankInputError):
    """A table does not match its stage contract."""


def conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    """Check that `table` has every column of `schema` with a compatible type and return it
    cast to exactly `schema` (column order, nullability). Extra columns are an error, so a
    producer cannot silently add data a consumer ignores.

    `what` names the file or stage in the error message.
    """
    names = set(table.column_names)
    missing = [f.name for f in schema if f.name not in names]
    if missing:
        raise SchemaError(f"{what}: missing column(s) {missing}; expected {schema.names}")
    extra = [n for n in table.column_names if n not in schema.names]
    if extra:
        raise SchemaError(f"{what}: unexpected column(s) {extra}; expected {schema.names}")
    for field in schema:
        actual = table.schema.field(field.name).type
        if not _compatible(actual, field.type):
            raise SchemaError(
                f"{what}: column '{field.name}' has type {actual}, expected {field.type}"
            )
        if not field.nullable and table.column(field.name).null_count:
            col = table.column(field.name)
            first = next(i for i, v in enumerate(col.is_null().to_pylist()) if v)
            raise SchemaError(f"{what}: column '{field.name}' has a null at row {first}")
    return table.select(schema.names).cast(schema)


def _compatible(actual: pa.DataType, expected: pa.DataType) -> bool:
    """Same type, or the same shape with only list flavour (list/large_list) or string
    flavour (string/large_string) differing; numeric widths must match exactly."""
    if actual == expected:
        return True
    if pa.types.is_string(expected):
        return pa.types.is_string(actual) or pa.types.is_large_string(actual)
    if pa.types.is_list(expected):
        if pa.types.is_list(actual) or pa.types.is_large_list(actual):
            return _compatible(actual.value_type, expected.value_type)
        return False
    return False
