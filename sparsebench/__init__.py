"""sparsebench: a comparative sparsity benchmark for PyTorch vision models.

One harness and one protocol for every method; accuracy, FLOPs, parameters and measured
speedup in one record per run; leaderboards and plots rebuilt from records.
"""
__version__ = "0.1.0"


def create_model(name, **kwargs):
    from sparsebench.models import create_model as _create

    return _create(name, **kwargs)


def create_dataset(name, **kwargs):
    from sparsebench.datasets import create_dataset as _create

    return _create(name, **kwargs)


def create_method(name, **kwargs):
    from sparsebench.methods import create_method as _create

    return _create(name, **kwargs)


def load_model(run, results_dir="results/local", device="cpu"):
    """A run's saved model, rebuilt exactly (masked or compacted), in eval mode. `run`: a run id
    (or unique prefix) in `results_dir`, a record .json, or a .safetensors model file.
    `sparsebench.runners.artifacts.load_artifact` also returns its masks and record."""
    from sparsebench.runners.artifacts import load_artifact

    return load_artifact(str(run), results_dir, device).model
