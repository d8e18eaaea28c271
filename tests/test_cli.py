"""The command line, run as a user runs it, on a tiny model saved to a folder."""

import json
import subprocess
import sys

import pytest



def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "mechme.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def test_scan_json_keys(planted_folder, tmp_path):
    proc = run_cli("scan", "--model", str(planted_folder), "--out", str(tmp_path), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for key in ("model", "me_layer", "massive_dims", "massive_tokens", "branch", "layers", "store", "figure"):
        assert key in data
    assert data["me_layer"] == 2
    assert data["massive_dims"][0] == 17
    assert data["branch"] == "mlp"
    assert set(data["layers"][0]) >= {"layer", "top1", "median", "ratio", "massive_count"}
    assert data["massive_tokens"][0]["position"] == 0


def test_scan_table_and_verdict(planted_folder, tmp_path):
    proc = run_cli("scan", "--model", str(planted_folder), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "<- ME Layer" in proc.stdout
    assert "ME Layer 2" in proc.stdout
    assert "run file:" in proc.stdout


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model", "/no/such/dir"], "model '/no/such/dir' not found"),
        (["--max-tokens", "0"], "max_tokens must be at least 1, got 0"),
        (["--abs-threshold", "-1"], "abs_threshold must be positive"),
        (["--prompts", "nope"], "unknown prompt set 'nope'"),
    ],
)
def test_scan_bad_input_exit_code(args, message, tmp_path, planted_folder):
    if "--model" not in args:
        args = ["--model", str(planted_folder), *args]
    proc = run_cli("scan", *args, "--out", str(tmp_path / "runs"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert not list((tmp_path / "runs").glob("*.h5")) if (tmp_path / "runs").exists() else True


def test_run_missing_study_file(tmp_path):
    proc = run_cli("run", str(tmp_path / "no_such_study.py"))
    assert proc.returncode == 2
    assert "no_such_study.py' not found" in proc.stderr
    assert "Traceback" not in proc.stderr
