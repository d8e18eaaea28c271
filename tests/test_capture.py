"""Activation capture to HDF5: layouts, values, resume, damage detection, patching, offline measures."""

import argparse
import json
import re
import string

import h5py
import numpy as np
import pytest
import torch
import xarray as xr

from mechme import cli_capture
from mechme.engine import capture as capture_module
from mechme.engine.capture import (
    capture,
    check_capture,
    describe_capture,
    load_patch,
    open_capture,
    verify_capture,
)
from mechme.engine.scan import ScanSpec, resolve_rows
from mechme.engine.sites import read_site
from mechme.errors import SpecError, StoreError
from mechme.measures.offline import rigidity_from_capture
from mechme.models.architectures import SITES
from mechme.models.tiny import Plant, tiny_model
from mechme.specs.core import Tokens

# -- live reference: plain torch hooks on a plain Hugging Face forward -----------------


def live_states(model, ids: list[int], layer_sites: list[tuple[int, str]]) -> dict:
    """Run one unpadded prompt through the HF model; return ``(layer, site) -> [position, width]``.

    The sites are read with torch hooks at the modules the architecture table names, so
    nothing of nnsight or of the capture code is involved.
    """
    states, handles = {}, []
    for layer, site in layer_sites:
        hook = model.arch.sites[site]
        module = model.submodule(layer, hook.module)
        key = (layer, site)
        if hook.side == "output":
            def grab_output(mod, args, output, key=key, index=hook.index):
                value = output[index] if index is not None else output
                states[key] = value[0].detach().float().clone()

            handles.append(module.register_forward_hook(grab_output))
        else:
            def grab_input(mod, args, kwargs, key=key):
                value = args[0] if args else kwargs["hidden_states"]
                states[key] = value[0].detach().float().clone()

            handles.append(module.register_forward_pre_hook(grab_input, with_kwargs=True))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return states


def prompt_rows(model, **options):
    _, _, rows = resolve_rows(ScanSpec(**options), model.tokenizer)
    return rows


def live_rigidity(model, rows, layers):
    """Rigidity numbers from first-token states of unbatched HF forwards, by direct loops."""
    first = []
    for ids in rows:
        live = live_states(model, ids, [(L, "resid_post") for L in layers])
        first.append([live[(L, "resid_post")][0].double().numpy() for L in layers])
    first = np.asarray(first)  # [prompt, layer, dim]
    n = len(rows)
    cos_prev, pairwise, norm = [], [], []
    for i, layer in enumerate(layers):
        h = first[:, i]
        norm.append(np.mean([np.linalg.norm(v) for v in h]))
        pairs = [
            h[a] @ h[b] / (np.linalg.norm(h[a]) * np.linalg.norm(h[b]))
            for a in range(n) for b in range(a + 1, n)
        ]
        pairwise.append(np.mean(pairs))
        if i > 0 and layers[i - 1] == layer - 1:
            prev = first[:, i - 1]
            cos_prev.append(np.mean([
                h[p] @ prev[p] / (np.linalg.norm(h[p]) * np.linalg.norm(prev[p])) for p in range(n)
            ]))
        else:
            cos_prev.append(np.nan)
    return np.array(cos_prev), np.array(pairwise), np.array(norm)


# -- layouts and values --------------------------------------------------------------


def test_first_token_layout_and_values(planted_llama, tmp_path):
    path = capture(planted_llama, sites=["resid_post"], out=tmp_path, progress=False)
    assert path.name.startswith("capture-")
    assert path.suffix == ".h5"
    ds = xr.open_dataset(path, engine="h5netcdf")
    assert ds.resid_post.dims == ("prompt", "layer", "dim")
    assert ds.resid_post.dtype == np.float32
    assert ds.layer.values.tolist() == [0, 1, 2, 3]
    assert (ds.position.values == 0).all()
    assert (ds.token_string.values == "<s>").all()

    rows = prompt_rows(planted_llama)
    assert ds.sizes["prompt"] == len(rows)
    for p, ids in enumerate(rows):
        live = live_states(planted_llama, ids, [(L, "resid_post") for L in range(4)])
        for layer in range(4):
            np.testing.assert_allclose(
                ds.resid_post.sel(prompt=p, layer=layer).values, live[(layer, "resid_post")][0].numpy(),
                rtol=1e-5, atol=1e-3,
            )
    assert (np.abs(ds.resid_post.sel(layer=2, dim=17).values) > 1e4).all()
    ds.close()


def test_file_layout_for_lazy_layer_reads(planted_llama, tmp_path):
    path = capture(planted_llama, sites=["resid_post", "mlp_hidden"], out=tmp_path, progress=False)
    with h5py.File(path, "r") as fh:
        for site, width in (("resid_post", 64), ("mlp_hidden", 128)):
            dset = fh[site]
            assert dset.chunks[1:] == (1, width), "a chunk must span one layer"
            assert dset.compression == "gzip"
            assert dset.fletcher32
            assert np.isnan(dset.fillvalue)
        assert fh.attrs["mechme_complete"] == 1
        assert fh.attrs["mechme_weights_sha256"] == planted_llama.weights_sha256
        spec = json.loads(fh.attrs["mechme_spec"])
    assert spec["sites"] == ["mlp_hidden", "resid_post"]
    ds = open_capture(path)
    assert ds.mlp_hidden.dims == ("prompt", "layer", "neuron")
    one_layer = ds.resid_post.sel(layer=2)
    assert not one_layer.variable._in_memory
    assert one_layer.shape == (16, 64)
    assert json.loads(ds.attrs["mechme_versions"])["h5py"] == h5py.__version__
    ds.close()


def test_uncompressed_capture_keeps_checksums(planted_llama, tmp_path):
    packed = capture(planted_llama, out=tmp_path, progress=False)
    plain = capture(planted_llama, compression="none", out=tmp_path, progress=False)
    assert plain != packed
    with h5py.File(plain, "r") as fh:
        assert fh["resid_post"].compression is None
        assert fh["resid_post"].fletcher32
    with open_capture(packed) as a, open_capture(plain) as b:
        np.testing.assert_array_equal(a.resid_post.values, b.resid_post.values)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_all_tokens_flat_layout_matches_forward(family, tmp_path):
    model = tiny_model(family, plant=Plant(layer=1, dim=9))
    sites = ["resid_pre", "attn_out", "mlp_hidden", "resid_post"]
    path = capture(model, sites=sites, layers="1,3", tokens="all", batch_size=5, out=tmp_path, progress=False)
    rows = prompt_rows(model)
    ds = open_capture(path)
    assert ds.resid_post.dims == ("token", "layer", "dim")
    assert ds.sizes["token"] == sum(len(r) for r in rows)
    assert ds.layer.values.tolist() == [1, 3]
    lengths = {len(r) for r in rows}
    assert len(lengths) > 1, "prompts of one length would not exercise left padding"

    for p in (0, 7, 15):
        ids = rows[p]
        live = live_states(model, ids, [(L, s) for L in (1, 3) for s in sites])
        chosen = ds.isel(token=np.flatnonzero(ds.prompt.values == p))
        assert chosen.position.values.tolist() == list(range(len(ids)))
        assert chosen.token_id.values.tolist() == ids
        for site in sites:
            for layer in (1, 3):
                np.testing.assert_allclose(
                    chosen[site].sel(layer=layer).values, live[(layer, site)].numpy(), rtol=1e-4, atol=1e-3,
                )
    ds.close()


def test_positions_and_delimiters_selectors(tiny_llama, tmp_path):
    rows = prompt_rows(tiny_llama)
    path = capture(tiny_llama, tokens=Tokens.at(1, -1), layers=0, out=tmp_path, progress=False)
    ds = open_capture(path)
    assert ds.sizes["token"] == 2 * len(rows)
    for p, ids in enumerate(rows):
        chosen = ds.isel(token=np.flatnonzero(ds.prompt.values == p))
        assert chosen.position.values.tolist() == [1, len(ids) - 1]
        assert chosen.token_id.values.tolist() == [ids[1], ids[-1]]
    ds.close()

    path = capture(tiny_llama, tokens="delimiters", layers=0, out=tmp_path, progress=False)
    ds = open_capture(path)
    strings = ds.token_string.values.tolist()
    assert set(strings) <= set(string.punctuation)
    # The tokenizer is character-level, so a delimiter is one punctuation character.
    tokens = [s for ids in rows for s in tiny_llama.tokenizer.convert_ids_to_tokens(ids)]
    expected = sum(1 for s in tokens if s in string.punctuation)
    assert len(strings) == expected
    ds.close()


def test_remote_simulation_same_values(planted_llama, tmp_path):
    import dataclasses

    local = capture(planted_llama, layers="1-2", out=tmp_path / "local", progress=False)
    simulated = dataclasses.replace(planted_llama, remote="local", _lm=planted_llama._lm)
    remote = capture(simulated, layers="1-2", out=tmp_path / "remote", progress=False)
    with open_capture(local) as a, open_capture(remote) as b:
        np.testing.assert_array_equal(a.resid_post.values, b.resid_post.values)


def test_bfloat16_model_stored_as_float32(tmp_path):
    model = tiny_model("llama", plant=Plant(layer=1, dim=3))
    model.model.to(torch.bfloat16)
    path = capture(model, layers=1, dtype="bfloat16", out=tmp_path, progress=False)
    ds = open_capture(path)
    values = ds.resid_post.sel(layer=1).values
    assert values.dtype == np.float32
    # Every stored value is exactly a bfloat16 number, so none was rounded on the way.
    np.testing.assert_array_equal(torch.from_numpy(values).to(torch.bfloat16).float().numpy(), values)
    assert (np.abs(values[:, 3]) > 1e4).all()
    ds.close()


# -- sizes, names and bad input ------------------------------------------------------


def test_size_printed_before_start(planted_llama, tmp_path, capsys):
    capture(planted_llama, sites=["resid_post"], out=tmp_path, progress=True)
    err = capsys.readouterr().err
    assert "capture size: 16 tokens x 1 site(s) x 4 layer(s) x 64 dims x 4 bytes = 16.0 KiB" in err


def test_disk_full_rejected_before_writing(planted_llama, tmp_path, monkeypatch):
    class Usage:
        total, used, free = 10**9, 10**9 - 1000, 1000

    monkeypatch.setattr(capture_module.shutil, "disk_usage", lambda folder: Usage)
    with pytest.raises(StoreError, match=r"needs 16\.0 KiB but only 1000 B is free"):
        capture(planted_llama, out=tmp_path, progress=False)
    assert not list(tmp_path.glob("capture-*"))


def test_spec_names_file_and_reuses_it(planted_llama, tmp_path):
    first = capture(planted_llama, layers="0-3", out=tmp_path, progress=False)
    again = capture(planted_llama, layers=[0, 1, 2, 3], out=tmp_path, progress=False)
    other = capture(planted_llama, layers="0-2", out=tmp_path, progress=False)
    assert again == first
    assert other != first
    assert describe_capture(other)["layers"] == [0, 1, 2]


@pytest.mark.parametrize(
    "options,message",
    [
        ({"sites": ["resid"]}, "unknown site 'resid'; valid sites: " + ", ".join(SITES)),
        ({"sites": []}, "no site requested"),
        ({"layers": "3-x"}, "invalid layer range '3-x'"),
        ({"layers": 7}, "layer 7 is out of range; this model has layers 0..3"),
        ({"tokens": "middle"}, "invalid token selector 'middle'"),
        ({"tokens": Tokens.at(500)}, "token selector positions 500 matches no token in the 16 prompt(s)"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
        ({"compression": "lz4"}, "invalid compression 'lz4'; choose one of gzip, none"),
    ],
)
def test_bad_input_raises(planted_llama, tmp_path, options, message):
    with pytest.raises(SpecError, match=re.escape(message)):
        capture(planted_llama, out=tmp_path, progress=False, **options)
    assert not list(tmp_path.glob("capture-*"))


def test_delimiters_in_text_without_punctuation(tiny_llama, tmp_path):
    text = tmp_path / "plain.txt"
    text.write_text("no punctuation here at all just words")
    with pytest.raises(SpecError, match="token selector 'delimiters' matches no token"):
        capture(tiny_llama, text=str(text), tokens="delimiters", out=tmp_path, progress=False)


# -- resume and damage ---------------------------------------------------------------


def test_interrupted_capture_resumes(planted_llama, tmp_path, monkeypatch):
    real_trace = capture_module.trace_batch
    calls = []
    interrupted = []

    def flaky(model, batch, picks, pairs):
        calls.append(batch.index)
        if len(calls) == 3 and not interrupted:
            interrupted.append(batch.index)
            raise KeyboardInterrupt
        return real_trace(model, batch, picks, pairs)

    monkeypatch.setattr(capture_module, "trace_batch", flaky)
    options = dict(sites=["resid_post", "mlp_out"], tokens="all", batch_size=4, out=tmp_path, progress=False)
    with pytest.raises(KeyboardInterrupt):
        capture(planted_llama, **options)
    assert not list(tmp_path.glob("capture-*[0-9a-f].h5"))
    (partial,) = tmp_path.glob("capture-*.partial.h5")
    with h5py.File(partial, "r") as fh:
        assert fh.attrs["mechme_batches_done"] == 2
    with pytest.raises(StoreError, match="unfinished capture \\(2 of 4 batches\\)"):
        open_capture(partial)

    calls.clear()
    resumed = capture(planted_llama, **options)
    assert calls == [2, 3]
    assert not partial.exists()
    fresh = capture(planted_llama, **{**options, "out": tmp_path / "fresh"})
    with open_capture(resumed) as a, open_capture(fresh) as b:
        np.testing.assert_array_equal(a.resid_post.values, b.resid_post.values)
        np.testing.assert_array_equal(a.mlp_out.values, b.mlp_out.values)
        assert not np.isnan(a.resid_post.values).any()


def test_truncated_file_rejected(planted_llama, tmp_path):
    path = capture(planted_llama, out=tmp_path, progress=False)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="corrupt or truncated"):
        open_capture(path)
    with pytest.raises(StoreError, match="corrupt or truncated"):
        load_patch(path, planted_llama, site="resid_post", layer=2, prompt=0)


def test_corrupt_chunk_never_reads_as_zeros(planted_llama, tmp_path):
    path = capture(planted_llama, out=tmp_path, progress=False)
    with h5py.File(path, "r") as fh:
        info = fh["resid_post"].id.get_chunk_info_by_coord((0, 2, 0))
    with open(path, "r+b") as fh:
        fh.seek(info.byte_offset + 16)
        fh.write(b"\x00" * 64)
    check_capture(path)  # the structure is intact, only the chunk's bytes changed
    with pytest.raises(StoreError, match="corrupt: reading 'resid_post' failed"):
        verify_capture(path)
    with pytest.raises(StoreError, match="corrupt"):
        load_patch(path, planted_llama, site="resid_post", layer=2, prompt=0)
    with xr.open_dataset(path, engine="h5netcdf") as ds, pytest.raises(OSError):
        ds.resid_post.sel(layer=2).values
    # Other layers sit in other chunks and still read.
    torch.testing.assert_close(
        load_patch(path, planted_llama, site="resid_post", layer=1, prompt=0),
        torch.from_numpy(open_capture(path).resid_post.sel(prompt=0, layer=1).values),
    )


def test_short_row_count_rejected(planted_llama, tmp_path):
    path = capture(planted_llama, out=tmp_path, progress=False)
    with h5py.File(path, "r+") as fh:
        fh["resid_post"].attrs["mechme_rows_written"] = 8
    with pytest.raises(StoreError, match="has 8 of 16 rows written"):
        open_capture(path)


def test_not_a_capture_rejected(planted_llama, tmp_path):
    from mechme.engine.scan import scan

    scan_file = scan(model=planted_llama, out=tmp_path, progress=False).store
    with pytest.raises(StoreError, match="not a mechme capture file \\(kind 'scan'\\)"):
        open_capture(scan_file)
    with pytest.raises(StoreError, match="not found"):
        open_capture(tmp_path / "missing.h5")


# -- patching ------------------------------------------------------------------------


def traced_logits(model, ids, edit=None):
    """Logits of one prompt under an nnsight trace; ``edit(model)`` runs inside it."""
    with torch.no_grad(), model.lm.trace({"input_ids": torch.tensor([ids])}):
        if edit is not None:
            edit(model)
        logits = model.lm.output.logits.save()
    return logits


def test_patch_first_token_restores_clean_logits(planted_llama, tmp_path):
    path = capture(planted_llama, sites=["resid_post"], layers=1, out=tmp_path, progress=False)
    rows = prompt_rows(planted_llama)
    p = 5
    patch = load_patch(path, planted_llama, site="resid_post", layer=1, prompt=p)
    assert patch.shape == (64,)
    assert patch.dtype == torch.float32

    def perturb(model):
        # The MLP acts per position, so this changes layer 1's output at position 0 only.
        mlp = read_site(model, 1, "mlp_out")
        mlp[0, 0] = mlp[0, 0] * 3.0 + 1.0

    def perturb_and_patch(model):
        perturb(model)
        post = read_site(model, 1, "resid_post")
        post[0, 0] = patch

    clean = traced_logits(planted_llama, rows[p])
    perturbed = traced_logits(planted_llama, rows[p], perturb)
    patched = traced_logits(planted_llama, rows[p], perturb_and_patch)
    assert not torch.allclose(perturbed, clean, atol=1e-3)
    torch.testing.assert_close(patched, clean, rtol=1e-5, atol=1e-5)


def test_patch_all_positions_by_prompt_text(planted_llama, tmp_path):
    path = capture(planted_llama, sites=["resid_post"], layers=0, tokens="all", out=tmp_path, progress=False)
    text = "Water boils at one hundred degrees Celsius at sea level."
    ids = planted_llama.tokenizer(text).input_ids
    by_text = [load_patch(path, planted_llama, site="resid_post", layer=0, prompt=text, position=i)
               for i in range(len(ids))]
    by_index = load_patch(path, planted_llama, site="resid_post", layer=0, prompt=1, position=4)
    torch.testing.assert_close(by_text[4], by_index, rtol=0, atol=0)

    def perturb(model):
        embedded = read_site(model, 0, "resid_pre")
        embedded[:] = embedded * 0.5

    def perturb_and_patch(model):
        perturb(model)
        post = read_site(model, 0, "resid_post")
        post[0] = torch.stack(by_text)

    clean = traced_logits(planted_llama, ids)
    perturbed = traced_logits(planted_llama, ids, perturb)
    patched = traced_logits(planted_llama, ids, perturb_and_patch)
    assert not torch.allclose(perturbed, clean, atol=1e-3)
    torch.testing.assert_close(patched, clean, rtol=1e-5, atol=1e-5)


def test_patch_from_other_model_rejected(planted_llama, tmp_path):
    path = capture(planted_llama, layers=2, out=tmp_path, progress=False)
    other_weights = tiny_model("llama", seed=1, plant=Plant(layer=2, dim=17))
    with pytest.raises(SpecError, match="made with weights sha256 .* but 'tiny-llama' has weights sha256"):
        load_patch(path, other_weights, site="resid_post", layer=2, prompt=0)
    other_arch = tiny_model("gemma3")
    with pytest.raises(SpecError, match="made with 'tiny-llama' \\(llama, 4 layers.*this model is 'tiny-gemma3'"):
        load_patch(path, other_arch, site="resid_post", layer=2, prompt=0)


def test_patch_request_outside_capture(planted_llama, tmp_path):
    path = capture(planted_llama, layers="1-2", out=tmp_path, progress=False)
    cases = [
        (dict(site="mlp_out", layer=1, prompt=0), "site 'mlp_out' is not in capture"),
        (dict(site="resid_post", layer=3, prompt=0), "layer 3 is not in capture .* it contains layers 1-2"),
        (dict(site="resid_post", layer=1, prompt=16), "prompt 16 is out of range; .* has prompts 0..15"),
        (dict(site="resid_post", layer=1, prompt=0, position=2), "position 2 of prompt 0 is not in capture"),
        (dict(site="resid_post", layer=1, prompt="Never captured."), "is not among the 16 prompts"),
    ]
    for kwargs, message in cases:
        with pytest.raises(SpecError, match=message):
            load_patch(path, planted_llama, **kwargs)


# -- offline measures ----------------------------------------------------------------


@pytest.mark.parametrize("tokens", ["first", "all"])
def test_offline_rigidity_matches_live(tokens, tmp_path):
    model = tiny_model("llama", plant=Plant(layer=1, dim=30), n_layers=5)
    path = capture(model, tokens=tokens, out=tmp_path, progress=False)
    result = rigidity_from_capture(path)
    cos_prev, pairwise, norm = live_rigidity(model, prompt_rows(model), list(range(5)))
    assert np.isnan(result.cos_prev.values[0])
    np.testing.assert_allclose(result.cos_prev.values[1:], cos_prev[1:], rtol=1e-5)
    np.testing.assert_allclose(result.pairwise_cos.values, pairwise, rtol=1e-5)
    np.testing.assert_allclose(result.mean_norm.values, norm, rtol=1e-5)
    assert result.cos_prev_per_prompt.shape == (16, 5)


def test_offline_rigidity_skips_missing_previous_layer(planted_llama, tmp_path):
    path = capture(planted_llama, layers="0,2,3", out=tmp_path, progress=False)
    result = rigidity_from_capture(path)
    assert np.isnan(result.cos_prev.sel(layer=2))
    assert np.isfinite(result.cos_prev.sel(layer=3))
    with pytest.raises(SpecError, match="site 'mlp_out' is not in capture"):
        rigidity_from_capture(path, site="mlp_out")
    no_first = capture(planted_llama, tokens="1,2", layers=0, out=tmp_path, progress=False)
    with pytest.raises(SpecError, match="contains no token at position 0"):
        rigidity_from_capture(no_first)


# -- command line --------------------------------------------------------------------


def run_command(argv):
    parser = argparse.ArgumentParser(prog="mechme")
    cli_capture.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return cli_capture.COMMANDS[args.command](args)


def test_cli_json_output(planted_folder, tmp_path, capsys):
    code = run_command([
        "capture", "--model", str(planted_folder), "--site", "resid_post", "--site", "mlp_out",
        "--layers", "1-2", "--tokens", "all", "--out", str(tmp_path), "--json",
    ])
    assert code == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["sites"] == ["mlp_out", "resid_post"]
    assert data["layers"] == [1, 2]
    assert data["bytes"] == data["n_tokens"] * 2 * (64 + 64) * 4
    assert "capture size:" in captured.err
    with open_capture(data["store"]) as ds:
        assert ds.sizes["token"] == data["n_tokens"]


def test_cli_table_and_bad_site(planted_folder, tmp_path, capsys):
    assert run_command(["capture", "--model", str(planted_folder), "--site", "resid_post", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "capture file:" in out
    assert "layers:       0-3" in out
    with pytest.raises(SpecError, match="unknown site 'resid'"):
        run_command(["capture", "--model", str(planted_folder), "--site", "resid", "--out", str(tmp_path)])


# -- real model ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_capture(smollm2, tmp_path_factory):
    return capture(smollm2, sites=["resid_post"], out=tmp_path_factory.mktemp("runs"), progress=False)


@pytest.mark.slow
def test_smollm2_dim_507_massive_at_layer_11(smollm2_capture):
    with open_capture(smollm2_capture, verify=True) as ds:
        assert ds.sizes["layer"] == 30
        values = ds.resid_post.sel(layer=11, dim=507).values
        assert ds.sizes["prompt"] == 16
        assert (np.abs(values) > 1e4).all(), values
        before = ds.resid_post.sel(layer=10, dim=507).values
        assert (np.abs(before) < 1e3).all(), before


@pytest.mark.slow
def test_smollm2_offline_rigidity_matches_live(smollm2, smollm2_capture):
    result = rigidity_from_capture(smollm2_capture)
    layers = [9, 10, 11, 12, 20]
    cos_prev, pairwise, norm = live_rigidity(smollm2, prompt_rows(smollm2), layers)
    sel = result.sel(layer=layers)
    np.testing.assert_allclose(sel.pairwise_cos.values, pairwise, rtol=1e-4)
    np.testing.assert_allclose(sel.mean_norm.values, norm, rtol=1e-4)
    np.testing.assert_allclose(sel.cos_prev.values[1:4], cos_prev[1:4], rtol=1e-4)
    # From the ME Layer on, every prompt's first-token state points the same way.
    assert (result.pairwise_cos.sel(layer=slice(11, 27)) > 0.99).all()


def test_study_replace_reads_state_from_capture(tmp_path):
    """A study's Replace op patches a captured clean state, checked against the capture's model."""
    from mechme.engine.capture import capture
    from mechme.engine.study import run_study
    from mechme.errors import MechmeError
    from mechme.models.tiny import Plant, tiny_model
    from mechme.specs import Condition, Intervention, Noise, Replace, Study

    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    path = capture(model, sites=["resid_post"], layers=[1], tokens="first", out=tmp_path, progress=False)
    noisy = Intervention(site="resid_post", layers=1, op=Noise(std=5.0))
    patched = Intervention(site="resid_post", layers=1, op=Replace(prompt=0, capture=str(path)))
    study = Study(name="patch", model="tiny", conditions=[
        Condition(name="noisy", interventions=[noisy]),
        Condition(name="noisy_then_patched", interventions=[noisy, patched]),
    ])
    summary = run_study(study, model=model, out=None, progress=False).summary()
    assert summary["noisy"]["kl"] > 0
    assert summary["noisy_then_patched"]["kl"] < summary["noisy"]["kl"]

    other = tiny_model("llama", seed=1)
    with pytest.raises(MechmeError):
        run_study(study, model=other, out=None, progress=False)
