"""The HTML report: tables, embedded figures and provenance, rendered in headless Chromium."""

import re
import shutil
import subprocess

import pytest

from mechme.engine.scan import scan
from mechme.engine.study import run_study
from mechme.models.tiny import Plant, tiny_model
from mechme.plots.report import write_report
from mechme.specs import Condition, Intervention, Study, Zero

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    scan_run = scan(model=model, out=out, progress=False)
    study = Study(name="r", model="tiny", conditions=[
        Condition(name="zero", interventions=[Intervention(site="mlp_out", layers=2, op=Zero())])])
    study_run = run_study(study, model=model, out=out, progress=False)
    return write_report([scan_run.store, study_run.store], out / "report.html"), model


def test_report_has_tables_and_provenance(report):
    path, model = report
    page = path.read_text()
    assert page.count("<img class='figure'") == 2
    assert "data:image/png;base64," in page
    assert model.weights_sha256 in page
    assert "ME Layer 2" in page
    assert ">zero<" in page
    assert ">baseline<" in page
    assert "nnsight" in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_figures_render_in_chromium(report, tmp_path):
    path, _ = report
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
         "--virtual-time-budget=5000", "--dump-dom", path.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    match = re.search(r'data-figures="(\d+)/(\d+)"', proc.stdout)
    assert match, "the page's load script did not run"
    rendered, total = map(int, match.groups())
    assert total == 2
    assert rendered == total
