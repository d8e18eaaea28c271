"""Site tables: every site of every family reads the right tensor and writes through."""

import pytest
import torch
from transformers import GPT2Config

from mechme.engine.sites import read_site
from mechme.errors import UnsupportedArchitectureError
from mechme.models.architectures import SITES, architecture_for, supported_model_types
from mechme.models.tiny import FAMILIES, tiny_model

LAYER = 1


def _inputs(model, text="The cat sat on the mat."):
    enc = model.tokenizer([text], return_tensors="pt")
    return {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask}


def _read_all(model, inputs):
    import nnsight

    with torch.no_grad(), model.lm.trace(inputs):
        values = nnsight.save({site: read_site(model, LAYER, site).clone() for site in SITES})
    return values


@pytest.mark.parametrize("family", FAMILIES)
def test_sites_have_expected_shapes(family):
    model = tiny_model(family)
    inputs = _inputs(model)
    seq = inputs["input_ids"].shape[1]
    values = _read_all(model, inputs)
    for site in SITES:
        assert values[site].shape == (1, seq, model.site_width(site)), site


@pytest.mark.parametrize("family", FAMILIES)
def test_residual_decomposes_into_branches(family):
    model = tiny_model(family)
    v = _read_all(model, _inputs(model))
    torch.testing.assert_close(v["resid_mid"], v["resid_pre"] + v["attn_out"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v["resid_post"], v["resid_mid"] + v["mlp_out"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_norm_sites_match_module_outputs(family):
    model = tiny_model(family)
    v = _read_all(model, _inputs(model))
    with torch.no_grad():
        if "attn_norm" in model.arch.norms:
            expected = model.norm_module(LAYER, "attn_norm")(v["resid_pre"])
            torch.testing.assert_close(v["attn_in"], expected)
        if "mlp_norm" in model.arch.norms:
            expected = model.norm_module(LAYER, "mlp_norm")(v["resid_mid"])
            torch.testing.assert_close(v["mlp_in"], expected)
        else:
            torch.testing.assert_close(v["mlp_in"], v["resid_mid"])
        down = model.submodule(LAYER, model.arch.mlp.down)
        mlp = model.submodule(LAYER, "mlp")
        torch.testing.assert_close(down(v["mlp_hidden"]), mlp(v["mlp_in"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_every_site_write_moves_logits(family):
    model = tiny_model(family)
    inputs = _inputs(model)
    with torch.no_grad():
        clean = model.model(**inputs).logits
    for site in SITES:
        with torch.no_grad(), model.lm.trace(inputs):
            value = read_site(model, LAYER, site)
            value[:, 1:] = value[:, 1:] * 3.0 + 1.0
            logits = model.lm.output.logits.save()
        assert not torch.allclose(logits, clean), f"{family}: writing {site} did not change the logits"


@pytest.mark.parametrize("family", FAMILIES)
def test_gemma_gain_offset(family):
    model = tiny_model(family)
    role = next(iter(model.arch.norms))
    weight = model.norm_module(0, role).weight.detach().float()
    expected = weight + 1.0 if family.startswith("gemma") else weight
    torch.testing.assert_close(model.effective_gain(0, role), expected)


def test_unknown_architecture_lists_supported():
    with pytest.raises(UnsupportedArchitectureError) as info:
        architecture_for(GPT2Config())
    message = str(info.value)
    assert "'gpt2'" in message
    for model_type in supported_model_types():
        assert model_type in message
