"""The router runs no model, so it must not import torch: torch costs seconds of start-up (the
router's readiness, on every restart) and hundreds of MB of memory in each router pod.

Checked in a fresh interpreter, since the test process itself has torch loaded by other tests."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import disaggserve_worker

WORKER_ROOT = Path(disaggserve_worker.__file__).resolve().parents[1]

# Imports what `disaggserve-worker router --model builtin:tiny-llama ...` imports up to serving:
# the worker CLI (which registers the router subcommand), the router's modules, the model info of a
# built-in model and the app built from them. A finder that sees every import names who asked for
# torch, so a failure says which import to make lazy or move.
SCRIPT = textwrap.dedent("""
    import importlib.abc, sys, traceback

    chains = []

    class Watch(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname == "torch" and not chains:
                chains.append(" -> ".join(f"{f.filename}:{f.lineno}" for f in traceback.extract_stack()
                                          if "disaggserve" in f.filename))
            return None

    sys.meta_path.insert(0, Watch())

    import disaggserve_worker.router.app
    import disaggserve_worker.router.cli
    import disaggserve_worker.router.model_info
    from disaggserve_worker.cli import build_parser
    from disaggserve_worker.router.cli import build_router, config_from_args

    args = build_parser().parse_args(["router", "--model", "builtin:tiny-llama", "--model-name", "tiny",
                                      "--colocated-endpoints", "http://127.0.0.1:9"])
    router = build_router(config_from_args(args))
    router.build_app()
    info = router.model
    assert info.max_model_len == 4096 and info.vocab_size == 512, (info.max_model_len, info.vocab_size)
    assert info.decode(info.encode("Hello, world!")) == "Hello, world!"
    print("torch imported" if "torch" in sys.modules else "no torch", *chains)
""")


def test_router_imports_no_torch() -> None:
    path = os.pathsep.join(p for p in (str(WORKER_ROOT), os.environ.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": path})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "no torch", done.stdout
