"""Building the ImageNet zero-shot classifier (1,000 classes x 80 templates = 80,000 prompts) on
CPU: clipforge's ``ZeroShotClassifier.build`` against OpenCLIP's ``build_zero_shot_classifier``.

Both run in one process on the same random ViT-B-32 weights, in float32, with torch's default
thread count.  The peer is OpenCLIP's own function (``open_clip/zero_shot_classifier.py`` from the
open_clip_torch wheel, loaded by file: the package's ``__init__`` needs torchvision, which does
not load beside the CPU build of torch) driving Hugging Face ``transformers.CLIPModel``'s text
tower through a small adapter, on prompts padded to 77 tokens as OpenCLIP's tokenizer pads them
(the end-of-text token repeated, as ``CLIPTokenizer`` pads).  The peer is too slow to run on all
1,000 classes in a benchmark (about an hour here), so it runs on the first ``--peer-classes``
classes; its full time is extrapolated linearly (every class costs the same there: 80 prompts
of 77 tokens).  The class embeddings of those classes are compared (maximum absolute difference).

    python benchmarks/bench_zeroshot.py [--classes 1000] [--peer-classes 20] [--json PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

import clipforge
from bench_embed import environment, hf_inputs
from clipforge.evaluation import ZeroShotClassifier
from clipforge.prompts import IMAGENET_CLASSNAMES, IMAGENET_TEMPLATES
from machine import machine_busy_s
from report import write_json


def openclip_builder():
    """``build_zero_shot_classifier`` from the installed open_clip_torch, loaded by file."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip_torch is not installed: make setup installs it (--no-deps)")
    path = Path(spec.submodule_search_locations[0]) / "zero_shot_classifier.py"
    module_spec = importlib.util.spec_from_file_location("_openclip_zero_shot", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.build_zero_shot_classifier


class TransformersTextTower:
    """What OpenCLIP's builder calls, ``encode_text(ids, normalize=True)``, on transformers."""

    def __init__(self, hf_model, eot_id: int):
        self.hf, self.eot_id = hf_model, eot_id

    def encode_text(self, ids: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        hf_ids, _ = hf_inputs(ids, self.eot_id, pad_to_longest=False)  # all 77 positions
        out = self.hf.get_text_features(input_ids=hf_ids)
        out = out if torch.is_tensor(out) else out.pooler_output
        return torch.nn.functional.normalize(out, dim=-1) if normalize else out


def timed(fn):
    """``(fn(), wall seconds, CPU cores other processes used meanwhile)``."""
    busy0, own0, wall0 = machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    result = fn()
    busy1, own1, wall1 = machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
    others = None
    if busy0 is not None and busy1 is not None:
        others = max(busy1 - busy0 - (own1 - own0), 0.0) / (wall1 - wall0)
    return result, wall1 - wall0, others


def fmt_others(cores: float | None) -> str:
    return "n/a" if cores is None else f"{cores:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--classes", type=int, default=1000, help="ImageNet classes to build")
    parser.add_argument("--peer-classes", type=int, default=20,
                        help="classes for OpenCLIP's builder (extrapolated to --classes)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    env = environment()
    print(f"zero-shot classifier build, {args.model}, float32, CPU: {env['cpu']} "
          f"({env['cpu_count']} cores, {env['torch_threads']} torch threads), torch "
          f"{env['torch']}, transformers {env['transformers']}")
    classnames = list(IMAGENET_CLASSNAMES[: args.classes])
    templates = list(IMAGENET_TEMPLATES)
    prompts = len(classnames) * len(templates)

    torch.manual_seed(0)
    model = clipforge.create_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        clipforge.save_model(model, Path(tmp) / "hf", format="hf")
        hf = transformers.CLIPModel.from_pretrained(Path(tmp) / "hf").eval()
    tower = TransformersTextTower(hf, clipforge.get_tokenizer().eot_token_id)
    build_openclip = openclip_builder()

    with torch.inference_mode():
        ours, ours_s, ours_others = timed(
            lambda: ZeroShotClassifier.build(model, classnames, templates))
        peer_names = classnames[: args.peer_classes]
        peer, peer_s, peer_others = timed(lambda: build_openclip(
            tower, clipforge.tokenize, peer_names, templates, num_classes_per_batch=10,
            use_tqdm=False).T)
    diff = (ours.class_embeddings[: len(peer_names)] - peer).abs().max().item()
    peer_rate = len(peer_names) * len(templates) / peer_s
    peer_full = prompts / peer_rate
    print(f"\n{'':<44} {'prompts':>8} {'seconds':>9} {'prompts/s':>10} {'others':>7}")
    print(f"{'clipforge ZeroShotClassifier.build':<44} {prompts:>8} {ours_s:>9.1f} "
          f"{prompts / ours_s:>10.1f} {fmt_others(ours_others):>7}")
    print(f"{'OpenCLIP build_zero_shot_classifier (HF)':<44} "
          f"{len(peer_names) * len(templates):>8} {peer_s:>9.1f} {peer_rate:>10.1f} "
          f"{fmt_others(peer_others):>7}")
    print(f"\nclipforge: {len(classnames)} classes in {ours_s / 60:.1f} min; OpenCLIP's builder "
          f"extrapolated to the same: {peer_full / 60:.1f} min ({peer_full / ours_s:.1f}x)")
    print(f"class embeddings of the {len(peer_names)} shared classes: max |difference| "
          f"{diff:.2e} (unit vectors)")
    print("others = average CPU cores used by other processes during the measurement")
    if args.json is not None:
        write_json(args.json, {
            "environment": env, "model": args.model, "classes": len(classnames),
            "templates": len(templates), "clipforge_s": ours_s, "clipforge_others": ours_others,
            "peer_classes": len(peer_names), "peer_s": peer_s, "peer_others": peer_others,
            "peer_extrapolated_s": peer_full, "max_abs_diff": diff})
    return 0


if __name__ == "__main__":
    sys.exit(main())
