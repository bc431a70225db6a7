"""Tiny inputs for the whole-flow tests (test_flow.py, test_flow_ope.py, test_serve.py) and the
one day-one flow run those two share (conftest.py `flow_world`, `flow_day_one`)."""
from __future__ import annotations

from pathlib import Path

# Small enough that a whole flow run (every stage on Ray, one round) takes well under a minute.
TINY_OVERRIDES = {
    "protocol.slate_len": 4, "protocol.n_candidates": 10, "protocol.history_len": 8,
    "generator.d_model": 8, "generator.n_heads": 2, "generator.n_layers": 1,
    "reward.d_model": 8, "reward.n_heads": 2, "reward.n_layers": 1,
    "group.size": 4, "group.generator_samples": 2, "group.rounds": 1,
    "train.epochs": 1, "train.reward_epochs": 1, "train.aux_epochs": 1, "train.batch_size": 64,
    "train.num_workers": 1,
    "policies.dnn_dim": 8, "policies.dnn_hidden": 8, "policies.prm_d_model": 8, "policies.prm_heads": 2,
    "policies.emb_dim": 8,
}


def synth_source(folder: Path, seed: int = 0, logger: str = "noisy", n_candidates: int = 10,
                 slate_len: int = 4) -> tuple[Path, Path]:
    """Seeded synthetic impressions and items as Parquet under `folder`; logger="plackett-luce"
    logs their propensities (position_propensities too when n_candidates <= 8 with L = 4)."""
    import pyarrow.parquet as pq

    from goalrank_core.synth import synth_impressions

    imp, items, _ = synth_impressions(n_users=40, n_items=60, requests_per_user=6, slate_len=slate_len,
                                      n_candidates=n_candidates, n_categories=4, history_len=8, seed=seed,
                                      logger=logger)
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(imp, folder / "impressions.parquet")
    pq.write_table(items, folder / "items.parquet")
    return folder / "impressions.parquet", folder / "items.parquet"


# L = 2 of N = 4 candidates: 12 orderings, so the logger's lists match GoalRank's on enough
# validation requests for slate SNIPS to be defined (with L = 4 of 10 it would see none).
SMALL_SLATES = {**TINY_OVERRIDES, "protocol.slate_len": 2, "protocol.n_candidates": 4, "protocol.implicit_positives": 1}


def run_daily(world: dict, impressions: str, run_id: str, metric: str | None = "ope:snips", margin: float = 0.0,
              overrides: dict | None = None, **kw) -> dict:
    """`goalrank_daily` on the shared flow world's store and registry (conftest `flow_world`);
    `metric` None: the flow's default promotion metric."""
    from flows.daily import goalrank_daily

    if metric is not None:
        kw["promotion_metric"] = metric
    return goalrank_daily(impressions=impressions, items=world["items"], storage=world["storage"], run_id=run_id,
                          tracking_uri=world["tracking_uri"], experiment=world["experiment"],
                          model_name=world["model_name"], overrides=overrides or SMALL_SLATES,
                          promotion_margin=margin, **kw)
