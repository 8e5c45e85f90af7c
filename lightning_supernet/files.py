"""Files a user can trust: atomic writes, a sha256 digest stored with the weights, safe loading, clear errors.

* :func:`atomic_write` writes to a temporary file in the target's own directory and renames it over the target
  (``os.replace``), so a full disk or a kill leaves the old file or no file, never a partial one.
* :func:`save_weights` / :func:`load_weights`: a supernet's ``state_dict`` plus metadata, with a sha256 digest of
  the tensors; loading uses ``torch.load(weights_only=True)`` and checks the digest, so random bytes written into
  the file are caught instead of searched.
* :func:`save_module` / :func:`load_module`: an exported (pickled) model, with its digest in a JSON sidecar.
* :func:`load_checkpoint`: any ``torch.save``'d dict (a Lightning checkpoint), loaded safely; a missing, truncated,
  non-dict or corrupted file raises :class:`~lightning_supernet.errors.CheckpointError` naming the file and what
  was expected.

Example:
    >>> import tempfile, os, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> digest = save_weights(path, {"w": torch.ones(2)}, fingerprint="abc")
    >>> load_weights(path)["fingerprint"], len(digest)
    ('abc', 64)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from lightning_supernet.errors import CheckpointError

__all__ = ["WEIGHTS_FORMAT", "atomic_path", "atomic_write", "check_writable", "file_digest", "load_checkpoint",
           "load_module",
           "load_weights", "save_module", "save_weights", "state_digest"]

#: the ``format`` field of a weights file written by :func:`save_weights`
WEIGHTS_FORMAT = "lightning-supernet-weights"


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path``; on success it is flushed, fsync'ed and renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_write(p, "w") as f:
        ...     _ = f.write("hello")
        >>> open(p).read()
        'hello'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """A temporary file name beside ``path`` for writers that want a file name; renamed to ``path`` on success.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "b.txt")
        >>> with atomic_path(p) as tmp:
        ...     _ = open(tmp, "w").write("hi")
        >>> open(p).read()
        'hi'
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def check_writable(path: str | os.PathLike, what: str) -> Path:
    """Create ``path``'s directory and check a file can be written there (before hours of training, not after).

    Args:
        path: a file to be written later.
        what: how the error names it (e.g. ``"weights"``).

    Raises:
        CheckpointError: the directory cannot be created or written.

    Example:
        >>> import tempfile, os
        >>> check_writable(os.path.join(tempfile.mkdtemp(), "sub", "w.pt"), "weights").name
        'w.pt'
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=target.parent, prefix=".write-check-"):
            pass
    except OSError as err:
        raise CheckpointError(f"`{what}` {str(target)!r} cannot be written ({err.strerror or err}); allowed: a path "
                              "in a directory you can write to") from err
    if target.is_dir():
        raise CheckpointError(f"`{what}` {str(target)!r} is a directory; allowed: a file path")
    return target


def state_digest(state_dict: Mapping[str, Any]) -> str:
    """sha256 over the tensors of a ``state_dict`` (names, dtypes, shapes and bytes, in sorted name order).

    Example:
        >>> import torch
        >>> state_digest({"a": torch.zeros(2)}) == state_digest({"a": torch.zeros(2)})
        True
        >>> state_digest({"a": torch.zeros(2)}) == state_digest({"a": torch.ones(2)})
        False
    """
    import torch

    h = hashlib.sha256()
    for name in sorted(state_dict):
        value = state_dict[name]
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            h.update(f"{t.dtype}{tuple(value.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x"); _ = open(p, "wb").write(b"")
        >>> file_digest(p)[:8]
        'e3b0c442'
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike, expected: str = "a dict saved with torch.save") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` on the CPU; anything but a readable dict is a clear error.

    Args:
        path: the file.
        expected: what the file should hold, for the error message.

    Raises:
        CheckpointError: the file is missing, a directory, truncated or corrupted, holds objects that only an
            unsafe (``weights_only=False``) load could rebuild, or is not a dict.

    Example:
        >>> load_checkpoint("/no/such.ckpt")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        CheckpointError: '/no/such.ckpt' does not exist; expected a dict saved with torch.save
    """
    import torch

    where = str(path)
    if not os.path.exists(where):
        raise CheckpointError(f"{where!r} does not exist; expected {expected}")
    if os.path.isdir(where):
        raise CheckpointError(f"{where!r} is a directory; expected a file holding {expected}")
    try:
        obj = torch.load(where, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        text = str(err)
        what = ("it holds objects a safe (weights_only=True) load does not rebuild"
                if "weights_only" in text or "Unsupported global" in text else "it is corrupted")
        raise CheckpointError(f"{where!r} cannot be loaded: {what} ({text.splitlines()[0][:300]}); "
                              f"expected {expected}") from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError,
            UnicodeDecodeError, AttributeError, TypeError) as err:
        first = str(err).splitlines()[0][:300] if str(err) else type(err).__name__
        raise CheckpointError(f"{where!r} cannot be loaded: the file is truncated or corrupted "
                              f"({type(err).__name__}: {first}); expected {expected}") from err
    if not isinstance(obj, dict):
        raise CheckpointError(f"{where!r} holds a {type(obj).__name__}; expected {expected}")
    return obj


def save_weights(path: str | os.PathLike, state_dict: Mapping[str, Any], **meta: Any) -> str:
    """Write ``{"format", "version", "sha256", "state_dict", **meta}`` atomically; returns the digest.

    ``meta`` values must be plain data (str, numbers, lists, dicts) so that the file loads with
    ``weights_only=True``.

    Example:
        >>> import tempfile, os, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt")
        >>> save_weights(p, {"w": torch.zeros(1)}) == load_weights(p)["sha256"]
        True
    """
    import torch

    state = {k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in state_dict.items()}
    digest = state_digest(state)
    with atomic_write(path) as f:
        torch.save({"format": WEIGHTS_FORMAT, "version": 1, "sha256": digest, "state_dict": state, **meta}, f)
    return digest


def load_weights(path: str | os.PathLike) -> dict[str, Any]:
    """Load a file written by :func:`save_weights` and check its digest; returns the whole dict.

    Raises:
        CheckpointError: not such a file (see :func:`load_checkpoint`), no digest, or tensors that do not match
            the stored digest (the file was changed or damaged after it was written).

    Example:
        >>> import tempfile, os, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "w.pt"); _ = save_weights(p, {"w": torch.zeros(1)})
        >>> load_weights(p)["state_dict"]["w"]
        tensor([0.])
    """
    expected = f"supernet weights written by `lightning-supernet fit` (format {WEIGHTS_FORMAT!r})"
    obj = load_checkpoint(path, expected)
    if obj.get("format") != WEIGHTS_FORMAT or not isinstance(obj.get("state_dict"), dict):
        raise CheckpointError(f"{str(path)!r} has format {obj.get('format')!r} and keys {sorted(obj)[:6]}; "
                              f"expected {expected}")
    stored = obj.get("sha256")
    if not stored:
        raise CheckpointError(f"{str(path)!r} stores no sha256 digest; expected {expected}")
    actual = state_digest(obj["state_dict"])
    if actual != stored:
        raise CheckpointError(f"{str(path)!r} is corrupted: its tensors hash to sha256 {actual[:12]}..., the file "
                              f"records {stored[:12]}... (changed or damaged after it was written); retrain or "
                              "restore the file")
    return obj


def save_module(module: Any, path: str | os.PathLike, meta: Mapping[str, Any] | None = None) -> Path:
    """``torch.save`` a whole model atomically, with a JSON sidecar (``.json``) holding ``meta`` and the digest.

    Example:
        >>> import tempfile, os, torch
        >>> p = save_module(torch.nn.Linear(2, 1), os.path.join(tempfile.mkdtemp(), "m.pt"), {"trial": 3})
        >>> type(load_module(p)).__name__, json.loads(p.with_suffix(".json").read_text())["trial"]
        ('Linear', 3)
    """
    import torch

    target = Path(path)
    with atomic_write(target) as f:
        torch.save(module, f)
    doc = {**dict(meta or {}), "sha256": file_digest(target)}
    with atomic_write(target.with_suffix(".json"), "w") as f:
        json.dump(doc, f, indent=2, default=str)
    return target


def load_module(path: str | os.PathLike) -> Any:
    """Load a model written by :func:`save_module`, checking the digest in its sidecar first.

    The model is unpickled (``weights_only=False``: it rebuilds your own class), so load only files you wrote.

    Raises:
        CheckpointError: a missing file or sidecar, a digest mismatch, or a file torch cannot read.

    Example:
        >>> load_module("/no/model.pt")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        CheckpointError: '/no/model.pt' does not exist; expected a model exported by lightning-supernet
    """
    import torch

    where, expected = str(path), "a model exported by lightning-supernet"
    if not os.path.isfile(where):
        raise CheckpointError(f"{where!r} does not exist; expected {expected}")
    sidecar = Path(path).with_suffix(".json")
    try:
        stored = json.loads(sidecar.read_text()).get("sha256")
    except (OSError, ValueError, AttributeError) as err:
        raise CheckpointError(f"{str(sidecar)!r} (the digest of {where!r}) cannot be read: {err}") from err
    if stored != file_digest(where):
        raise CheckpointError(f"{where!r} is corrupted: its sha256 differs from the one in {str(sidecar)!r}")
    try:
        return torch.load(where, map_location="cpu", weights_only=False)
    except Exception as err:
        raise CheckpointError(f"{where!r} cannot be loaded ({type(err).__name__}: {err}); expected {expected}") from err
