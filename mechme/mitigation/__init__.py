"""Mitigations of massive activations."""

from mechme.mitigation.wemask import WeMask, WeMaskSpec, parse_spec, parse_wemask

__all__ = ["WeMask", "WeMaskSpec", "parse_spec", "parse_wemask"]
