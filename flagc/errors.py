"""flagc's error types: every user-facing failure is a FlagcError with a message naming the culprit.

The CLI prints `error: <message>` for these and exits non-zero; anything else is a bug in flagc.
"""

from __future__ import annotations

__all__ = [
    "FlagcError",
    "ConfigError",
    "CheckpointError",
    "IRError",
    "VerifyError",
    "LoweringError",
    "RuntimeInputError",
    "SamplingError",
    "HubError",
    "ArtifactError",
    "ResourceError",
]


class FlagcError(Exception):
    """Base class of every error flagc reports to users."""


class ConfigError(FlagcError):
    """A model config (config.json, GGUF metadata, CLI flags) is missing a field or holds a bad value."""


class CheckpointError(FlagcError):
    """A weight file is missing, corrupt, truncated, or lacks / mis-shapes a tensor."""


class IRError(FlagcError):
    """An IR graph could not be built, parsed or interpreted."""


class VerifyError(IRError):
    """The IR verifier found a malformed graph; the message names the node."""


class LoweringError(FlagcError):
    """An IR op has no lowering for the requested target, or lowering failed."""


class RuntimeInputError(FlagcError):
    """Bad input at run time: prompt over the context limit, wrong shapes, empty prompt."""


class SamplingError(RuntimeInputError):
    """An invalid sampling value (temperature < 0, top_p outside (0, 1], ...)."""


class HubError(FlagcError):
    """The model hub could not deliver a model (404, timeout, bad digest, unexpected answer)."""


class ArtifactError(FlagcError):
    """An artifact folder or engine file is missing, corrupt, or from an incompatible flagc."""


class ResourceError(FlagcError):
    """A build would not fit this machine (memory, disk); refused before anything is written."""
