"""Shared test fixtures: float32 highest-precision matmuls, the fixtures root, tiny configs."""
from __future__ import annotations

import json
import os
import shutil
import tempfile

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

# One persistent XLA compilation cache per test run, shared by the xdist workers (they inherit the variable the
# main process sets here before it starts them): programs that several tests compile alike compile once (CI, 2
# cores: 948 -> 880 s). Created here, removed at the end of the run; a JAX_COMPILATION_CACHE_DIR of the caller wins.
_OWN_XLA_CACHE = not os.environ.get("MEMFLOW_TEST_XLA_CACHE")
if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    if _OWN_XLA_CACHE:
        os.environ["MEMFLOW_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="memflow_jax_xla_cache_")
    jax.config.update("jax_compilation_cache_dir", os.environ["MEMFLOW_TEST_XLA_CACHE"])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def pytest_sessionfinish(session):
    if _OWN_XLA_CACHE and os.environ.get("MEMFLOW_TEST_XLA_CACHE"):
        shutil.rmtree(os.environ["MEMFLOW_TEST_XLA_CACHE"], ignore_errors=True)

FIXTURES_ROOT = os.path.abspath(os.environ.get(
    "MEMFLOW_FIXTURES", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures")))


def fixture_dir(component: str) -> str:
    return os.path.join(FIXTURES_ROOT, component)


def load_manifest(component: str) -> dict:
    """The manifest of a fixture folder; a missing folder is a test failure, never a skip."""
    path = os.path.join(fixture_dir(component), "manifest.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} not found: set MEMFLOW_FIXTURES to the fixtures root (default ../shared/fixtures)")
    with open(path) as f:
        return json.load(f)


def load_json(component: str, name: str) -> dict:
    with open(os.path.join(fixture_dir(component), name)) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def fixtures_root() -> str:
    return FIXTURES_ROOT


# Modules of long tests (minutes under -n 2) that the run should not end on. pytest-xdist's default (load)
# scheduling hands each worker a first batch of len(items) // workers // 4 consecutive tests, then ever smaller
# batches in collection order; a long test near the end of the collection (these sort late) keeps one worker busy
# while the other idles. They go, module by module and in their own order, to the front of the second worker's
# first batch (the first worker's is the long parity DiT cases).
LONG_MODULES = ("tests/unit/test_training_multidevice.py", "tests/unit/test_training.py",
                "tests/unit/test_vae_recipe.py")


def pytest_collection_modifyitems(config, items):
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0") or 0)
    if workers < 2:
        return
    module = lambda item: item.nodeid.split("::")[0]  # noqa: E731
    long = sorted((it for it in items if module(it) in LONG_MODULES), key=lambda it: LONG_MODULES.index(module(it)))
    if not long:
        return
    rest = [it for it in items if module(it) not in LONG_MODULES]
    at = min(len(items) // workers // 4, len(rest))
    items[:] = rest[:at] + long + rest[at:]
