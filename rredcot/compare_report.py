"""`rredcot compare`: a method against a baseline over seeds, from finished run directories.

`build_report(groups, baseline, out)` reads each run's metrics.jsonl / eval.json and writes
report.md, a self-contained report.html, PNG plots and summary.json. Curves are means over seeds with
95% t-intervals; the verdict is a paired t-test over seeds on final held-out greedy accuracy.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
from pathlib import Path
from statistics import mean
from typing import Any

from rredcot.errors import UserError
from rredcot.runs import Run, distinct_dirs, group_runs, load_run
from rredcot.stats import mean_ci, paired_t

# The training figure's panels. Truncated share and mean token advantage are the signals that preceded the
# collapses we saw (docs/results.md, "why RREDCoT collapsed"): a baseline that is biased shows as a mean far from 0.
CURVES = [
    ("reward/mean", "reward"),
    ("entropy", "entropy"),
    ("completion/mean_length", "completion length"),
    ("completion/clipped_ratio", "truncated share"),
    ("advantage/token_mean", "token-advantage mean"),
    ("advantage/token_std", "token-advantage std"),
    ("grad_norm", "gradient norm"),
    ("kl", "KL"),
]


def eval_curve(run: Run) -> list[tuple[int, float, float, float]]:
    """(step, generated tokens so far, seconds so far, held-out greedy accuracy) at each evaluation."""
    out, tokens, seconds = [], 0.0, 0.0
    batch = run.config["train"]["generation_batch_size"]
    for row in run.metrics:
        if "completion/mean_length" in row:
            tokens += row["completion/mean_length"] * batch
            seconds += row.get("time/step_s", 0.0)
        if row.get("eval/accuracy") is not None:
            out.append((row["step"], tokens, seconds, row["eval/accuracy"]))
    return out


def _smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average: per-step RL metrics are too noisy to read raw."""
    return [mean(xs[max(0, i - window + 1) : i + 1]) for i in range(len(xs))]


def _series(runs: list[Run], key: str) -> tuple[list[int], list[float], list[float]]:
    """Steps, mean and CI half-width over seeds of a per-step metric (steps every seed logged), each run
    smoothed over a window of ~1/20 of the steps."""
    per = [{r["step"]: r[key] for r in run.metrics if r.get(key) is not None and "reward/mean" in r} for run in runs]
    steps = sorted(set.intersection(*[set(p) for p in per])) if per else []
    window = max(1, len(steps) // 20)
    per = [dict(zip(steps, _smooth([p[s] for s in steps], window))) for p in per]
    stats = [mean_ci([p[s] for p in per]) for s in steps]
    return steps, [m for m, _ in stats], [h for _, h in stats]


def _final(run: Run, key: str) -> float:
    return float(run.result["final"][key])


def summary(groups: dict[str, list[Run]], baseline: str) -> dict[str, Any]:
    base = groups[baseline]
    base_final = mean(_final(r, "accuracy") for r in base)
    base_step = mean(mean(x["time/step_s"] for x in r.metrics if "time/step_s" in x) for r in base)
    rows = {}
    for label, runs in groups.items():
        acc, p1 = mean_ci([_final(r, "accuracy") for r in runs]), mean_ci([_final(r, "pass@1") for r in runs])
        step_s = mean(mean(x["time/step_s"] for x in r.metrics if "time/step_s" in x) for r in runs)
        share = mean(
            mean(x.get("time/redistribute_s", 0.0) / x["time/step_s"] for x in r.metrics if "time/step_s" in x)
            for r in runs
        )
        curves = [eval_curve(r) for r in runs]
        reach = [next((s for s, _, _, a in c if a >= base_final), None) for c in curves]
        rows[label] = {
            "seeds": sorted(r.seed for r in runs),
            "accuracy": acc[0],
            "accuracy_ci": acc[1],
            "pass@1": p1[0],
            "pass@1_ci": p1[1],
            "steps_to_baseline_final": mean(x for x in reach if x is not None)
            if any(x is not None for x in reach)
            else None,
            "runs_reaching_baseline_final": sum(x is not None for x in reach),
            "completion_length": mean(float(r.result["final"].get("mean_length", math.nan)) for r in runs),
            "seconds_per_step": step_s,
            "step_time_ratio": step_s / base_step if base_step else math.nan,
            "redistribution_share": share,
            "peak_memory_mb": max(max((x.get("memory/peak_mb", 0.0) for x in r.metrics), default=0.0) for r in runs),
        }
    return {
        "baseline": baseline,
        "split": base[0].split,
        "rows": rows,
        "verdicts": {m: verdict(groups[m], base, m, baseline) for m in groups if m != baseline},
    }


def verdict(runs: list[Run], base: list[Run], name: str, baseline: str) -> dict[str, Any]:
    """Paired t-test over the seeds both methods have, on final greedy accuracy."""
    by_seed = {r.seed: _final(r, "accuracy") for r in base}
    pairs = [(_final(r, "accuracy"), by_seed[r.seed]) for r in runs if r.seed in by_seed]
    if not pairs:
        return {"text": f"{name} and {baseline} share no seed: no paired test.", "n": 0}
    t = paired_t([a for a, _ in pairs], [b for _, b in pairs])
    diff, p, n = 100 * t["diff"], t["p"], t["n"]
    ci = f"95% CI {100 * (t['diff'] - t['ci']):+.1f} to {100 * (t['diff'] + t['ci']):+.1f}"
    if n < 2:
        text = f"{name} vs {baseline}: {diff:+.1f} points on 1 seed; run more seeds for a test."
    elif t["undefined"]:  # a p-value from zero variance would read 0.000 (or 1.000) for no evidence at all
        text = (
            f"{name} - {baseline} = {diff:+.1f} points of held-out greedy accuracy on each of {n} seeds; p = n/a "
            f"({t['undefined']}). Evaluate on more prompts (eval.n_prompts) or run more seeds for a test."
        )
    elif p < 0.05:
        text = (
            f"{name} {'beats' if diff > 0 else 'loses to'} {baseline} by {abs(diff):.1f} points of held-out greedy "
            f"accuracy ({ci}; paired t-test over {n} seeds, p = {p:.3f})."
        )
    else:
        text = (
            f"No significant difference: {name} - {baseline} = {diff:+.1f} points of held-out greedy accuracy "
            f"({ci}; paired t-test over {n} seeds, p = {p:.2f})."
        )
    return {**t, "text": text}


# ---- plots and files -------------------------------------------------------------------------------


def _draw(ax, x, m, h, label: str, **kw) -> None:
    """A mean line with its 95% band (NaN half-widths, i.e. one seed, draw no band)."""
    h = [0.0 if math.isnan(b) else b for b in h]
    ax.plot(x, m, label=label, **kw)
    ax.fill_between(x, [a - b for a, b in zip(m, h)], [a + b for a, b in zip(m, h)], alpha=0.2)


def _band(ax, xs, runs_curves, label):
    """Mean and 95% interval over seeds of accuracy at the evaluation points every seed has."""
    n = min(len(c) for c in runs_curves)
    stats = [mean_ci([c[i][3] for c in runs_curves]) for i in range(n)]
    x = [mean(xs(c[i]) for c in runs_curves) for i in range(n)]
    _draw(ax, x, [m for m, _ in stats], [h for _, h in stats], label, marker="o")


def _finish(fig, axes) -> bytes:
    """One legend for the whole figure, under it (method labels can be long: one per panel covered the curves)."""
    for ax in axes:
        ax.grid(alpha=0.3)
    first = next((ax for ax in axes if ax.lines), None)
    if first is None:
        fig.tight_layout()
    else:
        handles, labels = first.get_legend_handles_labels()
        ncol = 1 if max(map(len, labels)) > 60 else min(len(labels), 3)
        rows = math.ceil(len(labels) / ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
        fig.tight_layout(rect=(0, min(0.04 * rows + 0.02, 0.4), 1, 1))
    buf = io.BytesIO()  # files are written only once every one is made (write_report)
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def plot_all(groups: dict[str, list[Run]]) -> dict[str, bytes]:
    """accuracy.png and training.png, as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (xs, xlabel) in zip(
        axes,
        [
            (lambda e: e[0], "optimizer steps"),
            (lambda e: e[1], "generated tokens"),
            (lambda e: e[2], "wall-clock seconds (training only)"),
        ],
    ):
        for label, runs in groups.items():
            _band(ax, xs, [eval_curve(r) for r in runs], label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"greedy accuracy, {next(iter(groups.values()))[0].split} split")
        ax.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter())  # 200k, not 200000 run into its neighbours
    files = {"accuracy.png": _finish(fig, axes)}
    plt.close(fig)
    fig, axes = plt.subplots(2, 4, figsize=(19, 7))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for label, runs in groups.items():
            steps, m, h = _series(runs, key)
            if steps:
                _draw(ax, steps, m, h, label)
        if not ax.lines:
            ax.text(
                0.5, 0.5, "not logged (e.g. KL needs update.beta > 0)", ha="center", va="center", transform=ax.transAxes
            )
        ax.set_title(title + " (moving average)")
        ax.set_xlabel("step")
    files["training.png"] = _finish(fig, list(axes.flat))
    plt.close(fig)
    return files


def _pm(m: float, h: float, n: int) -> str:
    """mean ± half-width in points; n/a where seeds have no spread (a ± 0.0 would claim a certainty)."""
    if math.isnan(h):
        return f"{100 * m:.1f}" + (" ± n/a" if n > 1 else "")
    return f"{100 * m:.1f} ± {100 * h:.1f}"


def markdown(s: dict[str, Any], groups: dict[str, list[Run]]) -> str:
    lines = [f"# rredcot compare: {', '.join(m for m in groups if m != s['baseline'])} vs {s['baseline']}", ""]
    lines += [f"**Verdict.** {v['text']}" for v in s["verdicts"].values()] + [""]
    lines += [f"Accuracies are on the task's {s['split']!r} split.", ""]
    lines += [
        "| method | seeds | greedy acc (%) | pass@1 (%) | steps to baseline's final acc | completion tokens | s/step | "
        "ratio to baseline | redistribution share | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in s["rows"].items():
        n = len(r["seeds"])
        reach = (
            "-"
            if r["steps_to_baseline_final"] is None
            else f"{r['steps_to_baseline_final']:.0f} ({r['runs_reaching_baseline_final']}/{n} seeds)"
        )
        lines.append(
            f"| {label} | {n} | {_pm(r['accuracy'], r['accuracy_ci'], n)} | "
            f"{_pm(r['pass@1'], r['pass@1_ci'], n)} | {reach} | {r.get('completion_length', math.nan):.1f} | "
            f"{r['seconds_per_step']:.2f} | "
            f"{r['step_time_ratio']:.2f} | {100 * r['redistribution_share']:.0f}% | "
            f"{r['peak_memory_mb']:.0f} |"
        )
    lines += ["", "Intervals are 95% t-intervals over seeds (n/a: every seed scored the same, no variance). Runs:", ""]
    lines += [f"- {label}: " + ", ".join(str(r.path) for r in runs) for label, runs in groups.items()]
    lines += ["", "![accuracy](accuracy.png)", "", "![training curves](training.png)", ""]
    return "\n".join(lines)


def html_report(md: str, pngs: dict[str, bytes]) -> str:
    """report.md as a self-contained page (images inlined)."""
    import html as h

    body = []
    for line in md.splitlines():
        if line.startswith("!["):
            name = line[line.index("(") + 1 : -1]
            data = base64.b64encode(pngs[name]).decode()
            body.append(f'<img style="max-width:100%" src="data:image/png;base64,{data}">')
        elif line.startswith("|") and "---" not in line:
            cells = "".join(f"<td>{h.escape(c.strip())}</td>" for c in line.strip("|").split("|"))
            body.append(f"<tr>{cells}</tr>")
        elif line.startswith("# "):
            body.append(f"<h1>{h.escape(line[2:])}</h1>")
        elif line.strip() and "---" not in line:
            body.append(f"<p>{h.escape(line).replace('**', '')}</p>")
    text = "\n".join(body).replace("</p>\n<tr>", "</p>\n<table border=1 cellpadding=4><tr>", 1)
    text = text.replace("</tr>\n<p>", "</tr></table>\n<p>", 1)
    style = "font-family:sans-serif;max-width:70em;margin:2em auto"
    return f"<!doctype html><meta charset='utf-8'><title>rredcot compare</title><body style='{style}'>{text}</body>"


def build_report(
    run_dirs: list[Path], out: Path, baseline: str | None = None, split: str | None = None
) -> dict[str, Any]:
    """Load runs (their eval.split, or `split`), group them by method, write report.md / report.html / PNGs /
    summary.json into `out` (refused, before anything is written, where it would replace a file of the user's)."""
    owned = check_report_dir(out)
    distinct_dirs(run_dirs)
    groups = group_runs([load_run(Path(p), split) for p in run_dirs])
    baseline = baseline if baseline in groups else ("grpo" if "grpo" in groups else sorted(groups)[-1])
    s = summary(groups, baseline)
    files = plot_all(groups)
    md = markdown(s, groups)
    files["report.md"] = md.encode()
    files["report.html"] = html_report(md, files).encode()
    files["summary.json"] = json.dumps(_finite(s), indent=2, default=float).encode()
    write_report(out, files, owned)
    return s


def _finite(x: Any) -> Any:
    """NaN and inf as null: summary.json is strict JSON (an undefined p-value or interval is null, not NaN)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


# ---- never over a user's file: compare replaces only report files it wrote and nobody changed since ----------

MANIFEST = ".rredcot-compare.json"  # {"files": {name: [sha256, ...]}}: the report files compare wrote here
REPORT_FILES = ("report.md", "report.html", "summary.json", "accuracy.png", "training.png")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _manifest(out: Path) -> dict[str, list[str]]:
    path = out / MANIFEST
    if not path.exists():
        return {}
    try:
        files = json.loads(path.read_text())["files"]
        if all(isinstance(v, list) for v in files.values()):
            return files
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or not shaped like the manifest
        pass
    raise UserError(  # not a manifest this code wrote: nothing in `out` can be taken for compare's
        f"{str(path)!r} is not the list of report files `rredcot compare` keeps (it does not parse as one), so "
        f"compare cannot tell its own files in {str(out)!r} from yours (nothing was changed). Choose another "
        "--out, or remove that file."
    )


def check_report_dir(out: Path) -> dict[str, list[str]]:
    """The manifest of `out`, or a UserError if a report file there is not compare's own, unchanged (checked
    before training and before writing: nothing a user wrote is ever replaced)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {str(out)!r} is a file, not a directory (nothing was changed). Choose another --out.")
    owned = _manifest(out) if out.is_dir() else {}
    theirs = [
        f"{n} ({'changed since compare wrote it' if n in owned else 'not written by compare'})"
        for n in REPORT_FILES
        if os.path.lexists(out / n) and not _unchanged(out / n, owned.get(n, []))
    ]
    if theirs:
        raise UserError(
            f"--out {str(out)!r} already holds {', '.join(theirs)}, which compare would overwrite; it replaces only "
            "report files it wrote itself, unchanged (nothing was changed). Choose another --out, or move those "
            "files away."
        )
    return owned


def _unchanged(path: Path, hashes: list[str]) -> bool:
    """A regular file (not a link to one elsewhere) whose contents are ones compare wrote."""
    return not path.is_symlink() and path.is_file() and _sha256(path.read_bytes()) in hashes


def write_report(out: Path, files: dict[str, bytes], owned: dict[str, list[str]]) -> None:
    """Write the report files and record them. Until all are written the manifest accepts each file's old and
    new contents, so a kill mid-way leaves a directory the next compare still recognises as its own."""
    out.mkdir(parents=True, exist_ok=True)
    _write_manifest(out, {n: sorted({*owned.get(n, []), _sha256(b)}) for n, b in files.items()})
    for name, data in files.items():
        (out / name).write_bytes(data)
    _write_manifest(out, {n: [_sha256(b)] for n, b in files.items()})


def _write_manifest(out: Path, files: dict[str, list[str]]) -> None:
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(out / MANIFEST)  # a kill mid-write never leaves a manifest that does not parse
