"""The one error type for bad user input: the bottom layer, imported by every other."""


class SpecError(ValueError):
    """A bad value in a run spec, suite file or command line; the message names it."""
