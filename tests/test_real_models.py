"""The bundled real models: their measured massive activations and ME Layers."""

import numpy as np
import pytest
import torch

from mechme.engine.scan import scan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_scan(smollm2):
    return scan(model=smollm2, out=None, progress=False)


def test_smollm2_me_layer_11_dim_507(smollm2_scan):
    verdict = smollm2_scan.verdict
    assert verdict["me_layer"] == 11
    assert verdict["massive_dims"][0] == 507
    assert verdict["share"] == 1.0
    assert verdict["jump"] > 100


def test_smollm2_massive_value_at_first_token(smollm2_scan):
    ds = smollm2_scan.dataset.sel(layer=11)
    assert (ds.top_position.isel(rank=0).values == 0).all()
    assert (ds.top_dim.isel(rank=0).values == 507).all()
    values = np.abs(ds.top_value.isel(rank=0).values)
    assert 1.5e4 < np.median(values) < 3.0e4
    assert smollm2_scan.verdict["massive_tokens"][0]["position"] == 0


def test_smollm2_written_by_mlp(smollm2_scan):
    verdict = smollm2_scan.verdict
    assert verdict["branch"] == "mlp"
    parts = verdict["decomposition"]
    assert parts["mlp"] > 0.95 * parts["value"]
    assert abs(parts["attn"]) < 0.01 * parts["value"]


def test_smollm2_earlier_layers_not_massive(smollm2_scan):
    share = smollm2_scan.dataset.massive_share.values
    assert (share[:11] == 0).all()
    assert (share[11:28] == 1).all()


def test_smollm2_trace_is_transparent(smollm2):
    import nnsight

    enc = smollm2.tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    inputs = {
        "input_ids": enc.input_ids,
        "attention_mask": enc.attention_mask,
        "position_ids": (enc.attention_mask.cumsum(-1) - 1).clamp(min=0),
    }
    with torch.no_grad():
        plain = smollm2.model(**inputs).logits
        with smollm2.lm.trace(inputs):
            tops = nnsight.save([smollm2.envoy(i, "").output.abs().amax() for i in range(30)])
            traced = smollm2.lm.output.logits.save()
    assert len(tops) == 30
    assert torch.equal(traced, plain)


def test_gemma3_me_layer_0_dim_400_at_bos(gemma3):
    result = scan(model=gemma3, out=None, progress=False)
    verdict = result.verdict
    assert verdict["me_layer"] == 0
    assert verdict["massive_dims"][0] == 400
    assert verdict["massive_tokens"][0] == {"position": 0, "prompts": 16, "tokens": ["<bos>"]}
    top0 = np.abs(result.dataset.top_value.sel(layer=0).isel(rank=0).values)
    assert 2.5e3 < np.median(top0) < 3.5e3

    # A second dim, 163, takes over from layer 3.
    top_dims = result.dataset.top_dim.isel(rank=0)
    for layer in range(3, 14):
        assert (top_dims.sel(layer=layer).values == 163).mean() >= 0.9, layer
    for layer in range(0, 3):
        assert (top_dims.sel(layer=layer).values == 400).all(), layer


def test_smollm2_zeroing_first_token_mlp_removes_massive(smollm2):
    from mechme.engine.study import run_study
    from mechme.specs import Condition, Intervention, Study, Zero

    study = Study(name="zero-mlp", conditions=[
        Condition(name="zero", interventions=[Intervention(site="mlp_out", layers=11, op=Zero())])])
    result = run_study(study, model=smollm2, out=None, progress=False)
    summary = result.summary()
    assert summary["baseline"]["massive_max"] > 2e4
    per_prompt = np.abs(result.dataset.me_top.sel(condition="zero").values)
    assert np.median(per_prompt) < 120
    assert summary["zero"]["emerges"] is False
    assert summary["zero"]["kl"] > 1.0


def test_smollm2_attribution_separates_top_neurons(smollm2):
    from mechme.engine.attribution import attribute

    result = attribute(smollm2, seeds=(0, 1, 2))
    assert result["me_layer"] == 11 and result["massive_dim"] == 507
    assert result["neuron_share_top"] > 0.9
    assert result["ablate_top"]["emerges"] is False
    assert all(r["emerges"] for r in result["ablate_random"])
    assert all(r["massive_max"] > 1e4 for r in result["ablate_random"])
    scale = result["rms_scale"]["12"]
    assert scale["ratio"] > 50  # the massive token's 1/rms collapses once the spike exists
