"""The local cluster's pods share one compiled-kernel cache, the one a worker run by hand uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from disaggserve.contract import ENV_KERNEL_CACHE
from disaggserve.local.cluster import node_kernel_cache


def test_pods_share_the_users_kernel_cache_a_worker_finds_by_itself(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    cpu_kernels = pytest.importorskip("disaggserve_worker.model.cpu_kernels")
    monkeypatch.delenv(ENV_KERNEL_CACHE, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shared = node_kernel_cache()
    assert Path(shared) == cpu_kernels._cache_dir()  # the worker's default, computed by the worker

    monkeypatch.setenv(ENV_KERNEL_CACHE, str(tmp_path / "given"))
    assert node_kernel_cache() == str(tmp_path / "given")
    assert cpu_kernels._cache_dir() == tmp_path / "given"
