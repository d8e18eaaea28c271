"""Generation under a condition: prefill-only and every-step edits against torch hooks."""

import pytest
import torch

from mechme.engine.generate import generate
from mechme.errors import SpecError
from mechme.models.tiny import tiny_model
from mechme.specs import Condition, Intervention, Noise, Scale, Tokens, Zero

PROMPTS = ["The quick brown fox jumps", "Hi", "A third, longer prompt here"]
NEW = 6


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama")


def hook_generate(model, hook=None, every_step=False):
    """Reference: plain transformers generation with a forward hook on layer 1's MLP."""
    tok = model.tokenizer
    texts = []
    calls = []

    def wrapped(module, args, output):
        calls.append(1)
        if len(calls) == 1 or every_step:
            return hook(output)
        return output

    handle = model.submodule(1, "mlp").register_forward_hook(wrapped) if hook else None
    try:
        for prompt in PROMPTS:
            calls.clear()
            enc = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                out = model.model.generate(**enc, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                           pad_token_id=tok.pad_token_id)
            texts.append(tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True))
    finally:
        if handle:
            handle.remove()
    return texts


def scale_all(output):
    return output * 40.0


def test_empty_condition_matches_plain_generation(model):
    assert generate(model, PROMPTS, max_new_tokens=NEW) == hook_generate(model)


@pytest.mark.parametrize("when", ["prefill", "every_step"])
def test_when_matches_hook_reference(model, when):
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_out", layers=1, op=Scale(factor=40.0), tokens=Tokens.all(), when=when)])
    got = generate(model, PROMPTS, condition=cond, max_new_tokens=NEW)
    assert got == hook_generate(model, scale_all, every_step=when == "every_step")


def test_prefill_and_every_step_differ(model):
    def cond(when):
        return Condition(name="c", interventions=[
            Intervention(site="mlp_out", layers=1, op=Scale(factor=40.0), tokens=Tokens.all(), when=when)])
    prefill = generate(model, PROMPTS, condition=cond("prefill"), max_new_tokens=NEW)
    every = generate(model, PROMPTS, condition=cond("every_step"), max_new_tokens=NEW)
    assert prefill != every
    assert prefill != generate(model, PROMPTS, max_new_tokens=NEW)


def test_every_step_first_token_is_new_token(model):
    def zero_first(output):
        output = output.clone()
        output[:, 0] = 0
        return output

    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_out", layers=1, op=Zero(), when="every_step")])
    # In a cached pass position 0 is the new token, as in the released WeMask code.
    assert generate(model, PROMPTS, condition=cond, max_new_tokens=NEW) == hook_generate(
        model, zero_first, every_step=True)


def test_bad_generation_input(model):
    with pytest.raises(SpecError, match="max_new_tokens"):
        generate(model, PROMPTS, max_new_tokens=0)
    with pytest.raises(SpecError, match="prompts"):
        generate(model, [])
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_out", layers=1, op=Noise(std=1.0), tokens=Tokens.delimiters(), when="every_step")])
    with pytest.raises(SpecError, match="delimiters"):
        generate(model, PROMPTS, condition=cond)


def test_generation_through_the_remote_simulation(model):
    import dataclasses

    remote = dataclasses.replace(model, remote="local", _lm=model._lm)
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_out", layers=1, op=Scale(factor=40.0), tokens=Tokens.all(), when="every_step")])
    assert generate(remote, PROMPTS, condition=cond, max_new_tokens=NEW) == generate(
        model, PROMPTS, condition=cond, max_new_tokens=NEW)
