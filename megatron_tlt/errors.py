"""Errors caused by the user's input (config, data, checkpoints): the CLI prints them as one line."""


class UserError(Exception):
    """Base class for errors the user can fix; the message says what and where."""


class CheckpointError(UserError, ValueError):
    """A checkpoint or model directory is missing, incomplete, corrupt, or does not match the config."""


class LayoutError(UserError, ValueError):
    """The parallel layout does not fit the world size (or the model): the message names the sizes."""
