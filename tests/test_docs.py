"""The docs against the code: generated key tables, CLI examples, and the files results point to.

- docs/config.md's tables equal a fresh rendering from the config dataclasses
  (regenerate with ``python bench/make_config_docs.py``);
- every ``weightsmith`` command in a fenced bash block of README.md and docs/ parses with the real CLI
  parser, and every ``runs/...`` or ``exports/...`` directory an example reads was written by an earlier
  example (README first, then docs/serving.md), so the examples run in order after command 1;
- every ``bench/results/`` file the docs name exists or is written by the bench script of that name.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import shlex
from pathlib import Path
from typing import Literal

import pytest

from weightsmith.errors import WeightsmithError

ROOT = Path(__file__).resolve().parents[1]
DOCS_IN_ORDER = [ROOT / "README.md", ROOT / "docs" / "serving.md", ROOT / "docs" / "results.md",
                 ROOT / "docs" / "config.md"]


def _load_config_docs():
    spec = importlib.util.spec_from_file_location("make_config_docs", ROOT / "bench" / "make_config_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------------
# docs/config.md


def test_config_doc_matches_the_dataclasses():
    mcd = _load_config_docs()
    committed = mcd.generated_part(mcd.DOC.read_text())
    assert committed == mcd.render(), (
        f"docs/config.md is stale (a config field, task or family changed); run `{mcd.COMMAND}`")


def test_config_doc_has_a_row_for_every_train_field():
    from weightsmith.train.config import SampleConfig, TrainConfig

    text = _load_config_docs().render()
    for cls in (TrainConfig, SampleConfig):
        for f in dataclasses.fields(cls):
            assert f"| `{f.name}` |" in text, f.name


@dataclasses.dataclass(kw_only=True)
class _Toy:
    """A toy config. ``d_head`` is derived.

    ``n_kv_heads=None`` means ``n_heads``; ``mode="b"`` switches to b, ``width`` and ``depth`` are sizes.

    corpus: a path
        continued here.
    """

    corpus: str = "x"
    n_heads: int = 3
    n_kv_heads: int | None = None
    mode: Literal["a", "b"] = "a"
    width: int = 5
    depth: int = 7
    doc_in_field: float = dataclasses.field(default=0.5, metadata={"doc": "from the metadata"})
    d_head: int = dataclasses.field(init=False, default=0)


def test_descriptions_come_from_the_docstring_and_metadata():
    mcd = _load_config_docs()
    summary, docs = mcd.docstring_parts(_Toy)
    assert summary == "A toy config."
    assert docs["corpus"] == "a path continued here."
    assert docs["n_kv_heads"].startswith("``n_kv_heads=None`` means")
    assert docs["n_heads"] == ""  # mentioned, but not the subject of any clause
    assert docs["mode"] == docs["width"] == docs["depth"]  # one sentence, three subjects
    assert docs["doc_in_field"] == "from the metadata"
    assert docs["d_head"] == "``d_head`` is derived."
    lines = mcd.table(_Toy)
    assert '| `mode` | "a" / "b" | `"a"` |' in "\n".join(lines)
    assert '| `n_kv_heads` | int \\| None | unset |' in "\n".join(lines)
    assert lines[-2].startswith("Derived, not settable") and "`d_head`" in lines[-2]


# ------------------------------------------------------------------------------------------------
# commands in the README and docs


def _bash_commands(path: Path) -> list[list[str]]:
    """Each command (split on ``&&``, ``;``, ``|``) of the fenced bash blocks of ``path``, as argv."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            tokens = shlex.split(line, comments=True)
            current: list[str] = []
            for tok in tokens + ["&&"]:
                if tok in ("&&", ";", "|", "||"):
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(tok)
    return commands


def _weightsmith_argv(argv: list[str]) -> list[str] | None:
    for i, tok in enumerate(argv):
        if tok == "weightsmith" or tok.endswith("/weightsmith"):
            return argv[i + 1:]
    return None


def _doc_commands() -> list[tuple[str, list[str]]]:
    return [(p.name, argv) for p in DOCS_IN_ORDER for argv in _bash_commands(p)]


def test_doc_weightsmith_commands_parse_with_the_cli(capsys):
    from weightsmith import cli

    built = cli.build_parser()
    parser = built[0] if isinstance(built, tuple) else built
    checked = 0
    for where, argv in _doc_commands():
        args = _weightsmith_argv(argv)
        if args is None:
            continue
        try:
            _, extra = parser.parse_known_args(args)
        except (SystemExit, WeightsmithError) as e:
            pytest.fail(f"{where}: `weightsmith {' '.join(args)}` does not parse: {e} {capsys.readouterr().err}")
        bad = [a for a in extra if not re.fullmatch(r"--\w+\.\w+=.*", a)]
        assert not bad, f"{where}: `weightsmith {' '.join(args)}`: unknown arguments {bad}"
        checked += 1
    assert checked >= 8


def test_doc_examples_only_read_directories_earlier_examples_wrote():
    """README command 1 writes runs/shakespeare; everything after reads only what was written before it."""
    written: set[str] = set()
    for where, argv in _doc_commands():
        args = _weightsmith_argv(argv) or []
        outs = {args[args.index("--out") + 1].rstrip("/")} if "--out" in args else set()
        reads = {m.group(1) for tok in argv for m in [re.match(r"(?:\$PWD/)?((?:runs|exports)/[\w.-]+)", tok)] if m}
        for path in reads - outs:
            assert path in written, f"{where}: `{' '.join(argv)}` reads {path}, which no earlier example writes"
        for path in outs:  # a second write to the same --out fails: runs and exports are never overwritten
            assert path not in written, f"{where}: `{' '.join(argv)}` writes {path}, which an earlier example wrote"
        written |= outs
    assert "runs/shakespeare" in written
    # the Python snippets of docs/serving.md read the exports the README writes
    code = "".join(re.findall(r"```\w*\n(.*?)```", (ROOT / "docs" / "serving.md").read_text(), re.S))
    for path in set(re.findall(r"exports/[\w-]+", code)):
        assert path in written, f"serving.md's code uses {path}, which no example writes"


def test_results_files_named_in_the_docs_exist_or_have_a_bench_script():
    for path in DOCS_IN_ORDER:
        for name in set(re.findall(r"bench/results/([\w.-]+\.(?:json|md))", path.read_text())):
            stem = re.split(r"[.-]", name)[0]
            ok = (ROOT / "bench" / "results" / name).is_file() or (ROOT / "bench" / f"{stem}.py").is_file()
            assert ok, f"{path.name} names bench/results/{name}: no such file and no bench/{stem}.py writes it"
