"""WeMask: mask the dominant dims of the massive token's attention input.

After the ME Layer the massive token's state is nearly fixed, and attention reads it in
every later layer. WeMask zeroes (or scales by ``1 - gamma``) a few dims of that token's
attention input, the output of the attention-side norm, in the layers after the ME
Layer. The residual stream and the MLP path are untouched.

Options (`WeMaskSpec`), with what each choice follows:

- ``dims``: ``"gain"`` ranks dims by the |effective gain| of the ME Layer's norm
  (``gain_role``, the attention-side norm by default); this is the paper's description.
  ``"activation"`` ranks dims by |attention input| of the masked token at each layer and
  each forward pass; this is what the authors' released code does. ``"massive"`` uses
  the massive dims found by a scan.
- ``k`` or ``fraction`` of the hidden size. A fraction that rounds to zero dims raises,
  where the released code silently masks nothing.
- ``layers``: ``"from_me"`` (the ME Layer and later), ``"after_me"`` (later layers only,
  the released code's default) or ``"next_only"`` (the layer after the ME Layer only, the
  released code's maths variant).
- ``gamma``: 1 zeroes the dims; a smaller value scales them by ``1 - gamma``.
- ``token``: ``"massive"`` masks only the first real token of each row, during the
  prompt's forward pass (prefill). Under KV-cache generation its masked keys and values
  are reused, and generated tokens are not masked. ``"released"`` masks position 0 of
  every forward pass, as the released code does, which under a KV cache means every
  newly generated token.

`WeMask` carries the mask with plain torch forward hooks, so a masked model can be used
for generation, scoring or training without nnsight::

    with WeMask(model, WeMaskSpec(dims="gain", k=4)):
        model.model.generate(...)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from mechme.errors import SpecError
from mechme.models.loaded import LoadedModel, get_path

logger = logging.getLogger(__name__)

DIM_RULES = ("gain", "activation", "massive")
LAYER_RULES = ("from_me", "after_me", "next_only")
TOKEN_RULES = ("massive", "released")


@dataclass(frozen=True, kw_only=True)
class WeMaskSpec:
    """WeMask settings; see the module docstring for each option."""

    dims: str = "activation"
    k: int | None = None
    fraction: float | None = None
    layers: str = "after_me"
    gamma: float = 1.0
    token: str = "massive"
    gain_role: str = "attn_norm"
    me_layer: int | None = None  # None: located by a scan of the bundled prompts
    massive_dims: tuple[int, ...] = ()  # for dims="massive"; empty: from the scan

    def __post_init__(self):
        for name, value, allowed in (("dims", self.dims, DIM_RULES), ("layers", self.layers, LAYER_RULES),
                                     ("token", self.token, TOKEN_RULES)):
            if value not in allowed:
                raise SpecError(f"invalid WeMask {name} {value!r}; choose one of {', '.join(allowed)}")
        if self.dims != "massive" and (self.k is None) == (self.fraction is None):
            raise SpecError(f"WeMask needs exactly one of k or fraction (got k={self.k!r}, fraction={self.fraction!r})")
        if self.k is not None and self.k < 1:
            raise SpecError(f"WeMask k must be at least 1, got {self.k}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise SpecError(f"WeMask fraction must be in (0, 1], got {self.fraction}")
        if not 0 < self.gamma <= 1:
            raise SpecError(f"WeMask gamma must be in (0, 1], got {self.gamma}; 1 zeroes the dims")
        object.__setattr__(self, "massive_dims", tuple(int(d) for d in self.massive_dims))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_string(self) -> str:
        """Write the spec as ``key=value,...``, which `parse_spec` reads back (defaults left out)."""
        defaults = WeMaskSpec(k=1)
        parts = []
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in ("k", "fraction", "me_layer") and value is None:
                continue
            if field.name not in ("k", "fraction") and value == getattr(defaults, field.name):
                continue
            if field.name == "massive_dims":
                value = "+".join(str(d) for d in value)
            parts.append(f"{field.name}={value:g}" if isinstance(value, float) else f"{field.name}={value}")
        return ",".join(parts)

    def describe(self) -> str:
        if self.k is not None:
            size = f"k={self.k}"
        elif self.fraction is not None:
            size = f"fraction={self.fraction:g}"
        else:
            size = "all massive dims"
        return f"dims={self.dims}, {size}, layers={self.layers}, gamma={self.gamma:g}, token={self.token}"


class WeMask:
    """Apply a `WeMaskSpec` to a loaded model with torch forward hooks.

    Use as a context manager, or call `attach` and `detach`. Resolving the spec may run a
    scan (to find the ME Layer) before any hook is attached.
    """

    def __init__(self, model: LoadedModel, spec: WeMaskSpec):
        self.model = model
        self.spec = spec
        if "attn_norm" not in model.arch.norms:
            raise SpecError(f"WeMask masks the attention-side norm's output, and {model.arch.name} has none")
        self.me_layer, scanned_dims = self._locate(spec)
        self.layers = self._layers()
        width = model.d_model
        self.k = self._count(width)
        self.static_dims = self._static_dims(scanned_dims)
        self._handles: list = []
        self._prefill = True
        self._first = None  # first real position of each row in the current forward

    # -- resolution ------------------------------------------------------------

    def _locate(self, spec: WeMaskSpec) -> tuple[int, tuple[int, ...]]:
        if spec.me_layer is not None and (spec.dims != "massive" or spec.massive_dims):
            self.model.check_layer(spec.me_layer)
            return spec.me_layer, spec.massive_dims
        from mechme.engine.scan import scan

        verdict = scan(model=self.model, out=None, progress=False).verdict
        if verdict["me_layer"] is None:
            raise SpecError(
                f"{self.model.ref} has no ME Layer by the scan's criterion; pass WeMaskSpec(me_layer=L) to mask anyway"
            )
        me = spec.me_layer if spec.me_layer is not None else verdict["me_layer"]
        return me, spec.massive_dims or tuple(verdict["massive_dims"])

    def _layers(self) -> list[int]:
        me, n = self.me_layer, self.model.n_layers
        layers = {"from_me": range(me, n), "after_me": range(me + 1, n), "next_only": range(me + 1, min(me + 2, n))}
        chosen = list(layers[self.spec.layers])
        if not chosen:
            raise SpecError(
                f"WeMask layers={self.spec.layers!r} selects no layer: the ME Layer {me} is the last of {n}"
            )
        return chosen

    def _count(self, width: int) -> int | None:
        spec = self.spec
        if spec.k is not None:
            return min(spec.k, width)
        if spec.fraction is not None:
            k = int(spec.fraction * width)
            if k < 1:
                raise SpecError(
                    f"WeMask fraction {spec.fraction:g} of {width} dims rounds to 0 dims, so it would mask nothing; "
                    f"use fraction >= {1 / width:.4g} or k=1"
                )
            return k
        return None

    def _static_dims(self, scanned: tuple[int, ...]) -> torch.Tensor | None:
        spec = self.spec
        if spec.dims == "activation":
            return None
        if spec.dims == "massive":
            if not scanned:
                raise SpecError("WeMask dims='massive' selects nothing: no massive dims were found")
            dims = list(scanned)[: self.k] if self.k else list(scanned)
        else:
            gain = self.model.effective_gain(self.me_layer, spec.gain_role)
            dims = gain.abs().topk(self.k).indices.tolist()
        bad = [d for d in dims if not 0 <= d < self.model.d_model]
        if bad:
            raise SpecError(f"WeMask dims {bad} are out of range 0..{self.model.d_model - 1}")
        return torch.tensor(sorted(dims), dtype=torch.long)

    def as_condition(self, name: str = "wemask"):
        """Return the prefill edit of this mask as a study `Condition` (site ``attn_in``).

        Studies and measures run prompt forward passes, where both token rules mask the
        first token of an unpadded row, so the condition reproduces the hooks there.
        """
        from mechme.specs import Condition, Dims, Intervention, Scale, Tokens, Zero

        dims = Dims.top_activation(k=self.k) if self.static_dims is None else Dims.of(*self.static_dims.tolist())
        op = Zero() if self.spec.gamma == 1.0 else Scale(factor=1.0 - self.spec.gamma)
        return Condition(name=name, interventions=(
            Intervention(site="attn_in", layers=tuple(self.layers), op=op, tokens=Tokens.first(), dims=dims),))

    # -- hooks -------------------------------------------------------------------

    def attach(self) -> WeMask:
        if self._handles:
            return self
        base = get_path(self.model.model, self.model.arch.layers.rsplit(".", 1)[0])
        self._handles.append(base.register_forward_pre_hook(self._record_inputs, with_kwargs=True))
        for layer in self.layers:
            norm = self.model.norm_module(layer, "attn_norm")
            self._handles.append(norm.register_forward_hook(self._mask))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> WeMask:
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def __call__(self) -> WeMask:
        """Return self, so a `WeMask` can serve as a zero-argument context factory."""
        return self

    def _record_inputs(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        seq = (ids if ids is not None else embeds).shape[1]
        # transformers 5.25 passes the KV cache as `cache`; earlier releases as `past_key_values`.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        cached = 0
        if cache is not None and hasattr(cache, "get_seq_length"):
            cached = int(cache.get_seq_length())
        self._prefill = cached == 0
        mask = kwargs.get("attention_mask")
        positions = kwargs.get("position_ids")
        if not self._prefill:
            self._first = None
        elif isinstance(mask, torch.Tensor) and mask.dim() == 2:
            # Left padding: the first real token is the first 1 of each row.
            self._first = mask[:, -seq:].long().argmax(dim=1)
        elif isinstance(positions, torch.Tensor) and positions.dim() == 2:
            # generate() drops the 2-D mask but passes mask-derived position ids. Pads get
            # id 0 or 1, depending on who built the ids, and precede the first real token,
            # so that token is the last position whose id is 0.
            zero = (positions == 0).long()
            self._first = seq - 1 - zero.flip(1).argmax(dim=1)
        else:
            self._first = None
        return None

    def _mask(self, module, args, output):
        spec = self.spec
        if spec.token == "massive" and not self._prefill:
            return None
        batch = output.shape[0]
        rows = torch.arange(batch, device=output.device)
        if spec.token == "released" or self._first is None:
            cols = torch.zeros(batch, dtype=torch.long, device=output.device)
        else:
            cols = self._first.to(output.device)
        out = output.clone()
        state = out[rows, cols]  # [batch, dim]
        # The mask multiplies the state by a scale tensor instead of writing into it, so
        # training can backpropagate through the ranking's abs().
        scale = torch.ones_like(state)
        keep = 1.0 - spec.gamma
        if self.static_dims is not None:
            scale[:, self.static_dims.to(output.device)] = keep
        elif spec.token == "released":
            # The released code ranks by |h[:, 0]| averaged over the batch.
            scale[:, state.detach().abs().mean(0).topk(self.k).indices] = keep
        else:
            scale.scatter_(1, state.detach().abs().topk(self.k, dim=-1).indices, keep)
        out[rows, cols] = state * scale
        return out


# -- spec strings and recorded defaults -------------------------------------------

FALLBACK = WeMaskSpec(dims="activation", k=2, layers="after_me", gamma=1.0, token="massive")
"""Used by ``--wemask default`` when no sweep has recorded settings for a model: the
released code's ranking and layers, with the two top dims (the released code's rate
0.001 masks nothing on models this small)."""


def defaults_path(model_ref: str) -> Path:
    from mechme.models.bundled import cache_root

    safe = model_ref.replace("/", "--").replace(":", "_")
    return cache_root() / "wemask" / f"{safe}.json"


def repository_defaults_path(model_ref: str) -> Path:
    from mechme.engine.text import DATA_DIR

    safe = model_ref.replace("/", "--").replace(":", "_")
    return DATA_DIR / "wemask" / f"{safe}.json"


def record_default(model_ref: str, spec: WeMaskSpec, evidence: dict) -> Path:
    path = defaults_path(model_ref)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"spec": spec.to_dict(), "evidence": evidence}, indent=2))
    os.replace(tmp, path)
    return path


def default_spec(model_ref: str) -> tuple[WeMaskSpec, str]:
    """Return the recorded WeMask settings for a model and where they came from."""
    for path in (defaults_path(model_ref), repository_defaults_path(model_ref)):
        if path.is_file():
            data = json.loads(path.read_text())
            return WeMaskSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["spec"].items()}), str(path)
    return FALLBACK, "fallback (no sweep recorded)"


def parse_spec(text: str, model_ref: str = "") -> WeMaskSpec:
    """Parse ``"default"`` or ``"key=value,key=value"`` (keys: WeMaskSpec fields)."""
    text = text.strip()
    if text == "default":
        return default_spec(model_ref)[0]
    fields = {f.name: f for f in dataclasses.fields(WeMaskSpec)}
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        if "=" not in item:
            raise SpecError(f"invalid WeMask option {item!r}; write key=value, e.g. dims=gain,k=4")
        key, value = (s.strip() for s in item.split("=", 1))
        if key not in fields:
            raise SpecError(f"unknown WeMask option {key!r}; valid options: {', '.join(fields)}")
        if key in ("k", "me_layer"):
            values[key] = int(value)
        elif key in ("fraction", "gamma"):
            values[key] = float(value)
        elif key == "massive_dims":
            values[key] = tuple(int(v) for v in value.split("+"))
        else:
            values[key] = value
    return WeMaskSpec(**values)


def parse_wemask(text: str, model: LoadedModel) -> WeMask:
    """Build a `WeMask` for ``model`` from a spec string (``"default"`` or ``key=value,...``)."""
    return WeMask(model, parse_spec(text, model.ref))
