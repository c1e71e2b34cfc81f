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
    import os

    # keep the caller's PYTHONPATH (a worktree) behind the plugin site, or the child imports another checkout
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(pkg), os.environ.get("PYTHONPATH")]))}
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


def _plugin_site(root, source):
    (root / "goodplug").mkdir(parents=True)
    (root / "goodplug" / "__init__.py").write_text(source)
    (root / "badplug.py").write_text("raise ImportError('needs a package that is not installed')\n")
    for name, ep in (("goodplug", "good-random = goodplug"), ("badplug", "bad-method = badplug")):
        dist = root / f"{name}-1.2.dist-info"
        dist.mkdir()
        (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2\n")
        (dist / "entry_points.txt").write_text(f"[sparsebench.methods]\n{ep}\n")


PLUGIN = textwrap.dedent('''
    from sparsebench.methods import Method, Outcome, register_method

    @register_method("good-random")
    class GoodRandom(Method):
        """A plugin method."""
        granularity = "none"

        def run(self, ctx):
            return Outcome(ctx.model, "dense", finetune=False)
''')


def test_a_broken_plugin_warns_once_and_the_rest_work_and_plugin_source_names_the_run(tmp_path, monkeypatch, caplog):
    import importlib
    import logging

    from sparsebench.methods import METHODS
    from sparsebench.runners.pipeline import resolve
    from sparsebench.specs import RunSpec

    _plugin_site(tmp_path, PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(METHODS, "_entry_points_loaded", False)
    try:
        with caplog.at_level(logging.WARNING, logger="sparsebench"):
            names = METHODS.names()
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1 and "'bad-method'" in warnings[0] and "ImportError" in warnings[0]
        assert "good-random" in names and "magnitude-global" in names and "bad-method" not in names
        origin = METHODS.get("good-random").origin
        assert origin["distribution"] == "goodplug" and origin["version"] == "1.2"
        spec = resolve(RunSpec(method="good-random", model="resnet20_tiny", dataset="digits"))
        assert dict(spec.plugin)["source_sha256"] == origin["source_sha256"]
        assert spec.to_dict()["plugin"]["distribution"] == "goodplug"
        builtin = resolve(RunSpec(method="dense", model="resnet20_tiny", dataset="digits"))
        assert "plugin" not in builtin.to_dict()      # built-in run names are unchanged
        # editing the plugin's source changes its spec hash, so its runs are re-run
        (tmp_path / "goodplug" / "__init__.py").write_text(PLUGIN + "\n# tuned\n")
        METHODS._entries.pop("good-random")
        import sys

        sys.modules.pop("goodplug", None)
        importlib.invalidate_caches()
        monkeypatch.setattr(METHODS, "_entry_points_loaded", False)
        edited = resolve(RunSpec(method="good-random", model="resnet20_tiny", dataset="digits"))
        assert edited.hash != spec.hash and edited.run_id != spec.run_id
    finally:
        METHODS._entries.pop("good-random", None)
        import sys

        sys.modules.pop("goodplug", None)
