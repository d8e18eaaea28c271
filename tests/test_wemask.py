"""WeMask on tiny models: which dims, tokens and layers it masks, and when."""

import re

import pytest
import torch

from mechme.engine.compile import Context, compile_condition
from mechme.engine.study import trace_condition
from mechme.engine.text import make_batches, pad_id
from mechme.errors import SpecError
from mechme.mitigation.wemask import FALLBACK, WeMask, WeMaskSpec, default_spec, parse_spec
from mechme.models.tiny import Plant, tiny_model
from mechme.specs import Condition, Dims, Intervention, Study, Zero

ME = 1


@pytest.fixture
def model():
    return tiny_model("llama", plant=Plant(layer=ME, dim=17))


def batch_of(model, texts):
    rows = [model.tokenizer(t).input_ids for t in texts]
    return make_batches(rows, batch_size=len(rows), pad=pad_id(model.tokenizer))[0]


def spy(model, layer, seen):
    def hook(module, args, output):
        seen.append(output.detach().clone())

    return model.norm_module(layer, "attn_norm").register_forward_hook(hook)


def test_fraction_rounding_to_zero_raises(model):
    with pytest.raises(SpecError, match=re.escape("fraction 0.001 of 64 dims rounds to 0 dims")):
        WeMask(model, WeMaskSpec(dims="gain", fraction=0.001, me_layer=ME))


def test_bad_options_raise():
    with pytest.raises(SpecError, match="invalid WeMask layers 'later'"):
        WeMaskSpec(k=1, layers="later")
    with pytest.raises(SpecError, match="exactly one of k or fraction"):
        WeMaskSpec(dims="gain")
    with pytest.raises(SpecError, match="gamma must be in"):
        WeMaskSpec(k=1, gamma=0.0)
    with pytest.raises(SpecError, match="unknown WeMask option 'kk'"):
        parse_spec("kk=3")


def test_layer_rules(model):
    assert WeMask(model, WeMaskSpec(k=1, me_layer=ME, layers="from_me")).layers == [1, 2, 3]
    assert WeMask(model, WeMaskSpec(k=1, me_layer=ME, layers="after_me")).layers == [2, 3]
    assert WeMask(model, WeMaskSpec(k=1, me_layer=ME, layers="next_only")).layers == [2]
    with pytest.raises(SpecError, match="selects no layer"):
        WeMask(model, WeMaskSpec(k=1, me_layer=3, layers="after_me"))


def test_me_layer_and_massive_dims_from_scan(model):
    mask = WeMask(model, WeMaskSpec(dims="massive"))
    assert mask.me_layer == ME
    assert mask.static_dims.tolist() == [17]


def test_gain_dims_are_top_gain_of_me_layer(model):
    norm = model.norm_module(ME, "attn_norm")
    with torch.no_grad():
        norm.weight[[3, 9, 40]] = torch.tensor([5.0, -7.0, 6.0])
    mask = WeMask(model, WeMaskSpec(dims="gain", k=3, me_layer=ME))
    assert mask.static_dims.tolist() == [3, 9, 40]


def test_first_real_token_masked_under_left_padding(model):
    batch = batch_of(model, ["A much longer prompt here.", "Hi"])
    seen = []
    with WeMask(model, WeMaskSpec(dims="gain", k=4, me_layer=ME)) as mask:
        handle = spy(model, 2, seen)  # registered after WeMask's hook, so it records the masked output
        try:
            with torch.no_grad():
                model.model(**batch.model_inputs())
        finally:
            handle.remove()
    out, dims = seen[0], mask.static_dims
    for row, pad in enumerate(batch.n_pad):
        assert (out[row, pad, dims] == 0).all()
        assert (out[row, pad + 1:, dims] != 0).any()
    assert batch.n_pad[1] > 0
    assert (out[1, 0, dims] != 0).any(), "a pad position must not be masked"


def test_matches_study_zero_on_attn_in(model):
    batch = batch_of(model, ["The cat sat.", "Dogs bark loudly at night."])
    strings = [model.tokenizer.convert_ids_to_tokens(model.tokenizer(t).input_ids) for t in ["The cat sat.", "Dogs bark loudly at night."]]
    mask = WeMask(model, WeMaskSpec(dims="gain", k=4, me_layer=ME))
    with mask, torch.no_grad():
        got = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
    cond = Condition(name="c", interventions=[
        Intervention(site="attn_in", layers=tuple(mask.layers), op=Zero(), dims=Dims.of(*mask.static_dims.tolist()))])
    ctx = Context(model=model, me_layer=ME)
    _, expected = trace_condition(Study(name="s", conditions=()), ctx, compile_condition(cond, ctx), batch, strings, None)
    torch.testing.assert_close(got, expected)


def test_soft_mask_scales_by_one_minus_gamma(model):
    batch = batch_of(model, ["Soft masking test."])
    clean, masked = [], []
    handle = spy(model, 2, clean)
    with torch.no_grad():
        model.model(**batch.model_inputs())
    handle.remove()
    with WeMask(model, WeMaskSpec(dims="gain", k=4, me_layer=ME, gamma=0.25)) as mask:
        handle = spy(model, 2, masked)
        with torch.no_grad():
            model.model(**batch.model_inputs())
        handle.remove()
    dims = mask.static_dims
    torch.testing.assert_close(masked[0][0, 0, dims], clean[0][0, 0, dims] * 0.75)


def _generate_and_spy(model, spec):
    enc = model.tokenizer(["Once upon"], return_tensors="pt")
    seen = []
    with WeMask(model, spec) as mask:
        handle = spy(model, 2, seen)
        try:
            with torch.no_grad():
                model.model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
    return seen, mask


def test_generation_masks_only_prefill_massive_token(model):
    seen, mask = _generate_and_spy(model, WeMaskSpec(dims="gain", k=4, me_layer=ME, token="massive"))
    assert seen[0].shape[1] > 1
    assert (seen[0][0, 0, mask.static_dims] == 0).all()
    decode_steps = seen[1:]
    assert len(decode_steps) == 3
    for step in decode_steps:
        assert step.shape[1] == 1
        assert (step[0, 0, mask.static_dims] != 0).all(), "a generated token was masked"


def test_released_mode_masks_every_decoded_token(model):
    seen, mask = _generate_and_spy(model, WeMaskSpec(dims="gain", k=4, me_layer=ME, token="released"))
    for step in seen:
        assert (step[0, 0, mask.static_dims] == 0).all()


def test_activation_rule_masks_top_entries_per_token(model):
    batch = batch_of(model, ["Activation rule."])
    seen = []
    with WeMask(model, WeMaskSpec(dims="activation", k=3, me_layer=ME)):
        handle = spy(model, 2, seen)
        with torch.no_grad():
            model.model(**batch.model_inputs())
        handle.remove()
    assert int((seen[0][0, 0] == 0).sum()) == 3


def test_default_falls_back_without_sweep(tmp_path, monkeypatch):
    monkeypatch.setenv("MECHME_CACHE_DIR", str(tmp_path))
    spec, source = default_spec("tiny-llama")
    assert spec == FALLBACK
    assert source.startswith("fallback")
    assert parse_spec("default", "tiny-llama") == FALLBACK
    assert parse_spec("dims=gain,k=4,layers=next_only,gamma=0.5") == WeMaskSpec(
        dims="gain", k=4, layers="next_only", gamma=0.5)


def test_batched_generation_masks_first_real_token(model):
    enc = model.tokenizer(["A long prompt for padding", "Hi"], return_tensors="pt", padding=True)
    pad = int((enc.attention_mask[1] == 0).sum())
    assert pad > 0
    seen = []
    with WeMask(model, WeMaskSpec(dims="gain", k=4, me_layer=ME)) as mask:
        handle = spy(model, 2, seen)
        try:
            with torch.no_grad():
                model.model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=0)
        finally:
            handle.remove()
    prefill = seen[0]
    assert (prefill[0, 0, mask.static_dims] == 0).all()
    assert (prefill[1, pad, mask.static_dims] == 0).all()
    assert (prefill[1, 0, mask.static_dims] != 0).any()


@pytest.mark.parametrize("spec", [
    WeMaskSpec(dims="gain", k=4, layers="next_only", gamma=0.5),
    WeMaskSpec(dims="activation", fraction=0.25, token="released", me_layer=3),
    WeMaskSpec(dims="massive", massive_dims=(17, 5)),
])
def test_spec_string_round_trip(spec):
    assert parse_spec(spec.to_string()) == spec
