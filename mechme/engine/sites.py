"""Read canonical sites inside an nnsight trace."""

from __future__ import annotations

from mechme.models.architectures import SITES
from mechme.models.loaded import LoadedModel


def read_site(loaded: LoadedModel, layer: int, site: str):
    """Return the value at ``site`` of ``layer`` inside an active trace.

    The value is the live tensor: in-place writes to it change the forward pass.
    Sites must be read in forward order within one trace (see ``SITES``); nnsight
    raises ``OutOfOrderError`` otherwise.
    """
    hook = loaded.arch.sites[site]
    envoy = loaded.envoy(layer, hook.module)
    value = envoy.output if hook.side == "output" else envoy.input
    return value[hook.index] if hook.index is not None else value


def forward_order(layer_sites: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Sort ``(layer, site)`` pairs into the order a forward pass computes them."""
    return sorted(set(layer_sites), key=lambda pair: (pair[0], SITES.index(pair[1])))
