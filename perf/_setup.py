"""Makes ``import flexnsa`` work from a plain checkout (e.g. a copy on a GPU machine, not pip-installed).

pyproject maps the top-level folders ``masks/`` and ``custom_ops/`` to ``flexnsa.masks`` and
``flexnsa.custom_ops``. An editable or regular install does that mapping; a bare checkout does not.
When flexnsa is not installed, :func:`ensure_flexnsa` puts the repository root on ``sys.path`` and
installs a meta-path finder that loads ``flexnsa.masks[.*]`` / ``flexnsa.custom_ops[.*]`` from those
folders. When flexnsa is installed it does nothing.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import pathlib
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
_SUBPACKAGES = {"flexnsa.masks": "masks", "flexnsa.custom_ops": "custom_ops"}


class _SubpackageFinder(importlib.abc.MetaPathFinder):
    """Finds ``flexnsa.masks`` and ``flexnsa.custom_ops`` (and their modules) in the repo root."""

    def find_spec(self, fullname, path=None, target=None):
        for package, folder in _SUBPACKAGES.items():
            if fullname == package or fullname.startswith(package + "."):
                rest = fullname[len(package) :].lstrip(".").split(".") if fullname != package else []
                base = REPO_ROOT / folder / pathlib.Path(*rest) if rest else REPO_ROOT / folder
                if base.is_dir():
                    init = base / "__init__.py"
                    return importlib.util.spec_from_file_location(
                        fullname, init, submodule_search_locations=[str(base)]
                    )
                module_file = base.with_suffix(".py")
                if module_file.is_file():
                    return importlib.util.spec_from_file_location(fullname, module_file)
                return None
        return None


def ensure_flexnsa() -> None:
    """Make ``flexnsa`` importable. The finder goes last on ``sys.meta_path``, so an installed
    flexnsa (regular or editable) is always found first and the finder is never consulted."""
    if importlib.util.find_spec("flexnsa") is None and str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    if not any(isinstance(f, _SubpackageFinder) for f in sys.meta_path):
        sys.meta_path.append(_SubpackageFinder())
