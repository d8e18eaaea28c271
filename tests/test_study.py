"""Study specs and the study engine on tiny models, against hand-written torch references."""

import json
import re

import numpy as np
import pytest
import torch

from mechme.engine.compile import Context, compile_condition, weight_edits
from mechme.engine.study import BASELINE, load_study_file, run_study, trace_condition
from mechme.engine.text import make_batches, pad_id
from mechme.errors import SpecError
from mechme.models.tiny import Plant, tiny_model
from mechme.specs import (
    Condition, Dims, Intervention, Mean, Noise, Replace, Scale, SetGain, Study, SwapModules, SwapNeurons,
    Tokens, Zero, from_dict,
)
from mechme.store import spec_hash

TEXTS = ["The quick brown fox.", "Hi!", "A longer line, with commas; and more."]


@pytest.fixture
def setup():
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    rows = [model.tokenizer(t).input_ids for t in TEXTS]
    batch = make_batches(rows, batch_size=3, pad=pad_id(model.tokenizer))[0]
    strings = [model.tokenizer.convert_ids_to_tokens(r) for r in rows]
    study = Study(name="t", model="tiny", conditions=())
    ctx = Context(model=model, me_layer=2, massive_dims=(17,))
    return model, batch, strings, study, ctx


def engine_logprobs(setup, condition):
    model, batch, strings, study, ctx = setup
    with weight_edits(condition, ctx):
        _, logprobs = trace_condition(study, ctx, compile_condition(condition, ctx), batch, strings, None)
    return logprobs


def reference_logprobs(model, batch, hooks):
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        with torch.no_grad():
            logits = model.model(**batch.model_inputs()).logits
    finally:
        for h in handles:
            h.remove()
    return torch.log_softmax(logits.float(), -1)


def first_positions(batch):
    return torch.arange(len(batch.n_pad)), torch.tensor(batch.n_pad)


def test_baseline_bit_identical_to_plain_forward(setup):
    model, batch = setup[0], setup[1]
    got = engine_logprobs(setup, BASELINE)
    with torch.no_grad():
        plain = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
    assert torch.equal(got, plain)


def test_zero_mlp_out_matches_hook(setup):
    model, batch = setup[0], setup[1]
    rows, cols = first_positions(batch)

    def hook(module, args, output):
        output = output.clone()
        output[rows, cols] = 0
        return output

    cond = Condition(name="c", interventions=[Intervention(site="mlp_out", layers=2, op=Zero())])
    expected = reference_logprobs(model, batch, [(model.submodule(2, "mlp"), hook)])
    torch.testing.assert_close(engine_logprobs(setup, cond), expected)


def test_scale_explicit_dims_all_tokens_matches_hook(setup):
    model, batch = setup[0], setup[1]
    real = batch.attention_mask.bool()

    def hook(module, args, output):
        output = output.clone()
        output[..., [3, 17]] = torch.where(real.unsqueeze(-1), output[..., [3, 17]] * 0.25, output[..., [3, 17]])
        return output

    cond = Condition(name="c", interventions=[
        Intervention(site="resid_post", layers=1, op=Scale(factor=0.25), tokens=Tokens.all(), dims=Dims.of(3, 17)),
    ])
    expected = reference_logprobs(model, batch, [(model.layer_module(1), hook)])
    torch.testing.assert_close(engine_logprobs(setup, cond), expected)


def test_set_gain_matches_weight_edit(setup):
    model, batch = setup[0], setup[1]
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_norm", layers=2, op=SetGain(to="zero"), tokens=Tokens.all(), dims=Dims.of(5, 9)),
    ])
    got = engine_logprobs(setup, cond)
    norm = model.norm_module(2, "mlp_norm")
    saved = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight[[5, 9]] = 0.0
        expected = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
        norm.weight.copy_(saved)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(norm.weight, saved)


def test_set_gain_identity_on_gemma_means_gain_one():
    model = tiny_model("gemma3")
    rows = [model.tokenizer(t).input_ids for t in TEXTS]
    batch = make_batches(rows, batch_size=3, pad=pad_id(model.tokenizer))[0]
    strings = [model.tokenizer.convert_ids_to_tokens(r) for r in rows]
    ctx = Context(model=model)
    study = Study(name="t", model="tiny", conditions=())
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_norm", layers=1, op=SetGain(to="identity"), tokens=Tokens.all()),
    ])
    _, got = trace_condition(study, ctx, compile_condition(cond, ctx), batch, strings, None)
    norm = model.norm_module(1, "mlp_norm")
    saved = norm.weight.detach().clone()
    with torch.no_grad():
        norm.weight.zero_()  # Gemma's effective gain is 1 + weight
        expected = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
        norm.weight.copy_(saved)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_mean_op_uses_calibration(setup):
    model, batch, strings, study, ctx = setup
    ctx.calibration[(1, "resid_post")] = torch.full((model.d_model,), 0.5)
    rows, cols = first_positions(batch)

    def hook(module, args, output):
        output = output.clone()
        output[rows, cols] = 0.5
        return output

    cond = Condition(name="c", interventions=[Intervention(site="resid_post", layers=1, op=Mean())])
    expected = reference_logprobs(model, batch, [(model.layer_module(1), hook)])
    torch.testing.assert_close(engine_logprobs(setup, cond), expected)


def test_noise_is_seeded_and_moves_logits(setup):
    cond = Condition(name="c", interventions=[Intervention(site="resid_pre", layers=1, op=Noise(std=2.0, seed=3))])
    a, b = engine_logprobs(setup, cond), engine_logprobs(setup, cond)
    assert torch.equal(a, b)
    assert not torch.allclose(a, engine_logprobs(setup, BASELINE))


def test_replace_with_state_of_other_prompt(setup):
    model, batch, strings, study, ctx = setup
    source = model.tokenizer("Zebra", return_tensors="pt").input_ids
    with torch.no_grad():
        clean = model.model(source, output_hidden_states=True).hidden_states[2][0, 0]  # output of layer 1
    ctx.replacements[("Zebra", 1, "resid_post", 0)] = clean
    rows, cols = first_positions(batch)

    def hook(module, args, output):
        output = output.clone()
        output[rows, cols] = clean
        return output

    cond = Condition(name="c", interventions=[Intervention(site="resid_post", layers=1, op=Replace(prompt="Zebra"))])
    expected = reference_logprobs(model, batch, [(model.layer_module(1), hook)])
    torch.testing.assert_close(engine_logprobs(setup, cond), expected)


def test_swap_modules_between_layers_and_restore(setup):
    model = setup[0]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_out", layers=2, op=SwapModules(part="both", other_layer=0)),
    ])
    got = engine_logprobs(setup, cond)
    assert not torch.allclose(got, engine_logprobs(setup, BASELINE))
    for k, v in model.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_swap_neurons_within_layer_exchanges_outputs(setup):
    model, batch = setup[0], setup[1]
    cond = Condition(name="c", interventions=[
        Intervention(site="mlp_hidden", layers=2, op=SwapNeurons(other_layer=2, pairs=((0, 5),))),
    ])
    got = engine_logprobs(setup, cond)
    down = model.submodule(2, "mlp.down_proj").weight
    saved = down.detach().clone()
    with torch.no_grad():
        down[:, [0, 5]] = saved[:, [5, 0]]
        expected = torch.log_softmax(model.model(**batch.model_inputs()).logits.float(), -1)
        down.copy_(saved)
    torch.testing.assert_close(got, expected)


WRITE_OPS = [
    Intervention(site="attn_in", layers=1, op=Zero()),
    Intervention(site="mlp_hidden", layers=1, op=Scale(factor=3.0), tokens=Tokens.all()),
    Intervention(site="resid_post", layers=0, op=Noise(std=1.0)),
    Intervention(site="mlp_norm", layers=1, op=SetGain(to="scale", factor=2.0), tokens=Tokens.all()),
    Intervention(site="attn_norm", layers=1, op=SetGain(to="zero"), tokens=Tokens.first(), dims=Dims.of(0, 1, 2)),
    Intervention(site="mlp_out", layers=1, op=SwapModules(part="mlp", other_layer=3)),
    Intervention(site="mlp_hidden", layers=1, op=SwapNeurons(other_layer=3, pairs=((1, 2),))),
    Intervention(site="resid_mid", layers=1, op=Zero(), tokens=Tokens.at(-1), dims=Dims.top_activation(k=4)),
]


@pytest.mark.parametrize("intervention", WRITE_OPS, ids=lambda iv: f"{type(iv.op).__name__}-{iv.site}")
def test_every_write_op_moves_logits(setup, intervention):
    got = engine_logprobs(setup, Condition(name="c", interventions=[intervention]))
    assert not torch.allclose(got, engine_logprobs(setup, BASELINE))


def test_spec_roundtrip_and_stable_hash():
    study = Study(name="s", conditions=[Condition(name="c", interventions=WRITE_OPS)])
    data = study.to_dict()
    rebuilt = from_dict(json.loads(json.dumps(data)))
    assert rebuilt == study
    assert spec_hash(rebuilt.to_dict()) == spec_hash(data)
    # The hash is fixed by content: pin it so an accidental format change shows up.
    small = Study(name="s", conditions=[Condition(name="c", interventions=[
        Intervention(site="mlp_out", layers=11, op=Zero())])])
    assert spec_hash(small.to_dict()) == spec_hash(from_dict(small.to_dict()).to_dict())


@pytest.mark.parametrize(
    "intervention,message",
    [
        (Intervention(site="mlp_outt", layers=1, op=Zero()), "unknown site 'mlp_outt'; valid sites: resid_pre"),
        (Intervention(site="mlp_out", layers=9, op=Zero()), "layer 9 is out of range; this model has layers 0..3"),
        (Intervention(site="mlp_out", layers=1, op=Zero(), dims=Dims.of(64)), "dims [64] are out of range"),
        (Intervention(site="mlp_out", layers=1, op=SetGain()), "SetGain needs a norm role"),
        (Intervention(site="mlp_out", layers=1, op=Zero(), dims=Dims.top_activation(fraction=0.001)),
         "rounds to 0 dims"),
    ],
)
def test_validation_errors_list_valid_values(setup, intervention, message):
    ctx = setup[4]
    with pytest.raises(SpecError, match=re.escape(message)):
        compile_condition(Condition(name="c", interventions=[intervention]), ctx)


def test_selector_that_matches_nothing_raises():
    model = tiny_model("llama")
    ctx = Context(model=model, massive_dims=())
    cond = Condition(name="c", interventions=[Intervention(site="resid_post", layers=1, op=Zero(), dims=Dims.massive())])
    with pytest.raises(SpecError, match="selects nothing"):
        compile_condition(cond, ctx)


def test_reserved_and_duplicate_condition_names():
    with pytest.raises(SpecError, match="reserved"):
        Study(name="s", conditions=[Condition(name="baseline")])
    with pytest.raises(SpecError, match="duplicate condition names: a"):
        Study(name="s", conditions=[Condition(name="a"), Condition(name="a")])


def test_first_token_right_under_left_padding(setup):
    model, batch, strings, study, ctx = setup
    assert len(set(batch.n_pad)) > 1
    cond = Condition(name="c", interventions=[Intervention(site="mlp_out", layers=2, op=Zero())])
    stats, _ = trace_condition(study, ctx, compile_condition(cond, ctx), batch, strings, None)
    base, _ = trace_condition(study, ctx, compile_condition(BASELINE, ctx), batch, strings, None)
    # The planted neuron fires on BOS; zeroing position 0 must remove it there in every row.
    massive_base = base["massive_by_layer"][:, 0, 0]
    assert (massive_base > 1000).all()


def test_run_study_remote_local_equals_local(tmp_path):
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    study = Study(name="r", model="tiny", conditions=[
        Condition(name=type(iv.op).__name__ + iv.site, interventions=[iv])
        for iv in WRITE_OPS if not isinstance(iv.op, (SwapModules, SwapNeurons))
    ])
    local = run_study(study, model=model, out=None, progress=False).summary()
    remote = run_study(study, model=model, out=None, progress=False, remote="local").summary()
    assert remote == local


def test_weight_ops_rejected_remotely():
    model = tiny_model("llama")
    study = Study(name="w", model="tiny", conditions=[Condition(name="c", interventions=[WRITE_OPS[5]])])
    with pytest.raises(SpecError, match="only works on a local model"):
        run_study(study, model=model, out=None, progress=False, remote="local")


def test_study_file_and_resume(tmp_path, monkeypatch):
    from mechme.engine import study as study_module

    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    study = Study(name="r", model="tiny", batch_size=4, conditions=[
        Condition(name="zero", interventions=[Intervention(site="mlp_out", layers=2, op=Zero())])])
    real = study_module._run_batch
    calls = []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(study_module, "_run_batch", flaky)
    with pytest.raises(KeyboardInterrupt):
        run_study(study, model=model, out=tmp_path, progress=False)
    assert not list(tmp_path.glob("study-*.h5"))
    monkeypatch.setattr(study_module, "_run_batch", real)
    resumed = run_study(study, model=model, out=tmp_path, progress=False)
    fresh = run_study(study, model=model, out=None, progress=False)
    assert resumed.summary() == fresh.summary()
    np.testing.assert_array_equal(resumed.dataset.kl_sum.values, fresh.dataset.kl_sum.values)

    path = tmp_path / "study_def.py"
    path.write_text("from mechme.specs import *\nstudy = Study(name='f', conditions=[Condition(name='a')])\n")
    assert load_study_file(path).name == "f"
    path.write_text("x = 1\n")
    with pytest.raises(SpecError, match="defines 0 Study objects"):
        load_study_file(path)


def _all_op_study(**kwargs):
    ops = [
        *WRITE_OPS,
        Intervention(site="attn_in", layers=1, op=Mean(), tokens=Tokens.first()),
        Intervention(site="resid_pre", layers=2, op=Replace(prompt="A different source prompt"), tokens=Tokens.at(1)),
        # Two conditions at one layer on the norm's input and output sides.
        Intervention(site="attn_norm", layers=2, op=SetGain(to="zero"), tokens=Tokens.all(), dims=Dims.of(3, 17)),
    ]
    return Study(name="stack", model="tiny", batch_size=3, conditions=[
        Condition(name=f"c{i}-{type(iv.op).__name__}", interventions=[iv]) for i, iv in enumerate(ops)
    ], **kwargs)


def test_stacked_conditions_match_one_trace_each():
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    study = _all_op_study()
    one_each = run_study(study, model=model, out=None, progress=False, stack_tokens=1).dataset
    stacked = run_study(study, model=model, out=None, progress=False, stack_tokens=4096).dataset
    for name in ("kl_sum", "nll_sum", "me_top", "massive_by_layer"):
        np.testing.assert_allclose(stacked[name].values, one_each[name].values, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(stacked.agree_sum.values, one_each.agree_sum.values)
    # Every condition moves the next-token distributions, so a mix-up of rows would show.
    # (The one that edits only the last token changes no scored prediction.)
    kl = stacked.kl_sum.sum("prompt").to_series()
    assert kl["baseline"] == 0
    assert (kl.drop(["baseline", "c7-Zero"]) > 0).all(), kl


def test_condition_groups():
    from mechme.engine.study import _groups

    model = tiny_model("llama")
    batch = make_batches([model.tokenizer(t).input_ids for t in TEXTS], batch_size=3, pad=pad_id(model.tokenizer))[0]
    study = _all_op_study()
    groups = _groups(study, batch, stack_tokens=4 * batch.input_ids.numel())
    assert groups[0][0] == "baseline"
    assert sorted(sum(groups, [])) == sorted(["baseline", *(c.name for c in study.conditions)])
    weight = {c.name for c in study.conditions if isinstance(c.interventions[0].op, (SwapModules, SwapNeurons))}
    for group in groups:
        assert len(group) <= 4
        assert len(group) == 1 or not weight & set(group)
    one_each = _groups(study, batch, stack_tokens=1)
    assert one_each[0] == ["baseline"]
    assert sorted(one_each) == sorted([n] for n in ["baseline", *(c.name for c in study.conditions)])
    with pytest.raises(SpecError, match="stack_tokens"):
        run_study(study, model=model, out=None, progress=False, stack_tokens=0)
