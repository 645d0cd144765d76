"""Known published weights and their download through huggingface_hub.

Each tag names a Hugging Face Hub repository holding OpenCLIP-format files (the repositories
OpenCLIP itself uses, including the ``timm/*.openai`` mirrors of OpenAI's checkpoints), the
activation those weights were trained with and their published ImageNet zero-shot accuracy
(``pretrained.tsv``).  Downloads land in the usual Hugging Face cache; when
the network is unavailable the error says how to pass a local file instead.
"""

from __future__ import annotations

import os
import socket
import urllib.parse
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .checkpoint import CheckpointError


@dataclass(frozen=True)
class Pretrained:
    """A published set of weights: its Hub repository (OpenCLIP-format files), the activation
    its towers were trained with where the repository's own config may not say it
    (QuickGELU for OpenAI's weights and their mirrors; None: the files decide) and its
    published ImageNet-1k zero-shot top-1 (%), where OpenCLIP's results table gives one."""

    repo: str
    activation: str | None
    imagenet: float | None = None


def _read_table() -> dict[str, dict[str, Pretrained]]:
    """The rows of ``pretrained.tsv`` (data beside this module), by architecture and tag."""
    table: dict[str, dict[str, Pretrained]] = {}
    text = resources.files(__package__).joinpath("pretrained.tsv").read_text(encoding="utf-8")
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    for name, tag, repo, activation, imagenet in rows[1:]:
        table.setdefault(name, {})[tag] = Pretrained(
            repo, None if activation == "-" else activation,
            None if imagenet == "-" else float(imagenet))
    return table


PRETRAINED: dict[str, dict[str, Pretrained]] = _read_table()

HUB_PREFIX = "hf-hub:"
# Tried in order; the first present in the repository is used (safetensors first: no pickle).
HUB_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
             "pytorch_model.bin")
HUB_CONFIGS = ("open_clip_config.json", "config.json", "preprocessor_config.json",
               "processor_config.json")
# The tokenizer files a family's repository may hold beside its weights (those present are
# fetched: a model loads with its own tokenizer).
HUB_TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json",
                       "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "vocab.txt",
                       "vocab.json", "merges.txt", "added_tokens.json")


class WeightsUnavailableError(RuntimeError):
    """Weights could not be fetched (offline, unknown repository or tag)."""


def pretrained_tags(model: str) -> list[str]:
    return list(PRETRAINED.get(model, {}))


def resolve(model: str, weights: str) -> tuple[str, str | None]:
    """(hub repository, activation or None) for ``weights`` = a tag or ``hf-hub:org/repo``."""
    if weights.startswith(HUB_PREFIX):
        return weights[len(HUB_PREFIX):].strip("/"), None
    known = PRETRAINED.get(model, {})
    if weights not in known:
        hint = f"known tags: {', '.join(known)}" if known else "no published weights are known"
        raise WeightsUnavailableError(
            f"unknown weights {weights!r} for {model} ({hint}); pass a tag, 'hf-hub:org/repo' or "
            "a local checkpoint path"
        )
    return known[weights].repo, known[weights].activation


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the hub's host, so that being offline fails at once instead of after
    huggingface_hub's retries.  Behind a proxy the check is left to the download itself."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    from huggingface_hub import constants

    url = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def download(repo: str) -> Path:
    """Return a snapshot directory holding the repository's configs and one weights file: from
    the Hugging Face cache when there, else downloaded into it.  Offline, a cache miss fails at
    once with instructions for passing a local file instead."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def fetch(name: str, cached_only: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo, name, local_files_only=cached_only))
        except (EntryNotFoundError, LocalEntryNotFoundError, FileNotFoundError):
            return None

    def first_weights(names: tuple[str, ...], cached_only: bool) -> Path | None:
        for name in HUB_CONFIGS + HUB_TOKENIZER_FILES:
            if name in names:
                fetch(name, cached_only)
        for name in HUB_FILES:
            if name in names and (path := fetch(name, cached_only)) is not None:
                return path.parent
        return None

    if (snapshot := first_weights(HUB_CONFIGS + HUB_TOKENIZER_FILES + HUB_FILES,
                                  cached_only=True)) is not None:
        return snapshot
    if not _hub_reachable():
        raise WeightsUnavailableError(
            f"cannot download weights from the Hugging Face Hub repository {repo!r}: there is no "
            "network (or HF_HUB_OFFLINE is set) and they are not in the local cache. Download "
            f"the checkpoint where you are online (e.g. `hf download {repo}`), then pass the "
            "local file or directory: clipforge.create_model('/path/to/checkpoint') or "
            "`--model /path/to/checkpoint`."
        )
    try:
        listed = tuple(list_repo_files(repo))
        snapshot = first_weights(listed, cached_only=False)
    except Exception as exc:  # HTTP errors, unknown or gated repositories, broken connections
        raise WeightsUnavailableError(f"download from {repo!r} failed: {exc}") from exc
    if snapshot is None:
        raise WeightsUnavailableError(f"{repo!r} holds none of {', '.join(HUB_FILES)}")
    return snapshot


__all__ = ["PRETRAINED", "Pretrained", "WeightsUnavailableError", "CheckpointError", "download",
           "pretrained_tags", "resolve"]
