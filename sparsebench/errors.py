"""The one error type for bad user input: the bottom layer, imported by every other."""


class SpecError(ValueError):
    """A bad value in a run spec, suite file or command line; the message names it."""


class Diverged(RuntimeError):
    """Training produced a non-finite loss or weights; the run ends with status "diverged".

    Not bad input: the run's record is still written, saying where it diverged.
    """

    def __init__(self, stage: str, reason: str):
        super().__init__(f"diverged in {stage}: {reason}")
        self.stage = stage
        self.reason = reason


class ArtifactError(ValueError):
    """A saved model that cannot be written, found or trusted (missing, truncated, wrong hash,
    no structure); the message is one line naming the run."""
