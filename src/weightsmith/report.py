"""Run reports: ``weightsmith report RUN`` and ``weightsmith compare RUN RUN ...``.

Everything is read from what a run directory already holds (``config.toml``, ``metrics.jsonl``,
``eval.json``, ``events.jsonl``, ``samples.txt``, ``mfu.json`` and the task's images: ``confusion.png``
for classifiers, ``samples.png`` for generators, ``recall.png`` for recall); nothing is recomputed.
The output directory gets:

- ``index.html``: one self-contained page (the PNGs inlined as ``data:`` URIs; no script, no network);
- ``report.md``: the same tables as Markdown, linking the PNGs beside it;
- the PNG plots (matplotlib, Agg): ``loss.png`` (train loss and the validation losses against the
  optimizer step, eval.json's whole-split ``val_loss`` as a star at the last step, skip and rewind
  events as vertical lines), ``val.png`` (other validation
  metrics, e.g. ``val_acc``), ``lr.png``, ``grad_norm.png`` (``grad_norm_total``, before clipping) and
  ``throughput.png`` (the task's units per second: ``tok_per_s``, ``img_per_s``).

``compare`` overlays the runs' curves (one line per run) and tabulates each run's final numbers
(last step, last train loss, wall seconds, every number of eval.json) and the config fields whose
values differ between the runs (a field missing from a run counts as different).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from weightsmith.errors import CheckpointError

PLOTS = ("loss", "val", "lr", "grad_norm", "throughput")
TASK_IMAGES = {"confusion.png": "confusion matrix (test split)", "samples.png": "samples",
               "recall.png": "recall accuracy"}
_COUNT_SUFFIXES = ("_tokens", "_images", "_bytes", "_examples")  # sizes of the eval split, not metrics


@dataclass
class RunRecord:
    """What a report shows of one run directory; ``train`` and ``val`` are metrics.jsonl rows."""

    path: Path
    config: dict[str, Any]
    train: list[dict[str, Any]] = field(default_factory=list)
    val: list[dict[str, Any]] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    samples: str | None = None
    mfu: dict[str, Any] | None = None
    images: dict[str, Path] = field(default_factory=dict)
    label: str = ""  # how plots and tables name the run (default: the directory's name)

    @property
    def name(self) -> str:
        return self.label or self.path.name

    @property
    def rate_key(self) -> str | None:
        keys = [k for r in self.train for k in r if k.endswith("_per_s")]
        return keys[0] if keys else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (none if it is missing); a torn last line is dropped."""
    if not path.is_file():
        return []
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise CheckpointError(f"{path} line {i + 1} is not valid JSON; fix or delete that line") from None
    return rows


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path} is not valid JSON") from None


def load_run_record(run_dir: str | Path) -> RunRecord:
    """Read a run directory written by ``weightsmith train``.

    Raises:
        CheckpointError: ``run_dir`` is not a run directory (no ``config.toml``), or one of its JSON
            files is corrupt (one line naming the file).
    """
    from weightsmith.config import load_toml

    path = Path(run_dir)
    if not (path / "config.toml").is_file():
        what = "does not exist" if not path.exists() else "is not a run directory (no config.toml)"
        raise CheckpointError(f"{path} {what}; report and compare take run directories written by "
                              "`weightsmith train`")
    rows = _read_jsonl(path / "metrics.jsonl")
    rec = RunRecord(path=path, config=load_toml(path / "config.toml"),
                    train=[r for r in rows if "lr" in r], val=[r for r in rows if "lr" not in r],
                    eval=_read_json(path / "eval.json"), events=_read_jsonl(path / "events.jsonl"),
                    mfu=_read_json(path / "mfu.json"))
    if (path / "samples.txt").is_file():
        rec.samples = (path / "samples.txt").read_text()
    rec.images = {name: path / name for name in TASK_IMAGES if (path / name).is_file()}
    return rec


# ---- numbers and tables ----
def fmt(value: Any) -> str:
    """A table cell: floats to 6 significant digits, non-finite as nan/inf, containers as compact JSON."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    if isinstance(value, int | str):
        return str(value)
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"train.lr": 3e-4, ...}``; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def final_numbers(rec: RunRecord) -> dict[str, Any]:
    """One run's summary: last step, last train loss, wall seconds, throughput, eval.json's numbers."""
    out: dict[str, Any] = {}
    if rec.train:
        last = rec.train[-1]
        out.update({"step": last["step"], "loss": last["loss"], "elapsed_s": last.get("elapsed_s")})
    for k, v in flatten(rec.eval or {}).items():
        if isinstance(v, int | float) and not isinstance(v, bool):
            out[f"eval.{k}"] = v
    if rec.mfu and isinstance(rec.mfu.get("mfu"), float):
        out["mfu"] = rec.mfu["mfu"]
    return out


def config_diff(records: list[RunRecord]) -> dict[str, list[Any]]:
    """{dotted config field: [value per run]} for the fields whose values are not all equal (a field
    missing from a run is ``None`` there and counts as different)."""
    flat = [flatten(r.config) for r in records]
    keys = sorted(set().union(*flat))
    missing = object()
    diff = {}
    for k in keys:
        values = [f.get(k, missing) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diff[k] = [None if v is missing else v for v in values]
    return diff


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    cell = lambda v: fmt(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _html_table(table_id: str, header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>\n'


# ---- plots ----
def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def _val_keys(records: list[RunRecord]) -> tuple[list[str], list[str]]:
    """(validation loss keys, other validation metric keys), in first-seen order."""
    keys: list[str] = []
    for rec in records:
        for r in rec.val:
            keys += [k for k in r if k != "step" and k not in keys and isinstance(r[k], int | float)
                     and not k.endswith(_COUNT_SUFFIXES)]
    losses = [k for k in keys if "loss" in k]
    return losses, [k for k in keys if k not in losses]


def make_plots(records: list[RunRecord], out_dir: Path) -> dict[str, Path]:
    """Write the PNGs that have data; returns {plot name: path}. One line per run (and per metric)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    val_losses, val_other = _val_keys(records)
    label = (lambda rec, what: f"{rec.name} {what}") if len(records) > 1 else (lambda rec, what: what)
    specs = {
        "loss": ("loss", [("loss", "train", False)] + [(k, k, True) for k in val_losses]),
        "val": ("validation metric", [(k, k, True) for k in val_other]),
        "lr": ("learning rate", [("lr", "lr", False)]),
        "grad_norm": ("gradient L2 norm (before clipping)", [("grad_norm_total", "grad_norm_total", False)]),
        "throughput": ("units per second", [(None, "rate", False)]),
    }
    written: dict[str, Path] = {}
    for name, (ylabel, lines) in specs.items():
        fig, ax = plt.subplots(figsize=(7, 3.6), dpi=100)
        n = 0
        for i, rec in enumerate(records):
            color = f"C{i}" if len(records) > 1 else None
            for j, (key, what, is_val) in enumerate(lines):
                key = key or rec.rate_key
                if key is None:
                    continue
                xs, ys = _series(rec.val if is_val else rec.train, key)
                if not xs:
                    continue
                style = dict(marker="o", linestyle="--") if is_val else {}
                ax.plot(xs, ys, label=label(rec, key if name == "throughput" else what),
                        color=color or f"C{j}", **style)
                n += 1
            if name == "loss" and rec.train and isinstance((rec.eval or {}).get("val_loss"), int | float):
                ax.plot([rec.train[-1]["step"]], [rec.eval["val_loss"]], marker="*", markersize=11, linestyle="",
                        color=color or "C3", label=label(rec, "val_loss (eval.json, whole split)"))
                n += 1
            if name == "loss":
                for ev in rec.events:
                    if isinstance(ev.get("step"), int):
                        ax.axvline(ev["step"], color="red" if ev.get("event") == "rewind" else "orange",
                                   linestyle=":", linewidth=1)
        if n:
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(ylabel)
            ys = [y for line in ax.get_lines() for y in line.get_ydata()]
            if name in ("loss", "grad_norm") and min(ys) > 0 and max(ys) / min(ys) > 20:
                ax.set_yscale("log")  # a curve falling by orders of magnitude; else linear reads better
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            fig.tight_layout()
            written[name] = out_dir / f"{name}.png"
            fig.savefig(written[name])
        plt.close(fig)
    return written


# ---- pages ----
_CSS = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse;margin:1em 0;font-size:0.9em}"
        "td,th{border:1px solid #ccc;padding:2px 8px;text-align:left}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:1em;white-space:pre-wrap}")


class _Page:
    """Collects sections once and renders them both as self-contained HTML and as Markdown."""

    def __init__(self, title: str) -> None:
        self.title, self.html, self.md = title, [], [f"# {title}\n"]

    def heading(self, text: str) -> None:
        self.html.append(f"<h2>{html.escape(text)}</h2>\n")
        self.md.append(f"\n## {text}\n")

    def table(self, table_id: str, header: list[str], rows: list[list[Any]]) -> None:
        self.html.append(_html_table(table_id, header, rows))
        self.md.append(_md_table(header, rows))

    def image(self, path: Path, alt: str, md_ref: str) -> None:
        data = base64.b64encode(path.read_bytes()).decode()
        self.html.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">\n')
        self.md.append(f"![{alt}]({md_ref})\n")

    def text(self, text: str) -> None:
        self.html.append(f"<pre>{html.escape(text)}</pre>\n")
        self.md.append("```\n" + text.rstrip("\n") + "\n```\n")

    def write(self, out_dir: Path) -> Path:
        from weightsmith.fsio import atomic_write_text

        page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{_CSS}</style></head><body><h1>{html.escape(self.title)}</h1>\n"
                + "".join(self.html) + "</body></html>\n")
        atomic_write_text(out_dir / "index.html", page)
        atomic_write_text(out_dir / "report.md", "\n".join(self.md))
        return out_dir / "index.html"


def _plots_section(page: _Page, plots: dict[str, Path]) -> None:
    page.heading("Curves")
    for name, path in plots.items():
        page.image(path, name, path.name)


def _out_dir(out: str | Path | None, default: Path) -> Path:
    out_dir = Path(out) if out is not None else default
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"--out {out_dir} is a file; name a directory for the report")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """One run's report into ``out`` (default ``RUN/report/``); returns the path of ``index.html``.

    Raises:
        CheckpointError: ``run_dir`` is not a run directory, or ``out`` is a file.
    """
    rec = load_run_record(run_dir)
    out_dir = _out_dir(out, rec.path / "report")
    page = _Page(f"weightsmith run {rec.name}")
    page.table("summary", ["field", "value"], [[k, v] for k, v in final_numbers(rec).items()])
    _plots_section(page, make_plots([rec], out_dir))
    if rec.eval is not None:
        page.heading("Evaluation (eval.json)")
        page.table("eval", ["metric", "value"], list(flatten(rec.eval).items()))
    if rec.events:
        page.heading("Events (events.jsonl)")
        keys = list(dict.fromkeys(k for ev in rec.events for k in ev))
        page.table("events", keys, [[ev.get(k, "") for k in keys] for ev in rec.events])
    for name, path in rec.images.items():
        page.heading(TASK_IMAGES[name].capitalize())
        page.image(path, TASK_IMAGES[name], f"../{name}" if out is None else str(path.resolve()))
    if rec.samples is not None:
        page.heading("Sample (samples.txt)")
        page.text(rec.samples)
    if rec.mfu is not None:
        page.heading("MFU (mfu.json)")
        page.table("mfu", ["field", "value"], list(rec.mfu.items()))
    page.heading("Config (config.toml)")
    page.table("config", ["field", "value"], list(flatten(rec.config).items()))
    return page.write(out_dir)


def write_compare(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Overlaid curves, final numbers and config differences of several runs into ``out``; returns the
    path of ``index.html``.

    Raises:
        CheckpointError: fewer than two runs, a path that is not a run directory, or ``out`` is a file.
    """
    if len(run_dirs) < 2:
        raise CheckpointError(f"compare needs at least two run directories, got {len(run_dirs)}")
    records = [load_run_record(d) for d in run_dirs]
    if len({r.path.name for r in records}) < len(records):  # same name in different folders: the paths given
        for r, d in zip(records, run_dirs):
            r.label = str(d)
    out_dir = _out_dir(out, Path(out))
    page = _Page("weightsmith compare: " + ", ".join(r.name for r in records))
    finals = [final_numbers(r) for r in records]
    keys = list(dict.fromkeys(k for f in finals for k in f))
    header = ["metric"] + [r.name for r in records]
    page.heading("Final numbers")
    page.table("final", header, [[k] + [f.get(k, "") for f in finals] for k in keys])
    diff = config_diff(records)
    page.heading("Config differences")
    page.table("config-diff", ["field"] + header[1:], [[k] + v for k, v in diff.items()])
    _plots_section(page, make_plots(records, out_dir))
    return page.write(out_dir)
