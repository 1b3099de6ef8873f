"""Resolve ``from_pretrained`` names: a local directory, or a Hugging Face hub id fetched through
``huggingface_hub`` and its cache (``HF_HUB_OFFLINE=1`` / ``local_files_only=True`` use the cache only)."""
from __future__ import annotations

import os
import re

# The demo model shipped inside the package (tools/train_demo.py; its sources and licences in
# SOURCES.md there): a small GLM-4 trained on the King James Bible and Tang / Song poems, so that
# glm4rt runs with no model hub at all. A checkpoint directory like any other.
DEMO_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_model")
DEMO_NAME = "glm4rt-demo"  # its model id in the server's API

# Keyword arguments of from_pretrained that belong to the hub, not to the config.
HUB_KWARGS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


def pop_hub_kwargs(kwargs: dict) -> dict:
    """Remove the hub options (``HUB_KWARGS``) from a ``from_pretrained``'s ``kwargs``; return them."""
    return {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}

# Files a GLM-4 checkpoint needs: config, weights, tokenizer and chat template.
_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_model_dir(name_or_path: str | os.PathLike, revision: str | None = None,
                      cache_dir: str | None = None, local_files_only: bool | None = None,
                      token: str | bool | None = None, force_download: bool = False) -> str:
    """Return a local directory holding the checkpoint.

    Args:
        name_or_path: a directory, or a hub id such as ``"zai-org/GLM-4-9B-0414"``.
        revision, cache_dir, local_files_only, token, force_download: passed to
            ``huggingface_hub.snapshot_download``.
    Returns:
        The directory path.
    Raises:
        FileNotFoundError: not a directory and not resolvable on the hub or in its cache.
    """
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise FileNotFoundError(f"{path!r} is a file; from_pretrained expects a checkpoint directory")
    if not _REPO_ID.match(path) or path.startswith((".", "/", "~")):
        raise FileNotFoundError(f"no such checkpoint directory: {path!r}")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise FileNotFoundError(
            f"no such directory {path!r}, and huggingface_hub is not installed to resolve it as a hub id"
        ) from None
    try:
        return snapshot_download(path, revision=revision, cache_dir=cache_dir,
                                 local_files_only=bool(local_files_only), token=token,
                                 force_download=force_download, allow_patterns=_ALLOW_PATTERNS)
    except Exception as e:  # network, auth, not-in-cache: one clear message
        raise FileNotFoundError(
            f"{path!r} is not a local directory and could not be resolved as a Hugging Face hub id "
            f"({type(e).__name__}: {e})") from e
