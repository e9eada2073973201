"""Which peer libraries this machine can run, and the bench-local Node modules for the npm peer.

The Python peers are the ``bench`` extra (``pip install -e '.[bench]'``): python-redis-lock, pottery and
reslock. The npm ``redis-semaphore`` (with ``ioredis``) is installed on first use into ``bench/.node/``
(ignored by git) when ``node`` and ``npm`` are on PATH. A peer that is missing is skipped with a message.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
NODE_DIR = BENCH / ".node"
NODE_MODULES = NODE_DIR / "node_modules"
NODE_WORKER = BENCH / "semaphore_worker.js"
NPM_PACKAGES = {"redis-semaphore": "^5.8.0", "ioredis": "^6.0.0"}
NPM_TIMEOUT_S = 180

PYTHON_PEERS = {"python-redis-lock": "redis_lock", "pottery": "pottery", "reslock": "reslock"}


@dataclass(frozen=True)
class Availability:
    ok: bool
    why: str = ""  # when not ok: the message printed instead of the figures


def python_peer(name: str) -> Availability:
    if importlib.util.find_spec(PYTHON_PEERS[name]) is not None:
        return Availability(True)
    return Availability(False, f"skipped: {name} is not installed (pip install -e '.[bench]')")


def node_package_version(name: str) -> str:
    try:
        return str(json.loads((NODE_MODULES / name / "package.json").read_text())["version"])
    except (OSError, ValueError, KeyError):
        return "?"


def node_peer(install: bool = True) -> Availability:
    """The npm MultiSemaphore peer: node on PATH and the modules in bench/.node (installed here if missing)."""
    node = shutil.which("node")
    if node is None:
        return Availability(False, "skipped: Node is not installed (no `node` on PATH)")
    if all((NODE_MODULES / name / "package.json").is_file() for name in NPM_PACKAGES):
        return Availability(True)
    npm = shutil.which("npm")
    if npm is None or not install:
        return Availability(False, "skipped: redis-semaphore is not in bench/.node and npm is not available")
    NODE_DIR.mkdir(exist_ok=True)
    manifest = {"name": "gpuboss-bench-node", "private": True, "dependencies": NPM_PACKAGES}
    (NODE_DIR / "package.json").write_text(json.dumps(manifest, indent=2) + "\n")
    try:
        done = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=NODE_DIR,
            capture_output=True,
            text=True,
            timeout=NPM_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as err:
        return Availability(False, f"skipped: npm install redis-semaphore ioredis failed ({err})")
    if done.returncode != 0 or not (NODE_MODULES / "redis-semaphore").is_dir():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        return Availability(False, f"skipped: npm could not install redis-semaphore ioredis ({tail})")
    return Availability(True)


def node_env() -> dict[str, str]:
    env = dict(os.environ)
    env["NODE_PATH"] = str(NODE_MODULES)
    return env


def versions() -> str:
    """Versions of the peers found, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("redis", *PYTHON_PEERS):
        try:
            found.append(f"{'redis-py' if dist == 'redis' else dist} {version(dist)}")
        except PackageNotFoundError:
            found.append(f"{dist} (not installed)")
    if (NODE_MODULES / "redis-semaphore").is_dir():
        found.append(f"npm redis-semaphore {node_package_version('redis-semaphore')}")
        found.append(f"ioredis {node_package_version('ioredis')}")
    node = shutil.which("node")
    if node is not None:
        try:
            out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout.strip()
            found.append(f"node {out}")
        except (OSError, subprocess.SubprocessError):
            pass
    return ", ".join(found)
