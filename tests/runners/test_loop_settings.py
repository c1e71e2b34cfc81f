"""A run sets how its trainers feed the device and states it in its record."""
import torch

from sparsebench.runners.pipeline import RunOptions, execute

from conftest import tiny_spec


def test_a_run_sets_cudnn_benchmark_itself_and_records_its_training_loop(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)      # left on by whatever ran before
    record = execute(tiny_spec("magnitude-global", target="sparsity=0.5"), RunOptions(out=tmp_path))
    assert torch.backends.cudnn.benchmark is False                    # a CPU run: no autotuning
    loop = record.environment["training_loop"]
    assert loop["cudnn_benchmark"] is False and loop["channels_last"] is False and loop["compile"] is False
    assert loop["micro_batches"] == 1 and loop["loss_read_every"] == 1
