"""Declarative study specs: selectors, ops, interventions, conditions, studies."""

from mechme.specs.core import (
    Condition,
    Dims,
    Intervention,
    Mean,
    Noise,
    Replace,
    Scale,
    SetGain,
    Study,
    SwapModules,
    SwapNeurons,
    Tokens,
    Zero,
    from_dict,
    to_dict,
)

__all__ = [
    "Condition", "Dims", "Intervention", "Mean", "Noise", "Replace", "Scale", "SetGain", "Study",
    "SwapModules", "SwapNeurons", "Tokens", "Zero", "from_dict", "to_dict",
]
