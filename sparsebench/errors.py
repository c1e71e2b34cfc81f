"""The error types every layer shares: the bottom layer, imported by every other."""


class SpecError(ValueError):
    """A bad value in a run spec, suite file or command line; the message names it."""


class Diverged(RuntimeError):
    """Training produced non-finite weights or a non-finite loss; nothing of it is cached.

    The pipeline records such a run as diverged instead of failing it as a crash."""
