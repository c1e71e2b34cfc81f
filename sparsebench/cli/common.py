"""What every command shares: the one-line error, NAME=VALUE parsing, device and output-folder checks."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

ERROR_EXIT = 2


class CliError(Exception):
    pass


def _kv(items: Optional[List[str]], flag: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"bad {flag} {item!r}; expected name=value")
        out[key.strip()] = _yaml_scalar(value)
    return out


def _yaml_scalar(text: str):
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _progress_factory(quiet: bool):
    if quiet or not sys.stderr.isatty():     # logs and CI get the sweep's plain lines instead
        return None
    from tqdm.auto import tqdm

    def factory(total: int, desc: str):
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)

    return factory


def _check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"bad --device {text!r}; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise CliError(f"bad --device {text!r}; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise CliError(f"--device {text!r} is not available here (no CUDA GPU); allowed: cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {text!r} is not available here; allowed: cpu, cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1}")


# The longest name written under an output folder: a record, a checkpoint or a temp file of either.
LONGEST_NAME = 255
SUBFOLDERS = ("records", "checkpoints", "partial", "models", "exports")


def _check_out_dir(path: Path, flag: str) -> None:
    """An output folder that can be created and written, with room for every file name the run
    writes inside PATH_MAX: else one line now, not a lost run at the last step."""
    import errno
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise CliError(f"{flag} {_short(path)} is too long: a name in it exceeds the file system's limit "
                           f"({_limit(path, 'PC_NAME_MAX', 255)} bytes per name, {_limit(path, 'PC_PATH_MAX', 4096)} per path)") from None
        raise CliError(f"{flag} {_short(path)} cannot be created or written: {e.strerror}") from None
    path_max = _limit(path, "PC_PATH_MAX", 4096)          # counts the terminating NUL
    length = len(os.fsencode(path.resolve()))
    room = 1 + max(map(len, SUBFOLDERS)) + 1 + LONGEST_NAME
    if length + room >= path_max:
        raise CliError(f"{flag} {_short(path)} is too long ({length} bytes as an absolute path); records and "
                       f"checkpoints inside it could exceed PATH_MAX; allowed: at most {path_max - 1 - room} bytes")


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path if path.exists() else "/", name)
    except (OSError, ValueError):
        return default


def _short(path: Path) -> str:
    text = str(path)
    return repr(text if len(text) <= 80 else text[:38] + "..." + text[-38:])


def _human(seconds: float) -> str:
    from sparsebench.runners.suite import human_seconds

    return human_seconds(seconds)


def _wrote(files, root: Path) -> str:
    """`wrote ...` naming every file, grouped by folder so a site's pages stay readable."""
    groups = {}
    for f in files:
        f = Path(f)
        groups.setdefault(str(f.parent), []).append(f.name)
    parts = [f"{folder}/: {', '.join(names)}" for folder, names in groups.items()]
    return f"wrote {len(files)} files: " + "; ".join(parts)


def _results_where(root: Path, report_files) -> list:
    """A sweep's last lines: where its results are, grouped (a count per folder, the leaderboard's
    formats in one name, the plots counted), and the command that opens the report."""
    root = Path(root)
    folders = {}
    for name in ("records", "models"):
        folders[name] = sum(1 for p in (root / name).glob("*") if p.is_file()) if (root / name).is_dir() else 0
    tops, report = {}, 0
    for f in map(Path, report_files):
        if f.parent == root:
            tops.setdefault(f.suffix, []).append(f)
        else:
            report += 1
    folders["report"] = report
    parts = [f"{name}/ ({n})" for name, n in folders.items() if n]
    plots = tops.pop(".png", [])
    stems = {}
    for files in tops.values():
        for f in files:
            stems.setdefault(f.stem, []).append(f.suffix[1:])
    parts += [f"{stem}.{{{','.join(sorted(s))}}}" if len(s) > 1 else f"{stem}.{s[0]}" for stem, s in stems.items()]
    if plots:
        parts.append(f"{len(plots)} plot{'s' if len(plots) > 1 else ''} ({', '.join(sorted(p.name for p in plots))})")
    total = sum(folders.values()) + sum(len(s) for s in stems.values()) + len(plots)
    lines = [f"{total} files under {root}: " + ", ".join(parts)]
    index = root / "report" / "index.html"
    if index in map(Path, report_files):
        opener = "open" if sys.platform == "darwin" else "xdg-open"
        lines.append(f"open the report: {opener} {index}   (a static page: no server needed)")
    return lines


def _readable_records(directory: str):
    """The records of a results directory, or a one-line error when it holds none that read."""
    from sparsebench.store import load_records

    records = load_records(Path(directory))
    if not records:
        raise CliError(f"no readable run records in {directory!r} (expected JSON records under "
                       f"{str(Path(directory) / 'records')!r})")
    return records
