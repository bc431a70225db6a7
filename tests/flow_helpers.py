"""Tiny inputs for the whole-flow tests (test_flow.py, test_serve.py)."""
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
