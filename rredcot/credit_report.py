"""`rredcot credit`: see where credit lands, and measure every estimator against Monte Carlo values.

Samples traces for a few held-out prompts, shades each segment by its credit (terminal and a
standalone HTML page), and with `credit.against=mc` scores each estimator (and each segmenter in
`credit.segmenters`) against MC values from the same traces: Spearman and Pearson correlation of
segment credits and of boundary values, per trace (averaged) and pooled, plus the cost of each in
forward tokens, generated tokens and seconds. Writes credit.json and credit.html.
"""

from __future__ import annotations

import html
import io
import json
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console
from rich.text import Text

from rredcot.compose import load_config
from rredcot.correlation import bootstrap_ci, pearson, spearman
from rredcot.estimator_spec import estimator_spec
from rredcot.registry import get
from rredcot.sections import stage_options
from rredcot.stages.reward_funcs import completion_id_lists
from rredcot.stages.segment import PieceDecoder, run_segment, think_marker
from rredcot.stages.verify import run_verify

# ---- statistics ------------------------------------------------------------------------------------


def _nanmean(xs: list[float]) -> float:
    xs = [x for x in xs if not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def agreement(est: list[torch.Tensor], ref: list[torch.Tensor]) -> dict[str, float]:
    """Correlations of two per-trace lists of tensors: per trace (averaged over traces where defined) and pooled."""
    pairs = [(e.double(), r.double()) for e, r in zip(est, ref) if len(e) == len(r) and len(e)]
    if not pairs:
        return {}
    pooled_e, pooled_r = torch.cat([e for e, _ in pairs]), torch.cat([r for _, r in pairs])

    def pooled(sample: list) -> float:
        return spearman(torch.cat([e for e, _ in sample]), torch.cat([r for _, r in sample]))

    return {
        "spearman_per_trace": _nanmean([spearman(e, r) for e, r in pairs]),
        "pearson_per_trace": _nanmean([pearson(e, r) for e, r in pairs]),
        "spearman_pooled": spearman(pooled_e, pooled_r),
        "pearson_pooled": pearson(pooled_e, pooled_r),
        "spearman_pooled_ci95": list(bootstrap_ci(pairs, pooled)),  # traces resampled: they are the units
        "traces": len(pairs),
    }


# ---- measuring one estimator ----------------------------------------------------------------------


class ForwardCounter:
    """Counts tokens through the model's forward (input_ids or inputs_embeds) while active."""

    def __init__(self, model):
        self.tokens = 0
        self.handle = model.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs):
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        if x is None and args:
            x = args[0]
        if x is not None:
            self.tokens += int(x.shape[0] * x.shape[1])

    def close(self) -> None:
        self.handle.remove()


def run_estimator(name: str, ro, ver, seg, ctx, group_size: int, overrides: dict[str, Any]):
    """Call redistributor `name` with its shipped config (plus overrides); returns (Credit, cost)."""
    opts = stage_options(load_config([f"redistribute={name}"]).redistribute)
    opts.update(overrides)
    generated = [0]
    inner = ctx.generate

    def counting_generate(prefixes, n, budgets):
        texts = inner(prefixes, n, budgets)
        generated[0] += sum(len(ctx.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        return texts

    ctx.generate = counting_generate
    counter = ForwardCounter(ctx.model)
    t = time.perf_counter()
    try:
        credit = get("redistribute", name)(ro, ver, seg, ctx, group_size=group_size, **opts)
    finally:
        counter.close()
        ctx.generate = inner
    cost = {"seconds": time.perf_counter() - t, "forward_tokens": counter.tokens, "generated_tokens": generated[0]}
    return credit, cost


def compare(ro, ver, seg, ctx, cfg: DictConfig, reference) -> dict[str, Any]:
    """Every estimator in credit.estimators against the MC reference credit on the same segments."""
    rows = {}
    ref_credit = [c[:-1] for c in reference.segment_credit]  # segments only; the correction is R - V_K
    for entry in cfg.credit.estimators:
        name, opts = estimator_spec(entry)
        credit, cost = run_estimator(name, ro, ver, seg, ctx, cfg.rollout.group_size, opts)
        row = {"cost": cost, "credit": agreement([c[:-1] for c in credit.segment_credit], ref_credit)}
        if credit.values is not None:
            row["values"] = agreement(credit.values, reference.values)
        rows[str(entry)] = row
    return rows


# ---- showing it ------------------------------------------------------------------------------------


def _shade(x: float, scale: float) -> tuple[int, int, int, float]:
    a = min(abs(x) / scale, 1.0) if scale > 0 else 0.0
    return (40, 160, 60, a) if x >= 0 else (200, 50, 50, a)


def trace_segments(ro, seg, credit, row: int, pieces) -> list[tuple[str, float | None]]:
    """(text, credit) for each segment of a trace, then the correction part."""
    n = int(ro.lengths[row])
    ids = ro.completion_ids[row, :n].tolist()
    bounds = seg.boundaries[row] + [n]
    credits = credit.segment_credit[row].tolist()
    return [
        ("".join(pieces(ids[a:b])), credits[k] if k < len(credits) else None)
        for k, (a, b) in enumerate(zip(bounds, bounds[1:]))
    ]


def terminal_trace(prompt: str, reward: float, parts, scale: float) -> Text:
    text = Text(f"{prompt.strip()}   reward {reward:.0f}\n", style="bold")
    for chunk, c in parts:
        if c is None:
            text.append(chunk)
            continue
        r, g, b, a = _shade(c, scale)
        mix = tuple(int(255 * (1 - a) + v * a) for v in (r, g, b))
        body, newline = (chunk[:-1], "\n") if chunk.endswith("\n") else (chunk, "")
        text.append(body, style=f"black on rgb({mix[0]},{mix[1]},{mix[2]})" if a >= 0.05 else "")
        text.append(f"  {c:+.2f}{newline}", style="dim")  # the label stays on the segment's own line
    return text


def html_page(title: str, traces: list[dict[str, Any]], table: dict[str, Any] | None, scale: float) -> str:
    body = []
    for t in traces:
        spans = []
        for chunk, c in t["parts"]:
            esc = html.escape(chunk).replace("\n", "<br>")
            if c is None:
                spans.append(f"<span>{esc}</span>")
            else:
                r, g, b, a = _shade(c, scale)
                spans.append(f'<span title="credit {c:+.3f}" style="background:rgba({r},{g},{b},{a:.2f})">{esc}</span>')
        body.append(
            f'<div class="t"><div class="p">{html.escape(t["prompt"])} &nbsp; reward {t["reward"]:.0f}</div>'
            f'<div class="c">{"".join(spans)}</div></div>'
        )
    tbl = f"<h2>Against Monte Carlo</h2><pre>{html.escape(json.dumps(table, indent=2))}</pre>" if table else ""
    return (
        f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>body{{font-family:sans-serif;"
        f"max-width:60em;margin:2em auto}}.t{{margin:1em 0;padding:.5em;border:1px solid #ddd}}.p{{font-weight:bold}}"
        f".c{{font-family:monospace;white-space:pre-wrap}}</style><h1>{html.escape(title)}</h1>"
        f"<p>Green: positive credit, red: negative (hover for the number).</p>{''.join(body)}{tbl}"
    )


def sample_traces(cfg: DictConfig, backend, tokenizer, stages):
    samples = get("task", cfg.task.name)(cfg.task, cfg.eval.split, tokenizer)[: cfg.credit.prompts]
    ro = stages.rollout(backend, tokenizer, samples)
    return ro, run_verify(ro.texts, ro.samples, stages.reward_funcs, cfg.verify.budget_s, completion_id_lists(ro))


def segmenter_rows(ro, ver, ctx, cfg, pieces) -> dict[str, Any]:
    """For each segmenter in credit.segmenters: the first estimator against MC on its segments."""
    out = {}
    for name in cfg.credit.segmenters:
        seg_cfg = load_config([f"segment={name}"]).segment
        seg = run_segment(ro, partial(get("segment", name), **stage_options(seg_cfg)), pieces, think_marker(cfg))
        ref, _ = run_estimator("mc", ro, ver, seg, ctx, cfg.rollout.group_size, {"samples": cfg.credit.mc_samples})
        out[name] = compare(ro, ver, seg, ctx, cfg, ref)
    return out


def credit_command(cfg: DictConfig, model, tokenizer, out_dir: Path, console) -> dict[str, Any]:
    from rredcot.assemble import build_stages, policy_context

    stages = build_stages(cfg)
    torch.manual_seed(cfg.seed)
    backend = stages.make_backend(model, tokenizer)
    ro, ver = sample_traces(cfg, backend, tokenizer, stages)
    pieces = PieceDecoder(tokenizer)
    seg = run_segment(ro, stages.segment, pieces, stages.marker)
    ctx = policy_context(cfg, model, tokenizer, stages, backend)
    credit = stages.redistribute(ro, ver, seg, ctx)
    scale = max((abs(c) for cs in credit.segment_credit for c in cs.tolist()), default=1.0)
    traces = [
        {
            "prompt": ro.samples[i].prompt,
            "reward": float(ver.rewards[i]),
            "parts": trace_segments(ro, seg, credit, i, pieces),
        }
        for i in range(len(ro.texts))
    ]
    recorder = Console(record=True, width=110, file=io.StringIO())  # the same view, saved as credit.svg
    for t in traces[: cfg.credit.show]:
        shaded = terminal_trace(t["prompt"], t["reward"], t["parts"], scale)
        console.print(shaded)
        recorder.print(shaded)
    result: dict[str, Any] = {
        "redistribute": cfg.redistribute.name,
        "segment": cfg.segment.name,
        "prompts": cfg.credit.prompts,
        "traces": len(ro.texts),
        "stats": credit.stats,
    }
    if cfg.credit.against == "mc":
        ref, ref_cost = run_estimator(
            "mc", ro, ver, seg, ctx, cfg.rollout.group_size, {"samples": cfg.credit.mc_samples}
        )
        result["mc"] = {
            "samples": cfg.credit.mc_samples,
            "cost": ref_cost,
            "split_half_reliability": ref.stats.get("credit/mc_split_half"),
            "split_half_reliability_credit": ref.stats.get("credit/mc_split_half_credit"),
        }
        result["estimators"] = compare(ro, ver, seg, ctx, cfg, ref)
        if cfg.credit.segmenters:
            result["segmenters"] = segmenter_rows(ro, ver, ctx, cfg, pieces)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "credit.json").write_text(json.dumps(result, indent=2, default=float))
    title = f"rredcot credit: {cfg.redistribute.name} on {cfg.segment.name} segments"
    (out_dir / "credit.html").write_text(html_page(title, traces, result.get("estimators"), scale))
    recorder.save_svg(str(out_dir / "credit.svg"), title=title)
    return result


def _ci(d: dict[str, Any]) -> str:
    lo, hi = d.get("spearman_pooled_ci95", (math.nan, math.nan))
    return "" if math.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]"


def results_table(result: dict[str, Any]):
    from rich.table import Table

    rel = [result["mc"].get(k) for k in ("split_half_reliability", "split_half_reliability_credit")]
    rel = ["-" if r is None or math.isnan(r) else f"{r:.2f}" for r in rel]
    table = Table(
        title=f"estimators against Monte Carlo ({result['mc']['samples']} samples per boundary, "
        f"{result['traces']} traces of {result['prompts']} prompts; MC split-half reliability: "
        f"values {rel[0]}, credit {rel[1]})"
    )
    for col in (
        "estimator",
        "credit spearman (trace / pooled)",
        "credit pearson (trace / pooled)",
        "value spearman (trace / pooled [95% CI])",
        "forward tokens",
        "generated tokens",
        "seconds",
    ):
        table.add_column(col, justify="right")
    rows = {"mc (reference)": {"cost": result["mc"]["cost"]}, **result["estimators"]}
    for name, row in rows.items():
        c, v, cost = row.get("credit", {}), row.get("values", {}), row["cost"]
        f = lambda d, k: "-" if k not in d or math.isnan(d[k]) else f"{d[k]:.2f}"  # noqa: E731
        table.add_row(
            name,
            f"{f(c, 'spearman_per_trace')} / {f(c, 'spearman_pooled')}",
            f"{f(c, 'pearson_per_trace')} / {f(c, 'pearson_pooled')}",
            f"{f(v, 'spearman_per_trace')} / {f(v, 'spearman_pooled')}{_ci(v)}",
            str(cost["forward_tokens"]),
            str(cost["generated_tokens"]),
            f"{cost['seconds']:.2f}",
        )
    return table
