"""Loop diagnostics: ordering quality of a reward model and who fills the groups."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from goalrank_core.diagnostics import format_round, group_summary, group_summary_table, ordering_quality


def test_ordering_quality_on_hand_made_groups():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [5.0, 5.0, 5.0]])  # the last group ties: left out
    mask = np.ones_like(ref, bool)
    same = ordering_quality(ref * 2, ref, mask)
    assert same == {"spearman": 1.0, "top1": 1.0, "top1_value": 1.0, "groups": 2}
    flipped = ordering_quality(-ref, ref, mask)
    assert flipped["spearman"] == pytest.approx(-1.0) and flipped["top1"] == 0.0
    assert flipped["top1_value"] == pytest.approx(-1.0)  # the worst list: (1 - 2) / (3 - 2)
    # a masked list is ignored even if it scores highest
    part = ordering_quality(np.array([[0.0, 1.0, 9.0]]), np.array([[1.0, 2.0, 0.0]]), np.array([[True, True, False]]))
    assert part["top1"] == 1.0 and part["groups"] == 1


def test_group_summary_counts_lists_best_lists_and_mass():
    rewards = np.array([[0.2, 0.9, 0.1], [0.5, 0.4, 0.0]])
    pi = np.array([[0.2, 0.7, 0.1], [0.6, 0.4, 0.0]])
    mask = np.array([[True, True, True], [True, True, False]])
    pids = np.array([[0, 1, 1], [1, 0, -1]])
    s = group_summary(rewards, pi, mask, pids, ["mmr", "goalrank"])
    assert s["size"] == 2.5
    assert s["lists"] == {"mmr": pytest.approx(2 / 5), "goalrank": pytest.approx(3 / 5)}
    assert s["best"] == {"mmr": 0.0, "goalrank": 1.0}  # row 0: list 1 (goalrank); row 1: list 0 (goalrank)
    assert s["mass"] == {"mmr": pytest.approx((0.2 + 0.4) / 2), "goalrank": pytest.approx((0.8 + 0.6) / 2)}
    ess0, ess1 = 1 / (0.04 + 0.49 + 0.01), 1 / (0.36 + 0.16)
    assert s["effective_size"] == pytest.approx((ess0 + ess1) / 2)
    assert "goalrank 1.00" in format_round(1, s)


def test_group_summary_of_a_scored_groups_table():
    t = pa.table({"policies": [["a", "b"], ["b"]], "rewards": [[1.0, 0.0], [2.0]], "pi_ref": [[0.7, 0.3], [1.0]]})
    s = group_summary_table(t)
    assert s["best"] == {"a": 0.5, "b": 0.5} and s["size"] == 1.5
