"""Small helpers shared by analyses and commands that need a model's ME Layer."""

from __future__ import annotations

from mechme.engine.scan import scan
from mechme.errors import SpecError
from mechme.models.loaded import LoadedModel


def me_layer_of(model: LoadedModel, *, prompts: str = "sentences") -> int:
    """Return the ME Layer found by a scan of ``prompts``; raise when the model has none."""
    verdict = scan(model=model, prompts=prompts, out=None, progress=False).verdict
    if verdict["me_layer"] is None:
        raise SpecError(f"{model.ref} has no ME Layer by the scan's criterion: {verdict['text']}")
    return verdict["me_layer"]
