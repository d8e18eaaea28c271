"""Ablate the parts of SmolLM2's ME Layer (11) that could create its massive activation.

Run with `mechme run analyses/me_layer_ablation.py`.
"""

from mechme.specs import Condition, Dims, Intervention, Noise, Scale, SetGain, Study, Tokens, Zero

ME_LAYER = 11

study = Study(
    name="me-layer-ablation",
    model="smollm2-135m",
    conditions=[
        Condition(name="mlp_out_zero_first", interventions=[
            Intervention(site="mlp_out", layers=ME_LAYER, op=Zero(), tokens=Tokens.first()),
        ]),
        Condition(name="mlp_out_zero_second", interventions=[
            Intervention(site="mlp_out", layers=ME_LAYER, op=Zero(), tokens=Tokens.at(1)),
        ]),
        Condition(name="mlp_norm_gain_identity", interventions=[
            Intervention(site="mlp_norm", layers=ME_LAYER, op=SetGain(to="identity"), tokens=Tokens.all()),
        ]),
        Condition(name="mlp_norm_gain_mean", interventions=[
            Intervention(site="mlp_norm", layers=ME_LAYER, op=SetGain(to="mean"), tokens=Tokens.all()),
        ]),
        Condition(name="massive_dims_halved", interventions=[
            Intervention(site="resid_post", layers=ME_LAYER, op=Scale(factor=0.5), dims=Dims.massive()),
        ]),
        Condition(name="first_token_noise", interventions=[
            Intervention(site="resid_pre", layers=ME_LAYER, op=Noise(std=1.0, seed=0)),
        ]),
    ],
)
