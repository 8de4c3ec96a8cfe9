"""The peers (Taskiq, arq) that the refill and intake benchmarks run beside ours.

They are installed from PyPI into a virtualenv of their own, ``.venv-peers`` at the
repository's root, made on first use: the project's own environment stays exactly what
its tests run on (taskiq and arq would add hiredis, which changes how redis-py parses
every reply). Without PyPI the peers are skipped, and the benchmark says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from devkit import ROOT

VENV = ROOT / ".venv-peers"
#: what the figures in the docs were measured with
REQUIREMENTS = ("taskiq==0.13.0", "taskiq-redis==1.2.4", "arq==0.25.0")


def python() -> Path | str:
    """The peers' interpreter, installing them first if needed; or why they cannot run."""
    interpreter = VENV / "bin" / "python"
    marker = VENV / ".installed"
    if marker.exists() and marker.read_text() == "\n".join(REQUIREMENTS):
        return interpreter
    try:
        if not interpreter.exists():
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
        subprocess.run(
            [str(interpreter), "-m", "pip", "install", "-q", *REQUIREMENTS],
            check=True,
            capture_output=True,
            timeout=600,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"could not install {', '.join(REQUIREMENTS)}: {exc}"
    marker.write_text("\n".join(REQUIREMENTS))
    return interpreter


@dataclass(frozen=True)
class Peer:
    """One peer: how its worker starts and how it publishes, in the peers' virtualenv."""

    name: str
    module: str
    worker: tuple[str, ...]

    def env(self, redis_url: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ, PEER_REDIS_URL=redis_url, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(extra or {})
        return env

    def start(
        self, interpreter: Path, redis_url: str, log: Path, extra: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        with open(log, "wb") as out:
            return subprocess.Popen(
                [str(interpreter), "-m", *self.worker],
                cwd=ROOT,
                env=self.env(redis_url, extra),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def publish(
        self,
        interpreter: Path,
        redis_url: str,
        key: str,
        total: int,
        seconds: float,
        is_async: bool,
    ) -> None:
        args = [str(interpreter), "-m", self.module, "publish", key, str(total), str(seconds)]
        if is_async:
            args.append("async")
        subprocess.run(args, cwd=ROOT, env=self.env(redis_url), check=True, timeout=300)

    @property
    def command(self) -> str:
        return "python -m " + " ".join(self.worker)


def taskiq(slots: int) -> Peer:
    return Peer(
        "taskiq",
        "benchmarks.peer_taskiq",
        (
            "taskiq",
            "worker",
            "benchmarks.peer_taskiq:broker",
            "--workers",
            "1",
            "--max-async-tasks",
            str(slots),
            "--max-threadpool-threads",
            str(slots),
            "--log-level",
            "WARNING",
        ),
    )


def arq() -> Peer:
    return Peer("arq", "benchmarks.peer_arq", ("arq", "benchmarks.peer_arq.WorkerSettings"))
