"""Exceptions raised by mechme.

Every error a user can cause derives from `MechmeError`, so a caller can catch one
class. Messages name the offending value and say how to fix it.
"""


class MechmeError(Exception):
    """Base class for errors caused by invalid input or an unusable environment."""


class ModelNotFoundError(MechmeError):
    """A model reference does not resolve to a loadable model."""


class UnsupportedArchitectureError(MechmeError):
    """A model's architecture has no site table."""


class SpecError(MechmeError, ValueError):
    """A spec, selector or option is invalid for the model it targets."""


class TextError(MechmeError, ValueError):
    """Input text is missing, empty, undecodable or too short."""


class StoreError(MechmeError):
    """A run file is unwritable, corrupt, or belongs to another spec."""


class RemoteError(MechmeError):
    """A remote (NDIF) run cannot start or did not finish."""
