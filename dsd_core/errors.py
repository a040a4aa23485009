"""Exceptions raised by dsd_core. Every message names the problem and the fix."""


class DSDError(Exception):
    """Base class for errors a user can act on."""


class ModelNotFoundError(DSDError, FileNotFoundError):
    """A model folder, file or hub repository could not be found or downloaded."""


class ModelFormatError(DSDError, ValueError):
    """A model file exists but is not what was asked for (e.g. plain FLUX given as DSD)."""


class InputError(DSDError, ValueError):
    """A generation input (image, size, guidance value, ...) is invalid."""


class GenerationCancelled(DSDError):
    """Raised when a step callback asks to stop."""


class NonFiniteError(DSDError):
    """NaN or infinity appeared while sampling; the run stops instead of returning a black image."""


class ConcurrentUseError(DSDError):
    """A pipeline was called again from inside its own call (pipelines are not re-entrant)."""
