"""The streaming scan on tiny models: detection, transparency, run files, resume, bad input."""

import json
import re

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from mechme.engine import scan as scan_module
from mechme.engine.scan import ScanSpec, scan
from mechme.engine.text import make_batches, pad_id
from mechme.errors import SpecError, StoreError, TextError
from mechme.measures import massive
from mechme.models.tiny import FAMILIES, Plant, tiny_model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layer,dim", [(1, 5), (3, 40)])
def test_planted_layer_and_dim_found(family, layer, dim):
    model = tiny_model(family, plant=Plant(layer=layer, dim=dim))
    result = scan(model=model, out=None, progress=False, batch_size=4)
    assert result.verdict["me_layer"] == layer
    assert result.verdict["massive_dims"][0] == dim
    assert result.verdict["branch"] == "mlp"


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_random_model_has_no_me_layer(family):
    result = scan(model=tiny_model(family), out=None, progress=False)
    assert result.verdict["me_layer"] is None
    assert "no massive activations" in result.verdict["text"]


def test_traced_logits_bit_identical(tiny_llama):
    import nnsight

    rows = [tiny_llama.tokenizer(t).input_ids for t in ["Hello there, friend.", "A b"]]
    batch = make_batches(rows, batch_size=2, pad=pad_id(tiny_llama.tokenizer))[0]
    with torch.no_grad():
        plain = tiny_llama.model(**batch.model_inputs()).logits
        with tiny_llama.lm.trace(batch.model_inputs()):
            states = nnsight.save([tiny_llama.envoy(i, "").output.abs().amax() for i in range(4)])
            traced = tiny_llama.lm.output.logits.save()
    assert len(states) == 4
    assert torch.equal(traced, plain)


def test_reduce_layer_matches_brute_force():
    torch.manual_seed(0)
    h = torch.randn(3, 7, 10)
    h[1, 2, 4] = 5000.0
    real = torch.ones(3, 7, dtype=torch.bool)
    real[2, :3] = False
    n_pad = [0, 0, 3]
    out = massive.reduce_layer(h, real, n_pad, abs_threshold=100.0, ratio_threshold=1000.0)
    for b in range(3):
        entries = h[b, n_pad[b]:].abs().reshape(-1)
        assert out["median"][b] == entries.median()
        assert abs(out["top_value"][b, 0]) == entries.max()
    assert out["massive_per_token"][1, 2] == 1
    assert int(out["massive_per_token"].sum()) == 1
    assert out["massive_per_dim"][4] == 1
    assert int(out["hist"].sum()) == int(real.sum()) * 10


def test_histogram_median_error_bound():
    values = np.random.default_rng(0).lognormal(0.0, 2.0, size=100_001)
    logs = np.log10(values)
    hist, _ = np.histogram(logs, bins=massive.N_BINS, range=(massive.LOG10_MIN, massive.LOG10_MAX))
    estimate = massive.histogram_median(hist)
    assert abs(estimate / np.median(values) - 1) <= 10 ** (1 / (2 * massive.BINS_PER_DECADE)) - 1 + 1e-9


def test_left_padding_positions_count_real_tokens(planted_llama):
    result = scan(model=planted_llama, out=None, progress=False, batch_size=16)
    ds = result.dataset
    lengths = ds.prompt_length.values
    assert len(set(lengths)) > 1, "prompts of one length would not exercise padding"
    for p, length in enumerate(lengths):
        assert ds.token.values[p, 0] == "<s>"
        assert ds.token_id.values[p, length:].tolist() == [-1] * (ds.sizes["position"] - length)


def test_run_file_roundtrip_and_provenance(planted_llama, tmp_path):
    result = scan(model=planted_llama, out=tmp_path, progress=False)
    assert result.store.exists() and result.figure.exists()
    ds = xr.open_dataset(result.store, engine="h5netcdf").load()
    xr.testing.assert_identical(ds, result.dataset)
    assert ds.top_value.dtype == np.float32
    assert set(ds.top_value.dims) == {"layer", "prompt", "rank"}
    with h5py.File(result.store) as fh:
        assert fh["massive_share"].shape == (4,)
        spec = json.loads(fh.attrs["mechme_spec"])
    assert spec["weights_sha256"] == planted_llama.weights_sha256
    assert ds.attrs["mechme_weights_sha256"] == planted_llama.weights_sha256
    assert json.loads(ds.attrs["mechme_versions"])["nnsight"].startswith("0.8")
    assert not list(tmp_path.glob(".scan-*.partial"))


def test_rerun_reuses_finished_file(planted_llama, tmp_path):
    first = scan(model=planted_llama, out=tmp_path, progress=False)
    second = scan(model=planted_llama, out=tmp_path, progress=False)
    assert second.reused and second.store == first.store
    assert second.verdict == first.verdict


def test_interrupted_scan_leaves_no_file_and_resumes(planted_llama, tmp_path, monkeypatch):
    real_trace = scan_module.trace_batch
    calls = []

    def flaky(model, batch, spec):
        calls.append(batch.index)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_trace(model, batch, spec)

    monkeypatch.setattr(scan_module, "trace_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        scan(model=planted_llama, out=tmp_path, progress=False, batch_size=4)
    assert not list(tmp_path.glob("scan-*.h5"))
    assert len(list(tmp_path.glob(".scan-*.partial/batch-*.npz"))) == 2

    calls.clear()
    monkeypatch.setattr(scan_module, "trace_batch", real_trace)
    resumed = scan(model=planted_llama, out=tmp_path, progress=False, batch_size=4)
    fresh = scan(model=planted_llama, out=None, progress=False, batch_size=4)
    assert resumed.verdict == fresh.verdict
    np.testing.assert_array_equal(resumed.dataset.top_value.values, fresh.dataset.top_value.values)


def test_different_spec_never_overwrites(planted_llama, tmp_path):
    from mechme.store.runfile import write_run

    result = scan(model=planted_llama, out=tmp_path, progress=False)
    with pytest.raises(StoreError, match="never overwritten"):
        write_run(result.dataset, result.store, kind="scan", spec={"other": 1}, model_info={})


def test_corrupt_run_file_is_rejected(tmp_path):
    from mechme.store.runfile import open_run

    path = tmp_path / "scan-bad.h5"
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 64)
    with pytest.raises(StoreError, match="corrupt"):
        open_run(path)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"abs_threshold": 0.0}, "abs_threshold must be positive, got 0.0"),
        ({"ratio_threshold": -5.0}, "ratio_threshold must be positive, got -5.0"),
        ({"dtype": "int8"}, "invalid dtype 'int8'"),
    ],
)
def test_bad_options_raise(options, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        ScanSpec(**options)


def test_text_errors(tiny_llama, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9 au lait".encode("latin-1"))
    short = tmp_path / "short.txt"
    short.write_text("a")
    cases = [(empty, "is empty"), (latin, "not valid UTF-8"), (short, "shorter than two tokens")]
    for path, message in cases:
        with pytest.raises(TextError, match=message):
            scan(model=tiny_llama, text=str(path), out=tmp_path / "runs", progress=False)
    assert not list((tmp_path / "runs").glob("*.h5"))


def test_jsonl_text_field(planted_llama, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "One prompt here."}\n{"text": "And a second one."}\n')
    result = scan(model=planted_llama, text=str(path), out=None, progress=False)
    assert result.dataset.sizes["prompt"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "no text field"}\n')
    with pytest.raises(TextError, match="no string field 'text'"):
        scan(model=planted_llama, text=str(bad), out=None, progress=False)


def test_unwritable_out(planted_llama, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="not writable"):
        scan(model=planted_llama, out=blocker / "runs", progress=False)


def test_text_file_chunks_and_max_tokens(planted_llama, tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("All work and no play. " * 40)
    result = scan(model=planted_llama, text=str(path), seq_len=64, max_tokens=200, out=None, progress=False)
    lengths = result.dataset.prompt_length.values
    assert lengths.sum() == 200
    assert lengths.max() == 64
    assert (result.dataset.token.values[:, 0] == "<s>").all()


def test_scan_accepts_a_model_reference(planted_folder, tmp_path):
    result = scan(model=str(planted_folder), out=tmp_path, progress=False, max_tokens=64, seq_len=32)
    assert result.verdict["me_layer"] == 2
    assert "median prompt's top-1" in result.verdict["text"]
    assert (result.store.stat().st_mode & 0o777) == 0o666 & ~_umask()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
