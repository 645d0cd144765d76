"""Known published weights and their download through huggingface_hub.

Each tag names a Hugging Face Hub repository holding OpenCLIP-format files (the repositories
OpenCLIP itself uses, including the ``timm/*.openai`` mirrors of OpenAI's checkpoints) and the
activation those weights were trained with.  Downloads land in the usual Hugging Face cache; when
the network is unavailable the error says how to pass a local file instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .checkpoint import CheckpointError


@dataclass(frozen=True)
class Pretrained:
    repo: str
    activation: str


def _openai(repo: str) -> Pretrained:
    return Pretrained(repo, "quick_gelu")


def _laion(repo: str) -> Pretrained:
    return Pretrained(repo, "gelu")


PRETRAINED: dict[str, dict[str, Pretrained]] = {
    "RN50": {"openai": _openai("timm/resnet50_clip.openai")},
    "RN101": {"openai": _openai("timm/resnet101_clip.openai")},
    "RN50x4": {"openai": _openai("timm/resnet50x4_clip.openai")},
    "RN50x16": {"openai": _openai("timm/resnet50x16_clip.openai")},
    "RN50x64": {"openai": _openai("timm/resnet50x64_clip.openai")},
    "ViT-B-32": {"openai": _openai("timm/vit_base_patch32_clip_224.openai"),
                 "laion2b_s34b_b79k": _laion("laion/CLIP-ViT-B-32-laion2B-s34B-b79K")},
    "ViT-B-16": {"openai": _openai("timm/vit_base_patch16_clip_224.openai"),
                 "laion2b_s34b_b88k": _laion("laion/CLIP-ViT-B-16-laion2B-s34B-b88K")},
    "ViT-L-14": {"openai": _openai("timm/vit_large_patch14_clip_224.openai"),
                 "laion2b_s32b_b82k": _laion("laion/CLIP-ViT-L-14-laion2B-s32B-b82K")},
    "ViT-L-14-336": {"openai": _openai("timm/vit_large_patch14_clip_336.openai")},
    "ViT-H-14": {"laion2b_s32b_b79k": _laion("laion/CLIP-ViT-H-14-laion2B-s32B-b79K")},
    "ViT-g-14": {"laion2b_s34b_b88k": _laion("laion/CLIP-ViT-g-14-laion2B-s34B-b88K")},
    "ViT-bigG-14": {"laion2b_s39b_b160k": _laion("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k")},
}

HUB_PREFIX = "hf-hub:"
# Tried in order; the first present in the repository is used (safetensors first: no pickle).
HUB_FILES = ("open_clip_model.safetensors", "model.safetensors", "open_clip_pytorch_model.bin",
             "pytorch_model.bin")
HUB_CONFIGS = ("open_clip_config.json", "config.json", "preprocessor_config.json")


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


def download(repo: str) -> Path:
    """Fetch a repository's configs and one weights file into the Hugging Face cache and return
    the snapshot directory.  Offline, only the cache is used, and a miss fails at once with
    instructions for passing a local file."""
    from huggingface_hub import hf_hub_download, list_repo_files
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    try:
        listed: set[str] | None = set(list_repo_files(repo))
    except RepositoryNotFoundError as exc:
        raise WeightsUnavailableError(f"no Hugging Face Hub repository {repo!r}") from exc
    except Exception:  # offline, proxy, DNS...: fall back on the local cache
        listed = None

    def fetch(name: str) -> Path | None:
        if listed is not None and name not in listed:
            return None
        try:
            return Path(hf_hub_download(repo, name, local_files_only=listed is None))
        except (EntryNotFoundError, FileNotFoundError):
            return None
        except Exception as exc:  # network failure or an offline cache miss
            if listed is None:
                return None
            raise WeightsUnavailableError(f"download of {name} from {repo!r} failed: {exc}") from exc

    for name in HUB_CONFIGS:
        fetch(name)
    for name in HUB_FILES:
        if (path := fetch(name)) is not None:
            return path.parent
    if listed is None:
        raise WeightsUnavailableError(
            f"cannot download weights from the Hugging Face Hub repository {repo!r}: there is no "
            "network (or HF_HUB_OFFLINE is set) and they are not in the local cache. Download "
            f"the checkpoint where you are online (e.g. `hf download {repo}`), then pass the "
            "local file or directory: clipforge.create_model('/path/to/checkpoint') or "
            "`--model /path/to/checkpoint`."
        )
    raise WeightsUnavailableError(f"{repo!r} holds none of {', '.join(HUB_FILES)}")


__all__ = ["PRETRAINED", "Pretrained", "WeightsUnavailableError", "CheckpointError", "download",
           "pretrained_tags", "resolve"]
