"""The findings page: analyses run from the command line, and one rerun keeps the others."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mechme.findings import Finding, write_findings

ANALYSIS = '''
import os
from pathlib import Path

from mechme.engine.scan import ScanSpec, scan
from mechme.findings import Finding

def analysis(out, remote=None):
    result = scan(ScanSpec(model=os.environ["PLANTED_MODEL"], prompts="sentences", max_tokens=64, seq_len=32),
                  out=out, progress=False)
    layer = result.verdict["me_layer"]
    return Finding(title="{title}", claim="The planted value appears at layer {expected}.",
                   measured=f"ME Layer {{layer}}.", verdict="holds" if layer == {expected} else "does not hold",
                   reason="The scan finds the planted layer." if layer == {expected} else "It does not.",
                   figures=[result.figure], stores=[result.store])
'''


def test_findings_command_runs_analyses_and_updates_one(tmp_path, planted_folder):
    for name, title, expected in (("a_first.py", "First", 2), ("b_second.py", "Second", 3)):
        (tmp_path / name).write_text(textwrap.dedent(ANALYSIS.format(title=title, expected=expected)))
    page = tmp_path / "docs" / "findings.md"
    page.parent.mkdir()

    def findings(*files):
        env = {**os.environ, "PLANTED_MODEL": str(planted_folder), "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "mechme.cli", "findings", *files, "--out", str(page),
                               "--runs", str(tmp_path / "docs" / "runs")],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return page.read_text()

    text = findings("a_first.py", "b_second.py")
    assert "| First | holds |" in text
    assert "| Second | does not hold |" in text
    assert text.count("**Measured.** ME Layer 2.") == 2
    figure = text.split("](", 1)[1].split(")", 1)[0]
    assert figure.startswith("runs/scan-")
    assert (page.parent / figure).is_file()

    # Rerunning one analysis rewrites its section and keeps the other's.
    (tmp_path / "b_second.py").write_text(textwrap.dedent(ANALYSIS.format(title="Second", expected=2)))
    text = findings("b_second.py")
    assert "| First | holds |" in text
    assert "| Second | holds |" in text
    records = sorted(p.name for p in (page.parent / "findings-records").iterdir())
    assert records == ["a_first.json", "b_second.json"]
    assert json.loads((page.parent / "findings-records" / "a_first.json").read_text())["source"] == "a_first.py"


def test_findings_page_is_complete_or_untouched(tmp_path):
    page = tmp_path / "findings.md"
    page.write_text("old page")
    good = Finding(title="t", claim="c", measured="m", verdict="holds", reason="r")
    bad = Finding(title="t", claim="c", measured="m", verdict="holds", reason="r")
    bad.figures = [object()]  # not a path: the record cannot be written
    with pytest.raises(TypeError):
        write_findings([(tmp_path / "a.py", good), (tmp_path / "b.py", bad)], page)
    assert page.read_text() == "old page"
    assert not list((tmp_path / "findings-records").glob("*.json"))
