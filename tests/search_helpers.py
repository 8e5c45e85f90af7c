"""Small builders shared by the search, MLflow and CLI tests (tiny digits ViT, fast validation)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import torch

from lightning_supernet import SupernetModule
from lightning_supernet.demo import DigitsDataModule, DigitsViT


def one_thread():
    """Generator for a module-scoped fixture: one torch thread (tiny models on a busy 2-core box run 4x faster)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_supernet(depth: int = 2, dim: int = 16, heads: int = 2) -> SupernetModule:
    """An untrained 2-block digits ViT supernet (metrics exist; their values do not matter here)."""
    torch.manual_seed(0)
    return SupernetModule(DigitsViT(dim=dim, depth=depth, num_heads=heads, mlp_ratio=2.0), eval_subnets=None)


def digits(batch_size: int = 128) -> DigitsDataModule:
    """The digits data module with large batches (one validation batch per trial with ``limit_val_batches=1``)."""
    return DigitsDataModule(batch_size=batch_size)


def free_port() -> int:
    """A TCP port nothing listens on (closed again before it is returned)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (``initdb`` + ``pg_ctl``, as the ``postgres`` user when root)."""

    def __init__(self, root: Path) -> None:
        self.bin = _pg_bin()
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]

    @staticmethod
    def available() -> str | None:
        """``None`` if a cluster can be started here, else why not."""
        if _pg_bin() is None:
            return "PostgreSQL binaries (initdb, pg_ctl) not found; scripts/ci_services.sh installs them"
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root without a `postgres` user to run initdb"
            if shutil.which("runuser") is None:
                return "`runuser` not found"
        try:
            import psycopg2  # noqa: F401
        except ImportError:
            return "psycopg2 is not installed (pip install 'lightning-supernet[postgres]')"
        return None

    def _run(self, *args: str) -> None:
        subprocess.run([*self.as_user, *args], check=True, capture_output=True, timeout=60)

    def start(self) -> str:
        """Start it; returns the SQLAlchemy URL of a fresh database."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.as_user:
            shutil.chown(self.root, "postgres")
            os.chmod(self.root, 0o700)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "--no-sync")
        opts = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=50"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.root / "log"), "-w",
                  "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "optuna")
        return f"postgresql+psycopg2://postgres@127.0.0.1:{self.port}/optuna"

    def stop(self) -> None:
        """Stop it (immediately; the data is thrown away)."""
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop")
        except (subprocess.SubprocessError, OSError):
            pass


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return versions[-1].parent if versions else None


def kill_when(proc, ready, timeout: float = 120.0) -> None:
    """SIGKILL a process once ``ready()`` is true (or fail after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not proc.is_alive():
            raise AssertionError(f"the search process exited early (code {proc.exitcode})")
        if time.monotonic() > deadline:
            os.kill(proc.pid, signal.SIGKILL)
            raise AssertionError("the search process made no progress in time")
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
