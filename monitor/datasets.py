"""Where the labelled benchmark data lives, and readers for its layouts.

The data is never downloaded: it is read from ``$FOREWARN_DATA`` or from the
``shared/data`` folder beside the project checkout (see the README).
"""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from connectors.files import FileFormatError

SMD_MACHINES = ("1-2", "1-3", "1-4", "1-5", "1-6", "1-7", "1-8",
                "2-1", "2-2", "2-3", "2-4", "2-5", "2-7", "2-8")
# Machines the shipped initialization was meta-trained on; the others are held out
# for every comparison that claims to measure new devices.
SMD_META_TRAIN = SMD_MACHINES[:10]
SMD_HELD_OUT = SMD_MACHINES[10:]


def data_dir() -> Path:
    """``$FOREWARN_DATA``, else ``../shared/data`` from the project root."""
    env = os.environ.get("FOREWARN_DATA")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"
    if not path.is_dir():
        where = "where FOREWARN_DATA points" if env else "set FOREWARN_DATA to the folder holding nab/ and smd/"
        raise FileNotFoundError(f"benchmark data not found at {path} ({where})")
    return path


def smd_path(machine: str, split: str = "train", root: Path | None = None) -> Path:
    return (root or data_dir()) / "smd" / split / f"machine-{machine}.txt.gz"


def load_smd(machine: str, split: str = "train", root: Path | None = None) -> np.ndarray:
    """[rows, 38] values of one SMD machine (from ``root``, else ``data_dir()``)."""
    return read_table(smd_path(machine, split, root), delimiter=",")


def read_table(path: Path, **kwargs) -> np.ndarray:
    """A numeric text table, or a ``FileFormatError`` naming the file (missing, cut, not numbers:
    a damaged .gz raises EOFError or zlib.error, which no caller would expect)."""
    try:
        return np.loadtxt(path, **kwargs)
    except FileNotFoundError:
        raise FileFormatError(f"{path}: no such file") from None
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise FileFormatError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:120]})") from None


def nab_files(root: Path | None = None) -> list[Path]:
    """Every NAB series, sorted by ``category/name.csv``."""
    return sorted(((root or data_dir()) / "nab" / "data").glob("*/*.csv"))


def load_nab_values(path: Path) -> np.ndarray:
    return np.genfromtxt(path, delimiter=",", skip_header=1, usecols=1, dtype=np.float64)


def held_out_tasks(n_smd: int, n_nab: int, support: int = 256, query: int = 128, seed: int = 0,
                   with_sources: bool = False, root: Path | None = None):
    """Tasks from series no shipped initialization was trained on: the held-out SMD
    machines (train split) and every NAB series; returns scaled (support, query), and
    with ``with_sources`` the series each task came from ("smd/3", "nab/12")."""
    import torch

    from monitor.meta import TaskSampler
    from monitor.normalize import Normalization

    parts = []
    if n_smd:
        smd = [col for m in SMD_HELD_OUT for col in load_smd(m, root=root).T]
        support_, query_, index = TaskSampler(smd, support, query, Normalization(), seed).sample_with_sources(n_smd)
        parts.append((support_, query_, np.array([f"smd/{i}" for i in index])))
    if n_nab:
        nab = [load_nab_values(p) for p in nab_files(root)]
        support_, query_, index = TaskSampler(nab, support, query, Normalization(), seed + 1).sample_with_sources(n_nab)
        parts.append((support_, query_, np.array([f"nab/{i}" for i in index])))
    tasks = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return (*tasks, np.concatenate([p[2] for p in parts])) if with_sources else tasks


def meta_train_tasks(n: int, support: int = 256, query: int = 128, seed: int = 0, root: Path | None = None):
    """Validation tasks from the meta-training machines (for tuning baselines, never the test)."""
    from monitor.meta import TaskSampler
    from monitor.normalize import Normalization

    smd = [col for m in SMD_META_TRAIN for col in load_smd(m, root=root).T]
    return TaskSampler(smd, support, query, Normalization(), seed + 1000).sample(n)
