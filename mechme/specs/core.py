"""Study specs: frozen, keyword-only dataclasses that serialise to JSON and hash.

A **study** names a model, its text, a list of **conditions** and what to measure. A
condition is a named list of **interventions** (the baseline is the empty list). An
intervention edits one site of some layers, at some tokens and dims, with one op::

    Intervention(site="mlp_out", layers=(11,), tokens=Tokens.first(), dims=Dims.all(), op=Zero())

Gain ops (`SetGain`) target a norm role instead of a site (``site="mlp_norm"``). Inside
the trace they rewrite that norm's output as if its gain had the new value. The model's
weights are not modified, so nothing needs restoring and the edit runs remotely too. Module and neuron swaps (`SwapModules`, `SwapNeurons`) edit weights,
locally only, and restore them when the condition ends.

Every spec has ``to_dict()`` and `from_dict` rebuilds it; `spec_hash` of the dict
names the run file.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from mechme.errors import SpecError

# -- selectors ----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Tokens:
    """Token selector. Positions count real tokens (position 0 is the first non-pad token).

    Kinds:
        ``first``: the massive token, which is the first real token.
        ``positions``: explicit real positions; a negative position counts from the end.
        ``delimiters``: tokens whose text is punctuation or a newline.
        ``all``: every real token.
    """

    kind: str = "first"
    positions: tuple[int, ...] = ()

    KINDS = ("first", "positions", "delimiters", "all")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise SpecError(f"invalid token selector kind {self.kind!r}; choose one of {', '.join(self.KINDS)}")
        if self.kind == "positions" and not self.positions:
            raise SpecError("Tokens(kind='positions') needs at least one position, e.g. Tokens.at(0, 3)")
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))

    @classmethod
    def first(cls) -> Tokens:
        return cls(kind="first")

    @classmethod
    def at(cls, *positions: int) -> Tokens:
        return cls(kind="positions", positions=positions)

    @classmethod
    def delimiters(cls) -> Tokens:
        return cls(kind="delimiters")

    @classmethod
    def all(cls) -> Tokens:
        return cls(kind="all")


@dataclass(frozen=True, kw_only=True)
class Dims:
    """Dim (or neuron) selector.

    Kinds: ``all``; ``explicit`` (``dims``); ``gain_top`` (the ``k`` or ``fraction`` largest
    effective gains of norm ``role`` at ``layer``); ``act_top`` (the ``k`` largest
    |activation| at the intervention's site and selected tokens, per prompt, computed in
    the trace); ``massive`` (the massive dims found by a scan of the study's text).
    """

    kind: str = "all"
    dims: tuple[int, ...] = ()
    k: int | None = None
    fraction: float | None = None
    role: str | None = None
    layer: int | None = None

    KINDS = ("all", "explicit", "gain_top", "act_top", "massive")

    def __post_init__(self):
        if self.kind not in self.KINDS:
            raise SpecError(f"invalid dim selector kind {self.kind!r}; choose one of {', '.join(self.KINDS)}")
        object.__setattr__(self, "dims", tuple(int(d) for d in self.dims))
        if self.kind == "explicit" and not self.dims:
            raise SpecError("Dims(kind='explicit') needs at least one dim, e.g. Dims.of(507)")
        if self.kind in ("gain_top", "act_top"):
            if (self.k is None) == (self.fraction is None):
                raise SpecError(f"Dims(kind={self.kind!r}) needs exactly one of k or fraction")
            if self.k is not None and self.k < 1:
                raise SpecError(f"Dims k must be at least 1, got {self.k}")
            if self.fraction is not None and not 0 < self.fraction <= 1:
                raise SpecError(f"Dims fraction must be in (0, 1], got {self.fraction}")
        if self.kind == "gain_top" and self.role is None:
            raise SpecError("Dims(kind='gain_top') needs role, e.g. Dims.top_gain(role='mlp_norm', layer=11, k=5)")

    @classmethod
    def all(cls) -> Dims:
        return cls(kind="all")

    @classmethod
    def of(cls, *dims: int) -> Dims:
        return cls(kind="explicit", dims=dims)

    @classmethod
    def top_gain(cls, *, role: str, layer: int | None = None, k: int | None = None,
                 fraction: float | None = None) -> Dims:
        return cls(kind="gain_top", role=role, layer=layer, k=k, fraction=fraction)

    @classmethod
    def top_activation(cls, *, k: int | None = None, fraction: float | None = None) -> Dims:
        return cls(kind="act_top", k=k, fraction=fraction)

    @classmethod
    def massive(cls) -> Dims:
        return cls(kind="massive")


# -- ops ----------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Zero:
    """Set the selected entries to 0."""


@dataclass(frozen=True, kw_only=True)
class Scale:
    """Multiply the selected entries by ``factor``."""

    factor: float


@dataclass(frozen=True, kw_only=True)
class Mean:
    """Replace the selected entries by their mean over all real tokens of a calibration run
    on the study's own text (the baseline condition)."""


@dataclass(frozen=True, kw_only=True)
class Noise:
    """Add seeded Gaussian noise with standard deviation ``std`` to the selected entries."""

    std: float
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class Replace:
    """Replace the selected entries with the state of ``prompt`` at the same site, layer
    and position (its first real token for ``Tokens.first()``), from a clean run.

    With ``capture`` (the path of a `mechme capture` file) the state is read from that
    file instead. The file's model must match the study's, which is checked by weights
    sha256, and ``prompt`` may then be the prompt's index in the capture.
    """

    prompt: str | int
    capture: str | None = None


@dataclass(frozen=True, kw_only=True)
class SetGain:
    """Set the selected entries of a norm's effective gain: to ``"mean"`` (the mean gain),
    ``"identity"`` (1), ``"zero"``, or ``"scale"`` (times ``factor``).

    The norm is given by the intervention's ``site``, a norm role such as ``"mlp_norm"``.
    Gemma's effective gain is ``1 + weight``, so ``identity`` means a gain of 1 everywhere.
    """

    to: str = "mean"
    factor: float = 1.0

    def __post_init__(self):
        if self.to not in ("mean", "identity", "zero", "scale"):
            raise SpecError(f"invalid SetGain target {self.to!r}; choose mean, identity, zero or scale")


@dataclass(frozen=True, kw_only=True)
class SwapNeurons:
    """Exchange FFN neurons (gate and up rows and down column together) with ``other_layer``
    or with the same layer of ``checkpoint``. Within one layer (``other_layer`` equal to
    the intervention's layer) a whole-neuron swap is a permutation that changes nothing,
    so there ``pairs`` exchange only the neurons' down_proj columns: neuron i then writes
    neuron j's direction."""

    other_layer: int | None = None
    checkpoint: str | None = None
    pairs: tuple[tuple[int, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "pairs", tuple((int(a), int(b)) for a, b in self.pairs))


@dataclass(frozen=True, kw_only=True)
class SwapModules:
    """Exchange the FFN (``part="mlp"``), the MLP-side norm (``"norm"``) or both with
    ``other_layer`` or with the same layer of ``checkpoint`` (same architecture)."""

    part: str = "mlp"
    other_layer: int | None = None
    checkpoint: str | None = None

    def __post_init__(self):
        if self.part not in ("mlp", "norm", "both"):
            raise SpecError(f"invalid SwapModules part {self.part!r}; choose mlp, norm or both")
        if (self.other_layer is None) == (self.checkpoint is None):
            raise SpecError("SwapModules needs exactly one of other_layer or checkpoint")


OPS = {cls.__name__: cls for cls in (Zero, Scale, Mean, Noise, Replace, SetGain, SwapNeurons, SwapModules)}
WEIGHT_OPS = (SwapNeurons, SwapModules)
WHEN = ("prefill", "every_step")


@dataclass(frozen=True, kw_only=True)
class Intervention:
    """An edit: ``op`` applied at ``site`` of each of ``layers``, at ``tokens`` and ``dims``.

    ``when`` is ``"prefill"`` (the prompt's forward pass only) or ``"every_step"`` (also
    every generated token). Studies score prefill passes; `mechme.engine.generate`
    generates text under a condition and honours both.
    """

    site: str
    layers: tuple[int, ...]
    op: Any
    tokens: Tokens = field(default_factory=Tokens.first)
    dims: Dims = field(default_factory=Dims.all)
    when: str = "prefill"

    def __post_init__(self):
        layers = (self.layers,) if isinstance(self.layers, int) else tuple(int(x) for x in self.layers)
        if not layers:
            raise SpecError(f"intervention at {self.site!r} selects no layer; pass layers=(L, ...)")
        object.__setattr__(self, "layers", layers)
        if type(self.op).__name__ not in OPS:
            raise SpecError(f"invalid op {self.op!r}; choose one of {', '.join(OPS)}")
        if self.when not in WHEN:
            raise SpecError(f"invalid when {self.when!r}; choose one of {', '.join(WHEN)}")


@dataclass(frozen=True, kw_only=True)
class Condition:
    """A named list of interventions applied together; the baseline is the empty list."""

    name: str
    interventions: tuple[Intervention, ...] = ()

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise SpecError(f"condition name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "interventions", tuple(self.interventions))


@dataclass(frozen=True, kw_only=True)
class Study:
    """A causal study: model, text, conditions and how to judge massive activations.

    A baseline condition (no interventions) is always run first; KL divergence, loss
    change and top-1 agreement compare each condition with it.
    """

    name: str
    conditions: tuple[Condition, ...]
    model: str = "smollm2-135m"
    prompts: str = "sentences"
    text: str | None = None
    max_tokens: int | None = None
    seq_len: int = 128
    batch_size: int = 8
    dtype: str = "float32"
    abs_threshold: float = 100.0
    ratio_threshold: float = 1000.0

    def __post_init__(self):
        conditions = tuple(self.conditions)
        names = [c.name for c in conditions]
        if "baseline" in names:
            raise SpecError("the condition name 'baseline' is reserved for the unedited run; rename it")
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SpecError(f"duplicate condition names: {', '.join(dupes)}")
        object.__setattr__(self, "conditions", conditions)

    def to_dict(self) -> dict:
        return to_dict(self)


# -- serialisation --------------------------------------------------------------

_CLASSES = {cls.__name__: cls for cls in (Tokens, Dims, Intervention, Condition, Study, *OPS.values())}


def to_dict(spec) -> Any:
    """Serialise a spec to plain JSON types, tagging each dataclass with ``"type"``."""
    if dataclasses.is_dataclass(spec):
        out = {"type": type(spec).__name__}
        for f in dataclasses.fields(spec):
            out[f.name] = to_dict(getattr(spec, f.name))
        return out
    if isinstance(spec, (list, tuple)):
        return [to_dict(x) for x in spec]
    return spec


def from_dict(data: Any) -> Any:
    """Rebuild a spec serialised by `to_dict`."""
    if isinstance(data, dict) and "type" in data:
        cls = _CLASSES.get(data["type"])
        if cls is None:
            raise SpecError(f"unknown spec type {data['type']!r}; known types: {', '.join(_CLASSES)}")
        kwargs = {k: _tuples(from_dict(v)) for k, v in data.items() if k != "type"}
        return cls(**kwargs)
    if isinstance(data, list):
        return [from_dict(x) for x in data]
    return data


def _tuples(value):
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value
