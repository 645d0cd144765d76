"""Working out the architecture of a bare state dict from its tensor shapes.

OpenAI and OpenCLIP checkpoints name no architecture, but every size is in the shapes: widths from
the weight matrices, depths from counting blocks, patch size and grid from the patch embedding and
positional table.  Only the head count is invisible (it does not change any shape): it is
``width // 64`` as in every OpenAI tower, unless the shapes are exactly those of a built-in
architecture, whose head counts are then used (LAION's ViT-H/g/bigG use 80-104-wide heads).

Depths come from counting blocks, so every block is checked to be a real one (numbered in
order, with the tensors and shapes of its siblings) before a depth is believed: a small file
of 100,000 one-tensor "blocks" must not make clipforge build a 100,000-layer model.

A bare state dict records no activation either.  It is read with OpenAI's convention (QuickGELU)
unless the caller says otherwise; see :func:`infer_config`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import torch

from ..configs import ARCHITECTURES, CLIPConfig, TextConfig, VisionConfig
from .checkpoint import CheckpointError

log = logging.getLogger(__name__)
StateDict = dict[str, torch.Tensor]


def _count_blocks(sd: StateDict, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return len({m.group(1) for k in sd if (m := pattern.match(k))})


# Block lists: (prefix, the first block that all later ones repeat).  A ResNet stage's first
# block differs from the rest (stride, downsampling).
BLOCK_LISTS = (("transformer.resblocks.", 0), ("visual.transformer.resblocks.", 0),
               *((f"visual.layer{i}.", 1) for i in range(1, 5)))


def _blocks(sd: StateDict, prefix: str) -> dict[int, dict[str, tuple[int, ...]]]:
    """{block index: {tensor name within the block: shape}} of the blocks under ``prefix``."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)")
    blocks: dict[int, dict[str, tuple[int, ...]]] = {}
    for key, tensor in sd.items():
        if m := pattern.match(key):
            blocks.setdefault(int(m.group(1)), {})[m.group(2)] = tuple(tensor.shape)
    return blocks


def check_blocks(sd: StateDict, source: str) -> None:
    """Raise :class:`CheckpointError` unless each list of blocks is numbered 0..N-1 and every
    block repeats the tensor names and shapes of its list's reference block: a depth counted
    from the keys then stands for real weights, and building that many layers is no more work
    than the file's size justifies."""
    for prefix, first in BLOCK_LISTS:
        blocks = _blocks(sd, prefix)
        if sorted(blocks) != list(range(len(blocks))):
            numbers = sorted(blocks)
            raise CheckpointError(
                f"{source}: its blocks {prefix}N are numbered {numbers[:3]}...{numbers[-1]}, "
                f"not 0 to {len(blocks) - 1}; the file is corrupt or not a CLIP checkpoint")
        for index in range(first + 1, len(blocks)):
            if blocks[index] != blocks[first]:
                raise CheckpointError(
                    f"{source}: block {prefix}{index} does not hold the tensors and shapes of "
                    f"{prefix}{first}; the file is corrupt or not a CLIP checkpoint")


def _guess_heads(width: int) -> int:
    """OpenAI's head count, ``width // 64``; for a width that is not a multiple of 64 (no
    published model), the nearest count below it that divides the width, and at least one."""
    heads = max(1, width // 64)
    while width % heads:
        heads -= 1
    return heads


def _infer_vision(sd: StateDict) -> VisionConfig:
    if "visual.proj" in sd:
        conv = sd["visual.conv1.weight"]
        width, patch = conv.shape[0], conv.shape[-1]
        grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
        return VisionConfig(
            image_size=grid * patch, width=width, patch_size=patch,
            layers=_count_blocks(sd, "visual.transformer.resblocks."), heads=_guess_heads(width),
            mlp_width=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )
    if "visual.attnpool.positional_embedding" in sd:
        width = sd["visual.layer1.0.conv1.weight"].shape[0]
        grid = round((sd["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
        layers = tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5))
        return VisionConfig(image_size=grid * 32, width=width, layers=layers,
                            heads=_guess_heads(width * 32))
    raise KeyError("visual.proj or visual.attnpool.positional_embedding")


def _signature(config: CLIPConfig) -> tuple:
    """Everything shapes can show: the config without head counts, activation, preprocessing."""
    def sizes(tower: VisionConfig | TextConfig) -> tuple:
        return tuple(v for k, v in dataclasses.asdict(tower).items() if k != "heads")
    return config.embed_dim, sizes(config.vision), sizes(config.text)


def infer_config(sd: StateDict, activation: str | None = None, source: str = "checkpoint"
                 ) -> CLIPConfig:
    """A :class:`CLIPConfig` for an OpenAI/OpenCLIP-layout state dict.

    ``activation`` None means OpenAI's QuickGELU.  When the shapes are those of a built-in
    architecture whose published weights use another activation, a warning says so, because a
    wrong activation degrades accuracy silently.
    """
    check_blocks(sd, source)
    try:
        vision = _infer_vision(sd)
        text_width = sd["ln_final.weight"].shape[0]
        text = TextConfig(
            width=text_width, layers=_count_blocks(sd, "transformer.resblocks."),
            heads=_guess_heads(text_width), context_length=sd["positional_embedding"].shape[0],
            vocab_size=sd["token_embedding.weight"].shape[0],
            mlp_width=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        )
        embed_dim = sd["text_projection"].shape[1]
        if "input_resolution" in sd:  # TorchScript archives state it outright
            vision = dataclasses.replace(vision, image_size=sd["input_resolution"].item())
        config = CLIPConfig(embed_dim, vision, text, activation or "quick_gelu")
    except KeyError as exc:
        raise CheckpointError(
            f"{source} is not a CLIP state dict in OpenAI/OpenCLIP layout: key {exc} is missing "
            f"(first keys: {', '.join(list(sd)[:5])})"
        ) from None
    except (IndexError, RuntimeError, ValueError) as exc:  # shapes no CLIP model has
        raise CheckpointError(
            f"{source}: its tensor shapes describe no CLIP model clipforge can build ({exc}); "
            "the file is corrupt, or not a CLIP checkpoint"
        ) from None
    for name, known in ARCHITECTURES.items():
        if _signature(known) == _signature(config):
            config = config.replace(
                vision=dataclasses.replace(vision, heads=known.vision.heads),
                text=dataclasses.replace(text, heads=known.text.heads),
            )
            if activation is None and known.activation != "quick_gelu":
                log.warning(
                    "%s records no activation and has the shapes of %s, whose published weights "
                    "use %s; reading it with QuickGELU (OpenAI's convention). If these weights "
                    "were trained with %s, pass activation=%r (--activation %s).",
                    source, name, known.activation, known.activation, known.activation,
                    known.activation,
                )
            break
    return config


def _dim(sd: StateDict, key: str, dim: int) -> int | None:
    """Size ``dim`` of tensor ``key``; None when the tensor is absent or has too few dimensions
    (then the key-by-key check before loading names it)."""
    tensor = sd.get(key)
    if tensor is None or tensor.ndim <= (dim if dim >= 0 else -dim - 1):
        return None
    return int(tensor.shape[dim])


def _positions(image_size: int, step: int, class_token: bool = True) -> int:
    return (image_size // step) ** 2 + int(class_token)


# (config field, its value, the number the tensors should show for it, what they show,
#  which tensors); "show" is None where the tensor is absent.
Claim = tuple[str, object, object, object, str]


def _vision_claims(v: VisionConfig, sd: StateDict) -> list[Claim]:
    if v.is_vit:
        blocks, grid = "visual.transformer.resblocks.", "visual.positional_embedding"
        return [
            ("vision.width", v.width, v.width, _dim(sd, "visual.conv1.weight", 0),
             "visual.conv1.weight"),
            ("vision.patch_size", v.patch_size, v.patch_size,
             _dim(sd, "visual.conv1.weight", -1), "visual.conv1.weight"),
            ("vision.layers", v.layers, v.layers, _count_blocks(sd, blocks),
             f"blocks {blocks}N"),
            ("vision.mlp_width", v.mlp_width, v.mlp_width * (2 if v.mlp_gated else 1),
             _dim(sd, blocks + "0.mlp.c_fc.weight", 0), blocks + "0.mlp.c_fc.weight"),
            ("vision.image_size", v.image_size,
             _positions(v.image_size, v.patch_size, v.class_token), _dim(sd, grid, 0),
             f"positions in {grid}"),
        ]
    grid = "visual.attnpool.positional_embedding"
    return [
        ("vision.width", v.width, v.width, _dim(sd, "visual.layer1.0.conv1.weight", 0),
         "visual.layer1.0.conv1.weight"),
        ("vision.layers", v.layers, v.layers,
         tuple(_count_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)),
         "blocks visual.layer1-4.N"),
        ("vision.image_size", v.image_size, _positions(v.image_size, 32), _dim(sd, grid, 0),
         f"positions in {grid}"),
    ]


# Where a text projection shows the embedding width: (tensor, dimension) per projection kind.
_TEXT_PROJECTION_OUT = {"matrix": ("text_projection", 1), "linear": ("text_projection.weight", 0),
                        "mlp": ("text_projection.2.weight", 0)}


def _claims(config: CLIPConfig, sd: StateDict) -> list[Claim]:
    """Every size of ``config`` that the tensors of ``sd`` show."""
    t, blocks = config.text, "transformer.resblocks."
    claims: list[Claim] = []
    if t.proj in _TEXT_PROJECTION_OUT:
        key, dim = _TEXT_PROJECTION_OUT[t.proj]
        claims.append(("embed_dim", config.embed_dim, config.embed_dim, _dim(sd, key, dim), key))
    return [
        *claims,
        ("text.width", t.width, t.width, _dim(sd, "token_embedding.weight", 1),
         "token_embedding.weight"),
        ("text.layers", t.layers, t.layers, _count_blocks(sd, blocks), f"blocks {blocks}N"),
        ("text.mlp_width", t.mlp_width, t.mlp_width, _dim(sd, blocks + "0.mlp.c_fc.weight", 0),
         blocks + "0.mlp.c_fc.weight"),
        ("text.context_length", t.context_length, t.positions,
         _dim(sd, "positional_embedding", 0), "positional_embedding"),
        ("text.vocab_size", t.vocab_size, t.vocab_size, _dim(sd, "token_embedding.weight", 0),
         "token_embedding.weight"),
        *_vision_claims(config.vision, sd),
    ]


def _tower_kind(sd: StateDict) -> str | None:
    if "visual.positional_embedding" in sd:
        return "ViT"
    if any(k.startswith("visual.layer1.") for k in sd):
        return "ResNet"
    return None


def _describe(claim: Claim, names: dict[str, str]) -> str:
    field, value, implied, shown, where = claim
    said = f"{value}" if value == implied else f"{value} ({implied} {where.split()[0]})"
    return f"{names.get(field, field)} is {said} but the tensors have {shown} ({where})"


_ADVICE = ("fix or remove the config, or pass the weights file alone so that its architecture "
           "is read from its shapes")


def check_config_fits(config: CLIPConfig, sd: StateDict, source: str, weights: str,
                      names: dict[str, str] | None = None) -> None:
    """Raise :class:`CheckpointError` unless every size ``config`` states (depths, widths,
    positions, the kind of image tower) is what the tensors of ``sd`` (OpenAI layout) show.

    Runs before any model is built: building costs milliseconds per block, and a config from
    a file that claims 100,000 layers would take minutes to construct before the key-by-key
    check could refuse it.  ``source`` names the config (and its file), ``weights`` the
    tensors' file (whose blocks are checked first, :func:`check_blocks`); ``names`` maps
    clipforge's field names to the file's own spelling (``text.layers`` ->
    ``text_config.num_hidden_layers``).  Head counts do not show in shapes: the config's
    own checks ensure they divide the widths."""
    names = names or {}
    check_blocks(sd, weights)
    kind, expected = _tower_kind(sd), ("ViT" if config.vision.is_vit else "ResNet")
    if kind is not None and kind != expected:
        raise CheckpointError(f"{source} describes a {expected} image tower, but the tensors "
                              f"hold a {kind} one: {_ADVICE}")
    problems = [_describe(claim, names) for claim in _claims(config, sd)
                if claim[3] is not None and claim[3] != claim[2]]
    if problems:
        raise CheckpointError(
            f"{source} does not match its weights: " + "; ".join(problems[:3])
            + ("; ..." if len(problems) > 3 else "") + f". {_ADVICE[0].upper()}{_ADVICE[1:]}"
        )
