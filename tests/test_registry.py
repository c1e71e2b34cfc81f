"""Third-party methods register through the `sparsebench.methods` entry-point group."""
import subprocess
import sys
import textwrap


def test_entry_point_method_is_listed_and_runnable(tmp_path):
    pkg = tmp_path / "site"
    (pkg / "myprune").mkdir(parents=True)
    (pkg / "myprune" / "__init__.py").write_text(textwrap.dedent('''
        from dataclasses import dataclass
        import torch
        from sparsebench.methods import Method, Outcome, register_method
        from sparsebench.training.masks import MaskSet, prunable_weights, global_topk_masks

        @register_method("my-random")
        class MyRandom(Method):
            """Third-party random pruning."""
            granularity = "unstructured"

            @dataclass(frozen=True)
            class Config:
                scale: float = 1.0

            def run(self, ctx):
                params = prunable_weights(ctx.model)
                g = torch.Generator().manual_seed(ctx.seed)
                scores = {n: torch.rand(p.shape, generator=g) for n, p in params.items()}
                masks = MaskSet(ctx.model, global_topk_masks(scores, ctx.target.value))
                return Outcome(ctx.model, "masked", masks=masks, prunable=list(params))
    '''))
    dist = pkg / "myprune-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myprune\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sparsebench.methods]\nmy-random = myprune\n")
    env = {"PYTHONPATH": str(pkg)}
    import os

    env = {**os.environ, **env}
    listed = subprocess.run([sys.executable, "-m", "sparsebench.cli", "list", "methods"], capture_output=True,
                            text=True, env=env, check=True).stdout
    assert "my-random" in listed and "Third-party random pruning" in listed
    out = subprocess.run([sys.executable, "-m", "sparsebench.cli", "run", "--method", "my-random", "--model",
                          "resnet20_tiny", "--dataset", "digits", "--target", "sparsity=0.7", "--recipe",
                          "pretrain_epochs=0.5", "--recipe", "finetune_epochs=0.5", "--no-latency", "--quiet",
                          "--out", str(tmp_path / "out"), "--method-arg", "scale=2"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "sparsity 0.7" in out.stdout
