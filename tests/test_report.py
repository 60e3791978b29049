"""weightsmith report / compare: the tables hold eval.json's and metrics.jsonl's numbers, the plots are
real PNGs inlined in a self-contained page, compare lists exactly the differing config fields, and bad
input is one line (exit 2). The headless-Chromium check is in the slow tier."""

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from io import BytesIO

import pytest
from PIL import Image
from test_cli import one_line
from test_tasks_classification import _tree, folder  # noqa: F401  (folder is a fixture)
from test_trainer import _recipe

from weightsmith.cli import main
from weightsmith.recipe import recipe_from_tree
from weightsmith.report import config_diff, load_run_record, write_compare, write_report
from weightsmith.train.loop import _read_metrics, run_training, train

QUIET = lambda *a: None  # noqa: E731


class _Tables(HTMLParser):
    """{table id: [[cell text, ...] per body row]} and the img srcs of a page."""

    def __init__(self):
        super().__init__()
        self.tables, self.imgs, self._id, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self._id = a.get("id")
            self.tables[self._id] = []
        elif tag == "tr" and self._id is not None:
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.imgs.append(a["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._row:
            self.tables[self._id].append(self._row)
            self._row = None
        elif tag == "table":
            self._id = None


def _parse(path):
    p = _Tables()
    p.feed(path.read_text())
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_corpus):
    root = tmp_path_factory.mktemp("report")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTSMITH_CACHE", str(root / "cache"))
        recipe = _recipe(root, tiny_corpus, steps=12, ckpt_every=100)
        a = train(recipe, ["--train.eval_every=5"], out=root / "a", log=QUIET)
        b = train(recipe, ["--train.eval_every=5", "--train.lr=3e-3", "--train.warmup_steps=2"], out=root / "b",
                  log=QUIET)
    return a, b


def test_report_tables_equal_eval_json_and_metrics_and_the_plots_are_pngs(runs, tmp_path):
    run = runs[0]
    page = write_report(run, tmp_path / "rep")
    assert page == tmp_path / "rep" / "index.html"
    doc = _parse(page)
    ev = json.loads((run / "eval.json").read_text())
    table = dict(doc.tables["eval"])
    assert set(table) == set(ev)
    for k, v in ev.items():
        assert float(table[k]) == pytest.approx(v, rel=1e-5), k
    rows = [r for r in _read_metrics(run / "metrics.jsonl") if "lr" in r]
    summary = dict(doc.tables["summary"])
    assert int(summary["step"]) == rows[-1]["step"] == 12
    assert float(summary["loss"]) == pytest.approx(rows[-1]["loss"], rel=1e-5)
    assert float(summary["eval.val_bpb"]) == pytest.approx(ev["val_bpb"], rel=1e-5)
    config = dict(doc.tables["config"])
    assert config["train.max_steps"] == "12" and config["model.d_model"] == "32"
    for name in ("loss", "val", "lr", "grad_norm", "throughput"):  # val: none (LM quick eval has losses only)
        if name == "val":
            assert not (tmp_path / "rep" / "val.png").exists()
            continue
        img = Image.open(tmp_path / "rep" / f"{name}.png")
        assert img.format == "PNG" and img.size[0] > 200
    # self-contained: every image is inlined and decodes; the file refers to nothing outside itself
    pngs = [s for s in doc.imgs if s.startswith("data:image/png;base64,")]
    assert len(pngs) == len(doc.imgs) == 4
    for s in pngs:
        Image.open(BytesIO(base64.b64decode(s.split(",", 1)[1]))).verify()
    assert not re.search(r'(src|href)="(?!data:)', page.read_text())
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "![loss](loss.png)" in md and f"| val_bpb | {float(table['val_bpb']):.6g} |" in md
    assert "KING." in page.read_text()  # samples.txt (its prompt) is shown


def test_default_report_goes_into_the_run_and_the_cli_prints_its_path(runs, capsys):
    run = runs[1]
    assert main(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip() == f"report: {run / 'report' / 'index.html'}"
    assert (run / "report" / "loss.png").is_file()
    shutil.rmtree(run / "report")


def test_a_classifier_run_shows_its_confusion_matrix(runs, tmp_path):
    run = tmp_path / "clf"
    shutil.copytree(runs[0], run, ignore=shutil.ignore_patterns("checkpoints", "report"))
    Image.new("RGB", (31, 17), (200, 10, 10)).save(run / "confusion.png")  # stands in for the task's image
    doc = _parse(write_report(run))
    assert len(doc.imgs) == 5
    inlined = Image.open(BytesIO(base64.b64decode(doc.imgs[-1].split(",", 1)[1])))
    assert inlined.size == (31, 17) and inlined.getpixel((0, 0)) == (200, 10, 10)
    assert "<h2>Confusion matrix (test split)</h2>" in (run / "report" / "index.html").read_text()
    assert "![confusion matrix (test split)](../confusion.png)" in (run / "report" / "report.md").read_text()


def test_a_real_classifier_report_has_val_acc_curves_per_class_numbers_and_the_confusion_matrix(
        tmp_path, folder, cache_dir):  # noqa: F811
    run = run_training(recipe_from_tree(_tree(folder, max_steps=20, eval_every=5)), tmp_path / "clf",
                       log=lambda *a: None)
    doc = _parse(write_report(run))
    ev = json.loads((run / "eval.json").read_text())
    table = dict(doc.tables["eval"])
    for cls in ("hbars", "square", "vbars"):
        assert float(table[f"test_per_class_acc.{cls}"]) == pytest.approx(ev["test_per_class_acc"][cls], rel=1e-5)
    assert float(table["test_acc"]) == pytest.approx(ev["test_acc"], rel=1e-5)
    assert Image.open(run / "report" / "val.png").format == "PNG"  # val_acc, beside the val_loss curve
    assert Image.open(run / "report" / "throughput.png").format == "PNG"  # img_per_s
    confusion = (run / "confusion.png").read_bytes()
    assert f'src="data:image/png;base64,{base64.b64encode(confusion).decode()}"' in (run / "report" / "index.html"
                                                                                      ).read_text()
    assert len(doc.imgs) == 6  # loss, val, lr, grad_norm, throughput, confusion


def test_compare_tables_the_final_numbers_and_exactly_the_differing_config_fields(runs, tmp_path):
    a, b = runs
    page = write_compare([a, b], tmp_path / "cmp")
    doc = _parse(page)
    diff = {row[0]: row[1:] for row in doc.tables["config-diff"]}
    assert diff == {"train.lr": ["0.001", "0.003"], "train.warmup_steps": ["5", "2"]}
    final = {row[0]: row[1:] for row in doc.tables["final"]}
    for i, run in enumerate((a, b)):
        ev = json.loads((run / "eval.json").read_text())
        assert float(final["eval.val_bpb"][i]) == pytest.approx(ev["val_bpb"], rel=1e-5)
        last = [r for r in _read_metrics(run / "metrics.jsonl") if "lr" in r][-1]
        assert float(final["loss"][i]) == pytest.approx(last["loss"], rel=1e-5)
    assert final["eval.val_bpb"][0] != final["eval.val_bpb"][1]
    for name in ("loss", "lr", "grad_norm", "throughput"):
        assert Image.open(tmp_path / "cmp" / f"{name}.png").format == "PNG"


def test_config_diff_counts_a_missing_field_as_different(runs):
    a, b = (load_run_record(r) for r in runs)
    b.config["train"].pop("seed")
    b.config["model"]["d_model"] = 32  # equal values are not differences
    assert config_diff([a, b]) == {"train.lr": [0.001, 0.003], "train.seed": [1337, None],
                                   "train.warmup_steps": [5, 2]}


def test_bad_input_is_one_line(runs, tmp_path, capsys):
    one_line(capsys, "report", str(tmp_path), needles=(str(tmp_path), "not a run directory"))
    one_line(capsys, "report", str(tmp_path / "nope"), needles=("does not exist",))
    one_line(capsys, "compare", str(runs[0]), "--out", str(tmp_path / "c"), needles=("at least two",))
    one_line(capsys, "compare", str(runs[0]), str(tmp_path), "--out", str(tmp_path / "c"),
             needles=("not a run directory",))
    (tmp_path / "file").write_text("x")
    one_line(capsys, "report", str(runs[0]), "--out", str(tmp_path / "file"), needles=("is a file",))


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-headless-shell", "chromium-browser",
                                                "google-chrome"))), None)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (apt-get install chromium-headless-shell)")
def test_the_page_renders_in_headless_chromium_and_its_images_load(runs, tmp_path):
    page = write_report(runs[0], tmp_path / "rep")
    # a copy with a probe script: after load it writes how many images decoded with a non-zero size
    probe = ("<script>window.addEventListener('load',()=>{const i=[...document.images];"
             "document.body.setAttribute('data-probe',"
             "'loaded '+i.filter(x=>x.complete&&x.naturalWidth>0).length+' of '+i.length)})</script>")
    probed = tmp_path / "probe.html"
    probed.write_text(page.read_text().replace("</body>", probe + "</body>"))
    proc = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           "--dump-dom", probed.as_uri()], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'data-probe="loaded 4 of 4"' in proc.stdout, proc.stdout[-500:]
    assert "<h1>weightsmith run a</h1>" in proc.stdout
