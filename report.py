"""report.py — eval.py's outputs for people: results.md (one row per policy, TLCR Table 1's layout)
and report.html (one self-contained page: the table, the PPO training curves of TLCR Figure 7, and
responses with every token shaded by its TLCR and RED reward, TLCR Figure 8). No algorithm here:
eval.py computes every number; this file only lays them out. Every text from a model or a user is
escaped. """
from __future__ import annotations

import html
import math
from pathlib import Path

from plumbing import checkpoint

# columns of results.md / the report table: (key in results.json, header, format)
COLUMNS = [("rm_score", "RM score ↑", "{:+.3f}"), ("tlcr_reward", "TLCR reward ↑", "{:+.3f}"),
           ("kl", "KL", "{:.3f}"), ("kl_per_token", "KL / token", "{:.4f}"),
           ("ref_perplexity", "PPL (ref)", "{:.2f}"), ("response_length", "Length", "{:.1f}"),
           ("eos_share", "EOS %", "{:.0%}")]
# PPO log keys drawn as curves, first key found wins (ppo_token.py's names first)
# (task rewards of different sources are not on one scale; the reward-model score is, when logged)
GOLD_VS_KL = "gold score against KL to the reference (per PPO step)"
GOLD_COLUMN = ("gold_score", "Gold ↑", "{:+.3f}")  # the offline lab's known reward (eval.py --gold)
CURVES = [
    ("gold score", ("gold_score",)),
    ("reward-model score", ("rm_score",)),
    ("task reward", ("task_reward", "reward")),
    ("KL to reference", ("kl", "kl_ref")),
    ("response length", ("response_length", "length")),
    ("perplexity under the policy", ("perplexity", "ppl")),
]



def fmt(value, pattern):
    return "—" if value is None else pattern.format(value)


def md_cell(text):
    """Text for a markdown table cell: a '|' would start a new column."""
    return str(text).replace("|", "\\|")


def win_cell(row, baseline, name):
    if name == baseline:
        return "baseline"
    return fmt(row.get("win_rate"), "{:.1f}")


def accuracy_line(acc):
    return (
        f"Discriminator token accuracy ({acc.get('split', 'heldout')} labels): "
        f"{acc['accuracy']:.1%} "
        f"(positive {acc['positive_accuracy']:.1%} of {acc['n_positive']}, negative "
        f"{acc['negative_accuracy']:.1%} of {acc['n_negative']}; paper 81.4%)"
    )


def table_columns(results):
    """COLUMNS, with the lab's gold score first when it was measured (eval.py --gold)."""
    measured = any("gold_score" in row for row in results["policies"].values())
    return ([GOLD_COLUMN] if measured else []) + COLUMNS


def results_markdown(results):
    """One row per policy, as in TLCR Table 1."""
    base, columns = results["baseline"], table_columns(results)
    head = ["Policy"] + [h for _, h, _ in columns] + [f"Win rate vs {md_cell(base)} (%) ↑"]
    lines = [
        f"Held-out prompts: {results['num_prompts']} ({results['split']} split); judge: "
        f"{results['judge']}."
        + (f" Gold lexicon: {results['lexicon']}." if results.get("lexicon") else ""),
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for name, row in results["policies"].items():
        cells = (
            [md_cell(name)]
            + [fmt(row.get(k), f) for k, _, f in columns]
            + [win_cell(row, base, name)]
        )
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("discriminator_accuracy") is not None:
        lines += ["", accuracy_line(results["discriminator_accuracy"])]
    return "\n".join(lines) + "\n" + credit_markdown(results)


# the token credit tables (eval.py --gold): (key in eval.credit_summary, header, format)
CREDIT_COLUMNS = [("auc_harm", "AUC harm ↑", "{:.3f}"), ("auc_safe", "AUC safe ↑", "{:.3f}"),
                  ("word_r", "per-word r ↑", "{:+.3f}"), ("reply_r", "per-reply r ↑", "{:+.3f}"),
                  ("tokens", "tokens", "{}"), ("harm_tokens", "harm tokens", "{}"),
                  ("safe_tokens", "safe tokens", "{}"), ("words", "words", "{}")]
CREDIT_NOTE = ("AUC harm: how well −reward separates the tokens of harm words from all others; "
               "AUC safe: how well the reward separates the tokens of safe words; 0.5 is chance, "
               "1 perfect. Per-word r: Pearson r between a word's summed token reward and its gold "
               "weight, over all words; per-reply r: between a reply's summed token reward and its "
               "gold score. Every token of a word carries the word's weight (gold.token_credit); "
               "— where a class is empty.")


def credit_tables(results):
    """[(title, header, rows of cells)] of the token credit tables; [] without eval.py --gold.
    Held-out replies: every reward source; samples: each policy by the source it trained on."""
    credit = results.get("credit")
    if not credit:
        return []
    kinds = credit["heldout"]["replies"]
    sections = [(f"Token credit on held-out replies ({kinds['chosen']} chosen, {kinds['rejected']} "
                 f"rejected, {kinds['revised']} revised by the rule), by reward source",
                 credit["heldout"]["by_source"].items())]
    own = [(name, by_source[name]) for name, by_source in credit["samples"].items()
           if name in by_source]
    if own:
        sections.append(("Token credit on each policy's own samples, by the reward it trained on",
                         own))
    heads = ["source", "policy = source"]
    return [(title, [first] + [h for _, h, _ in CREDIT_COLUMNS],
             [[name] + [fmt(m.get(k), f) for k, _, f in CREDIT_COLUMNS] for name, m in rows])
            for first, (title, rows) in zip(heads, sections)]


def credit_markdown(results):
    """The credit tables as markdown ('' without eval.py --gold)."""
    lines = []
    for title, head, rows in credit_tables(results):
        lines += ["", title + ":", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n\n" + CREDIT_NOTE + "\n" if lines else ""


def html_table(head, rows):
    """A results table: header cells, rows of cells (escaped)."""
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                    for row in rows)
    header = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    return f'<table class="results"><thead><tr>{header}</tr></thead><tbody>{cells}</tbody></table>'


def credit_html(results):
    """The credit tables as HTML ('' without eval.py --gold)."""
    parts = [f"<h3>{html.escape(title)}</h3>" + html_table(head, rows)
             for title, head, rows in credit_tables(results)]
    if not parts:
        return ""
    return "<h2>True token credit</h2>" + "".join(parts) + f"<p>{html.escape(CREDIT_NOTE)}</p>"


def curve_series(rows, keys):
    """[(step, value)] for the first of `keys` present in the log (x = "step" or the line
    number)."""
    key = next((k for k in keys if any(isinstance(r.get(k), (int, float)) for r in rows)), None)
    if key is None:
        return None, []
    points = [(r.get("step", i + 1), r[key]) for i, r in enumerate(rows)
              if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    return key, points


PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def line_chart_svg(title, series, width=360, height=230, x_label="step"):
    """An inline SVG line chart: series = {run name: [(x, y), ...]}, one coloured line each. Points
    are joined in x order against steps, in the order given otherwise (a run's path against KL)."""
    pts = [p for line in series.values() for p in line]
    if not pts:
        return ""
    left, right, top, bottom = 56, 22, 24, 56  # room for the tick labels at both ends
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-3)

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [
        f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
        f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" '
        f'class="title">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
        'class="axis"></line>',
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" class="axis"></line>',
    ]
    for k in range(3):
        y = y0 + (y1 - y0) * k / 2
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for x in (x0, x1):
        parts.append(
            f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle">{x:.4g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{height - bottom + 14}" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>')
    for k, (name, line) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        coords = " ".join(
            f"{sx(x):.1f},{sy(y):.1f}" for x, y in (sorted(line) if x_label == "step" else line)
        )
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.6" points="{coords}">'
            f'<title>{html.escape(name)}</title></polyline>'
        )
        lx, ly = left + (k % 3) * 100, height - 22 + (k // 3) * 12
        parts.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{colour}"></rect>'
                     f'<text x="{lx + 14}" y="{ly - 4}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


KL_BIN_EDGES = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)  # the frontier's KL bins


def binned_frontier(points, edges=KL_BIN_EDGES):
    """[(KL, gold)] -> [(mean KL, mean gold, standard error or None, n)] per non-empty KL bin, in KL
    order: the frontier of one run read as averages over the steps that reached each range of KL.
    Points below the first edge join the first bin, those above the last edge the last one."""
    bins = {}
    for x, y in points:
        k = sum(x >= edge for edge in edges[1:-1])  # the bin index, 0 .. len(edges) − 2
        bins.setdefault(k, []).append((x, y))
    frontier = []
    for k in sorted(bins):
        xs, ys = [p[0] for p in bins[k]], [p[1] for p in bins[k]]
        n, mean = len(ys), sum(ys) / len(ys)
        sem = math.sqrt(sum((y - mean) ** 2 for y in ys) / (n - 1) / n) if n > 1 else None
        frontier.append((sum(xs) / n, mean, sem, n))
    return frontier


def chart_frame(title, x_range, y_range, width, height, margins, x_label, x_ticks=5):
    """The frame of an SVG chart: title, axes, tick labels. Returns (parts, sx, sy), the SVG pieces
    so far and the maps from data to pixel coordinates."""
    (x0, x1), (y0, y1), (left, right, top, bottom) = x_range, y_range, margins

    def sx(x):
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y):
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    base = height - bottom
    parts = [f'<svg class="curve" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<text x="{width / 2:.0f}" y="15" text-anchor="middle" class="title">'
             f'{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{base}" x2="{width - right}" y2="{base}" class="axis"></line>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" class="axis"></line>']
    for k in range(3):
        y = y0 + (y1 - y0) * k / 2
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for k in range(x_ticks):
        x = x0 + (x1 - x0) * k / (x_ticks - 1)
        parts.append(f'<text x="{sx(x):.1f}" y="{base + 14}" text-anchor="middle">{x:.3g}</text>')
    parts.append(f'<text x="{(left + width - right) / 2:.0f}" y="{base + 28}" '
                 f'text-anchor="middle">{html.escape(x_label)}</text>')
    return parts, sx, sy


def frontier_chart_svg(title, series, points=None, width=420, height=270, x_label="KL", note=""):
    """An inline SVG frontier: series = {name: [(x, y, error or None)]}, one line of means with a
    vertical bar of ± error at each point, joined in x order; points = {name: [(x, y)]}, the raw
    values drawn faint behind it (per step, or per seed)."""
    points = points or {}
    # the frame holds the means and the faint points; an error bar longer than that is cut at the
    # frame (with few seeds one wide interval would otherwise flatten every curve)
    pts = [(x, y) for line in series.values() for x, y, _ in line]
    pts += [p for line in points.values() for p in line]
    if not pts:
        return ""
    x0, x1 = min(0.0, min(p[0] for p in pts)), max(p[0] for p in pts)
    y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + abs(y0) * 0.1 + 1e-3)
    left, bottom = 56, 74
    parts, sx, sy = chart_frame(title, (x0, x1), (y0, y1), width, height, (left, 22, 24, bottom),
                                x_label)
    for k, name in enumerate(dict.fromkeys([*series, *points])):
        colour = PALETTE[k % len(PALETTE)]
        for x, y in points.get(name, []):
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="1.8" fill="{colour}" '
                         f'fill-opacity="0.25"></circle>')
        line = sorted(series.get(name, []))
        if line:
            coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y, _ in line)
            parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.8" '
                         f'points="{coords}"><title>{html.escape(name)}</title></polyline>')
        for x, y, e in line:
            if e:
                low, high = max(y - e, y0), min(y + e, y1)
                parts.append(f'<line x1="{sx(x):.1f}" y1="{sy(low):.1f}" x2="{sx(x):.1f}" '
                             f'y2="{sy(high):.1f}" stroke="{colour}" stroke-width="1.2" '
                             f'stroke-opacity="0.6"></line>')
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.6" fill="{colour}">'
                         f'<title>{html.escape(name)}: {html.escape(x_label)} {x:.3g}, {y:+.3f}'
                         f'{f" ± {e:.3f}" if e else ""}</title></circle>')
        lx, ly = left + (k % 3) * 110, height - bottom + 44 + (k // 3) * 12
        parts.append(f'<rect x="{lx}" y="{ly - 8}" width="10" height="3" fill="{colour}"></rect>'
                     f'<text x="{lx + 14}" y="{ly - 4}">{html.escape(name)}</text>')
    if note:
        parts.append(f'<text x="{left}" y="{height - 3}" class="note">{html.escape(note)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def token_colour(value, scale):
    """Green for positive, red for negative; opacity grows with |value| / scale."""
    alpha = min(abs(value) / scale, 1.0) * 0.85 if scale > 0 else 0.0
    rgb = "34,160,60" if value >= 0 else "214,39,40"
    return f"rgba({rgb},{alpha:.2f})"


def shaded_tokens_html(tokens, values, label, scale):
    """Each token as a span shaded by its reward; the value on hover (title). Text is escaped."""
    spans = [
        f'<span class="tok" style="background-color:{token_colour(v, scale)}" '
        f'title="{html.escape(label)} {v:+.4f}">{html.escape(t)}</span>'
        for t, v in zip(tokens, values)
    ]
    return "".join(spans)


def report_html(results, samples, curves):
    """One self-contained page: the table, the training curves, the shaded responses."""
    base, columns = results["baseline"], table_columns(results)
    head = "".join(f"<th>{html.escape(h)}</th>" for h in ["Policy"] + [h for _, h, _ in columns]
                   + [f"Win rate vs {base} (%)"])
    rows = "".join("<tr><td>" + html.escape(name) + "</td>"
                   + "".join(f"<td>{html.escape(fmt(row.get(k), f))}</td>" for k, _, f in columns)
                   + f"<td>{html.escape(win_cell(row, base, name))}</td></tr>"
                   for name, row in results["policies"].items())
    body = [
        f"<h1>token-rlhf evaluation</h1><p>{results['num_prompts']} held-out prompts "
        f"({html.escape(results['split'])}"
        f" split), seed {results['seed']}, judge: {html.escape(results['judge'])}"
        + (f", gold lexicon {html.escape(results['lexicon'])}" if results.get("lexicon") else "")
        + ".</p>",
        f'<table class="results"><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>',
    ]
    if results.get("discriminator_accuracy") is not None:
        body.append(f"<p>{html.escape(accuracy_line(results['discriminator_accuracy']))}</p>")
    charts = [gold_frontier_svg(series) if title == GOLD_VS_KL else line_chart_svg(title, series)
              for title, series in curves.items() if series]
    body.append("<h2>PPO training curves</h2>")
    body.append(
        f'<div class="charts">{"".join(charts)}</div>' if charts else "<p>No PPO logs found.</p>")
    body.append(credit_html(results))
    body.append("<h2>Token rewards</h2><p>Each token shaded by its TLCR reward (2·D − 1) and its "
                "RED reward (R(x, y≤t) − R(x, y≤t−1)): green positive, red negative; hover for the "
                "value. With --gold the first row is each token's gold credit, the weight of"
                " the word it belongs to (−1 harm, +1 safe), the answer both rows should find.</p>")
    red_scale = max(
        [abs(v) for s in samples for r in s["responses"].values() for v in r["red"]] + [1e-6])
    for k, sample in enumerate(samples):
        body.append(
            f'<h3>Prompt {k + 1}</h3><pre '
            f'class="prompt">{html.escape(sample["prompt"][-800:])}</pre>'
        )
        for name, resp in sample["responses"].items():
            gold_row = "" if "gold" not in resp else (
                '<div class="row"><span class="lbl">gold credit</span><span class="toks">'
                + shaded_tokens_html(resp["tokens"], resp["gold"], "gold credit", 1.0)
                + '</span></div>')
            body.append(
                f'<div class="resp"><div class="name">{html.escape(name)}</div>{gold_row}'
                f'<div class="row"><span class="lbl">TLCR</span><span class="toks">'
                f'{shaded_tokens_html(resp["tokens"], resp["tlcr"], "TLCR", 1.0)}</span></div>'
                f'<div class="row"><span class="lbl">RED</span><span class="toks">'
                f'{shaded_tokens_html(resp["tokens"], resp["red"], "RED", red_scale)}'
                "</span></div></div>"
            )
    style = (
        "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 "
        "1em;color:#222}"
        "table.results{border-collapse:collapse}table.results td,table.results th{border:1px solid "
        "#bbb;"
        "padding:4px 8px;text-align:right}table.results td:first-child{text-align:left}"
        ".charts{display:flex;flex-wrap:wrap;gap:12px}svg.curve{font-size:10px;background:#fafafa}"
        "svg .axis{stroke:#888}svg .title{font-size:12px;font-weight:600}svg .note{fill:#666}"
        "pre.prompt{white-space:pre-wrap;background:#f4f4f4;padding:6px;font-size:12px}"
        ".resp{margin:6px 0 12px}.name{font-weight:600}.row{display:flex;gap:8px;margin:2px 0}"
        ".lbl{width:72px;flex:none;color:#666;font-size:12px}"
        ".toks{white-space:pre-wrap;font-family:monospace;"
        "font-size:12px}.tok{border-radius:2px}"
    )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<title>token-rlhf evaluation</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def gold_frontier_svg(series):
    """The gold-against-KL chart of one PPO run per policy: every step a faint point, and the mean
    gold of the steps in each KL bin (KL_BIN_EDGES), ± one standard error, joined in KL order."""
    means = {name: [(x, y, e) for x, y, e, _ in binned_frontier(points)]
             for name, points in series.items()}
    return frontier_chart_svg(GOLD_VS_KL, means, points=series,
                              note="mean ± s.e. of the steps in each KL bin; faint: every step")


def find_logs(policies):
    """log.jsonl in or beside each policy dir (runs/x/ppo_tlcr/policy ->
    runs/x/ppo_tlcr/log.jsonl)."""
    found = {}
    for name, path in policies.items():
        for candidate in (Path(path) / "log.jsonl", Path(path).parent / "log.jsonl"):
            if candidate.exists() and "ppo" in str(candidate.parent.name).lower():
                found[name] = str(candidate)
                break
    return found


def training_curves(logs):
    """{chart title: {run name: [(step, value)]}} from the PPO logs (missing keys are skipped)."""
    rows = {
        name: checkpoint.read_jsonl_tolerant(path)
        for name, path in logs.items()
        if Path(path).exists()
    }
    curves = {}
    for title, keys in CURVES:
        series, used = {}, set()
        for name, log_rows in rows.items():
            key, points = curve_series(log_rows, keys)
            if points:
                series[name] = points
                used.add(key)
        if series:
            curves[f"{title} ({', '.join(sorted(used))})"] = series
    gold_vs_kl = {
        name: [(r["kl"], r["gold_score"]) for r in log_rows if "kl" in r and "gold_score" in r]
        for name, log_rows in rows.items()
    }
    # the fair comparison: the reward against the KL it cost, one point per PPO step
    if any(gold_vs_kl.values()):
        curves[GOLD_VS_KL] = {name: points for name, points in gold_vs_kl.items() if points}
    return curves
