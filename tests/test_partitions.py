"""Daily operations, pure parts: window arithmetic, partition names, the split inside a window,
data gates, warm-start remapping, per-day synthetic logs and partition listing/reading."""
from __future__ import annotations

from datetime import date, timedelta

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from goalrank_core.batch import Vocab
from goalrank_core.config import GoalRankConfig
from goalrank_core.config_sections import GateConfig
from goalrank_core.errors import ConfigError, GoalRankInputError
from goalrank_core.gates import DataGateError, MissingPartitionError, check_partition
from goalrank_core.partitions import (PartitionError, by_day, date_range, parse_date, parse_partition, partition_name,
                                      select_window, split_window, spread_over_days, window_dates)
from goalrank_core.replay import synth_day
from goalrank_core.warm import WarmStartMismatch, remap_state

D = date(2026, 11, 27)


def _day(d: date, users: int = 12, seed: int = 0) -> pa.Table:
    return synth_day(d, n_users=users, n_items=60, requests_per_user=2, slate_len=4, n_candidates=10,
                     n_categories=4, seed=seed)[0]


# ---------------------------------------------------------------- dates and windows


def test_window_is_the_w_days_before_the_run_date():
    dates = window_dates(D, 3)
    assert dates == [date(2026, 11, 24), date(2026, 11, 25), date(2026, 11, 26)]
    assert window_dates(date(2024, 3, 1), 2) == [date(2024, 2, 28), date(2024, 2, 29)]  # leap day
    assert date_range(D, D - timedelta(days=1)) == []


def test_select_window_reads_exactly_the_window_and_reports_gaps():
    have = [D - timedelta(days=k) for k in (10, 5, 3, 1, 0)] + [D + timedelta(days=2)]
    w = select_window(have, D, 5)
    assert w.train == (D - timedelta(days=5), D - timedelta(days=3))  # D-10 is outside, D and D+2 are future
    assert w.holdout == D - timedelta(days=1)
    assert w.partitions == ("date=2026-11-22", "date=2026-11-24", "date=2026-11-26")
    assert w.missing == (D - timedelta(days=4), D - timedelta(days=2))
    assert w.describe()["start"] == "2026-11-22" and w.describe()["holdout"] == "date=2026-11-26"


def test_missing_d_minus_1_is_a_clear_failure():
    have = [D - timedelta(days=k) for k in (2, 3)]
    with pytest.raises(MissingPartitionError, match=r"date=2026-11-26.*'present'|'present'.*date=2026-11-26") as e:
        select_window(have, D, 30)
    assert "missing" in str(e.value) and "date=2026-11-25" in str(e.value)  # names the newest one present
    assert isinstance(e.value, DataGateError) and isinstance(e.value, GoalRankInputError)


def test_window_with_only_the_validation_day_has_nothing_to_train_on():
    with pytest.raises(PartitionError, match="at least one earlier partition"):
        select_window([D - timedelta(days=1), D - timedelta(days=40)], D, 30)


@pytest.mark.parametrize("name,expected", [("date=2026-11-27", date(2026, 11, 27)), ("_SUCCESS", None),
                                           (".tmp", None), ("s3://b/x/date=2024-02-29/", date(2024, 2, 29))])
def test_parse_partition(name, expected):
    assert parse_partition(name) == expected


@pytest.mark.parametrize("bad", ["date=2026-13-01", "date=26-11-27", "date=2026-02-30"])
def test_malformed_partition_names_are_errors(bad):
    with pytest.raises(PartitionError, match=bad.split("/")[-1]):
        parse_partition(bad)


def test_run_date_parsing():
    assert parse_date("2026-11-27") == D and partition_name(D) == "date=2026-11-27"
    with pytest.raises(ConfigError, match="run_date '27/11/2026'"):
        parse_date("27/11/2026")


def test_window_and_gate_configs_are_checked():
    with pytest.raises(ConfigError, match="window.days"):
        GoalRankConfig().override({"window.days": 1})
    with pytest.raises(ConfigError, match="window.test_fraction"):
        GoalRankConfig().override({"window.test_fraction": 1.0})
    with pytest.raises(ConfigError, match="gates.min_row_ratio"):
        GoalRankConfig().override({"gates.min_row_ratio": 3.0})
    with pytest.raises(ConfigError, match="gates.min_positive_share"):
        GoalRankConfig().override({"gates.max_positive_share": 1.5})
    with pytest.raises(ConfigError, match="train.warm_epochs"):
        GoalRankConfig().override({"train.warm_epochs": 0})
    with pytest.raises(ConfigError, match="unknown config key"):
        GoalRankConfig.from_dict({"gates": {"max_rows": 3}})


# ---------------------------------------------------------------- split and writers


def test_split_window_last_day_validates_by_time():
    train = pa.concat_tables([_day(D - timedelta(days=3)), _day(D - timedelta(days=2))])
    held = _day(D - timedelta(days=1))
    s = split_window(train, held, None, test_fraction=0.25)
    assert s.train.num_rows == train.num_rows
    assert s.valid.num_rows + s.test.num_rows == held.num_rows
    assert s.valid.num_rows == int(np.ceil(0.75 * held.num_rows))
    v_ts, t_ts = s.valid.column("timestamp").to_numpy(), s.test.column("timestamp").to_numpy()
    assert v_ts.max() <= t_ts.min()  # validation before test
    assert max(train.column("timestamp").to_numpy()) < v_ts.min()  # train strictly before the holdout day
    assert s.stats["valid_requests"] == s.valid.num_rows
    with pytest.raises(PartitionError, match="no requests"):
        split_window(train, held.slice(0, 0), None)


def test_synth_day_depends_only_on_seed_and_date():
    a, b, c = _day(D), _day(D), _day(D + timedelta(days=1))
    assert a.equals(b) and not a.equals(c)
    assert set(by_day(a)) == {D}  # every timestamp inside its day
    assert len(set(a.column("request_id").to_pylist()) & set(c.column("request_id").to_pylist())) == 0
    from goalrank_core.validate import validate_impressions

    validate_impressions(pa.concat_tables([a, c]), "two days")  # request ids unique across days


def test_spread_over_days_keeps_each_users_order():
    t = pa.concat_tables([_day(D), _day(D + timedelta(days=1))])
    out = spread_over_days(t, 4, date(2030, 1, 1))
    parts = by_day(out)
    assert sorted(parts) == [date(2030, 1, d) for d in (1, 2, 3, 4)]
    u, ts = out.column("user_id").to_numpy(), out.column("timestamp").to_numpy()
    old = t.column("timestamp").to_numpy()
    for user in np.unique(u):
        m = u == user
        assert (np.argsort(old[m], kind="stable") == np.argsort(ts[m], kind="stable")).all()


# ---------------------------------------------------------------- gates


def _gate(table, trailing=(40, 40), known=None, **cfg):
    known = np.arange(1000, 1060) if known is None else known
    return check_partition(table, "date=2026-11-26", list(trailing), known, GateConfig(**cfg))


def test_gates_pass_on_a_normal_day():
    res = _gate(_day(D))
    assert [r.check for r in res] == ["schema", "row_ratio", "positive_share", "unknown_item_share"]
    assert all(r.passed for r in res)
    skipped = _gate(_day(D), trailing=())
    assert skipped[1].passed is None and "no earlier partition" in skipped[1].note


def test_gate_empty_partition():
    with pytest.raises(DataGateError, match=r"'rows' failed for partition date=2026-11-26.*value 0.*empty"):
        _gate(_day(D).slice(0, 0))


def test_gate_row_count_against_trailing_mean():
    with pytest.raises(DataGateError, match=r"'row_ratio'.*value 0.1.*\[0.5, 2\].*24 rows vs trailing mean 240"):
        _gate(_day(D), trailing=(240, 240))
    _gate(_day(D), trailing=(240, 240), min_row_ratio=0.05)  # bounds are configurable


def test_gate_positive_share():
    t = _day(D)
    zeros = pa.array([[0.0] * 4] * t.num_rows, pa.list_(pa.float32()))
    with pytest.raises(DataGateError, match=r"'positive_share'.*value 0 outside \[0.005, 0.95\]"):
        _gate(t.set_column(t.schema.get_field_index("labels"), "labels", zeros))


def test_gate_unknown_items():
    with pytest.raises(DataGateError, match=r"'unknown_item_share'.*value 1 outside \[0, 0.5\]"):
        _gate(_day(D), known=np.arange(5000, 5100))


def test_gate_schema():
    t = _day(D)
    with pytest.raises(DataGateError, match=r"'schema'.*labels"):
        _gate(t.drop_columns(["labels"]))
    nan = pa.array([[float("nan")] * 4] * t.num_rows, pa.list_(pa.float32()))
    with pytest.raises(DataGateError, match=r"'schema'.*not finite"):
        _gate(t.set_column(t.schema.get_field_index("labels"), "labels", nan))


# ---------------------------------------------------------------- warm start


def _gen(n_items, n_users, seed=0):
    from goalrank_core.config_sections import GeneratorConfig
    from goalrank_core.generator import GoalRankGenerator

    torch.manual_seed(seed)
    return GoalRankGenerator(GeneratorConfig(d_model=8, n_heads=2, n_layers=1), n_items, n_users, 3, 4)


def test_remap_copies_shared_ids_and_keeps_new_rows_fresh():
    old_items, new_items = Vocab(np.array([10, 20, 30])), Vocab(np.array([20, 30, 40, 50]))
    old_users, new_users = Vocab(np.array([1, 2])), Vocab(np.array([2, 3]))
    old, fresh = _gen(len(old_items), len(old_users), 1), _gen(len(new_items), len(new_users), 2)
    state, stats = remap_state(old.state_dict(), fresh.state_dict(), old_items, new_items, old_users, new_users)
    o, f, s = old.state_dict(), fresh.state_dict(), state
    it = "embed.item.weight"
    assert torch.equal(s[it][:2], o[it][:2])  # PAD, UNK carried over
    assert torch.equal(s[it][2], o[it][3]) and torch.equal(s[it][3], o[it][4])  # items 20, 30
    assert torch.equal(s[it][4:], f[it][4:])  # items 40, 50: fresh
    assert torch.equal(s["embed.user.weight"][2], o["embed.user.weight"][3])  # user 2
    assert torch.equal(s["embed.user.weight"][3], f["embed.user.weight"][3])  # user 3: fresh
    assert torch.equal(s["key.weight"], o["key.weight"])  # everything else copied
    assert stats == {"items_shared": 2, "items_new": 2, "items_dropped": 1,
                     "users_shared": 1, "users_new": 1, "users_dropped": 1}
    fresh.load_state_dict(state)  # shapes fit the new model


def test_category_rows_follow_the_items_they_hold():
    """Learnt categories are numbered arbitrarily by each clustering: a new category inherits the row
    of the old one most of its items had; given categories keep their numbers; without shared items
    a number keeps its own row, and one beyond the old table stays fresh."""
    from goalrank_core.warm import category_alignment

    old_cat = {10: 1, 11: 1, 12: 2, 13: 2}
    assert category_alignment(old_cat, {10: 2, 11: 2, 12: 1, 13: 1}, 3).tolist() == [0, 2, 1]  # swapped
    assert category_alignment(old_cat, old_cat, 3).tolist() == [0, 1, 2]  # given: unchanged
    assert category_alignment(old_cat, {10: 1, 11: 1, 12: 1, 99: 2}, 4).tolist() == [0, 1, 2, 3]  # majority 1; 2 unshared
    v = Vocab(np.array([10, 20]))
    old, fresh = _gen(len(v), len(v), 1), _gen(len(v), len(v), 2)
    swapped = category_alignment(old_cat, {10: 2, 11: 2, 12: 1, 13: 1}, 3)
    state, _ = remap_state(old.state_dict(), fresh.state_dict(), v, v, v, v, swapped)
    c, o = "embed.category.weight", old.state_dict()["embed.category.weight"]
    assert torch.equal(state[c][1], o[2]) and torch.equal(state[c][2], o[1]) and torch.equal(state[c][0], o[0])
    plain, _ = remap_state(old.state_dict(), fresh.state_dict(), v, v, v, v)
    assert torch.equal(plain[c], o)  # no map: by number, as before
    wider = _gen_categories(len(v), 5)
    state, _ = remap_state(old.state_dict(), wider.state_dict(), v, v, v, v, np.arange(5))
    assert torch.equal(state[c][:3], o) and torch.equal(state[c][3:], wider.state_dict()[c][3:])  # new numbers: fresh


def _gen_categories(n: int, n_categories: int):
    from goalrank_core.config_sections import GeneratorConfig
    from goalrank_core.generator import GoalRankGenerator

    torch.manual_seed(3)
    return GoalRankGenerator(GeneratorConfig(d_model=8, n_heads=2, n_layers=1), n, n, n_categories, 4)


def test_remap_refuses_another_architecture():
    from goalrank_core.config_sections import GeneratorConfig
    from goalrank_core.generator import GoalRankGenerator

    v = Vocab(np.array([10, 20]))
    old = _gen(len(v), len(v))
    wider = GoalRankGenerator(GeneratorConfig(d_model=16, n_heads=2, n_layers=1), len(v), len(v), 3, 4)
    with pytest.raises(WarmStartMismatch, match="shape"):
        remap_state(old.state_dict(), wider.state_dict(), v, v, v, v)
    deeper = GoalRankGenerator(GeneratorConfig(d_model=8, n_heads=2, n_layers=2), len(v), len(v), 3, 4)
    with pytest.raises(WarmStartMismatch, match="parameter names differ"):
        remap_state(old.state_dict(), deeper.state_dict(), v, v, v, v)


# ---------------------------------------------------------------- storage side (tasks/partitions.py)


def _dataset(root, days, users=12):
    from tasks.partitions import write_partition

    for d in days:
        write_partition(_day(d, users), str(root), d)
    return str(root)


def test_list_plan_and_read_exactly_the_window(tmp_path):
    from tasks.partitions import is_partitioned, list_partitions, plan_window, read_window

    days = [D - timedelta(days=k) for k in (6, 4, 3, 2, 1, 0)]
    uri = _dataset(tmp_path / "imp", days)
    (tmp_path / "imp" / "_SUCCESS").write_text("")
    (tmp_path / "imp" / "notes").mkdir()
    assert is_partitioned(uri) and not is_partitioned(str(tmp_path / "nothing"))
    assert list(list_partitions(uri)) == sorted(days)
    w = plan_window(uri, D, 4)
    read = read_window(uri, w)
    assert read.partitions == ["date=2026-11-23", "date=2026-11-24", "date=2026-11-25", "date=2026-11-26"]
    assert set(by_day(read.table)) == {D - timedelta(days=k) for k in (4, 3, 2, 1)}
    assert read.table.num_rows == sum(read.rows.values()) == 4 * 24


def test_run_gates_on_files(tmp_path):
    from tasks.partitions import plan_window, run_gates

    days = [D - timedelta(days=k) for k in (3, 2, 1)]
    uri = _dataset(tmp_path / "imp", days)
    cfg = GoalRankConfig()
    rep = run_gates(uri, plan_window(uri, D, 30), cfg)
    assert rep["partition"] == "date=2026-11-26" and rep["rows"] == 24
    assert {c["check"]: c["passed"] for c in rep["checks"]} == {
        "schema": True, "row_ratio": True, "positive_share": True, "unknown_item_share": True}
    # A truncated file in D - 1: one clear error naming the partition and the check.
    f = tmp_path / "imp" / "date=2026-11-26" / "part-00000.parquet"
    f.write_bytes(f.read_bytes()[:200])
    with pytest.raises(DataGateError, match=r"'readable' failed for partition date=2026-11-26.*part-00000.parquet"):
        run_gates(uri, plan_window(uri, D, 30), cfg)
    # An empty partition folder.
    f.unlink()
    with pytest.raises(DataGateError, match=r"'rows' failed for partition date=2026-11-26"):
        run_gates(uri, plan_window(uri, D, 30), cfg)
    # Gates can be switched off.
    assert run_gates(uri, plan_window(uri, D, 30), cfg.override({"gates.enabled": False}))["enabled"] is False


def test_synth_and_replay_cli_write_partitions(tmp_path, capsys):
    from goalrank.cli import main
    from tasks.partitions import list_partitions

    out = tmp_path / "s"
    assert main(["data", "synth", "--days", "3", "--out", str(out), "--users", "8", "--items", "60",
                 "--requests", "2"]) == 0
    parts = list_partitions(str(out / "impressions"))
    assert [d.isoformat() for d in parts] == ["2023-11-15", "2023-11-16", "2023-11-17"]
    before = pq.read_table(parts[date(2023, 11, 16)], partitioning=None)
    # A new day lands: the earlier partitions are untouched, the new one is the same as if
    # it had been written with the others.
    assert main(["data", "synth", "--days", "1", "--start", "2023-11-18", "--out", str(out), "--users", "8",
                 "--items", "60", "--requests", "2"]) == 0
    parts = list_partitions(str(out / "impressions"))
    assert len(parts) == 4 and pq.read_table(parts[date(2023, 11, 16)], partitioning=None).equals(before)
    assert pq.read_table(out / "items.parquet").num_rows == 60
    assert main(["data", "synth", "--days", "0", "--out", str(out)]) == 2
    assert "--days must be >= 1" in capsys.readouterr().err


def test_replay_ml100k_one_partition_a_day(tmp_path, capsys):
    import os

    from goalrank.cli import main
    from tasks.partitions import list_partitions

    data_dir = os.environ.get("GOALRANK_DATA_DIR")
    if not data_dir or not os.path.isdir(os.path.join(data_dir, "ml-100k")):
        pytest.skip("GOALRANK_DATA_DIR with ml-100k not available")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("protocol: {max_users: 60}\n")
    assert main(["data", "replay", "--dataset", "ml-100k", "--out", str(tmp_path / "ml"), "--config", str(cfg)]) == 0
    parts = list_partitions(str(tmp_path / "ml" / "impressions"))
    assert len(parts) > 20 and min(parts) >= date(1997, 9, 1) and max(parts) <= date(1998, 5, 1)
    for d in list(parts)[:3]:
        t = pq.read_table(parts[d], partitioning=None)
        assert set(by_day(t)) == {d}  # every request in the partition of its own day
