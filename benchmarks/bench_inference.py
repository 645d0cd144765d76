"""Inference throughput on CPU for every precision and backend, next to the peers, in one run.

For each model (ViT-B-32 and RN50 by default, random weights from seed 0, the same weights for
every contender) and each contender below, a fresh process loads the model, checks its
embeddings against clipforge float32, and times:

* images/s for the image tower at batch 1 and 32 (random normalised pixels);
* captions/s for the text tower at batch 1 and 32 (zero-shot prompts "a photo of a {label}.");
* the process's peak resident memory (VmHWM, so each contender's figure is its own);
* the float32 matrix-product rate of the moment, measured around the timings ("GEMM now"):
  on a shared host a run's speed drifts, and this says how fast the machine was.

Contenders:

* clipforge torch: ``create_model(name, precision="fp32" | "bf16" | "int8")``;
* clipforge onnx: the encoders exported by ``clipforge export onnx``, run by onnxruntime
  (``load_onnx``), float32 and int8 where the export offers it;
* transformers ``CLIPModel`` (ViT only: it has no ResNet tower), float32 and bfloat16, text
  padded to 77 tokens as ``CLIPTokenizer(padding="max_length")`` gives it;
* openai/CLIP's own ``model.py`` (from the clip-anytorch wheel), float32, text at 77 tokens.

OpenCLIP cannot be installed beside this CPU torch (it needs torchvision); its towers are
openai/CLIP's, so ``model.py`` stands in for it.  ``% ceil`` divides the FLOPs each figure
implies (counted by ``torch.utils.flop_counter`` on the float32 model) by the machine's ceiling
for that number format: 208 GFLOP/s in float32, twice that in bf16, four times in int8.
Captions count the tokens each contender actually runs (clipforge stops at the batch's last
end-of-text token; the peers run all 77).

    python benchmarks/bench_inference.py [--models ViT-B-32,RN50] [--repeats 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from bench_embed import LABELS, BackgroundLoad, fmt_load  # noqa: E402
from machine import cpu_name, status_bytes  # noqa: E402
from report import write_json  # noqa: E402

CEILING = {"fp32": 208.0, "bf16": 416.0, "int8": 832.0}  # GFLOP/s on 2 Zen 4 cores
CONTENDERS = [("clipforge", "fp32"), ("clipforge", "bf16"), ("clipforge", "int8"),
              ("onnx", "fp32"), ("onnx", "int8"), ("transformers", "fp32"),
              ("transformers", "bf16"), ("openai", "fp32")]


# --------------------------------------------------------------------------- child process
def _weights(name: str) -> dict[str, torch.Tensor]:
    import clipforge

    torch.manual_seed(0)
    return clipforge.create_model(name).state_dict()


def _inputs(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    import clipforge

    config = clipforge.configs.get_config(name)
    gen = torch.Generator().manual_seed(batch)
    pixels = torch.randn(batch, 3, config.image_size, config.image_size, generator=gen)
    prompts = [f"a photo of a {label}." for label in LABELS[:batch]]
    return pixels, clipforge.tokenize(prompts)


def _encoders(kind: str, mode: str, name: str, export_dir: str):
    """(encode_image, encode_text, text length run) for one contender; inputs are clipforge's
    pixels and zero-padded ids."""
    import clipforge

    if kind == "clipforge":
        model = clipforge.create_model(name, precision=mode)  # seed 0: the shared weights
        return model.encode_image, model.encode_text, None
    if kind == "onnx":
        from clipforge.onnx import load_onnx

        model = load_onnx(Path(export_dir) / "onnx", variant=mode)
        return model.encode_image, model.encode_text, None
    if kind == "transformers":
        from transformers import CLIPModel

        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        hf = CLIPModel.from_pretrained(Path(export_dir) / "hf", dtype=dtype).eval()

        def features(out):
            return out if torch.is_tensor(out) else out.pooler_output

        def image(pixels):
            return features(hf.get_image_features(pixel_values=pixels.to(dtype)))

        def text(ids):  # CLIPTokenizer pads with the end token to 77
            eot = ids.argmax(-1)
            pad = torch.arange(ids.shape[1])[None] > eot[:, None]
            return features(hf.get_text_features(input_ids=ids.masked_fill(pad, 49407)))
        return image, text, 77
    if kind == "openai":
        from conftest import _load_by_path  # type: ignore[import-not-found]

        model_py = _load_by_path("clip", "model")
        reference = model_py.build_model(_weights(name)).float().eval()
        return reference.encode_image, reference.encode_text, 77
    raise ValueError(kind)


def gemm_gflops() -> float:
    """The float32 matrix-product rate this machine gives right now (oneDNN, a packed
    ViT-B-32 MLP weight, 1600 rows): a shared host's speed drifts by 10-30 % from minute to
    minute, so each contender's figures come with the rate measured beside them."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1600, 768, generator=gen)
    weight = torch.ops.mkldnn._reorder_linear_weight(torch.randn(3072, 768, generator=gen))
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(4):
            torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
        best = max(best, 4 * 2 * 1600 * 768 * 3072 / (time.perf_counter() - start) / 1e9)
    return best


def child(spec: dict) -> dict:
    """Time one contender on one model; returns figures and the peak RSS of this process."""
    torch.manual_seed(0)
    encode_image, encode_text, text_len = _encoders(spec["kind"], spec["mode"], spec["model"],
                                                    spec["export_dir"])
    out: dict = {"load_peak_mib": status_bytes("VmHWM") / 2**20}
    with torch.inference_mode():
        pixels, ids = _inputs(spec["model"], 4)
        reference = torch.load(Path(spec["export_dir"]) / "reference.pt", weights_only=True)
        got = torch.nn.functional.normalize(encode_image(pixels).float(), dim=-1)
        want = torch.nn.functional.normalize(reference["image"], dim=-1)
        out["image_cos_min"] = (got * want).sum(-1).min().item()
        got = torch.nn.functional.normalize(encode_text(ids).float(), dim=-1)
        want = torch.nn.functional.normalize(reference["text"], dim=-1)
        out["text_cos_min"] = (got * want).sum(-1).min().item()
        gemm: list[float] = []
        for batch in (1, 32):
            pixels, ids = _inputs(spec["model"], batch)
            for what, fn, arg in (("image", encode_image, pixels), ("text", encode_text, ids)):
                for _ in range(spec["warmup"]):
                    fn(arg)
                times = []
                gemm.append(gemm_gflops())
                with BackgroundLoad() as load:
                    for _ in range(spec["repeats"]):
                        start = time.perf_counter()
                        fn(arg)
                        times.append(time.perf_counter() - start)
                gemm.append(gemm_gflops())
                out[f"{what}_{batch}"] = batch / statistics.median(times)
                out[f"{what}_{batch}_others"] = load.cores
            out[f"text_{batch}_tokens"] = text_len or int(ids.argmax(-1).max()) + 1
    out["peak_mib"] = status_bytes("VmHWM") / 2**20
    out["gemm_gflops"] = statistics.median(gemm)
    return out


# --------------------------------------------------------------------------- parent process
def flops(name: str) -> tuple[float, dict[int, float]]:
    """FLOPs per image, and per caption at each text length, of the float32 model."""
    from torch.utils.flop_counter import FlopCounterMode

    import clipforge

    torch.manual_seed(0)
    model = clipforge.create_model(name)
    pixels, _ = _inputs(name, 1)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            model.encode_image(pixels)
        image = counter.get_total_flops()
        per_text = {}
        for length in range(2, 78):
            ids = torch.zeros(1, length, dtype=torch.long)
            ids[0, -1] = 49407
            with FlopCounterMode(display=False) as counter:
                model.encode_text(ids)
            per_text[length] = counter.get_total_flops()
    return image, per_text


def prepare(name: str, directory: Path) -> None:
    """Reference embeddings, a Hugging Face copy (ViT) and ONNX exports of the same weights."""
    import clipforge

    torch.manual_seed(0)
    model = clipforge.create_model(name)
    pixels, ids = _inputs(name, 4)
    with torch.inference_mode():
        torch.save({"image": model.encode_image(pixels), "text": model.encode_text(ids)},
                   directory / "reference.pt")
    if model.config.vision.is_vit:
        clipforge.save_model(model, directory / "hf", format="hf")
    try:
        from clipforge.onnx import export_onnx

        export_onnx(model, directory / "onnx", quantize="int8")  # fp32 and int8 graphs
    except Exception as exc:  # reported in the table as missing
        print(f"onnx export of {name} failed: {exc}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="ViT-B-32,RN50")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", help="comma-separated contenders, e.g. clipforge:bf16,onnx:fp32")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    contenders = CONTENDERS
    if args.only:
        contenders = [tuple(c.split(":")) for c in args.only.split(",")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            directory = Path(tmp) / name
            directory.mkdir()
            print(f"{name}: preparing weights, exports and FLOP counts...", flush=True)
            prepare(name, directory)
            image_flops, text_flops = flops(name)
            for kind, mode in contenders:
                if kind == "transformers" and not (directory / "hf").exists():
                    continue
                if kind == "onnx" and not (directory / "onnx").exists():
                    continue
                spec = {"kind": kind, "mode": mode, "model": name, "export_dir": str(directory),
                        "repeats": args.repeats, "warmup": args.warmup}
                env = {**os.environ, "PYTHONPATH": os.pathsep.join(
                    [str(BENCH.parent / "tests"), str(BENCH), os.environ.get("PYTHONPATH", "")])}
                run = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)],
                                     capture_output=True, text=True, env=env)
                if run.returncode != 0:
                    print(f"  {kind} {mode}: failed: {run.stderr.strip().splitlines()[-1:]}",
                          flush=True)
                    continue
                row = {**spec, **json.loads(run.stdout.strip().splitlines()[-1])}
                for batch in (1, 32):
                    tokens = row[f"text_{batch}_tokens"]
                    row[f"image_{batch}_ceil"] = (100 * row[f"image_{batch}"] * image_flops
                                                  / 1e9 / CEILING[mode])
                    row[f"text_{batch}_ceil"] = (100 * row[f"text_{batch}"] * text_flops[tokens]
                                                 / 1e9 / CEILING[mode])
                results.append(row)
                print(f"  {kind} {mode}: images/s {row['image_1']:.1f} / {row['image_32']:.1f}, "
                      f"captions/s {row['text_1']:.1f} / {row['text_32']:.1f}", flush=True)
            print(f"{name}: {image_flops / 1e9:.2f} GFLOP per image", flush=True)

    print(f"\nCPU: {cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch "
          f"threads), torch {torch.__version__}; ceilings fp32 {CEILING['fp32']:.0f}, bf16 "
          f"{CEILING['bf16']:.0f}, int8 {CEILING['int8']:.0f} GFLOP/s")
    header = ("model", "contender", "img/s b1", "%ceil", "img/s b32", "%ceil", "cap/s b1",
              "cap/s b32", "%ceil", "peak MiB", "cos min", "GEMM now", "others")
    rows = [header]
    for r in results:
        others = max(v or 0.0 for k, v in r.items() if k.endswith("_others"))
        rows.append((r["model"], f"{r['kind']} {r['mode']}", f"{r['image_1']:.1f}",
                     f"{r['image_1_ceil']:.0f}", f"{r['image_32']:.1f}",
                     f"{r['image_32_ceil']:.0f}", f"{r['text_1']:.1f}", f"{r['text_32']:.1f}",
                     f"{r['text_32_ceil']:.0f}", f"{r['peak_mib']:.0f}",
                     f"{min(r['image_cos_min'], r['text_cos_min']):.5f}",
                     f"{r['gemm_gflops']:.0f}", fmt_load(others)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.rjust(w) if i > 1 else cell.ljust(w)
                        for i, (cell, w) in enumerate(zip(row, widths))))
    print("cos min: embeddings against clipforge float32 on the same inputs; GEMM now: float32 "
          "GFLOP/s of a oneDNN matrix product measured around that contender's timings (the "
          "host's speed of the moment); others: cores used by other processes while timing "
          "(above ~0.1 the figures are disturbed)")
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
