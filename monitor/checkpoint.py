"""The meta-learned initialization on disk: weights plus everything needed to use them.

A checkpoint is a plain dict of tensors, strings and numbers written with
``torch.save`` and read with ``weights_only=True``, so loading one never
unpickles arbitrary objects.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from monitor.adapt import AdaptConfig
from monitor.forecaster import LSTMSpec, Params, init_params
from monitor.normalize import Normalization

FORMAT = "forewarn-init"
VERSION = 1
DEFAULT_INIT = "default_init.pt"


class CheckpointError(ValueError):
    """A file that is not a usable Forewarn initialization.

    >>> Initialization.load("no/such/init.pt")
    Traceback (most recent call last):
    ...
    monitor.checkpoint.CheckpointError: no/such/init.pt: no such initialization file
    >>> import tempfile
    >>> with tempfile.NamedTemporaryFile(suffix=".pt") as empty:  # doctest: +ELLIPSIS
    ...     Initialization.load(empty.name)
    Traceback (most recent call last):
    ...
    monitor.checkpoint.CheckpointError: ...pt: not a Forewarn initialization (an empty file)
    """


@dataclass
class Initialization:
    """Shared starting weights for every new stream, and how to adapt from them.

    >>> init = Initialization.random(LSTMSpec(hidden=4), seed=0)
    >>> init.spec, init.adapt.steps
    (LSTMSpec(hidden=4, layers=1), 10)
    """

    spec: LSTMSpec
    params: Params
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    normalization: Normalization = field(default_factory=Normalization)
    inner_lr: Params | None = None      # learned per-parameter step sizes (Meta-SGD)
    info: dict = field(default_factory=dict)  # how it was made: algorithm, corpus, seed, loss

    @classmethod
    def random(cls, spec: LSTMSpec = LSTMSpec(), seed: int = 0, **kwargs) -> "Initialization":
        params = init_params(spec, torch.Generator().manual_seed(seed))
        return cls(spec, params, info={"algorithm": "random", "seed": seed}, **kwargs)

    @property
    def origin(self) -> str:
        """How it was made, for tables and notes: "maml", "maml from the pooled model".

        >>> Initialization.random(LSTMSpec(hidden=4)).origin
        'random'
        """
        started = self.info.get("started_from", "random")
        return self.info.get("algorithm", "?") + ("" if started == "random" else f" from the {started} model")

    def save(self, path: str | Path) -> None:
        payload = {
            "format": FORMAT,
            "version": VERSION,
            "spec": self.spec.to_dict(),
            "params": {k: v.detach().clone() for k, v in self.params.items()},
            "inner_lr": None if self.inner_lr is None else {k: v.detach().clone() for k, v in self.inner_lr.items()},
            "adapt": self.adapt.to_dict(),
            "normalization": self.normalization.to_dict(),
            "info": self.info,
        }
        path = Path(path)
        problem = self.problem()
        if problem:  # written, it would be refused at load: say so now, not at the daemon's start
            raise CheckpointError(f"{path}: not written, the initialization is unusable: {problem}")
        self.check_writable(path)
        payload["digest"] = _digest(payload)
        path.parent.mkdir(parents=True, exist_ok=True)
        # next to the target, then renamed over it: a crash mid-write leaves the old file whole.
        # A short name of its own: NAME.partial could be past the file system's limit where NAME is not
        # (made as any file is, under the umask: the daemon may run as another user than this)
        partial = path.parent / f".forewarn-init-{os.getpid()}.partial"
        try:
            with open(partial, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)

    @staticmethod
    def check_writable(path: str | Path) -> None:
        """Refuse a path ``save`` could not write, before hours of training are spent on it."""
        path = Path(path)
        existing = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if existing is not None:
            try:
                longest = os.pathconf(existing, "PC_NAME_MAX")
            except (OSError, ValueError, AttributeError):  # not POSIX, or no limit told
                longest = None
            if longest and len(os.fsencode(path.name)) > longest:
                raise CheckpointError(f"{path}: a file name longer than this file system takes ({longest} bytes)")
        if path.is_dir():
            raise CheckpointError(f"{path}: is a directory; give a file name for the initialization")
        if existing is not None and not (existing.is_dir() and os.access(existing, os.W_OK)):
            raise CheckpointError(f"{path}: cannot write in {existing}")

    @classmethod
    def load(cls, path: str | Path) -> "Initialization":
        try:
            payload = torch.load(path, weights_only=True, map_location="cpu")
        except FileNotFoundError:
            raise CheckpointError(f"{path}: no such initialization file") from None
        except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
            size = Path(path).stat().st_size if Path(path).is_file() else None
            what = "an empty file" if size == 0 else f"truncated, corrupt or another kind of file: " \
                f"{type(exc).__name__}{': ' + _gist(str(exc)) if str(exc) else ''}"
            raise CheckpointError(f"{path}: not a Forewarn initialization ({what})") from None
        if not isinstance(payload, dict) or payload.get("format") != FORMAT:
            raise CheckpointError(f"{path}: not a Forewarn initialization (format tag missing)")
        if payload.get("version") != VERSION:
            raise CheckpointError(f"{path}: initialization version {payload.get('version')!r}, "
                                  f"this Forewarn reads version {VERSION}")
        try:
            spec = LSTMSpec(**payload["spec"])
            init = cls(spec=spec, params=dict(payload["params"]),
                       adapt=AdaptConfig(**payload["adapt"]),
                       normalization=Normalization(**payload["normalization"]),
                       inner_lr=None if payload["inner_lr"] is None else dict(payload["inner_lr"]),
                       info=dict(payload.get("info", {})))
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: incomplete or invalid initialization ({exc})") from None
        problem = init.problem()
        if problem:  # adaptation would fail on it at the first warm-up, after the daemon is ready
            raise CheckpointError(f"{path}: {problem}")
        # torch's reader checks no checksum: a changed byte could change a weight without a word.
        # Files written before the digest have none, and are read unchecked
        if "digest" in payload and payload["digest"] != _digest(payload):
            raise CheckpointError(f"{path}: corrupt, or edited (its contents do not match the digest written with "
                                  "them; an edited file loads once its 'digest' is removed)")
        return init

    def problem(self) -> str | None:
        """What makes these tensors unusable for adaptation, or None.

        >>> init = Initialization.random(LSTMSpec(hidden=4))
        >>> init.inner_lr = {k: torch.full_like(v, -0.1) for k, v in init.params.items()}
        >>> init.problem()  # a negative step climbs the loss
        "inner_lr['l0.w'] must be > 0"
        """
        shapes = self.spec.shapes()
        groups = [("params", self.params)] + ([("inner_lr", self.inner_lr)] if self.inner_lr is not None else [])
        for name, group in groups:
            extra = sorted(map(str, set(group) - set(shapes)))
            if extra:
                return f"{name} has tensors this model does not have: {', '.join(extra)}"
            for key, shape in shapes.items():
                tensor = group.get(key)
                if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                    return f"{name}[{key!r}] missing or not a tensor of shape {shape}"
                if tensor.layout != torch.strided or tensor.device.type != "cpu":  # sparse, or torch's "meta"
                    return f"{name}[{key!r}] must be a dense CPU tensor, got {tensor.layout} on {tensor.device}"
                finite = bool(torch.isfinite(tensor).all())
                if tensor.dtype != torch.float32 or not finite:
                    return f"{name}[{key!r}] must be finite float32, got {tensor.dtype}" \
                           f"{'' if finite else ' with NaN or inf'}"
                if name == "inner_lr" and not bool((tensor > 0).all()):
                    return f"inner_lr[{key!r}] must be > 0"
        return None

    @classmethod
    def default(cls) -> "Initialization":
        """The initialization shipped in the package (meta-trained on SMD, see the README)."""
        with resources.as_file(resources.files("monitor.data") / DEFAULT_INIT) as path:
            return cls.load(path)


def _digest(payload: dict) -> str:
    """SHA-256 of what an initialization does: its tensors' bytes and its settings (not the
    ``info`` notes).

    >>> init = Initialization.random(LSTMSpec(hidden=4))
    >>> payload = {"spec": init.spec.to_dict(), "params": init.params, "inner_lr": None,
    ...            "adapt": init.adapt.to_dict(), "normalization": init.normalization.to_dict()}
    >>> before = _digest(payload)
    >>> payload["params"]["l0.b"][0] += 1e-3
    >>> _digest(payload) == before
    False
    """
    h = hashlib.sha256()
    h.update(json.dumps([payload["spec"], payload["adapt"], payload["normalization"]], sort_keys=True).encode())
    for group in ("params", "inner_lr"):
        tensors = payload[group] or {}
        for key in sorted(tensors):
            h.update(f"{group}/{key}/{tuple(tensors[key].shape)}/{tensors[key].dtype}".encode())
            h.update(tensors[key].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _gist(message: str) -> str:
    """What a ``torch.load`` error says about the file, without its advice to load it unsafely.

    >>> _gist("Weights only load failed. In PyTorch 2.6, ... WeightsUnpickler error: \\n\\nUnsupported operand 103\\n\\nCheck")
    'Unsupported operand 103'
    >>> _gist("invalid load key, 'x'.")
    "invalid load key, 'x'."
    """
    found = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n\n|$)", message, re.S)
    text = (found.group(1) if found else message).strip().splitlines()[0]
    return text if len(text) <= 160 else text[:160].rsplit(" ", 1)[0] + " ..."
