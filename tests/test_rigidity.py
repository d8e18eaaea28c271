"""Rigidity and diversity measures against brute force on tiny models, and on SmolLM2-135M."""

import argparse
import json

import numpy as np
import pytest
import torch

from mechme import cli_measures
from mechme.errors import SpecError
from mechme.measures.rigidity import effective_rank, mean_pairwise_cosine, measure_rigidity
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


def remove_first_mlp(layer):
    return Condition(
        name="zero-mlp",
        interventions=(Intervention(site="mlp_out", layers=(layer,), tokens=Tokens.first(), op=Zero()),),
    )


def naive_states(model, ids, zero_mlp_layer=None):
    """Run one unpadded prompt through plain torch; return resid_pre(0), resid_post and attn_in per layer."""
    layers = [model.layer_module(i) for i in range(model.n_layers)]
    posts, attn_ins, pre = [], [], []

    def first_input(store):
        return lambda m, args, kwargs: store.append(args[0] if args else kwargs["hidden_states"])

    def first_output(store):
        return lambda m, args, out: store.append(out[0] if isinstance(out, tuple) else out)

    hooks = [layers[0].register_forward_pre_hook(first_input(pre), with_kwargs=True)]
    attn_in = model.arch.sites["attn_in"]
    for i, layer in enumerate(layers):
        hooks.append(layer.register_forward_hook(first_output(posts)))
        module = model.submodule(i, attn_in.module)
        if attn_in.side == "input":  # OLMo-2 reads the attention module's input
            hooks.append(module.register_forward_pre_hook(first_input(attn_ins), with_kwargs=True))
        else:
            hooks.append(module.register_forward_hook(first_output(attn_ins)))
    if zero_mlp_layer is not None:
        site = model.arch.sites["mlp_out"].module

        def zero_first(module, args, out):
            out = out.clone()
            out[:, 0] = 0.0
            return out

        hooks.append(model.submodule(zero_mlp_layer, site).register_forward_hook(zero_first))
    try:
        with torch.no_grad():
            model.model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    return (pre[0][0].double().numpy(), [p[0].double().numpy() for p in posts],
            [a[0].double().numpy() for a in attn_ins])


def cos(a, b):
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def naive_mean_cos(x):
    values = [cos(x[i], x[j]) for i in range(len(x)) for j in range(len(x)) if i < j]
    return float(np.mean(values))


def naive_erank(x):
    s = np.linalg.svd(x, compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def brute_force(model, rows, zero_mlp_layer=None):
    """Every number of the rigidity measure, by loops over unpadded single-prompt runs."""
    runs = [naive_states(model, ids, zero_mlp_layer) for ids in rows]
    out = {k: [] for k in ("first_cos_prev", "first_norm", "first_across", "other_cos_prev", "other_norm",
                           "other_across", "mean_cos", "mean_cos_wo", "erank", "erank_wo")}
    for layer in range(model.n_layers):
        prev = [run[0] if layer == 0 else run[1][layer - 1] for run in runs]
        post = [run[1][layer] for run in runs]
        attn = [run[2][layer] for run in runs]
        out["first_cos_prev"].append([cos(h[0], p[0]) for h, p in zip(post, prev)])
        out["first_norm"].append([np.linalg.norm(h[0]) for h in post])
        out["first_across"].append(naive_mean_cos(np.stack([h[0] for h in post])))
        out["other_cos_prev"].append([np.mean([cos(h[t], p[t]) for t in range(1, len(h))]) for h, p in zip(post, prev)])
        out["other_norm"].append([np.mean(np.linalg.norm(h[1:], axis=1)) for h in post])
        # Every cosine between positions >= 1 of two different prompts, from the blocks of one Gram matrix.
        units = [h[1:] / np.linalg.norm(h[1:], axis=1, keepdims=True) for h in post]
        pairs = [units[a] @ units[b].T for a in range(len(units)) for b in range(len(units)) if a != b]
        out["other_across"].append(np.concatenate([p.ravel() for p in pairs]).mean())
        out["mean_cos"].append([naive_mean_cos(x) for x in attn])
        out["mean_cos_wo"].append([naive_mean_cos(x[1:]) for x in attn])
        out["erank"].append([naive_erank(x) for x in attn])
        out["erank_wo"].append([naive_erank(x[1:]) for x in attn])
    return {k: np.array(v) for k, v in out.items()}


def assert_matches(ds, expected, condition):
    sel = ds.sel(condition=condition)
    pairs = [
        ("first_cos_prev", "first_cos_prev", 1e-4), ("other_cos_prev", "other_cos_prev", 1e-4),
        ("first_cos_across_prompts", "first_across", 1e-4), ("other_cos_across_prompts", "other_across", 1e-4),
        ("mean_cos", "mean_cos", 1e-4), ("mean_cos_without_first", "mean_cos_wo", 1e-4),
        ("erank", "erank", 1e-3), ("erank_without_first", "erank_wo", 1e-3),
    ]
    for name, key, tol in pairs:
        np.testing.assert_allclose(sel[name].values, expected[key], atol=tol, err_msg=name)
    for name, key in (("first_norm", "first_norm"), ("other_norm", "other_norm")):
        np.testing.assert_allclose(sel[name].values, expected[key], rtol=1e-4, err_msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_rigidity_matches_brute_force(family, tmp_path):
    model = tiny_model(family, plant=Plant(layer=1, dim=9))
    ds, summary = measure_rigidity(model, text=write_prompts(tmp_path), batch_size=3, out=None, progress=False)
    rows = [model.tokenizer(p).input_ids for p in PROMPTS]
    assert len({len(r) for r in rows}) > 1, "equal lengths would not exercise left padding"
    assert_matches(ds, brute_force(model, rows), "baseline")
    assert summary["me_layer"] == 1
    assert [row["layer"] for row in summary["layers"]] == list(range(model.n_layers))


def test_condition_matches_hooked_forward(tmp_path):
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    ds, summary = measure_rigidity(
        model, conditions=[remove_first_mlp(2)], text=write_prompts(tmp_path), batch_size=2, out=None, progress=False
    )
    rows = [model.tokenizer(p).input_ids for p in PROMPTS]
    assert_matches(ds, brute_force(model, rows, zero_mlp_layer=2), "zero-mlp")
    assert_matches(ds, brute_force(model, rows), "baseline")
    base = ds.sel(condition="baseline").first_norm.sel(layer=2)
    edited = ds.sel(condition="zero-mlp").first_norm.sel(layer=2)
    assert float(edited.max()) < 0.01 * float(base.min())
    assert set(summary["conditions"]) == {"zero-mlp"}


def test_pairwise_cosine_and_erank_against_numpy():
    torch.manual_seed(1)
    x = torch.randn(3, 6, 5)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, :2] = False
    mask[2, 0] = False
    got_cos = mean_pairwise_cosine(x, mask)
    got_rank = effective_rank(x, mask)
    for b in range(3):
        rows = x[b][mask[b]].double().numpy()
        assert got_cos[b].item() == pytest.approx(naive_mean_cos(rows), abs=1e-6)
        assert got_rank[b].item() == pytest.approx(naive_erank(rows), abs=1e-5)
    single = torch.ones(1, 4, dtype=torch.bool)
    single[0, 1:] = False
    assert torch.isnan(mean_pairwise_cosine(x[:1, :4], single)).all()


def test_run_file_figures_and_reuse(planted_llama, tmp_path):
    ds, summary = measure_rigidity(planted_llama, out=tmp_path, progress=False)
    store = tmp_path / summary["store"].split("/")[-1]
    assert store.name.startswith("rigidity-")
    assert len(store.stem) == len("rigidity-") + 12
    assert store.exists()
    assert all((tmp_path / f.split("/")[-1]).stat().st_size > 0 for f in summary["figures"])
    assert ds.attrs["mechme_kind"] == "rigidity"
    assert ds.first_cos_prev.dtype == np.float32
    again, summary_again = measure_rigidity(planted_llama, out=tmp_path, progress=False)
    assert summary_again == summary
    assert len(list(tmp_path.glob("rigidity-*.h5"))) == 1


@pytest.mark.parametrize(
    "conditions,message",
    [
        ([Condition(name="baseline")], "reserved"),
        ([Condition(name="a"), Condition(name="a")], "duplicate condition names: a"),
        (["remove-massive"], "must be mechme.specs.Condition"),
    ],
)
def test_bad_conditions_raise(tiny_llama, conditions, message):
    with pytest.raises(SpecError, match=message):
        measure_rigidity(tiny_llama, conditions=conditions, out=None, progress=False)


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="mechme")
    cli_measures.add_parsers(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return cli_measures.COMMANDS[args.command](args)


def test_cli_rigidity_json(tmp_path, capsys):
    folder = tmp_path / "planted"
    model = tiny_model("llama", plant=Plant(layer=2, dim=17))
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    code = run_cli(["rigidity", "--model", str(folder), "--json", "--condition", "remove-massive",
                    "--out", str(tmp_path / "runs")])
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    assert data["me_layer"] == 2
    assert set(data["layers"][0]) >= {"layer", "cos_prev", "cos_across_prompts", "norm"}
    assert set(data["diversity"][0]) >= {
        "layer", "mean_cos", "erank", "mean_cos_without_massive", "erank_without_massive"
    }
    assert set(data["conditions"]) == {"remove-massive"}
    assert data["store"].endswith(".h5")
    # The condition zeroes the planted MLP write at position 0, so the state there stays small.
    assert data["conditions"]["remove-massive"]["layers"][2]["norm"] < 0.01 * data["layers"][2]["norm"]


def test_cli_remove_massive_without_me_layer(tmp_path, capsys):
    folder = tmp_path / "plain"
    model = tiny_model("llama")
    model.model.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    with pytest.raises(SpecError, match="needs an ME Layer"):
        run_cli(["rigidity", "--model", str(folder), "--condition", "remove-massive", "--out", str(tmp_path)])


@pytest.mark.slow
def test_smollm2_first_token_is_rigid_after_me_layer(smollm2):
    ds, summary = measure_rigidity(smollm2, conditions=[remove_first_mlp(11)], out=None, progress=False,
                                   max_tokens=100)
    assert summary["me_layer"] == 11
    base = ds.sel(condition="baseline")
    after = base.sel(layer=slice(12, 26))
    # Measured on 100 tokens of the bundled sentences: cos_prev and cos_across_prompts of
    # position 0 are above 0.9999 from layer 12 to 26, and every prompt's norm exceeds 21,000.
    assert float(after.first_cos_prev.min()) > 0.999
    assert float(after.first_cos_across_prompts.min()) > 0.999
    assert float(after.first_norm.min()) > 2.0e4
    # Ordinary tokens are not fixed that way: across prompts they stay near 0.5-0.7.
    assert float(after.other_cos_across_prompts.max()) < 0.8
    assert float(after.other_norm.max()) < 1.0e3
    # Zeroing the ME Layer's MLP write at position 0 removes the fixed state.
    removed = ds.sel(condition="zero-mlp").sel(layer=slice(12, 26))
    assert float(removed.first_norm.max()) < 2.0e3
    assert float(removed.first_cos_across_prompts.max()) < 0.97


def test_remote_simulation_matches_local(planted_llama):
    import dataclasses

    from mechme.measures.sinks import measure_sinks

    simulated = dataclasses.replace(planted_llama, remote="local", _lm=None)
    for measure, name in ((measure_rigidity, "first_cos_prev"), (measure_sinks, "importance")):
        local, _ = measure(planted_llama, out=None, progress=False, max_tokens=200)
        remote, _ = measure(simulated, out=None, progress=False, max_tokens=200)
        np.testing.assert_allclose(remote[name].values, local[name].values, atol=1e-6, err_msg=name)
