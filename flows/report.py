"""What a finished daily run reports: the summary the flow returns, and its text form.

The console shows the metrics tables, the registered version and the decision (`format_summary`);
each stage's own line already gave its time, rows and peak memory, so the per-stage table
(`format_stages`) goes to the run's log only.
"""
from __future__ import annotations

from typing import Any

STAGE_FIELDS = ("stage", "uri", "skipped", "wall_s", "peak_mb", "driver_peak_mb", "workers_peak_mb", "rows")


def run_summary(run_id: str, name: str, model_name: str, reg: dict, decision: dict, summaries: list[dict],
                wall_s: float, run_date: str, warm_info: dict, window: dict | None) -> dict[str, Any]:
    """The flow's return value: what was registered and decided, metrics, per-stage numbers."""
    return {
        "run_id": run_id,
        "dataset": name,
        "model_name": model_name,
        "registered_version": reg["version"],
        "newly_registered": reg["created"],
        "mlflow_run_id": reg["mlflow_run_id"],
        "data_version": reg["data_version"],
        "decision": decision,
        "metrics": reg["metrics"],
        "stages": [{k: v for k, v in x.items() if k in STAGE_FIELDS} for x in summaries],
        "wall_s": round(wall_s, 1),
        "run_date": run_date,
        "warm_start": warm_info,
        "window": window["window"] if window else None,
        "gates": window["gates"] if window else None,
    }


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_metrics(rows: list[dict]) -> list[str]:
    """One table per split: a row per policy, a column per metric."""
    metrics = sorted({r["metric"] for r in rows})
    out = []
    for split in ("valid", "test"):
        policies = sorted({r["policy"] for r in rows if r["split"] == split})
        if not policies:
            continue
        val = {(r["policy"], r["metric"]): r["value"] for r in rows if r["split"] == split}
        width = max(len(p) for p in policies + ["policy"])
        out.append(f"\n{split} metrics")
        out.append(f"{'policy':<{width}}  " + "  ".join(f"{m:>9}" for m in metrics))
        for p in policies:
            out.append(f"{p:<{width}}  " + "  ".join(f"{val.get((p, m), float('nan')):9.4f}" for m in metrics))
    return out


def _side(d: dict, side: str) -> str:
    """`0.5014` or, for an off-policy metric, `0.0812 [0.0700, 0.0930], ESS 412`."""
    text = _num(d.get(f"{side}_value"))
    if d.get(f"{side}_ci_low") is not None:
        text += f" [{_num(d[f'{side}_ci_low'])}, {_num(d[f'{side}_ci_high'])}]"
    if d.get(f"{side}_ess") is not None:
        text += f", ESS {d[f'{side}_ess']:.0f}"
    return text


def format_decision(d: dict) -> str:
    verdict = "PROMOTED to champion" if d["promoted"] else "not promoted"
    if d.get("champion_version") is None:
        return f"decision: {verdict}: {d['metric']} challenger {_side(d, 'challenger')}; {d['reason']}"
    return (f"decision: {verdict}: {d['metric']} challenger {_side(d, 'challenger')} vs champion "
            f"v{d['champion_version']} {_side(d, 'champion')}; {d['reason']}")


def format_summary(summary: dict[str, Any]) -> str:
    """The end-of-run report for the console: metrics tables, registered version, decision."""
    out = [f"\n== GoalRank run {summary['run_id']} on {summary['dataset']} ({summary['wall_s']} s) =="]
    out += format_metrics(summary["metrics"])
    ws = summary.get("warm_start")
    if ws:
        out.append(f"\nwarm start: from champion v{ws['version']} ({ws['reason']})" if ws["warm"]
                   else f"\ncold start: {ws['reason']}")
    if summary.get("window"):
        w = summary["window"]
        out.append(f"window: {w['start']}..{w['end']}, {len(w['partitions'])} partition(s) read, "
                   f"{w['holdout']} validates; data gates passed")
    new = "new" if summary["newly_registered"] else "existing (rerun)"
    out.append(f"\nregistered: {summary['model_name']} version {summary['registered_version']} ({new})")
    out.append(format_decision(summary["decision"]))
    return "\n".join(out)


def format_stages(stages: list[dict]) -> str:
    """The per-stage table (wall time, peak memory of driver and Ray workers, rows, skipped)."""
    def mb(x):
        return "-" if x is None else f"{x:.0f}"
    out = ["stages", f"{'stage':<24} {'wall s':>8} {'driver MB':>10} {'workers MB':>10} {'rows':>9}  skipped"]
    for s in stages:
        rows = str(s["rows"]) if s.get("rows") is not None else "-"
        out.append(f"{s['stage']:<24} {s['wall_s']:>8.1f} {mb(s.get('driver_peak_mb')):>10} "
                   f"{mb(s.get('workers_peak_mb')):>10} {rows:>9}  {s['skipped']}")
    out.append("(peak resident memory: driver process; summed Ray worker processes)")
    return "\n".join(out)
