"""Attribution at the ME Layer: which FFN neurons and which norm gains write the massive entry.

1. **Neurons.** The MLP branch at the massive dim ``d`` of the massive token is
   ``sum_n hidden_n * W_down[d, n]``, so each neuron's contribution is exact: its hidden
   activation times its ``down_proj`` weight on ``d`` (mean over prompts). On Gemma this is
   the raw MLP output, before the post-FFN norm.
2. **Gain dims.** The MLP-side norm's gain ``g`` enters the MLP as ``x_hat * g``; each
   gain dim's attribution is ``g_j * d(mlp_d)/d(g_j)`` (gradient times input, through the
   MLP alone, at the massive token), mean over prompts.
3. **Causal checks.** Ablating the top ``n`` neurons (zeroing their hidden activation at
   the massive token) must remove the massive activation, and ``n`` random neurons,
   several seeded draws, must not. The same for the top gain dims (set to the mean gain)
   against random gain dims.
4. **Joint check.** Gain alone (the top gain dims, or the whole gain vector, set to the
   mean gain), FFN alone (the top neurons zeroed) and both, as conditions of one study.
5. **RMSNorm scale** ``1/rms`` at the MLP-side norm's input, massive token against the
   other tokens, at the ME Layer and the next one.
"""

from __future__ import annotations

import numpy as np
import torch

from mechme.engine.scan import scan
from mechme.engine.sites import read_site
from mechme.engine.study import run_study
from mechme.engine.text import load_prompt_set, make_batches, pad_id, tokenize_rows
from mechme.errors import SpecError
from mechme.models.loaded import LoadedModel
from mechme.specs import Condition, Dims, Intervention, SetGain, Study, Tokens, Zero


def _mlp_norm_role(model: LoadedModel) -> str:
    if "mlp_norm" in model.arch.norms:
        return "mlp_norm"
    raise SpecError(f"{model.arch.name} has no norm before its MLP, so gain attribution does not apply")


def attribute(model: LoadedModel, *, prompts: str = "sentences", n_neurons: int = 8, n_gain_dims: int = 8,
              seeds: tuple[int, ...] = (0, 1, 2, 3, 4), out=None, progress: bool = False) -> dict:
    """Attribute the massive activation at the ME Layer; see the module docstring."""
    import nnsight

    verdict = scan(model=model, prompts=prompts, out=None, progress=False).verdict
    me = verdict["me_layer"]
    if me is None:
        raise SpecError(f"{model.ref} has no ME Layer by the scan's criterion, so there is nothing to attribute")
    dim = verdict["massive_dims"][0]
    role = _mlp_norm_role(model)

    rows = tokenize_rows(model.tokenizer, "prompts", load_prompt_set(prompts), seq_len=128, max_tokens=None)
    batches = make_batches(rows, batch_size=16, pad=pad_id(model.tokenizer))
    down = model.submodule(me, model.arch.mlp.down).weight.detach().float()[dim]  # [neuron]
    contributions, gain_attr, scales = [], [], {me: [], me + 1: []} if me + 1 < model.n_layers else {me: []}
    for batch in batches:
        first = torch.tensor(batch.n_pad)
        rows_idx = torch.arange(len(batch.n_pad))
        with torch.no_grad(), model.lm.trace(batch.model_inputs(), **model.trace_kwargs()):
            mid_full = read_site(model, me, "resid_mid").detach().float().clone()
            hidden = read_site(model, me, "mlp_hidden")[rows_idx, first].detach().float().clone()
            later = {}
            if me + 1 < model.n_layers:
                later = {"next_mid": read_site(model, me + 1, "resid_mid").detach().float().clone()}
            saved = nnsight.save({"mid_full": mid_full, "hidden": hidden, **later})
        saved["mid"] = saved["mid_full"][rows_idx, first]
        contributions.append(saved["hidden"] * down)
        gain_attr.append(_gain_attribution(model, me, role, saved["mid"], dim))
        scales[me].append(_inv_rms_split(saved["mid_full"], model.norm_eps(me, role), batch.n_pad))
        if "next_mid" in saved:
            scales[me + 1].append(_inv_rms_split(saved["next_mid"], model.norm_eps(me + 1, role), batch.n_pad))
    contribution = torch.cat(contributions).mean(0)
    gain_score = torch.cat(gain_attr).mean(0)
    top_neurons = contribution.abs().argsort(descending=True)
    top_gain = gain_score.abs().argsort(descending=True)

    def zero_neurons(neurons):
        return (Intervention(site="mlp_hidden", layers=(me,), op=Zero(), tokens=Tokens.first(),
                             dims=Dims.of(*map(int, neurons))),)

    def mean_gain(dims):
        return (Intervention(site=role, layers=(me,), op=SetGain(to="mean"), tokens=Tokens.all(),
                             dims=Dims.of(*map(int, dims))),)

    conditions = [Condition(name="ffn_top", interventions=zero_neurons(top_neurons[:n_neurons]))]
    for seed in seeds:
        rng = np.random.default_rng(seed)
        conditions.append(Condition(name=f"ffn_random_{seed}",
                                    interventions=zero_neurons(rng.choice(model.d_mlp, n_neurons, replace=False))))
    conditions.append(Condition(name="gain_top", interventions=mean_gain(top_gain[:n_gain_dims])))
    for seed in seeds:
        rng = np.random.default_rng(1000 + seed)
        conditions.append(Condition(name=f"gain_random_{seed}",
                                    interventions=mean_gain(rng.choice(model.d_model, n_gain_dims, replace=False))))
    conditions.append(Condition(name="gain_all", interventions=(
        Intervention(site=role, layers=(me,), op=SetGain(to="mean"), tokens=Tokens.all(), dims=Dims.all()),)))
    conditions.append(Condition(name="both_top", interventions=zero_neurons(top_neurons[:n_neurons])
                                + mean_gain(top_gain[:n_gain_dims])))
    study = Study(name="attribute", model=model.ref, prompts=prompts, conditions=tuple(conditions),
                  dtype=str(model.dtype).removeprefix("torch."))
    result = run_study(study, model=model, out=out, progress=progress)
    summary = result.summary()

    def brief(name):
        s = summary[name]
        return {"massive_max": s["massive_max"], "emerges": s["emerges"], "kl": s["kl"]}

    return {
        "model": model.ref,
        "me_layer": me,
        "massive_dim": dim,
        "baseline_max": summary["baseline"]["massive_max"],
        "top_neurons": [{"neuron": int(n), "contribution": float(contribution[n])} for n in top_neurons[:20]],
        "neuron_share_top": float(contribution[top_neurons[:n_neurons]].sum() / contribution.sum()),
        "ablate_top": {"n": n_neurons, **{k: brief("ffn_top")[k] for k in ("massive_max", "emerges")}},
        "ablate_random": [{"seed": s, **{k: brief(f"ffn_random_{s}")[k] for k in ("massive_max", "emerges")}}
                          for s in seeds],
        "gain_role": role,
        "gain_dims": [{"dim": int(d), "attribution": float(gain_score[d]),
                       "gain": float(model.effective_gain(me, role)[d])} for d in top_gain[:n_gain_dims]],
        "ablate_gain_top": {"n": n_gain_dims, **{k: brief("gain_top")[k] for k in ("massive_max", "emerges")}},
        "ablate_gain_random": [{"seed": s, **{k: brief(f"gain_random_{s}")[k] for k in ("massive_max", "emerges")}}
                               for s in seeds],
        "joint": {
            "gain_top_only": brief("gain_top"),
            "gain_all_only": brief("gain_all"),
            "ffn_top_only": brief("ffn_top"),
            "both_top": brief("both_top"),
        },
        "rms_scale": {str(layer): _summarise_scales(values) for layer, values in scales.items() if values},
        "store": str(result.store) if result.store else None,
    }


def _gain_attribution(model: LoadedModel, layer: int, role: str, mid: torch.Tensor, dim: int) -> torch.Tensor:
    """Gradient-times-gain of the MLP output at ``dim`` for each gain entry, per prompt."""
    norm = model.norm_module(layer, role)
    mlp = model.submodule(layer, "mlp")
    x = mid.float()
    x_hat = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + model.norm_eps(layer, role))
    gain = model.effective_gain(layer, role)
    # Per-prompt attribution needs per-prompt gradients; one MLP call per prompt is cheap.
    per_prompt = []
    for i in range(x_hat.shape[0]):
        g = gain.clone().requires_grad_(True)
        with torch.enable_grad():
            value = mlp((x_hat[i:i + 1] * g).to(norm.weight.dtype))[0, dim]
            (grad_i,) = torch.autograd.grad(value, g)
        per_prompt.append(grad_i * g.detach())
    return torch.stack(per_prompt)


def _inv_rms_split(x: torch.Tensor, eps: float, n_pad: list[int] | None = None) -> dict:
    """1/rms of the first real token and the median over the other real tokens, per prompt."""
    inv = torch.rsqrt(x.float().pow(2).mean(-1) + eps)  # [batch, seq]
    first, others = [], []
    for b in range(inv.shape[0]):
        start = n_pad[b] if n_pad else 0
        first.append(float(inv[b, start]))
        if inv.shape[1] - start > 1:
            others.append(float(inv[b, start + 1:].median()))
    return {"first": first, "others": others}


def _summarise_scales(values: list[dict]) -> dict:
    first = [v for item in values for v in item["first"]]
    others = [v for item in values for v in item["others"]]
    out = {"massive_token": float(np.median(first))}
    if others:
        out["other_tokens"] = float(np.median(others))
        out["ratio"] = out["other_tokens"] / out["massive_token"]
    return out
