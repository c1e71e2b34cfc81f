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
