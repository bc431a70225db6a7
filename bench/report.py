"""docs/results.md and the plots under docs/, generated from every JSON in bench/results/.

Nothing in results.md is typed by hand: each section is one result file, headed by the command,
machine, commit and time that produced it; a file with `tables` is rendered as they are, any
other (e.g. the stage benchmarks' flat results) as a key/value table of its numbers.

    python -m bench.report [--results DIR] [--out FILE] [--readme FILE]

It also rewrites the README's Results block (between its two `results:` markers) with the
tables the README quotes (README_RESULTS), so no number there is typed by hand either.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench.common import DOCS, RESULTS

# Section order and titles; unknown benchmarks follow, alphabetically.
SECTIONS = {
    "main_table": "Main table (the paper's Table 1)",
    "oracle_groups": "Headroom of group-relative training over its supervised start",
    "simulator": "True list value on the list-wise simulator (known optimum)",
    "reward_ordering": "Does the reward model know what a list is worth? (simulator ablation)",
    "loop_ceiling": "Reward model or loop? GoalRank with the true list value as its reward",
    "ope": "Off-policy estimates against the true value (simulator, Plackett-Luce logger)",
    "group_size": "Group size |B| (the paper's Table 2)",
    "scaling": "Scaling with generator size (the paper's Figure 3)",
    "latency": "Latency: GoalRank against Generator-Evaluator",
    "throughput": "Throughput and utilisation",
    "pipeline_cost": "Cost of the daily pipeline",
    "bench_score": "`score` stage throughput (Ray Data)",
    "bench_train_generator": "`train_generator` stage throughput (Ray Train)",
    "run_all": "Benchmark runs",
}
MODE_ORDER = {"full": 0, "quick": 1}


def load_results(results_dir: Path) -> list[dict]:
    out = []
    for p in sorted(Path(results_dir).glob("*.json")):
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{p}: not valid JSON: {exc}") from exc
        if not isinstance(doc, dict) or "benchmark" not in doc:
            raise ValueError(f"{p}: a result file must be a JSON object with a 'benchmark' key")
        doc["_file"] = p.name
        out.append(with_derived_tables(doc))
    names = list(SECTIONS)
    out.sort(key=lambda d: (names.index(d["benchmark"]) if d["benchmark"] in names else len(names), d["benchmark"],
                            MODE_ORDER.get(d.get("mode"), 9)))
    return out


def with_derived_tables(doc: dict) -> dict:
    """A main_table file written before its paired-difference table existed gets it here, from
    the per-seed values the file itself holds (said in the table's notes)."""
    if doc.get("benchmark") != "main_table":
        return doc
    from bench.main_table import PAIRED_TITLE, paired_table

    runs = (doc.get("data") or {}).get("runs") or []
    tables = doc.get("tables") or []
    if runs and all("per_seed" in r for r in runs) and not any(t["title"] == PAIRED_TITLE for t in tables):
        t = paired_table(runs)
        t["notes"] += " (Computed by bench.report from this file's per-seed values.)"
        doc["tables"] = tables + [t]
    return doc


def _cell(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x).replace("|", "\\|").replace("\n", " ")


def md_table(columns: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _pins() -> dict[str, str]:
    """The exact versions this tree pins (requirements.lock), to flag results run on others."""
    lock = Path(__file__).resolve().parents[1] / "requirements.lock"
    pins = {}
    if lock.is_file():
        for line in lock.read_text().splitlines():
            name, sep, version = line.strip().partition("==")
            if sep:
                pins[name.lower()] = version
    pins.setdefault("torch", "2.13.0")  # installed before the lock (Makefile), pinned in pyproject.toml
    return pins


def provenance_problems(doc: dict, pins: dict[str, str] | None = None) -> list[str]:
    """What keeps a result from being reproduced from one commit with the locked versions."""
    pins = _pins() if pins is None else pins
    git, m = doc.get("git") or {}, doc.get("machine") or {}
    out = []
    if not (git.get("sha") or doc.get("git_sha")):
        out.append("no commit recorded")
    elif git.get("dirty"):
        out.append("written from a tree with uncommitted changes")
    torch_v = str(m.get("torch") or "")
    if torch_v and pins.get("torch") and not torch_v.startswith(pins["torch"]):
        out.append(f"torch {torch_v}, the lock pins {pins['torch']}")
    py = str(m.get("python") or "")
    if py and not py.startswith("3.11"):
        out.append(f"Python {py}, the project needs 3.11")
    return out


def provenance(doc: dict) -> list[str]:
    m = doc.get("machine") or {}
    git = doc.get("git") or {}
    sha = git.get("sha") or doc.get("git_sha")
    where = ", ".join(x for x in (
        f"{m.get('cpus')} CPUs" + (f" ({m['cpu_model']})" if m.get("cpu_model") else "") if m.get("cpus") else None,
        f"{m['mem_gb']} GB RAM" if m.get("mem_gb") else None,
        f"GPU {m['gpu']}" if m.get("gpu") else ("no GPU" if m.get("cuda") is False else None),
        m.get("platform"), f"Python {m['python']}" if m.get("python") else None,
        f"torch {m['torch']}" if m.get("torch") else None) if x)
    load = m.get("load_avg_start", m.get("load_avg_1m"))
    cpus = m.get("cpus") or 0
    loaded = load is not None and cpus and load > 0.75 * cpus
    lines = [f"- command: `{doc.get('command') or 'python -m bench.' + doc['benchmark'] + ' --mode ' + str(doc.get('mode'))}`"
             f" (mode {doc.get('mode')})",
             f"- machine: {where or 'not recorded'}",
             f"- commit: {sha[:12] if sha else 'unknown'}{' plus uncommitted changes' if git.get('dirty') else ''}; "
             f"finished {doc.get('finished_at', '?')}" + (f"; took {doc['wall_s']:.0f} s" if doc.get("wall_s") is not None else "")]
    problems = provenance_problems(doc)
    if problems:
        lines.append(f"- **provenance: {'; '.join(problems)}** (rerun the command at a clean commit to replace it)")
    if load is not None:
        end = m.get("load_avg_end")
        lines.append(f"- load average (1 min) at start {load}" + (f", at end {end}" if end is not None else "")
                     + (" - **taken under load from other processes: timings are pessimistic**" if loaded else ""))
    return lines


def _flat(d: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    if isinstance(d, dict):
        for k in sorted(d):
            out += _flat(d[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(d, (int, float, bool, str)) or d is None:
        out.append((prefix, d))
    return out  # lists (per-epoch losses etc.) stay in the JSON


_META = {"benchmark", "mode", "machine", "command", "started_at", "finished_at", "wall_s", "git", "git_sha", "_file",
         "tables", "notes", "plots", "data", "config", "summary"}


def render_doc(doc: dict) -> list[str]:
    lines = provenance(doc) + [""]
    if doc.get("tables"):
        for t in doc["tables"]:
            lines += [f"**{_cell(t['title'])}**", ""] + md_table(t["columns"], t["rows"]) + [""]
            if t.get("notes"):
                lines += [t["notes"], ""]
    else:
        items = [(k, v) for k, v in _flat({k: v for k, v in doc.items() if k not in _META}) if v is not None]
        if items:
            lines += md_table(["result", "value"], [[k, v] for k, v in items]) + [""]
    for note in doc.get("notes") or []:
        lines += [note, ""]
    for p in doc.get("plots") or []:
        lines += [f"![{Path(p).stem}]({Path(p).name})", ""]
    return lines


def render(results: list[dict]) -> str:
    lines = ["# Results", "",
             "Generated by `python -m bench.report` from `bench/results/*.json` (written by `python -m bench.run_all "
             "--mode quick|full`, `make bench-quick`, or one benchmark's own command). Do not edit: rerun the benchmark. "
             "Each section names the command, machine and commit that produced it; quick-mode numbers use reduced data, "
             "epochs and seeds (said in each table) and are smoke evidence, full-mode numbers are the ones to quote.", ""]
    if not results:
        return "\n".join(lines + ["No results yet: run `make bench-quick`.", ""])
    lines += ["Contents: " + ", ".join(dict.fromkeys(SECTIONS.get(d["benchmark"], d["benchmark"]) for d in results)), ""]
    pins = _pins()
    weak = [(d["_file"], provenance_problems(d, pins)) for d in results]
    weak = [(f, p) for f, p in weak if p]
    if weak:
        lines += [f"{len(weak)} of {len(results)} result files cannot be reproduced from one clean commit with the "
                  "locked versions; their sections say why: " + "; ".join(f"`{f}` ({', '.join(p)})" for f, p in weak) + ".", ""]
    current = None
    for doc in results:
        if doc["benchmark"] != current:
            current = doc["benchmark"]
            lines += [f"## {SECTIONS.get(current, current)}", ""]
        lines += [f"### {current}, {doc.get('mode', '?')} mode (`bench/results/{doc['_file']}`)", ""] + render_doc(doc)
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------- the README's Results

README = Path(__file__).resolve().parents[1] / "README.md"
README_BEGIN = "<!-- results:begin (python -m bench.report writes this block from bench/results; do not edit) -->"
README_END = "<!-- results:end -->"
# What the README quotes: (result file, title prefixes of its tables, what it measures).
README_RESULTS = [
    ("pipeline_cost_full_ml-100k.json", ("Daily flow on ml-100k", "Test split of that run"),
     "`make run`: the whole daily flow on ML-100K, default config, fresh workspace"),
    ("main_table_full_ml-100k.json", ("Table 1", "GoalRank's gain", "GoalRank minus"),
     "Table 1 on ML-100K, in process, 3 seeds"),
    ("main_table_full_amazon-book.json", ("Table 1", "GoalRank's gain", "GoalRank minus"),
     "Table 1 on Amazon-Book, in process, 3 seeds"),
    ("oracle_groups_full_ml-100k.json", ("Headroom",), "Headroom of group-relative training over its supervised start"),
    ("oracle_groups_full_amazon-book.json", ("Headroom", "Minus the supervised"),
     "Headroom of group-relative training over its supervised start, Amazon-Book"),
    ("simulator_quick.json", ("True value on the simulator", "Teacher and student"),
     "True list value on the list-wise simulator (random list 0, best list found 1)"),
    ("simulator_full.json", ("Teacher and student",),
     "The simulator at full volume (12,800 training requests, one seed): teacher and student"),
    ("pipeline_cost_full_ml-1m.json", ("Daily flow on ml-1m",), "The whole daily flow on ML-1M, default config"),
    ("bench_score_full.json", ("Targets",), "`score` stage throughput on Ray Data"),
    ("ope_full.json", ("Coverage",), "Off-policy estimators against the true value"),
]


def render_readme_results(results: list[dict]) -> list[str]:
    """The README's Results block: the quoted tables of README_RESULTS, each under its command,
    commit and result file; a missing file is said, not filled in."""
    by_file = {d["_file"]: d for d in results}
    pins = _pins()
    lines = [README_BEGIN, ""]
    for fname, prefixes, what in README_RESULTS:
        doc = by_file.get(fname)
        if doc is None:
            lines += [f"**{what}**: not measured yet (`bench/results/{fname}` missing).", ""]
            continue
        git = doc.get("git") or {}
        sha = (git.get("sha") or doc.get("git_sha") or "unknown")[:7]
        problems = provenance_problems(doc, pins)
        lines += [f"**{what}** (`{doc.get('command')}` at {sha}; `bench/results/{fname}`"
                  + (f"; **{'; '.join(problems)}**" if problems else "") + "):", ""]
        for t in doc.get("tables") or []:
            if any(str(t["title"]).startswith(pre) for pre in prefixes):
                lines += [f"*{_cell(t['title'])}*", ""] + md_table(t["columns"], t["rows"]) + [""]
        lines += console_lines(doc)
    return lines + [README_END]


def console_lines(doc: dict) -> list[str]:
    """A pipeline_cost run's console measure (issue 18): lines on the terminal and in the log file."""
    runs = (doc.get("data") or {}).get("runs") or {} if doc.get("benchmark") == "pipeline_cost" else {}
    out = [f"*Console of the {name} run*: {r['console_lines']} lines on the terminal, "
           f"{r['log_file_lines']} in the run's log file." for name, r in sorted(runs.items())
           if isinstance(r, dict) and "console_lines" in r]
    return out + [""] if out else []


def write_readme_results(results: list[dict], readme: Path = README) -> bool:
    """Replace the block between README_BEGIN and README_END; -> whether the file changed."""
    text = readme.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"{readme}: needs exactly one '{README_BEGIN}' ... '{README_END}' block")
    head, rest = text.split(README_BEGIN)
    tail = rest.split(README_END, 1)[1]
    new = head + "\n".join(render_readme_results(results)) + tail
    if new != text:
        readme.write_text(new)
    return new != text


# ---------------------------------------------------------------- plots


def _pick(results: list[dict], name: str) -> dict | None:
    docs = [d for d in results if d["benchmark"] == name and d.get("data")]
    return docs[0] if docs else None  # full before quick (load_results' order)


def plot_scaling(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = doc["data"]["points"]
    k = (doc.get("config") or {}).get("k", "k")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot([p["params"] for p in pts], [p["goalrank"]["ndcg@6"] for p in pts], "o-", label="GoalRank (one generator)")
    ax.plot([p["params"] for p in pts], [p["supervised"]["ndcg@6"] for p in pts], "s--", label="supervised generator")
    ax.plot([p["mixture_params"] for p in pts], [p["mixture"]["ndcg@6"] for p in pts], "^-",
            label=f"{k} generators + evaluator (same total)")
    ax.set_xscale("log")
    ax.set_xlabel("generator parameters")
    ax.set_ylabel("NDCG@6 (test)")
    ax.set_title(f"Scaling, {doc['config'].get('dataset')} ({doc.get('mode')} mode)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_group_size(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = doc["config"]["sizes"]
    summ, stats = doc["data"]["summary"], doc["data"]["stats"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(sizes, [summ[str(b)]["ndcg@6"]["mean"] for b in sizes], "o-", label="NDCG@6")
    ax.plot(sizes, [summ[str(b)]["hr@6"]["mean"] for b in sizes], "s-", label="HR@6")
    ax.set_xscale("log")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("|B| (lists per group)")
    ax.set_ylabel("test metric")
    ax2 = ax.twinx()
    ax2.plot(sizes, [stats[str(b)]["reward_std"] for b in sizes], "^:", color="grey", label="reward spread (std)")
    ax2.set_ylabel("within-group reward std")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, loc="best")
    ax.set_title(f"Group size, {doc['config'].get('dataset')} ({doc.get('mode')} mode)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PLOTS = {"scaling": ("scaling.png", plot_scaling), "group_size": ("group_size.png", plot_group_size)}


def write_report(results_dir: Path = RESULTS, out: Path = DOCS / "results.md", plots: bool = True,
                 readme: Path | None = None) -> Path:
    results = load_results(results_dir)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if plots:
        for name, (fname, fn) in PLOTS.items():
            doc = _pick(results, name)
            if doc is not None:
                fn(doc, out.parent / fname)
                doc.setdefault("plots", [])
                if fname not in [Path(p).name for p in doc["plots"]]:
                    doc["plots"].append(f"docs/{fname}")
    out.write_text(render(results))
    if readme is not None:
        write_readme_results(results, readme)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--out", default=str(DOCS / "results.md"))
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--readme", default=str(README), help="README whose Results block is rewritten ('' for none)")
    args = ap.parse_args(argv)
    out = write_report(Path(args.results), Path(args.out), not args.no_plots, Path(args.readme) if args.readme else None)
    print(f"wrote {out}" + (f" and the Results block of {args.readme}" if args.readme else ""))


if __name__ == "__main__":
    main()
