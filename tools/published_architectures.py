"""Write src/clipforge/published_architectures.json: clipforge's config of every architecture
in weights/pretrained.tsv that has no hand-written row in configs.py (SigLIP, SigLIP 2, DFN,
MetaCLIP 2, PE-Core, EVA, XLM-RoBERTa...), as clipforge's own OpenCLIP reader makes it of
OpenCLIP's model config and the tensors OpenCLIP builds from it (on the meta device: no memory).

A development tool: it needs open_clip and timm (installed for the tests, see the Makefile) and
runs their model code with the tests' torchvision stand-in.  Its output is data, committed with
the package, so that ``clipforge models`` can list every architecture with its image size,
embedding width and size, and ``create_model(name)`` can build any of them.

    .venv/bin/python tools/published_architectures.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import families  # noqa: E402  (the tests' tokenizer builders and open_clip stand-in)
from clipforge.configs import ARCHITECTURES  # noqa: E402
from clipforge.weights.open_clip import read_open_clip  # noqa: E402
from clipforge.weights.pretrained import PRETRAINED  # noqa: E402

OUT = ROOT / "src" / "clipforge" / "published_architectures.json"

# The text towers OpenCLIP takes from the Hugging Face Hub by name: their public configs.
XLMR = {"model_type": "xlm-roberta", "vocab_size": 250002, "max_position_embeddings": 514,
        "type_vocab_size": 1, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "hidden_act": "gelu", "layer_norm_eps": 1e-5, "position_embedding_type": "absolute"}
HF_TOWERS = {
    "xlm-roberta-base": {**XLMR, "hidden_size": 768, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "intermediate_size": 3072},
    "xlm-roberta-large": {**XLMR, "hidden_size": 1024, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096},
}


def _tokenizer_dirs(root: Path) -> dict[str, Path]:
    """Stand-ins with each family's tokenizer class and padding id (only those are read)."""
    return {"siglip": families.siglip_tokenizer(root / "siglip"),
            "siglip2": families.siglip2_tokenizer(root / "siglip2"),
            "xlmr": families.xlmr_tokenizer(root / "xlmr")}


def _stand_in(text_cfg: dict, tokenizers: dict[str, Path], root: Path) -> Path:
    """A directory holding what the config names by Hub id: tokenizer files, a tower config."""
    directory = root / "model"
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    name = text_cfg.get("hf_tokenizer_name", "")
    kind = ("siglip2" if "SigLIP2" in name or "gemma" in name.lower() else
            "siglip" if "SigLIP" in name else "xlmr")
    if name:
        for path in tokenizers[kind].iterdir():
            (directory / path.name).write_bytes(path.read_bytes())
    tower = text_cfg.get("hf_model_name")
    if tower:
        text_cfg["hf_model_name"] = str(directory / "tower")
        (directory / "tower").mkdir()
        (directory / "tower" / "config.json").write_text(json.dumps(HF_TOWERS[tower]))
    return directory


def architecture(oc, name: str, tag: str, tokenizers: dict[str, Path], root: Path) -> dict:
    from open_clip.factory import get_model_config

    model_cfg = get_model_config(name)
    tag_cfg = oc.get_pretrained_cfg(name, tag) or {}
    if tag_cfg.get("quick_gelu"):
        model_cfg["quick_gelu"] = True
    preprocess = {k: tag_cfg[k] for k in ("mean", "std", "interpolation", "resize_mode")
                  if k in tag_cfg}
    text_cfg = dict(model_cfg["text_cfg"])
    directory = _stand_in(text_cfg, tokenizers, root)
    with torch.device("meta"):
        reference = oc.create_model(name, device="meta", pretrained_text=False,
                                    force_quick_gelu=bool(tag_cfg.get("quick_gelu")),
                                    text_cfg={**text_cfg, "hf_model_pretrained": False})
    document = json.loads(json.dumps({"model_cfg": {**model_cfg, "text_cfg": text_cfg},
                                      "preprocess_cfg": preprocess}))
    found = read_open_clip(document, reference.state_dict(), directory, None, name, name)
    return found.config.to_dict()


def main() -> None:
    oc = families.open_clip()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizers = _tokenizer_dirs(root / "tok")
        for name, tags in PRETRAINED.items():
            if name in ARCHITECTURES and name not in rows:
                continue
            rows[name] = architecture(oc, name, next(iter(tags)), tokenizers, root)
            print(name, rows[name].get("family", "clip"), file=sys.stderr)
    OUT.write_text(json.dumps(rows, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    print(f"wrote {OUT.relative_to(ROOT)} ({len(rows)} architectures)")


if __name__ == "__main__":
    main()
