"""Errors that carry one actionable line for the user (the CLI prints it and exits with status 2)."""


class MarcacheError(Exception):
    """Base class: bad user input (config, CLI argument, checkpoint, plugin parameter)."""


class CheckpointError(MarcacheError):
    """A checkpoint file that cannot be loaded into the requested model."""


class ConfigError(MarcacheError):
    """An invalid policy / plugin configuration."""


class PluginError(MarcacheError):
    """Unknown, conflicting or malformed plugins."""
