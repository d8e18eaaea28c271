"""mechme: find, explain and mitigate massive activations in language models."""

__version__ = "0.1.0"
