"""`LoadedModel`: a Hugging Face causal LM, its tokenizer, its site table and provenance."""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field

import torch

from mechme.errors import SpecError
from mechme.models.architectures import NORM_ROLES, SITES, Architecture, architecture_for


@dataclass
class LoadedModel:
    """A loaded model ready for tracing.

    Attributes:
        ref: the reference it was loaded from, e.g. ``"smollm2-135m"`` or a folder.
        model: the ``transformers`` causal LM, in eval mode.
        tokenizer: its tokenizer.
        arch: the site table for its architecture.
        weights_sha256: sha256 of the weights (file bytes where known, else tensor bytes).
        remote: ``None`` for a local model, else the nnsight remote backend to use
            (``"local"`` for the in-process simulation, ``"ndif"`` for the NDIF service).
        repo_id: the Hugging Face id under which NDIF hosts the model (``ndif:`` models only).
    """

    ref: str
    model: torch.nn.Module
    tokenizer: object
    arch: Architecture = None
    weights_sha256: str | None = None
    remote: str | None = None
    repo_id: str | None = None
    remote_options: dict = field(default_factory=dict)  # BoundedRemoteBackend options: host, timeouts
    _lm: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.arch is None:
            self.arch = architecture_for(self.model.config)

    # -- shape facts ---------------------------------------------------------

    @property
    def config(self):
        return self.model.config

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.config.hidden_size)

    @property
    def d_mlp(self) -> int:
        return int(self.config.intermediate_size)

    @property
    def n_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- modules -------------------------------------------------------------

    def layer_module(self, layer: int) -> torch.nn.Module:
        """Return decoder layer ``layer`` of the underlying torch model."""
        self.check_layer(layer)
        return get_path(self.model, self.arch.layers)[layer]

    def submodule(self, layer: int, path: str) -> torch.nn.Module:
        """Return the module at ``path`` relative to decoder layer ``layer``."""
        module = self.layer_module(layer)
        return get_path(module, path) if path else module

    def norm_module(self, layer: int, role: str) -> torch.nn.Module:
        """Return the RMSNorm that plays ``role`` (e.g. ``"mlp_norm"``) in ``layer``."""
        path = self.arch.norms.get(role)
        if path is None:
            raise SpecError(
                f"norm role {role!r} does not exist on {self.arch.name}; "
                f"available roles: {', '.join(self.arch.norms) or 'none'} "
                f"(all roles: {', '.join(NORM_ROLES)})"
            )
        return self.submodule(layer, path)

    def effective_gain(self, layer: int, role: str) -> torch.Tensor:
        """Return the effective gain of a norm: ``weight`` or ``1 + weight`` on Gemma."""
        weight = self.norm_module(layer, role).weight.detach().float()
        return weight + self.arch.gain_offset

    def norm_eps(self, layer: int, role: str) -> float:
        module = self.norm_module(layer, role)
        for name in ("variance_epsilon", "eps"):
            if hasattr(module, name):
                return float(getattr(module, name))
        return float(getattr(self.config, "rms_norm_eps", 1e-6))

    def check_layer(self, layer: int) -> None:
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SpecError(f"layer {layer!r} is out of range; this model has layers 0..{self.n_layers - 1}")

    def check_site(self, site: str) -> None:
        if site not in self.arch.sites:
            raise SpecError(f"unknown site {site!r}; valid sites: {', '.join(SITES)}")

    def site_width(self, site: str) -> int:
        """Return the size of the last axis of a site: ``d_mlp`` for mlp_hidden, else ``d_model``."""
        self.check_site(site)
        return self.d_mlp if site == "mlp_hidden" else self.d_model

    # -- nnsight -------------------------------------------------------------

    @property
    def lm(self):
        """The nnsight ``TransformersModel`` wrapping this model (built once, no copy)."""
        if self._lm is None:
            from nnsight import TransformersModel

            self._lm = TransformersModel(self.model, tokenizer=self.tokenizer)
        return self._lm

    def envoy(self, layer: int, path: str):
        """Return the nnsight envoy for ``path`` relative to decoder layer ``layer``."""
        node = get_path(self.lm, self.arch.layers)[layer]
        return get_path(node, path) if path else node

    def trace_kwargs(self) -> dict:
        """Keyword arguments that send a trace to the configured remote backend."""
        if self.remote is None:
            return {}
        if self.remote == "local":
            return {"remote": "local"}
        from mechme.engine.remote import BoundedRemoteBackend, model_key

        return {"backend": BoundedRemoteBackend(model_key(self), **self.remote_options)}

    def describe(self) -> dict:
        return {
            "model": self.ref,
            "architecture": self.arch.name,
            "model_class": type(self.model).__name__,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "dtype": str(self.dtype).removeprefix("torch."),
            "weights_sha256": self.weights_sha256 or "",
        }


def get_path(obj, path: str):
    """Return the attribute at a dotted ``path`` below ``obj`` (e.g. ``"model.layers"``)."""
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def tensor_sha256(model: torch.nn.Module) -> str:
    """Hash a model's parameters and buffers by name, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """Hash a file; cached per (path, size, mtime) for the life of the process."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
