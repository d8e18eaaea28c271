"""Architecture tables: canonical site names mapped to module paths, as pure data.

Each decoder layer of a supported model exposes the same canonical sites. A site is
read at one side (input or output) of one module, relative to the decoder layer
``{layers}[L]``. Shapes are ``[batch, position, dim]`` except ``mlp_hidden``, which
is ``[batch, position, neuron]``.

    resid_pre    residual stream entering layer L
    attn_in      attention input, after its norm
    attn_out     attention branch, as added to the residual (after Gemma's post norm)
    resid_mid    residual stream between the attention and MLP halves
    mlp_in       MLP input, after its norm
    mlp_hidden   MLP hidden state, act(gate) * up: the input of down_proj
    mlp_out      MLP branch, as added to the residual (after Gemma's post norm)
    resid_post   residual stream leaving layer L

Norm roles name the RMSNorm modules of a layer: ``attn_norm`` (before attention),
``mlp_norm`` (before the MLP), and on sandwich-norm models ``attn_post_norm`` and
``mlp_post_norm``. A norm's effective gain is ``weight`` on Llama-style models and
``1 + weight`` on Gemma models (``gain_offset`` 1.0).

Adding an architecture means adding one table here; no logic depends on a model name.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechme.errors import UnsupportedArchitectureError

SITES = (
    "resid_pre",
    "attn_in",
    "attn_out",
    "resid_mid",
    "mlp_in",
    "mlp_hidden",
    "mlp_out",
    "resid_post",
)
"""Canonical sites in the order a forward pass computes them."""

NORM_ROLES = ("attn_norm", "attn_post_norm", "mlp_norm", "mlp_post_norm")


@dataclass(frozen=True)
class Hook:
    """Where a site is read: a module path relative to the layer, a side, a tuple index.

    An empty ``module`` means the decoder layer itself.
    """

    module: str
    side: str  # "input" or "output"
    index: int | None = None  # element of a tuple output, e.g. 0 for self_attn


@dataclass(frozen=True)
class MLPLayout:
    """Module paths of the FFN projections, relative to the layer.

    ``gate_up`` is set instead of ``gate`` and ``up`` when the model fuses them into
    one projection whose first half of output rows is the gate (Phi-3).
    """

    down: str
    gate: str | None = None
    up: str | None = None
    gate_up: str | None = None


@dataclass(frozen=True)
class Architecture:
    """Site table of one model family."""

    name: str
    model_types: tuple[str, ...]  # config.model_type values this table serves
    layers: str  # path of the decoder-layer list from the top model
    sites: dict[str, Hook]
    norms: dict[str, str]  # norm role -> module path relative to the layer
    mlp: MLPLayout
    attention: str = "self_attn"
    final_norm: str = "model.norm"
    gain_offset: float = 0.0  # effective gain = gain_offset + weight
    notes: str = ""
    extra: dict[str, str] = field(default_factory=dict)


def _pre_norm_sites() -> dict[str, Hook]:
    # Llama-style pre-norm layer: x + attn(norm1(x)), then h + mlp(norm2(h)).
    return {
        "resid_pre": Hook("", "input"),
        "attn_in": Hook("input_layernorm", "output"),
        "attn_out": Hook("self_attn", "output", 0),
        "resid_mid": Hook("post_attention_layernorm", "input"),
        "mlp_in": Hook("post_attention_layernorm", "output"),
        "mlp_hidden": Hook("mlp.down_proj", "input"),
        "mlp_out": Hook("mlp", "output"),
        "resid_post": Hook("", "output"),
    }


_PRE_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_GATED_MLP = MLPLayout(gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj")


def _sandwich_sites() -> dict[str, Hook]:
    # Gemma 2/3: each branch has a norm before and after it, both inside the residual.
    return {
        "resid_pre": Hook("", "input"),
        "attn_in": Hook("input_layernorm", "output"),
        "attn_out": Hook("post_attention_layernorm", "output"),
        "resid_mid": Hook("pre_feedforward_layernorm", "input"),
        "mlp_in": Hook("pre_feedforward_layernorm", "output"),
        "mlp_hidden": Hook("mlp.down_proj", "input"),
        "mlp_out": Hook("post_feedforward_layernorm", "output"),
        "resid_post": Hook("", "output"),
    }


_SANDWICH_NORMS = {
    "attn_norm": "input_layernorm",
    "attn_post_norm": "post_attention_layernorm",
    "mlp_norm": "pre_feedforward_layernorm",
    "mlp_post_norm": "post_feedforward_layernorm",
}

ARCHITECTURES: dict[str, Architecture] = {
    table.name: table
    for table in (
        Architecture("llama", ("llama",), "model.layers", _pre_norm_sites(), _PRE_NORMS, _GATED_MLP),
        Architecture("mistral", ("mistral",), "model.layers", _pre_norm_sites(), _PRE_NORMS, _GATED_MLP),
        Architecture("qwen2", ("qwen2",), "model.layers", _pre_norm_sites(), _PRE_NORMS, _GATED_MLP),
        Architecture(
            "qwen3",
            ("qwen3",),
            "model.layers",
            _pre_norm_sites(),
            _PRE_NORMS,
            _GATED_MLP,
            notes="q_norm and k_norm normalise each head after the projections.",
        ),
        Architecture(
            "phi3",
            ("phi3",),
            "model.layers",
            _pre_norm_sites(),
            _PRE_NORMS,
            MLPLayout(gate_up="mlp.gate_up_proj", down="mlp.down_proj"),
            notes="gate and up are fused in gate_up_proj; rows [0, I) are the gate.",
        ),
        Architecture(
            "gemma2",
            ("gemma2",),
            "model.layers",
            _sandwich_sites(),
            _SANDWICH_NORMS,
            _GATED_MLP,
            gain_offset=1.0,
        ),
        Architecture(
            "gemma3",
            ("gemma3_text", "gemma3"),
            "model.layers",
            _sandwich_sites(),
            _SANDWICH_NORMS,
            _GATED_MLP,
            gain_offset=1.0,
            notes="The MLP-side pre norm is pre_feedforward_layernorm, not post_attention_layernorm.",
        ),
        Architecture(
            "olmo2",
            ("olmo2",),
            "model.layers",
            {
                # OLMo-2 normalises each branch's output, not its input.
                "resid_pre": Hook("", "input"),
                "attn_in": Hook("self_attn", "input"),
                "attn_out": Hook("post_attention_layernorm", "output"),
                "resid_mid": Hook("mlp", "input"),
                "mlp_in": Hook("mlp", "input"),
                "mlp_hidden": Hook("mlp.down_proj", "input"),
                "mlp_out": Hook("post_feedforward_layernorm", "output"),
                "resid_post": Hook("", "output"),
            },
            {"attn_post_norm": "post_attention_layernorm", "mlp_post_norm": "post_feedforward_layernorm"},
            _GATED_MLP,
            notes="No norm precedes attention or the MLP, so attn_in and mlp_in are un-normalised.",
        ),
    )
}

_BY_MODEL_TYPE = {mt: table for table in ARCHITECTURES.values() for mt in table.model_types}


def supported_model_types() -> list[str]:
    """Return the ``config.model_type`` values that have a site table."""
    return sorted(_BY_MODEL_TYPE)


def architecture_for(config) -> Architecture:
    """Return the site table for a Hugging Face config, keyed on ``config.model_type``."""
    model_type = getattr(config, "model_type", None)
    table = _BY_MODEL_TYPE.get(model_type)
    if table is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or ['unknown class'])}). "
            f"Supported model types: {', '.join(supported_model_types())}. "
            "To add one, write its site table in mechme/models/architectures.py."
        )
    return table
