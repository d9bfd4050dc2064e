"""report: one self-contained HTML page for a run (the dvc.yaml `report` stage, the last one).

    finetune report --output reports/run.html [--export-parity models/gguf/parity.json] [--screenshot run.png]

Reads (each an option of `finetune report`, defaults as in dvc.yaml), and shows:
  data       metrics/validate_<split>.json and metrics/tokenize_<split>.json: each split's lines read,
             rejected per reason, kept, dropped or truncated by tokenize; data/tokenized/<split>: the
             `length` column of its Arrow shards, for the token-length histogram
  training   plots/train/loss.csv (loss and learning rate by step), plots/train/eval_loss.csv, metrics/train.json
  evaluation metrics/eval.json (base vs tuned), reports/eval_samples.jsonl (the first 20 questions with
             the reference, base and tuned answers side by side)
  parity     models/merged/parity.json; the export's parity.json when given (`--export-parity`), else a
             "not exported" section
  lineage    models/merged/lineage.json (`stages.lineage.describe`, and every param)
The page has no script and loads nothing: CSS inline, plots inline SVG (matplotlib); every piece of
text from the inputs is HTML-escaped, so user data (questions, answers, paths, params) shows as text.
Built from the inputs alone (no clock, fixed SVG ids): the same inputs give the same bytes.

`--screenshot PNG` also opens the page in headless Chromium (`browse`, over the DevTools protocol on a
pipe: no extra package) at 1366 px wide and saves the whole page as PNG; a console error, an uncaught
exception or a request for anything but the page itself stops it with one line.
"""

from __future__ import annotations

import base64
import csv
import fcntl
import html
import io
import math
import os
import re
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import orjson

from stages import lineage as lin
from stages import tokens
from stages.errors import StageError
from stages.jsonl import read_jsonl
from stages.outputs import staged

SAMPLES_SHOWN = 20
WIDTH, HEIGHT = 1366, 900  # a laptop screen, in CSS pixels
METRICS = (  # eval.json key, label, whether higher is better
    ("loss", "loss (answer tokens)", False), ("perplexity", "perplexity", False),
    ("token_f1", "token F1", True), ("rouge_l", "ROUGE-L", True), ("exact_match", "exact match", True))


def esc(value) -> str:
    return html.escape(str(value), quote=True)


def num(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if abs(value) >= 1e4:
            return f"{value:,.0f}"
        short = f"{value:.4g}"
        return f"{value:.6g}" if float(short) == round(value) != value else short  # 1.0004, not 1
    return esc(value)


# --- plots: matplotlib figures as inline SVG -----------------------------------------------------------

def svg(fig, name: str) -> str:
    """The figure as an <svg> element that scales with its column; ids salted with `name` so that
    several plots on one page never share an id, and no date, so the bytes depend on the data only."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": name, "svg.fonttype": "none"}):
        fig.savefig(buf, format="svg", metadata={"Date": None}, bbox_inches="tight")
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', rf'<svg\1 class="plot" role="img" aria-label="{esc(name)}"',
                  text, count=1)


def figure(width: float = 6.0, height: float = 3.0):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot()
    ax.grid(alpha=0.3)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def label(text: str) -> str:
    return str(text).replace("$", r"\$")  # matplotlib reads $...$ as math


def histogram_svg(lengths: dict[str, list[int]]) -> str:
    fig, ax = figure()
    low = min((min(v) for v in lengths.values() if v), default=0)
    top = max((max(v) for v in lengths.values() if v), default=1)
    width = math.ceil((top - low + 1) / 50)  # whole tokens a bin, at most 50 bins
    for name, values in lengths.items():
        ax.hist(values, bins=range(low, top + width + 1, width), histtype="stepfilled", alpha=0.45,
                label=f"{label(name)} ({len(values):,} rows)")
    ax.set_xlabel("tokens per row (prompt + answer + EOS)")
    ax.set_ylabel("rows")
    ax.legend(frameon=False)
    return svg(fig, "token lengths")


def curves_svg(loss: list[dict], eval_loss: list[dict]) -> tuple[str, str]:
    fig, ax = figure()
    steps = [r["step"] for r in loss if r.get("loss") is not None]
    ax.plot(steps, [r["loss"] for r in loss if r.get("loss") is not None], label="train loss", color="#0969da")
    if eval_loss:
        ax.plot([r["step"] for r in eval_loss], [r["eval_loss"] for r in eval_loss], "o-", label="eval loss",
                color="#bf3989")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(frameon=False)
    loss_svg = svg(fig, "loss")
    fig, ax = figure()
    rows = [r for r in loss if r.get("learning_rate") is not None]
    ax.plot([r["step"] for r in rows], [r["learning_rate"] for r in rows], color="#1a7f37")
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    return loss_svg, svg(fig, "learning rate")


# --- sections ------------------------------------------------------------------------------------------

def table(header: list[str], rows: list[list[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller)."""
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def data_section(splits: list[str], validate: list[dict], tokenize: list[dict], hist: str,
                 max_length: int | None) -> str:
    def row(name: str, values) -> list[str]:
        return [name, *(num(v) for v in values)]

    def reason_keys(reports: list[dict], prefix: str) -> list[str]:
        return sorted({k for r in reports for k in r if k.startswith(prefix) and isinstance(r[k], int)})

    rows = [row("lines read", [v.get("lines") for v in validate]),
            row("blank lines (skipped)", [v.get("blank") for v in validate])]
    quiet = []
    for key in reason_keys(validate, "rejected_"):
        counts = [v.get(key, 0) for v in validate]
        (rows.append(row(f"rejected: <code>{esc(key.removeprefix('rejected_'))}</code>", counts))
         if any(counts) else quiet.append(key.removeprefix("rejected_")))
    rows.append(row("<b>kept by validate</b>", [v.get("kept") for v in validate]))
    if any(v.get("trimmed_trailing_turns") for v in validate):
        rows.append(row("trailing turns trimmed", [v.get("trimmed_trailing_turns") for v in validate]))
    for key in reason_keys(tokenize, "dropped_"):
        rows.append(row(f"dropped by tokenize: <code>{esc(key.removeprefix('dropped_'))}</code>",
                        [t.get(key, 0) for t in tokenize]))
    rows += [row("prompt truncated (kept)", [t.get("truncated") for t in tokenize]),
             row("<b>rows out of tokenize</b>", [t.get("rows_out") for t in tokenize]),
             row("tokens (trained on)", [f"{num(t.get('tokens_total'))} ({num(t.get('tokens_trained'))})"
                                         for t in tokenize]),
             row("length p50 / p90 / p99 / max", [" / ".join(num(t.get(k)) for k in
                                                            ("length_p50", "length_p90", "length_p99", "length_max"))
                                                  for t in tokenize])]
    limit = "" if max_length is None else f"; <code>tokenize.max_length</code> {num(max_length)}"
    note = (f'<p class="note">No line rejected as {", ".join(f"<code>{esc(q)}</code>" for q in quiet)}.</p>'
            if quiet else "")
    return (f'<section id="data"><h2>Data: what happened to each line</h2><div class="cols">'
            f'<div>{table(["", *(esc(s) for s in splits)], rows, "num")}{note}</div>'
            f'<figure>{hist}<figcaption>Token length per row, each split{limit}.</figcaption></figure></div></section>')


def metrics_section(ev: dict) -> str:
    rows = []
    for key, name, higher in METRICS:
        b, t = ev.get(f"base_{key}"), ev.get(f"tuned_{key}")
        if b is None or t is None:
            continue
        delta = t - b
        better = delta > 0 if higher else delta < 0
        mark = "" if delta == 0 else ("better" if better else "worse")
        rel = f" ({delta / b:+.0%})" if b else ""
        rows.append([name, num(b), f"<b>{num(t)}</b>",
                     f'<span class="{mark}">{"+" if delta > 0 else ""}{num(delta)}{rel} {mark}</span>'])
    speed = (f'<p class="note">{num(ev.get("rows_loss"))} rows scored for loss, {num(ev.get("rows_generated"))} '
             f'answered greedily; generation {num(ev.get("base_generated_tokens_per_s"))} tokens/s (base), '
             f'{num(ev.get("tuned_generated_tokens_per_s"))} tokens/s (tuned).</p>')
    return (f'<section id="metrics"><h2>Base vs tuned (eval split)</h2>'
            f'{table(["metric", "base", "tuned", "change"], rows, "num metrics")}{speed}</section>')


def training_section(tm: dict, loss_svg: str, lr_svg: str, eval_rows: int) -> str:
    facts = [("steps", tm.get("steps")), ("epochs", tm.get("epochs")), ("tokens seen", tm.get("tokens_seen")),
             ("first → final loss", f"{num(tm.get('first_loss'))} → {num(tm.get('final_loss'))}"),
             ("tokens/s (steady)", tm.get("tokens_per_s_steady")),
             ("trainable parameters", tm.get("trainable_parameters")),
             ("processes", tm.get("world_size")), ("4-bit base", tm.get("quantized_4bit")),
             ("finished", str(tm.get("created", "—")).replace("T", " "))]
    dl = "".join(f"<div><dt>{esc(k)}</dt><dd>{v if isinstance(v, str) and '→' in v else num(v)}</dd></div>"
                 for k, v in facts)
    note = "" if eval_rows else " (no eval loss during training: <code>train.eval_steps</code> is 0)"
    return (f'<section id="training"><h2>Training</h2><dl class="facts">{dl}</dl><div class="cols">'
            f'<figure>{loss_svg}<figcaption>Loss by step{note}.</figcaption></figure>'
            f'<figure>{lr_svg}<figcaption>Learning rate by step.</figcaption></figure></div></section>')


def samples_section(samples: list[dict]) -> str:
    shown = samples[:SAMPLES_SHOWN]
    rows = [[f'<span title="row id {esc(s.get("id", ""))}">{i}</span>',
             *(f'<div class="text">{esc(s.get(k, ""))}</div>' for k in ("prompt", "reference", "base", "tuned"))]
            for i, s in enumerate(shown, 1)]
    return (f'<section id="samples"><h2>Eval answers, side by side</h2>'
            f'<p class="note">The first {len(shown)} of {len(samples)} eval questions (greedy decoding), as '
            f'the model saw them.</p>{table(["#", "prompt", "reference", "base", "tuned"], rows, "samples")}'
            f'</section>')


def generic(value) -> str:
    """A JSON value as HTML: an object of objects (or a list of objects) as a table, an object of
    scalars as key/value rows, anything deeper as escaped JSON."""
    def scalar(v) -> bool:
        return not isinstance(v, (dict, list))

    def cell(v) -> str:
        return num(v) if scalar(v) else f"<code>{esc(orjson.dumps(v).decode())}</code>"

    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        value = {str(i): v for i, v in enumerate(value, 1)}
    if isinstance(value, dict):
        scalars = {k: v for k, v in value.items() if scalar(v)}
        nested = {k: v for k, v in value.items() if isinstance(v, dict) and all(map(scalar, v.values()))}
        other = {k: v for k, v in value.items() if k not in scalars and k not in nested}
        out = table(["", ""], [[esc(k), cell(v)] for k, v in scalars.items()], "kv") if scalars else ""
        if nested:
            cols = list(dict.fromkeys(c for v in nested.values() for c in v))
            out += table(["", *(esc(c) for c in cols)],
                         [[esc(k), *(cell(v.get(c)) for c in cols)] for k, v in nested.items()], "num")
        for k, v in other.items():
            out += f"<h4>{esc(k)}</h4>{generic(v)}"
        return out
    return f"<code>{esc(orjson.dumps(value).decode())}</code>"


def parity_section(merge: dict, export: dict | None) -> str:
    ok = merge.get("max_abs_diff") is not None and merge.get("tolerance") is not None \
        and merge["max_abs_diff"] <= merge["tolerance"]
    verdict = f'<span class="{"better" if ok else "worse"}">{"within" if ok else "past"} tolerance</span>'
    rows = [["max |Δlogit|", f"{num(merge.get('max_abs_diff'))} (tolerance {num(merge.get('tolerance'))}): {verdict}"],
            ["mean |Δlogit|", num(merge.get("mean_abs_diff"))],
            ["top-1 agreement", f"{merge['top1_agreement']:.1%}" if isinstance(merge.get("top1_agreement"), float)
             else num(merge.get("top1_agreement"))],
            ["checked on", f"{num(merge.get('prompts'))} prompts, {num(merge.get('tokens'))} tokens"],
            ["saved as", num(merge.get("saved_dtype"))]]
    rows += [[esc(k), num(v) if not isinstance(v, (dict, list)) else esc(orjson.dumps(v).decode())]
             for k, v in merge.items() if k not in {"max_abs_diff", "mean_abs_diff", "top1_agreement", "prompts",
                                                    "tokens", "saved_dtype", "tolerance"}]
    merged = (f'<h3>Merge: merged model vs base + adapter</h3>{table(["", ""], rows, "kv")}')
    if export is None:
        exported = ('<h3>Export</h3><p class="missing" id="not-exported">Not exported: this report was built '
                    'without an export parity file (<code>--export-parity</code>), so no GGUF file of this run '
                    'has been checked.</p>')
    else:
        exported = f'<h3>Export: GGUF files in llama.cpp vs the merged model</h3><div id="export">{generic(export)}</div>'
    return f'<section id="parity"><h2>Parity</h2><div class="cols"><div>{merged}</div><div>{exported}</div></div></section>'


def lineage_section(record: dict) -> str:
    params = lin.flat(record.get("params", {}))
    rows = [[f"<code>{esc(k)}</code>", f"<code>{esc(orjson.dumps(v).decode())}</code>"] for k, v in params.items()]
    return (f'<section id="lineage"><h2>Lineage: what made this model</h2><pre>{esc(lin.describe(record))}</pre>'
            f'<details><summary>All {len(params)} params</summary>{table(["key", "value"], rows, "kv")}</details>'
            f'</section>')


CSS = """
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:#1f2328;background:#f6f8fa}
main{max-width:1320px;margin:0 auto;padding:16px 20px 40px}
header h1{font-size:22px;margin:4px 0}
header p{margin:2px 0;color:#57606a}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:12px 16px;margin:14px 0}
h2{font-size:17px;margin:2px 0 10px}
h3{font-size:15px;margin:8px 0 6px}
h4{font-size:13px;margin:8px 0 4px}
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:10px;margin-top:12px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 14px}
.card .v{font-size:22px;font-weight:600}
.card .k,.card .s{color:#57606a;font-size:12.5px}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(480px,1fr));gap:16px;align-items:start}
figure{margin:0}
figcaption,.note{color:#57606a;font-size:12.5px}
svg.plot{width:100%;height:auto;display:block}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{border-bottom:1px solid #eaeef2;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f6f8fa;font-weight:600}
table.num td:not(:first-child),table.num th:not(:first-child){text-align:right;font-variant-numeric:tabular-nums}
table.kv td:first-child{width:30%;color:#57606a}
table.kv thead{display:none}
table.samples{table-layout:fixed}
table.samples th:first-child{width:36px}
table.metrics{max-width:760px}
table.samples .text{white-space:pre-wrap;overflow-wrap:anywhere;max-height:16em;overflow:auto}
table.samples tbody tr:nth-child(even){background:#fbfcfd}
code,pre{font:12px/1.4 ui-monospace,"DejaVu Sans Mono",monospace;overflow-wrap:anywhere}
pre{white-space:pre-wrap;background:#f6f8fa;padding:8px;border-radius:6px;margin:0 0 8px}
.better{color:#1a7f37;font-weight:600}.worse{color:#cf222e;font-weight:600}
.missing{background:#fff8c5;border:1px solid #d4a72c;border-radius:6px;padding:8px}
dl.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(150px,1fr));gap:4px 16px;margin:0 0 10px}
dl.facts dt{color:#57606a;font-size:12px}dl.facts div{min-width:0}dl.facts dd{margin:0;font-weight:600}
details summary{cursor:pointer;color:#0969da;margin:4px 0}
"""


def cards(ev: dict, tm: dict, validate: list[dict], tokenize: list[dict], merge: dict, export: dict | None) -> str:
    def card(key: str, value: str, sub: str) -> str:
        return f'<div class="card"><div class="k">{key}</div><div class="v">{value}</div><div class="s">{sub}</div></div>'

    out = [card(name, num(ev.get(f"tuned_{key}")), f"tuned; base {num(ev.get(f'base_{key}'))}")
           for key, name, _ in METRICS[1:4] if ev.get(f"tuned_{key}") is not None]
    if validate and tokenize:
        out.append(card("rows trained", num(tokenize[0].get("rows_out")),
                        f"of {num(validate[0].get('lines'))} lines; {num(validate[0].get('rejected'))} rejected"))
    out.append(card("steps", num(tm.get("steps")), f"loss {num(tm.get('first_loss'))} → {num(tm.get('final_loss'))}"))
    if isinstance(merge.get("top1_agreement"), float):
        out.append(card("merge parity", f"{merge['top1_agreement']:.1%}", f"top-1 agreement; max |Δlogit| "
                                                                         f"{num(merge.get('max_abs_diff'))}"))
    out.append(card("export", "checked" if export is not None else "—",
                    "GGUF parity in llama.cpp" if export is not None else "not exported"))
    return f'<div class="cards">{"".join(out)}</div>'


def render(splits: list[str], validate: list[dict], tokenize: list[dict], lengths: dict[str, list[int]],
           loss: list[dict], eval_loss: list[dict], train_metrics: dict, eval_metrics: dict, samples: list[dict],
           merge_parity: dict, export_parity: dict | None, record: dict) -> str:
    """The page, from the inputs as read (no file I/O here)."""
    max_length = record.get("params", {}).get("tokenize", {}).get("max_length")
    loss_svg, lr_svg = curves_svg(loss, eval_loss)
    base, git = record.get("base", {}), record.get("git", {})
    title = f"finetune run: {base.get('source', '?')}"
    head = (f'<header><h1>{esc(title)}</h1><p>finished {esc(train_metrics.get("created", "?"))} · code commit '
            f'<code>{esc((git.get("commit") or "none")[:12])}</code>{" (uncommitted changes)" if git.get("dirty") else ""}'
            f' · experiment {esc(record.get("dvc_experiment") or "none")}</p>'
            f'{cards(eval_metrics, train_metrics, validate, tokenize, merge_parity, export_parity)}</header>')
    body = "".join([head, metrics_section(eval_metrics), data_section(splits, validate, tokenize,
                                                                      histogram_svg(lengths), max_length),
                    training_section(train_metrics, loss_svg, lr_svg, len(eval_loss)), samples_section(samples),
                    parity_section(merge_parity, export_parity), lineage_section(record)])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="generator" content="finetune report">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<title>{esc(title)}</title><style>{CSS}</style></head><body><main>{body}</main></body></html>\n')


# --- headless Chromium, over the DevTools protocol on a pipe --------------------------------------------

def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    raise StageError("--screenshot: no chromium on PATH; install it (Debian: `apt-get install chromium`) or "
                     "leave out --screenshot")


def browse(page: Path, png: Path | None = None, expressions: dict[str, str] | None = None,
           timeout: float = 60.0) -> dict:
    """Open `page` in headless Chromium at WIDTH x HEIGHT, as a person would, and return what it saw:
    `problems` (console errors and warnings, uncaught exceptions, log errors such as a failed load),
    `requests` (every URL it fetched), `width` (the page's scroll width) and each JavaScript expression
    of `expressions` evaluated after load. With `png`, saves a screenshot of the whole page."""
    rfd, chrome_w = os.pipe()  # Chromium writes on its fd 4
    chrome_r, wfd = os.pipe()  # and reads on its fd 3

    def fds() -> None:  # in the child: the pipes at fds 3 and 4, by way of fds >= 10 (no clobbering)
        r, w = fcntl.fcntl(chrome_r, fcntl.F_DUPFD, 10), fcntl.fcntl(chrome_w, fcntl.F_DUPFD, 10)
        os.dup2(r, 3, inheritable=True)
        os.dup2(w, 4, inheritable=True)

    with tempfile.TemporaryDirectory(prefix="finetune-chromium-") as profile:
        proc = subprocess.Popen(
            [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--hide-scrollbars",
             f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            preexec_fn=fds, close_fds=False, start_new_session=True,
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(chrome_r)
        os.close(chrome_w)
        deadline = time.monotonic() + timeout
        buf, events, ids = b"", [], iter(range(1, 1 << 30))

        def receive() -> dict:
            nonlocal buf
            while b"\0" not in buf:
                if not select.select([rfd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise StageError(f"{page}: chromium did not answer within {timeout:.0f} s")
                chunk = os.read(rfd, 1 << 20)
                if not chunk:
                    raise StageError(f"{page}: chromium exited (rc {proc.poll()}) before the page was shown")
                buf += chunk
            message, buf = buf.split(b"\0", 1)
            return orjson.loads(message)

        def call(method: str, params: dict | None = None, session: str | None = None) -> dict:
            i = next(ids)
            message = {"id": i, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
            try:
                os.write(wfd, orjson.dumps(message) + b"\0")
            except BrokenPipeError:
                raise StageError(f"{page}: chromium exited (rc {proc.poll()}) before the page was shown") from None
            while (m := receive()).get("id") != i:
                events.append(m)
            if "error" in m:
                raise StageError(f"{page}: chromium refused {method}: {m['error'].get('message')}")
            return m["result"]

        try:
            target = call("Target.createTarget", {"url": "about:blank"})["targetId"]
            s = call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Runtime", "Log", "Page", "Network"):
                call(f"{domain}.enable", session=s)
            call("Emulation.setDeviceMetricsOverride", {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1,
                                                        "mobile": False}, s)
            call("Page.navigate", {"url": page.resolve().as_uri()}, s)
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                events.append(receive())
            result = {name: call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, s)["result"].get("value")
                      for name, expr in (expressions or {}).items()}
            result["width"] = call("Runtime.evaluate", {"expression": "document.documentElement.scrollWidth",
                                                        "returnByValue": True}, s)["result"]["value"]
            if png is not None:
                size = call("Page.getLayoutMetrics", session=s)["cssContentSize"]
                shot = call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True, "clip": {
                    "x": 0, "y": 0, "width": WIDTH, "height": math.ceil(size["height"]), "scale": 1}}, s)
                png.write_bytes(base64.b64decode(shot["data"]))
            call("Browser.close")
        finally:
            os.close(wfd)
            os.close(rfd)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    problems, requests = [], []
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            problems.append(f"{d.get('text')} {d.get('exception', {}).get('description', '')}".strip())
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{p['type']}: " + " ".join(str(a.get("value", a.get("description")))
                                                              for a in p.get("args", [])))
        elif method == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
            problems.append(f"{p['entry'].get('source')}: {p['entry'].get('text')} {p['entry'].get('url', '')}".strip())
        elif method == "Network.requestWillBeSent":
            requests.append(p["request"]["url"])
    return {**result, "problems": problems, "requests": requests}


# --- the stage: read, render, write ---------------------------------------------------------------------

def read_json(path: Path) -> dict:
    if not path.is_file():
        raise StageError(f"{path}: missing (run the upstream stages: `dvc repro`)")
    try:
        value = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as e:
        raise StageError(f"{path}: not JSON ({e}); re-run the stage that writes it (`dvc repro -f`)") from e
    if not isinstance(value, dict):
        raise StageError(f"{path}: holds a JSON {type(value).__name__}, not an object; re-run the stage that writes it")
    return value


def read_csv(path: Path) -> list[dict]:
    if not path.is_file():
        raise StageError(f"{path}: missing (run the upstream stages: `dvc repro`)")
    rows = []
    with open(path, newline="") as f:
        for line, r in enumerate(csv.DictReader(f), 2):
            try:
                rows.append({k: float(v) if v not in ("", None) else None for k, v in r.items() if k})
            except ValueError as e:
                raise StageError(f"{path}:{line}: not a number ({e}); re-run train (`dvc repro -f train`)") from e
    return rows


def run(validate: list[Path], tokenize: list[Path], tokenized: list[Path], loss: Path, eval_loss: Path,
        train_metrics: Path, eval_metrics: Path, samples: Path, merge_parity: Path, lineage: Path,
        export_parity: Path | None, output: Path, screenshot: Path | None = None) -> dict | None:
    """Read every input, render the page, write it (and the screenshot) atomically. Returns what the
    browser saw with --screenshot."""
    if not len(validate) == len(tokenize) == len(tokenized):
        raise StageError(f"--validate, --tokenize and --tokenized: one of each per split, in the same order; "
                         f"got {len(validate)}, {len(tokenize)} and {len(tokenized)}")
    splits = [p.name for p in tokenized]
    if not samples.is_file():
        raise StageError(f"{samples}: missing (run the upstream stages: `dvc repro`)")
    try:
        sample_rows = list(read_jsonl(samples))
    except orjson.JSONDecodeError as e:
        raise StageError(f"{samples}: not JSONL ({e}); re-run evaluate (`dvc repro -f evaluate`)") from e
    if not all(isinstance(r, dict) for r in sample_rows):
        raise StageError(f"{samples}: a row that is not a JSON object; re-run evaluate (`dvc repro -f evaluate`)")
    page = render(
        splits, [read_json(p) for p in validate], [read_json(p) for p in tokenize],
        {s: tokens.tokenized_lengths(p) for s, p in zip(splits, tokenized)}, read_csv(loss), read_csv(eval_loss),
        read_json(train_metrics), read_json(eval_metrics), sample_rows, read_json(merge_parity),
        read_json(export_parity) if export_parity is not None else None, read_json(lineage))
    seen = None
    with staged(output, screenshot) as (html_tmp, png_tmp):
        html_tmp.write_text(page, encoding="utf-8")
        if png_tmp is not None:
            seen = browse(html_tmp, png_tmp)
            foreign = [u for u in seen["requests"] if u != html_tmp.resolve().as_uri()]
            if seen["problems"] or foreign:
                raise StageError(f"{output}: in Chromium the page " + (
                    f"reported: {seen['problems'][0]}" if seen["problems"] else f"requested {foreign[0]}")
                    + "; nothing written (a bug of the report: please file it)")
    return seen
