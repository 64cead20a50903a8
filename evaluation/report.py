"""The comparison report: comparison.json, report.md (with its plots as PNG files beside it) and a
self-contained report.html (the same plots inlined as data URIs, so it can be mailed or archived alone)."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np

PLOTS_DIR = "plots"

HTML_TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
.sig { font-weight: bold; color: #0a6b2f; }
.worse { color: #a31515; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.note { color: #555; font-size: 0.9em; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">{{ queries }} {{ unit }}{% if dataset %} of {{ dataset }}{% endif %}; baseline
<b>{{ baseline }}</b>; paired t-test and paired randomisation test ({{ permutations }} permutations),
p-values Holm-corrected over the {{ challengers }} challenger(s); <span class="sig">bold</span>: both
tests significant at &alpha; = {{ alpha }}.</p>
<h2>Systems</h2>
<table><tr><th>system</th>{% for m in metrics %}<th>{{ m }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row.name }}</td>{% for cell in row.cells %}<td>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</table>
<h2>Against {{ baseline }}</h2>
<table><tr><th>system</th><th>metric</th><th>&Delta;</th><th>wins / losses</th><th>t-test p (Holm)</th>
<th>randomisation p (Holm)</th></tr>
{% for test in tests %}<tr class="{{ 'sig' if test.significant else '' }}">
<td>{{ test.name }}</td><td>{{ test.metric }}</td>
<td class="{{ 'worse' if test.delta < 0 else '' }}">{{ '%+.4f' % test.delta }}</td>
<td>{{ test.wins }} / {{ test.losses }}</td>
<td>{{ '%.4g' % test.t_test_p_holm }}</td><td>{{ '%.4g' % test.permutation_p_holm }}</td></tr>
{% endfor %}</table>
{% if latency %}<h2>Latency (per call)</h2>
<table><tr><th>system</th><th>calls</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th></tr>
{% for name, row in latency.items() %}<tr><td>{{ name }}</td><td>{{ row.calls }}</td><td>{{ '%.1f' % row.p50 }}</td>
<td>{{ '%.1f' % row.p95 }}</td><td>{{ '%.1f' % row.p99 }}</td></tr>{% endfor %}</table>{% endif %}
<h2>Plots</h2>
{% for plot in plots %}<h3>{{ plot.title }}</h3><img alt="{{ plot.title }}" src="data:image/png;base64,{{ plot.data }}">
{% endfor %}
</body></html>
"""


def write_report(comparison: dict[str, Any], output: Path, *, title: str, dataset: str | None = None,
                 latencies: dict[str, list[float]] | None = None) -> dict[str, Path]:
    """Write comparison.json, the plots, report.md and report.html under `output`; returns their paths."""
    output.mkdir(parents=True, exist_ok=True)
    (output / PLOTS_DIR).mkdir(exist_ok=True)
    paths = {"json": output / "comparison.json", "markdown": output / "report.md", "html": output / "report.html"}
    paths["json"].write_text(json.dumps(comparison, indent=2) + "\n")
    plots = _plots(comparison, latencies or {}, output / PLOTS_DIR)
    tests = [{"name": name, "metric": metric, **test}
             for name, per_metric in comparison["comparisons"].items() for metric, test in per_metric.items()]
    rows = [{"name": name, "cells": [f"{means[m]:.4f}" for m in comparison["metrics"]]}
            for name, means in comparison["table"].items()]
    unit = {"user": "users (with both labels)"}.get(comparison.get("unit", ""), "judged queries")
    context = {"title": title, "dataset": dataset, "queries": comparison["queries"], "unit": unit,
               "baseline": comparison["baseline"],
               "permutations": comparison["permutations"], "challengers": len(comparison["comparisons"]),
               "alpha": comparison["alpha"], "metrics": comparison["metrics"], "rows": rows, "tests": tests,
               "latency": comparison["latency_ms"]}
    html_plots = [{"title": plot_title, "data": base64.b64encode(path.read_bytes()).decode()}
                  for plot_title, path in plots]
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    paths["html"].write_text(environment.from_string(HTML_TEMPLATE).render(**context, plots=html_plots))
    paths["markdown"].write_text(_markdown(context, plots, output))
    return paths


def _markdown(context: dict[str, Any], plots: list[tuple[str, Path]], output: Path) -> str:
    lines = [f"# {context['title']}", "",
             f"{context['queries']} {context['unit']}{' of ' + context['dataset'] if context['dataset'] else ''}; "
             f"baseline **{context['baseline']}**; paired t-test and randomisation test "
             f"({context['permutations']} permutations), Holm-corrected; significant (both tests, "
             f"α = {context['alpha']}) marked ✓.", "",
             "| system | " + " | ".join(context["metrics"]) + " |",
             "|---|" + "---:|" * len(context["metrics"])]
    lines += [f"| {row['name']} | " + " | ".join(row["cells"]) + " |" for row in context["rows"]]
    lines += ["", f"Against {context['baseline']}:", "",
              "| system | metric | Δ | wins / losses | t-test p (Holm) | randomisation p (Holm) | significant |",
              "|---|---|---:|---:|---:|---:|:---:|"]
    lines += [f"| {t['name']} | {t['metric']} | {t['delta']:+.4f} | {t['wins']} / {t['losses']} | "
              f"{t['t_test_p_holm']:.4g} | {t['permutation_p_holm']:.4g} | {'✓' if t['significant'] else ''} |"
              for t in context["tests"]]
    if context["latency"]:
        lines += ["", "| system | calls | p50 ms | p95 ms | p99 ms |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {name} | {row['calls']} | {row['p50']:.1f} | {row['p95']:.1f} | {row['p99']:.1f} |"
                  for name, row in context["latency"].items()]
    for plot_title, path in plots:
        lines += ["", f"## {plot_title}", "", f"![{plot_title}]({path.relative_to(output).as_posix()})"]
    return "\n".join(lines) + "\n"


def _plots(comparison: dict[str, Any], latencies: dict[str, list[float]], directory: Path) -> list[tuple[str, Path]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[tuple[str, Path]] = []

    def save(figure: Any, name: str, plot_title: str) -> None:
        figure.tight_layout()
        path = directory / f"{name}.png"
        figure.savefig(path, dpi=100)
        plt.close(figure)
        made.append((plot_title, path))

    baseline, per_query = comparison["baseline"], comparison["per_query"]
    unit, one = ("users", "user") if comparison.get("unit") == "user" else ("queries", "query")
    metric = comparison["metrics"][0]
    challengers = list(comparison["comparisons"])
    figure, axes = plt.subplots(len(challengers), 1, figsize=(10, 2.6 * len(challengers)), squeeze=False)
    for axis, name in zip(axes[:, 0], challengers, strict=True):
        deltas = np.sort([per_query[name][q][metric] - per_query[baseline][q][metric] for q in per_query[name]])[::-1]
        axis.bar(np.arange(len(deltas)), deltas, width=1.0, color=np.where(deltas >= 0, "#2a7d4f", "#b03a2e"))
        axis.axhline(0, color="black", linewidth=0.6)
        axis.set(title=f"{name} − {baseline}", ylabel=f"Δ {metric}", xlabel=f"{unit}, sorted by Δ")
    save(figure, "per_query_delta", f"Per-{one} Δ {metric} against {baseline}")

    if comparison["recall_curves"]:
        figure, axis = plt.subplots(figsize=(7, 4.2))
        for name, curve in comparison["recall_curves"].items():
            cutoffs = sorted(curve, key=int)  # int keys in memory, str keys once read back from JSON
            axis.plot([int(k) for k in cutoffs], [curve[k] for k in cutoffs], marker="o", label=name)
        axis.set(xscale="log", xlabel="k", ylabel="mean Recall@k", title="Recall@k")
        axis.grid(alpha=0.3)
        axis.legend()
        save(figure, "recall_at_k", "Recall@k curves")

    figure, axis = plt.subplots(figsize=(7, 4.2))
    bins = np.linspace(0, 1, 21)
    for name, scores in per_query.items():
        axis.hist([score[metric] for score in scores.values()], bins=bins, histtype="step", linewidth=1.6, label=name)
    axis.set(xlabel=f"per-{one} {metric}", ylabel=unit, title=f"Distribution of per-{one} {metric}")
    axis.legend()
    save(figure, "score_distribution", f"Per-{one} {metric} distributions")

    timed = {name: values for name, values in latencies.items() if values}
    if timed:
        figure, axis = plt.subplots(figsize=(7, 4.2))
        top = float(np.percentile(np.concatenate([np.asarray(v) for v in timed.values()]), 99.5))
        for name, values in timed.items():
            axis.hist(np.clip(values, 0, top), bins=40, histtype="step", linewidth=1.6, label=name)
        axis.set(xlabel="ms per call", ylabel="calls", title="Latency per call (clipped at the 99.5th percentile)")
        axis.legend()
        save(figure, "latency", "Latency histograms")
    return made
