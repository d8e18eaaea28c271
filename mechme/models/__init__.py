"""Model loading and architecture tables."""

from mechme.models.architectures import ARCHITECTURES, SITES, Architecture, architecture_for
from mechme.models.loaded import LoadedModel
from mechme.models.loading import DEFAULT_MODEL, load_model

__all__ = ["ARCHITECTURES", "SITES", "Architecture", "DEFAULT_MODEL", "LoadedModel", "architecture_for", "load_model"]
