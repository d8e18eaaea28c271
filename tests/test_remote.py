"""NDIF failure paths against a mock service on 127.0.0.1; no real host is ever contacted."""

import time

import pytest
import torch

from mechme.engine.scan import scan
from mechme.errors import RemoteError
from mechme.models.tiny import tiny_model
from tests.ndif_mock import MockNDIF, free_port


def ndif_tiny(host: str, idle_timeout: float = 2.0):
    model = tiny_model("llama")
    model.remote = "ndif"
    model.repo_id = "mock-org/tiny"
    model.remote_options = {"host": host, "api_key": "test-key", "connect_timeout": 2.0, "idle_timeout": idle_timeout}
    return model


def run_one_trace(model):
    ids = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad(), model.lm.trace({"input_ids": ids, "attention_mask": torch.ones_like(ids)},
                                         **model.trace_kwargs()):
        model.lm.output.logits.save()


def test_refused_request():
    with MockNDIF("refuse") as mock:
        start = time.monotonic()
        with pytest.raises(RemoteError, match="NDIF rejected the request: Invalid API key"):
            run_one_trace(ndif_tiny(mock.host))
        assert time.monotonic() - start < 15
        assert mock.requests == 1


def test_unhosted_model():
    with MockNDIF("unhosted") as mock:
        with pytest.raises(RemoteError, match="not deployed; run nnsight.ndif_status"):
            run_one_trace(ndif_tiny(mock.host))


def test_host_that_stops_answering():
    with MockNDIF("silent") as mock:
        start = time.monotonic()
        with pytest.raises(RemoteError, match="stopped responding: no message for 2 s"):
            run_one_trace(ndif_tiny(mock.host, idle_timeout=2.0))
        assert time.monotonic() - start < 15


def test_unreachable_host():
    start = time.monotonic()
    with pytest.raises(RemoteError, match="cannot reach the NDIF host http://127.0.0.1"):
        run_one_trace(ndif_tiny(f"http://127.0.0.1:{free_port()}"))
    assert time.monotonic() - start < 15


def test_scan_surfaces_remote_error_and_writes_nothing(tmp_path):
    with MockNDIF("refuse") as mock:
        with pytest.raises(RemoteError):
            scan(model=ndif_tiny(mock.host), out=tmp_path, progress=False)
    assert not list(tmp_path.glob("*.h5"))


def test_ndif_study_runs_through_local_simulation(tmp_path):
    from mechme.findings import load_analysis

    from pathlib import Path

    analysis = load_analysis(Path(__file__).resolve().parents[1] / "analyses" / "ndif_llama8b_emergence.py")
    finding = analysis(tmp_path, remote="local")
    assert "ME Layer 11" in finding.measured
    assert finding.stores and finding.stores[0].exists()
