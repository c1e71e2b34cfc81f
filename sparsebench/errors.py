"""Errors every layer raises: the bottom layer, imported by every other."""


class SpecError(ValueError):
    """A bad value in a run spec, suite file or command line; the message names it."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weights; the run's record says `diverged`."""
