"""Tools: list the registries, check a dataset's files, count a model's FLOPs, time structured speedup."""
from __future__ import annotations

import json
from pathlib import Path

from sparsebench.cli.common import CliError, _check_device, _progress_factory


def cmd_check_data(args) -> int:
    """Check a dataset's image files (train and test): metadata for all and a decoded stratified sample,
    or with --full every file decoded; list the bad ones. The verdict is cached for runs and sweeps."""
    from sparsebench.datasets import create_dataset
    from sparsebench.datasets.integrity import scan

    data = create_dataset(args.dataset, args.data_root, args.img_size, download=False)
    check = scan(data, _progress_factory(args.quiet), full=args.full, name=args.dataset)
    if not check.files:
        print(f"{args.dataset}: held in memory, no image files to decode; nothing to check")
        return 0
    for b in check.bad:
        print(f"bad {b.path}: {b.error}")
    counts = check.files_per_class.values()
    how = "every file decoded" if check.full else f"{check.decoded} decoded (a stratified sample; --full decodes all)"
    print(f"{args.dataset}: {check.files} image files, {len(check.files_per_class)} (split, class) groups of "
          f"{min(counts, default=0)}-{max(counts, default=0)} files, {how}, {len(check.bad)} bad"
          + (f" (cached verdict, {check.cache_path})" if check.cached else "")
          + ("" if not check.bad else "; replace them, or run with --max-bad-samples N to skip and count them"))
    return 1 if check.bad else 0


def cmd_list(args) -> int:
    from sparsebench.datasets import DATASETS
    from sparsebench.methods import METHODS
    from sparsebench.models import MODELS

    kinds = {"methods": METHODS, "models": MODELS, "datasets": DATASETS}
    for kind in [args.what] if args.what else list(kinds):
        print(f"{kind}:")
        for entry in kinds[kind]:
            extra = ""
            if kind == "methods":
                cls = entry.factory
                starts = cls.starts_from if isinstance(cls.starts_from, str) else "pretrained|scratch"
                extra = f" [{cls.granularity}, from {starts}]"
            elif kind == "models":
                extra = f" [{entry.tags[0]}]"
            print(f"  {entry.name:<22} {entry.description}{extra}")
    return 0


def cmd_flops(args) -> int:
    from sparsebench.measure.flops import count_macs, count_params

    model = _any_model(args.model, args.num_classes, args.img_size)
    report = count_macs(model, (3, args.img_size, args.img_size), fused_attention=args.fused_attention)
    params = count_params(model)
    data = {"model": args.model, **report.as_dict(), **params,
            "layers": {k: v.macs for k, v in report.layers.items()} if args.layers else None}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"{args.model} at {args.img_size}px: {report.macs / 1e9:.4f} GMACs ({report.flops / 1e9:.4f} GFLOPs), "
              f"attention matmuls {report.attention_macs / 1e9:.4f} GMACs, params {params['params'] / 1e6:.3f} M")
    if args.cross_check:
        from sparsebench.measure.flops import fvcore_macs

        if args.fused_attention:
            raise CliError("--cross-check counts with fused attention off; drop --fused-attention")
        theirs = fvcore_macs(model, (3, args.img_size, args.img_size))
        print("conv + linear + matmul MACs per image, fused attention off:")
        print(f"  sparsebench {report.macs:>15,d} MACs")
        print(f"  fvcore      {theirs:>15,d} MACs")
        print(f"  difference {report.macs - theirs:,d} MACs ({(report.macs - theirs) / max(1, theirs):+.4%})")
    return 0


def _any_model(name: str, num_classes: int, img_size: int):
    """A registered sparsebench model, else a timm model, else a torchvision model."""
    from sparsebench.models import MODELS, create_model

    if name in MODELS:
        return create_model(name, num_classes=num_classes, img_size=img_size)
    import timm
    import torchvision

    if name in timm.list_models():
        try:   # transformers take the resolution as an argument; CNNs take any input size
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise CliError(f"unknown model {name!r}; allowed: a registered model ({', '.join(MODELS.names())}), "
                   f"or any timm or torchvision model name")


def cmd_speedup(args) -> int:
    import pandas as pd

    from sparsebench.report.speedup import plot_measured_vs_theoretical
    from sparsebench.runners.speedup import SpeedupConfig, speedup_environment, speedup_rows
    from sparsebench.models import MODELS
    from sparsebench.store.records import atomic_write_text

    for name in args.models:
        MODELS.get(name)
    for f in args.flops:
        if not 0 < f < 1:
            raise CliError(f"flops target {f} is out of range; allowed: 0 < flops < 1")
    for s in args.sparsity:
        if not 0 < s < 1:
            raise CliError(f"sparsity target {s} is out of range; allowed: 0 < sparsity < 1")
    if not args.flops and not args.sparsity:
        raise CliError("nothing to time: give --flops targets, --sparsity targets, or both")
    _check_device(args.device)
    config = SpeedupConfig(models=tuple(args.models), flops=tuple(args.flops), img_size=args.img_size,
                           batch_sizes=tuple(args.batch_sizes), threads=tuple(args.threads), device=args.device,
                           dtype=args.dtype, compile=args.compile, channels_last=args.channels_last,
                           min_run_time=args.min_run_time, rounds=args.rounds, sparsities=tuple(args.sparsity),
                           kernels=tuple(args.kernels), mask_scope=args.mask_scope,
                           calibration_seconds=args.calibration_seconds, runtimes=tuple(args.runtimes))

    def report(row):
        if args.quiet:
            return
        target = f"flops={row['target_flops']:<5g}" if "target_flops" in row else \
            f"sparsity={row['target_sparsity']:<5g} {row['realization']:<4}"
        measured = (f"measured {row['measured_speedup']:.2f}x [{row['speedup_ci95_low']:.2f}-"
                    f"{row['speedup_ci95_high']:.2f}]" + (f", {row['sparse_layers']}/{row['layers']} layers on CSR"
                                                          if "sparse_layers" in row else "")
                    if row.get("status") == "measured" else row.get("status"))
        print(f"  {row['model']:<14} {target} {row.get('runtime', 'eager'):<11} threads={row['threads']} "
              f"batch={row['batch']:<4} theoretical {row['theoretical_speedup']:.2f}x  {measured}", flush=True)

    table = pd.DataFrame(speedup_rows(config, progress=report))
    structured = table[table["target_flops"].notna()] if "target_flops" in table else table.iloc[0:0]
    unstructured = table[table["target_sparsity"].notna()] if "target_sparsity" in table else table.iloc[0:0]
    parts = []
    if len(structured):
        columns = [c for c in ("model", "target_flops", "achieved_flops_ratio", "runtime", "threads", "batch",
                               "dense_ms", "realized_ms", "theoretical_speedup", "measured_speedup",
                               "measured_over_theoretical", "status") if c in structured]
        parts.append(structured[columns].to_markdown(index=False, floatfmt=".3f"))
    if len(unstructured):
        columns = [c for c in ("model", "method", "target_sparsity", "realization", "runtime", "sparse_layers",
                               "layers", "threads", "batch", "dense_ms", "realized_ms", "theoretical_speedup",
                               "measured_speedup", "measured_over_theoretical", "status") if c in unstructured]
        counts = {c: unstructured[c].astype("Int64") for c in ("sparse_layers", "layers") if c in unstructured}
        parts.append(unstructured.assign(**counts)[columns].to_markdown(index=False, floatfmt=".3f"))
    text = "\n\n".join(parts)
    print(text)
    if args.out:
        out = Path(args.out)
        env = speedup_environment(config)
        atomic_write_text(out / "speedup.csv", table.to_csv(index=False))
        atomic_write_text(out / "environment.json", json.dumps(env, indent=2))
        title = "Speedup" if config.sparsities else "Structured speedup"
        header = (f"# {title}: theoretical vs measured ({env['device_name']}, {config.dtype})\n\n"
                  + (f"L1 structured pruning ({config.method}), physically compacted. " if config.flops else "")
                  + (f"Magnitude masks ({config.mask_scope}, input layer and classifier dense) realized by "
                     f"{', '.join(config.kernels)} (auto: per layer the faster of dense and CSR, calibrated at each "
                     "batch and thread count). " if config.sparsities else "")
                  + f"Runtimes: {', '.join(config.runtimes)} (dense and realized both under each). "
                  + f"Dense and realized timed in one process, alternating blocks, median of {config.rounds} blocks; "
                  f"torch {env['torch']}.\n\n")
        atomic_write_text(out / "speedup.md", header + text + "\n")
        plotted = plot_measured_vs_theoretical(table.assign(realization=table.get("realization", "compacted")),
                                               out / "measured_vs_theoretical.png",
                                               f"{env['device_name']}, {config.dtype}, threads "
                                               f"{'/'.join(map(str, config.threads))}")
        print(f"wrote {out / 'speedup.md'}, {out / 'speedup.csv'}, {out / 'environment.json'}"
              + (f", {plotted}" if plotted else ""))
    return 0
