"""Shared set-up of the perf scripts: the repository root, and a clear error when flexnsa is not
installed (the package is always used installed: ``pip install -e .``, on a GPU machine
``pip install --no-deps --no-build-isolation -e .``; ``masks/`` and ``custom_ops/`` only become
``flexnsa.masks`` and ``flexnsa.custom_ops`` through the install)."""

from __future__ import annotations

import importlib.util
import pathlib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


def ensure_flexnsa() -> None:
    """Raise SystemExit with the install command when ``flexnsa.custom_ops`` cannot be imported."""
    if importlib.util.find_spec("flexnsa") is None or importlib.util.find_spec("flexnsa.custom_ops") is None:
        raise SystemExit(f"flexnsa is not installed: run `pip install -e {REPO_ROOT}` first")
