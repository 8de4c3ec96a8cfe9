"""Take ``docs/flower-workers.png``: Flower's worker list while ``examples.app`` scales.

It starts a private Redis, a node (``celery -A examples.app worker -E``) and
``celery flower``, sends a burst to both example functions, waits until their
containers are online in Flower, and shoots the page with headless Chromium.
Everything it starts is stopped by its PID, even on failure.

Needs Chromium (Debian: ``apt-get install chromium``). From the repository root::

    .venv/bin/python docs/screenshot_flower.py [--out docs/flower-workers.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from devkit.servers import FlowerServer, redis_server, stop_process  # noqa: E402

APP = "examples.app"
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
)


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    raise SystemExit("no Chromium found: apt-get install chromium")


def wait_for_log(path: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} in {path} within {timeout}s")
        time.sleep(0.1)


def wait_for_containers(flower: FlowerServer, functions: dict[str, int], timeout: float) -> None:
    """Until Flower shows at least ``count`` containers of each function online."""
    deadline = time.monotonic() + timeout
    while True:
        online = [n for n, up in flower.get_json("/api/workers?status=true").items() if up]
        if all(
            sum(1 for n in online if n.startswith(f"{function}-")) >= count
            for function, count in functions.items()
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"containers online in Flower: {sorted(online)}")
        time.sleep(0.2)


def shoot(url: str, out: Path, size: str) -> None:
    with tempfile.TemporaryDirectory(prefix="cc-chromium-") as profile:
        proc = subprocess.Popen(
            [
                chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size}",
                "--virtual-time-budget=4000",
                f"--screenshot={out}",
                url,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            proc.wait(60)
        finally:
            stop_process(proc, grace=2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "flower-workers.png")
    parser.add_argument("--size", default="1440,820", help="the window, WIDTH,HEIGHT")
    args = parser.parse_args()
    out: Path = args.out.resolve()
    out.unlink(missing_ok=True)
    logdir = Path(tempfile.mkdtemp(prefix="cc-screenshot-"))
    with redis_server() as redis:
        os.environ["CELERY_BROKER_URL"] = redis.url
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        node_log = logdir / "node.log"
        with open(node_log, "wb") as log:
            node = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", APP, "worker", "-l", "INFO", "-E"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        flower = FlowerServer(APP, redis.url, cwd=str(ROOT), log_path=str(logdir / "flower.log"))
        try:
            wait_for_log(node_log, " ready.", 60)
            flower.start()
            from celery import group

            from examples.app import app, ask, fetch

            app.conf.update(broker_url=redis.url, result_backend=redis.url)
            group(fetch.s(f"https://example.com/{i}") for i in range(800)).apply_async()
            group(ask.s(f"question {i}") for i in range(4000)).apply_async()
            wait_for_containers(flower, {fetch.name: 4, ask.name: 2}, 60)
            time.sleep(1)  # some inputs done, many running
            shoot(f"{flower.url}/workers", out, args.size)
        finally:
            flower.stop()
            stop_process(node)
    if not out.exists():
        raise SystemExit(f"Chromium wrote no screenshot; logs in {logdir}")
    shutil.rmtree(logdir, ignore_errors=True)
    print(out)


if __name__ == "__main__":
    main()
