"""Shared fixtures; plain helpers live in sample_kit.py (a unique name, so no other conftest shadows them)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from sample_kit import tiny_recipe_dict


@pytest.fixture
def tiny_recipe(tmp_path):
    """Write a tiny recipe to disk and return its path; keyword sections are merged in."""

    def make(**sections) -> Path:
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(tiny_recipe_dict(tmp_path / "runs", **sections)))
        return path

    return make


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny problems: one torch thread avoids start-up and oversubscription costs on small, busy hosts."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
