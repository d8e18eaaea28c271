"""Attention-sink measure against full attention maps on tiny models, and on SmolLM2-135M."""

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch

from mechme import cli_measures
from mechme.errors import SpecError
from mechme.measures.sinks import eager_attention, first_token_importance, measure_sinks
from mechme.models.tiny import FAMILIES, Plant, tiny_model
from mechme.specs import Condition, Intervention, Tokens, Zero

PROMPTS = [
    "The cat sat on the mat.",
    "Rain fell all night over the quiet town, and the river rose.",
    "Hello there, friend!",
    "A short one.",
    "Numbers like 42 and 7 appear here too.",
]


def write_prompts(tmp_path, prompts=PROMPTS):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return str(path)


def zero_first_mlp(layer):
    return Condition(
        name="zero-mlp",
        interventions=(Intervention(site="mlp_out", layers=(layer,), tokens=Tokens.first(), op=Zero()),),
    )


def naive_importance(model, rows, zero_mlp_layer=None):
    """Gu et al. importance of key 0 from full attention maps of unpadded single-prompt runs.

    Returns ``[prompt, layer, head]``.
    """
    hook = None
    if zero_mlp_layer is not None:
        def zero_first(module, args, out):
            out = out.clone()
            out[:, 0] = 0.0
            return out

        site = model.arch.sites["mlp_out"].module
        hook = model.submodule(zero_mlp_layer, site).register_forward_hook(zero_first)
    out = []
    try:
        for ids in rows:
            with torch.no_grad():
                result = model.model(input_ids=torch.tensor([ids]), output_attentions=True)
            t = len(ids)
            per_layer = []
            for attn in result.attentions:  # [1, head, query, key]
                heads = attn.shape[1]
                per_layer.append([sum(float(attn[0, h, q, 0]) for q in range(t)) / t for h in range(heads)])
            out.append(per_layer)
    finally:
        if hook is not None:
            hook.remove()
    return np.array(out)


def test_importance_matches_full_attention(tmp_path):
    model = tiny_model("llama", plant=Plant(layer=1, dim=9))
    ds, summary = measure_sinks(model, text=write_prompts(tmp_path), batch_size=3, epsilon=0.15,
                                out=None, progress=False)
    rows = [model.tokenizer(p).input_ids for p in PROMPTS]
    assert len({len(r) for r in rows}) > 1, "equal lengths would not exercise left padding"
    expected = naive_importance(model, rows)
    np.testing.assert_allclose(ds.importance.sel(condition="baseline").values, expected, atol=1e-5)
    sinks = expected > 0.15
    assert 0 < sinks.mean() < 1, "epsilon must split the heads for this check to mean anything"
    assert summary["sink_rate"] == pytest.approx(100 * sinks.mean(), abs=1e-4)
    per_layer = [row["mean_attention_to_first"] for row in summary["layers"]]
    np.testing.assert_allclose(per_layer, expected.mean(axis=(0, 2)), atol=1e-5)
    assert summary["epsilon"] == 0.15
    assert summary["seq_len"] == 64
    assert summary["n_prompts"] == len(PROMPTS)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_matches_full_attention(family, tmp_path):
    model = tiny_model(family, plant=Plant(layer=1, dim=9))
    ds, _ = measure_sinks(model, text=write_prompts(tmp_path, PROMPTS[:3]), out=None, progress=False)
    rows = [model.tokenizer(p).input_ids for p in PROMPTS[:3]]
    np.testing.assert_allclose(ds.importance.sel(condition="baseline").values, naive_importance(model, rows), atol=1e-5)


def test_sliding_window_rows_match_full_attention(tmp_path):
    # Tiny Gemma 3 layers slide over 64 keys; 96-token rows let the window hide key 0
    # from late queries, which still count in T as Gu et al. count them.
    model = tiny_model("gemma3", plant=Plant(layer=1, dim=9))
    path = tmp_path / "doc.txt"
    path.write_text("Call me Ishmael. Some years ago, never mind how long precisely, I went to sea. " * 4)
    ds, _ = measure_sinks(model, text=str(path), seq_len=96, max_tokens=192, batch_size=2, out=None, progress=False)
    rows = [model.tokenizer(path.read_text(), add_special_tokens=False).input_ids[i * 95:(i + 1) * 95]
            for i in range(2)]
    rows = [[model.tokenizer.bos_token_id] + r for r in rows]
    expected = naive_importance(model, rows)
    np.testing.assert_allclose(ds.importance.sel(condition="baseline").values, expected, atol=1e-5)


def test_condition_matches_hooked_forward(tmp_path):
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    ds, summary = measure_sinks(model, conditions=[zero_first_mlp(2)], text=write_prompts(tmp_path),
                                batch_size=2, out=None, progress=False)
    rows = [model.tokenizer(p).input_ids for p in PROMPTS]
    edited = naive_importance(model, rows, zero_mlp_layer=2)
    np.testing.assert_allclose(ds.importance.sel(condition="zero-mlp").values, edited, atol=1e-5)
    baseline = naive_importance(model, rows)
    np.testing.assert_allclose(ds.importance.sel(condition="baseline").values, baseline, atol=1e-5)
    # Layer 3 reads the edited residual, so its attention must change.
    assert np.abs(edited[:, 3] - baseline[:, 3]).max() > 1e-3
    assert set(summary["conditions"]) == {"zero-mlp"}


def test_first_token_importance_with_left_padding():
    torch.manual_seed(0)
    weights = torch.rand(2, 3, 5, 5).softmax(-1)
    real = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]], dtype=torch.bool)
    first = torch.tensor([0, 2])
    got = first_token_importance(weights, real, first)
    for h in range(3):
        assert got[0, h].item() == pytest.approx(weights[0, h, :, 0].mean().item(), abs=1e-6)
        assert got[1, h].item() == pytest.approx(weights[1, h, 2:, 2].mean().item(), abs=1e-6)


def test_sdpa_model_switches_to_eager_and_back(tmp_path):
    model = tiny_model("llama", plant=Plant(layer=1, dim=9))
    eager, _ = measure_sinks(model, text=write_prompts(tmp_path), out=None, progress=False)
    model.model.set_attn_implementation("sdpa")
    switched, _ = measure_sinks(model, text=write_prompts(tmp_path), out=None, progress=False)
    assert model.model.config._attn_implementation == "sdpa"
    np.testing.assert_allclose(switched.importance.values, eager.importance.values, atol=1e-6)


def test_remote_model_without_eager_raises(tiny_llama):
    tiny_llama.model.set_attn_implementation("sdpa")
    remote = dataclasses.replace(tiny_llama, remote="ndif", _lm=None)
    with pytest.raises(SpecError, match="eager attention"):
        with eager_attention(remote):
            pass


@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.3, 1.5])
def test_epsilon_out_of_range_raises(tiny_llama, epsilon):
    with pytest.raises(SpecError, match=f"epsilon must be between 0 and 1, got {epsilon}"):
        measure_sinks(tiny_llama, epsilon=epsilon, out=None, progress=False)


def test_run_file_and_figure(planted_llama, tmp_path):
    ds, summary = measure_sinks(planted_llama, out=tmp_path, progress=False)
    store = tmp_path / summary["store"].split("/")[-1]
    assert store.name.startswith("sinks-")
    assert len(store.stem) == len("sinks-") + 12
    assert store.exists()
    assert (tmp_path / summary["figure"].split("/")[-1]).stat().st_size > 0
    assert ds.attrs["mechme_kind"] == "sinks"
    assert set(ds.importance.dims) == {"condition", "prompt", "layer", "head"}


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mechme")
    cli_measures.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return cli_measures.COMMANDS[args.command](args)


def test_cli_sinks_json(tmp_path, capsys):
    folder = tmp_path / "planted"
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    code = run_cli(["sinks", "--model", str(folder), "--json", "--epsilon", "0.05", "--seq-len", "32",
                    "--condition", "remove-massive", "--out", str(tmp_path / "runs")])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("sink_rate", "epsilon", "seq_len", "n_prompts", "layers", "conditions", "store", "figure"):
        assert key in data
    assert data["epsilon"] == 0.05
    assert data["seq_len"] == 32
    assert data["n_prompts"] == 16
    assert set(data["layers"][0]) >= {"layer", "mean_attention_to_first"}
    assert set(data["conditions"]) == {"remove-massive"}


@pytest.mark.slow
def test_smollm2_sinks_and_remove_massive(smollm2):
    original = smollm2.model.config._attn_implementation
    ds, summary = measure_sinks(smollm2, conditions=[zero_first_mlp(11)], out=None, progress=False, max_tokens=100)
    assert smollm2.model.config._attn_implementation == original
    assert summary["me_layer"] == 11
    # Measured on 100 tokens of the bundled sentences: about 98% of heads after the ME
    # Layer give position 0 more than 0.3 of their attention.
    assert summary["sink_rate_after_me_layer"] > 90
    # Zeroing the ME Layer's MLP write at position 0 cuts that to about 30%.
    removed = summary["conditions"]["zero-mlp"]
    assert removed["sink_rate_after_me_layer"] < 50
    # Layers before the ME Layer run before the edit, so they must not change at all.
    before = ds.importance.sel(layer=slice(0, 11))
    np.testing.assert_array_equal(before.sel(condition="zero-mlp").values, before.sel(condition="baseline").values)
