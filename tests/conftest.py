"""Shared test fixtures: float32 highest-precision matmuls, the fixtures root, tiny configs."""
from __future__ import annotations

import json
import os

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

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
