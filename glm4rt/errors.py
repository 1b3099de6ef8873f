"""Exceptions glm4rt raises for bad input. All are ValueError subclasses, so callers that catch
ValueError keep working; each message names the file, tensor, setting or argument at fault."""


class Glm4rtError(ValueError):
    """Base class of glm4rt's own errors."""


class ConfigError(Glm4rtError):
    """A config.json that is unreadable or asks for something glm4rt does not compute."""


class CheckpointError(Glm4rtError):
    """A checkpoint that is corrupt, truncated, or does not match its config."""
