"""Embedding throughput on CPU: clipforge against Hugging Face ``transformers.CLIPModel``.

Both implementations run in the same process on the same random weights (clipforge builds the
model, saves it in Hugging Face's layout, ``transformers`` loads that directory), in float32,
under ``torch.inference_mode()`` with torch's default thread count.  Before timing, the script
checks that both produce the same image and text features, so the figures compare the same
computation.  No network access is needed.

Measured (median of ``--repeats`` timed calls after ``--warmup`` untimed ones; clipforge and
transformers calls are interleaved, alternating which goes first, so drift affects both alike):

* images/s for ``CLIP.encode_image`` and ``CLIPModel.get_image_features`` at batch 1 and 32;
* captions/s for zero-shot prompts ("a photo of a {label}." over 100 class names, one batch):
  clipforge ``encode_text`` on zero-padded ids (it runs only up to the last end-of-text token),
  transformers ``get_text_features`` on ids padded to 77 with the end token (openai/CLIP's and
  OpenCLIP's input length) and on ids padded to the longest prompt with an attention mask;
* tokenizer throughput (texts/s): a fresh clipforge ``Tokenizer`` on its first call (cold BPE
  cache) and cached, next to transformers' ``CLIPTokenizer`` on the same prompts.

Tokenization is excluded from the embedding timings (inputs are prepared beforehand).

    python benchmarks/bench_embed.py [--model ViT-B-32] [--repeats N] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

import clipforge
from machine import cpu_name, machine_busy_s
from report import write_json

CEILING_GFLOPS = 208.0  # measured float32 matmul ceiling of the reference machine (2 Zen 4 cores)
TOKENIZER_LOOPS = 20  # calls per timed tokenizer repetition (one call takes only milliseconds)
TEMPLATE = "a photo of a {label}."
# 100 varied class names (animals, objects, vehicles, food, places, multi-word names, a few rare
# words that split into several BPE pieces), fixed so that every run tokenizes the same prompts.
LABELS = [
    "dog", "cat", "golden retriever", "tabby cat", "goldfish", "great white shark",
    "bald eagle", "tree frog", "loggerhead sea turtle", "komodo dragon", "king penguin",
    "african elephant", "red panda", "giant panda", "koala", "hummingbird", "peacock",
    "flamingo", "monarch butterfly", "ladybug", "tarantula", "scorpion", "jellyfish",
    "sea anemone", "hermit crab", "horse", "zebra", "hippopotamus", "ox", "bighorn sheep",
    "chimpanzee", "orangutan", "sloth bear", "hedgehog", "porcupine", "axolotl", "platypus",
    "aircraft carrier", "airliner", "ambulance", "fire truck", "school bus", "tractor",
    "mountain bike", "motor scooter", "steam locomotive", "canoe", "container ship", "submarine",
    "hot air balloon", "espresso machine", "toaster", "microwave oven", "refrigerator",
    "vacuum cleaner", "laptop", "computer keyboard", "mobile phone", "analog clock",
    "acoustic guitar", "grand piano", "violin", "saxophone", "drumstick", "umbrella",
    "backpack", "sunglasses", "wool sweater", "cowboy hat", "running shoe", "wristwatch",
    "teddy bear", "soccer ball", "tennis racket", "skateboard", "pizza", "cheeseburger",
    "hot dog", "ice cream", "bagel", "pretzel", "guacamole", "strawberry", "pineapple",
    "pomegranate", "broccoli", "cauliflower", "mushroom", "espresso", "red wine",
    "lighthouse", "castle", "suspension bridge", "volcano", "coral reef", "alpine lake",
    "sandy beach", "rainforest", "desert", "skyscraper",
]


# --------------------------------------------------------------------------------------- flops
def transformer_flops(tokens: int, width: int, mlp_width: int, layers: int) -> float:
    """Multiply-adds x 2 of a pre-norm transformer on one sequence: q/k/v/out projections
    (8 w^2 per token), the MLP (4 w mlp per token) and attention scores + weighted sum
    (4 n^2 w, counted in full even when causal)."""
    per_layer = tokens * (8 * width * width + 4 * width * mlp_width) + 4 * tokens * tokens * width
    return float(layers * per_layer)


def image_gflops(config: clipforge.CLIPConfig) -> float:
    v = config.vision
    grid = v.image_size // v.patch_size
    patch_embed = 2 * 3 * v.patch_size**2 * v.width * grid * grid
    body = transformer_flops(grid * grid + 1, v.width, v.mlp_width, v.layers)
    return (patch_embed + body + 2 * v.width * config.embed_dim) / 1e9


def text_gflops(config: clipforge.CLIPConfig, tokens: int) -> float:
    t = config.text
    body = transformer_flops(tokens, t.width, t.mlp_width, t.layers)
    return (body + 2 * t.width * config.embed_dim) / 1e9


# -------------------------------------------------------------------------------------- timing
def measure(fns: dict[str, Callable[[], object]], warmup: int, repeats: int
            ) -> tuple[dict[str, list[float]], float | None]:
    """Seconds per call of each function: ``warmup`` untimed calls each, then ``repeats`` timed
    rounds in which every function runs once, the order alternating between rounds.  Also the
    average load of other processes (cores) during the timed rounds."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    with BackgroundLoad() as load:
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                start = time.perf_counter()
                fns[name]()
                times[name].append(time.perf_counter() - start)
    return times, load.cores


class BackgroundLoad:
    """CPU used by *other* processes while a block runs, in cores on average: busy time of the
    whole machine (``/proc/stat``) minus this process's own (``os.times``), over wall time.
    On a 2-core machine anything above ~0.1 means the timings were disturbed.  None where
    ``/proc/stat`` is unavailable (not Linux)."""

    def __init__(self) -> None:
        self.cores: float | None = None

    def __enter__(self) -> BackgroundLoad:
        times = os.times()
        self._start = (machine_busy_s(), times.user + times.system, time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        busy, times, wall = machine_busy_s(), os.times(), time.perf_counter()
        busy0, own0, wall0 = self._start
        if busy is None or busy0 is None:
            return
        others = (busy - busy0) - (times.user + times.system - own0)
        self.cores = max(others, 0.0) / (wall - wall0)


def fmt_load(cores: float | None) -> str:
    return "n/a" if cores is None else f"{cores:.2f}"


def summary(seconds: list[float], items: int) -> dict[str, float]:
    median = statistics.median(seconds)
    return {"items": items, "median_s": median, "min_s": min(seconds), "max_s": max(seconds),
            "per_s": items / median, "spread_pct": 100 * (max(seconds) - min(seconds)) / median}


# ------------------------------------------------------------------------------------- helpers
def features(output: object) -> torch.Tensor:
    """transformers 5 returns a ModelOutput whose pooler_output is the projected embedding;
    transformers 4 returned the tensor itself."""
    return output if torch.is_tensor(output) else output.pooler_output  # type: ignore[union-attr]


def hf_inputs(ids: torch.Tensor, eot_id: int, pad_to_longest: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """clipforge ids (zero-padded) as transformers gets them from CLIPTokenizer: padding is the
    end-of-text token; padded to the longest prompt with an attention mask, or to 77 without."""
    eot = ids.argmax(dim=-1)
    positions = torch.arange(ids.shape[1])
    valid = positions[None, :] <= eot[:, None]
    hf_ids = torch.where(valid, ids, torch.full_like(ids, eot_id))
    if not pad_to_longest:
        return hf_ids, None
    length = int(eot.max()) + 1
    return hf_ids[:, :length].contiguous(), valid[:, :length].long().contiguous()


def environment() -> dict[str, object]:
    import transformers

    blas = next((part.split("=", 1)[1] for part in torch.__config__.show().replace(",", " ").split()
                 if part.startswith("BLAS_INFO=")), "unknown")
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "clipforge": clipforge.__version__,
            "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "blas": blas, "platform": platform.platform()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None,
                        help="ViT architecture (default ViT-B-32; tiny-vit with --quick)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed repetitions per measurement (default 7; 3 with --quick)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls before timing (default 2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: tiny-vit and few repeats, in seconds")
    parser.add_argument("--ceiling-gflops", type=float, default=CEILING_GFLOPS,
                        help=f"float32 ceiling of the machine, GFLOP/s (default {CEILING_GFLOPS})")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    args.model = args.model or ("tiny-vit" if args.quick else "ViT-B-32")
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")

    env = environment()
    print("clipforge vs transformers.CLIPModel: embedding throughput, float32, CPU")
    print(f"  cpu: {env['cpu']} ({env['cpu_count']} logical cores), torch {env['torch']} "
          f"(BLAS {env['blas']}), transformers {env['transformers']}, "
          f"clipforge {env['clipforge']}, python {env['python']}")
    print(f"  torch.get_num_threads() = {env['torch_threads']} (default, not changed)")
    print(f"  model {args.model}, random weights (seed 0), identical in both; "
          f"{args.warmup} warm-up call(s), median of {args.repeats} timed repetitions")

    torch.manual_seed(0)
    model = clipforge.create_model(args.model)
    config = model.config
    if not config.vision.is_vit:
        raise SystemExit(f"{args.model}: transformers.CLIPModel has no ResNet image tower; "
                         "pick a ViT architecture")
    tmp = tempfile.TemporaryDirectory(prefix="bench_embed_")
    hf_dir = Path(tmp.name) / "hf"
    clipforge.save_model(model, hf_dir, format="hf")
    hf_model = transformers.CLIPModel.from_pretrained(hf_dir).eval()
    attn_impl = getattr(hf_model.config, "_attn_implementation", "?")

    size = config.vision.image_size
    prompts = [TEMPLATE.format(label=label) for label in LABELS]
    eot_id = clipforge.get_tokenizer().eot_token_id

    # Tokenizers first: a fresh clipforge Tokenizer so that its first call meets a cold cache.
    start = time.perf_counter()
    cold_tokenizer = clipforge.Tokenizer()
    vocab_load_s = time.perf_counter() - start
    start = time.perf_counter()
    ids = cold_tokenizer(prompts, context_length=config.text.context_length)
    first_call_s = time.perf_counter() - start
    hf_tokenizer = transformers.CLIPTokenizer.from_pretrained(hf_dir)

    def hf_tokenize() -> dict:
        return hf_tokenizer(prompts, padding="max_length", max_length=config.text.context_length,
                            return_tensors="pt")

    def loop(fn: Callable[[], object]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(TOKENIZER_LOOPS):
                fn()
        return run

    tok_times, tok_load = measure({"clipforge": loop(lambda: cold_tokenizer(prompts)),
                                   "transformers": loop(hf_tokenize)}, args.warmup, args.repeats)

    ids77, _ = hf_inputs(ids, eot_id, pad_to_longest=False)
    ids_longest, mask_longest = hf_inputs(ids, eot_id, pad_to_longest=True)
    longest = ids_longest.shape[1]
    hf_encoded = hf_tokenize()
    hf_ids_same = torch.equal(hf_encoded["input_ids"], ids77)

    torch.manual_seed(1)
    pixels = {batch: torch.randn(batch, 3, size, size) for batch in (1, 32)}

    with torch.inference_mode():
        # Same computation?  Features of both implementations on the benchmark inputs.
        cf_img = model.encode_image(pixels[32][:4])
        hf_img = features(hf_model.get_image_features(pixel_values=pixels[32][:4]))
        cf_txt = model.encode_text(ids)
        hf_txt77 = features(hf_model.get_text_features(input_ids=ids77))
        hf_txt_l = features(hf_model.get_text_features(input_ids=ids_longest,
                                                       attention_mask=mask_longest))
        checks = {
            "image": (cf_img - hf_img).abs().max().item(),
            "text_pad77": (cf_txt - hf_txt77).abs().max().item(),
            "text_longest": (cf_txt - hf_txt_l).abs().max().item(),
        }
        scale = {"image": cf_img.abs().max().item(), "text": cf_txt.abs().max().item()}
        print("\nSame computation check (max |clipforge - transformers| over the features):")
        print(f"  image features (4 images):           {checks['image']:.2e}  "
              f"(largest |feature| {scale['image']:.3g})")
        print(f"  text features, HF ids padded to 77:   {checks['text_pad77']:.2e}  "
              f"(largest |feature| {scale['text']:.3g})")
        print(f"  text features, HF padded to longest:  {checks['text_longest']:.2e}")
        print(f"  HF CLIPTokenizer ids == clipforge ids with end-token padding: {hf_ids_same}")
        worst = max(checks["image"] / max(scale["image"], 1.0),
                    checks["text_pad77"] / max(scale["text"], 1.0),
                    checks["text_longest"] / max(scale["text"], 1.0))
        if worst > 1e-3:
            print("  MISMATCH: the implementations disagree; timings would not be comparable",
                  file=sys.stderr)
            return 1

        image_results, loads = {}, {}
        for batch, x in pixels.items():
            times, loads[f"image_b{batch}"] = measure({
                "clipforge": lambda x=x: model.encode_image(x),
                "transformers": lambda x=x: hf_model.get_image_features(pixel_values=x),
            }, args.warmup, args.repeats)
            image_results[batch] = {name: summary(t, batch) for name, t in times.items()}

        text_times, loads["text"] = measure({
            "clipforge": lambda: model.encode_text(ids),
            "transformers_pad77": lambda: hf_model.get_text_features(input_ids=ids77),
            "transformers_longest": lambda: hf_model.get_text_features(
                input_ids=ids_longest, attention_mask=mask_longest),
        }, args.warmup, args.repeats)
    text_results = {name: summary(t, len(prompts)) for name, t in text_times.items()}
    tok_results = {name: summary(t, TOKENIZER_LOOPS * len(prompts))
                   for name, t in tok_times.items()}
    tmp.cleanup()

    ceiling = args.ceiling_gflops
    img_gf = image_gflops(config)
    tokens_run = {"clipforge": longest, "transformers_pad77": config.text.context_length,
                  "transformers_longest": longest}
    txt_gf = {name: text_gflops(config, n) for name, n in tokens_run.items()}

    print(f"\nImage embeddings: {size}x{size} random normalised pixels; "
          f"{img_gf:.3g} GFLOP/image; ceiling {ceiling:g} GFLOP/s")
    print(f"  clipforge = CLIP.encode_image; transformers = CLIPModel.get_image_features "
          f"(attention: {attn_impl})")
    header = (f"  {'batch':>5} | {'clipforge img/s':>15} | {'transformers img/s':>18} | "
              f"{'cf/hf':>6} | {'cf % ceil':>9} | {'hf % ceil':>9} | {'spread cf/hf':>13} | "
              f"{'others':>6}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    for batch, res in image_results.items():
        cf, hf = res["clipforge"], res["transformers"]
        print(f"  {batch:>5} | {cf['per_s']:>15.2f} | {hf['per_s']:>18.2f} | "
              f"{cf['per_s'] / hf['per_s']:>5.2f}x | "
              f"{100 * cf['per_s'] * img_gf / ceiling:>8.1f}% | "
              f"{100 * hf['per_s'] * img_gf / ceiling:>8.1f}% | "
              f"{cf['spread_pct']:>5.1f}%/{hf['spread_pct']:>5.1f}% | "
              f"{fmt_load(loads[f'image_b{batch}']):>6}")

    print(f"\nText embeddings: {len(prompts)} prompts \"{TEMPLATE}\" in one batch, pre-tokenized; "
          f"longest prompt {longest} tokens; "
          f"{text_gflops(config, config.text.context_length):.3g} GFLOP per "
          f"{config.text.context_length}-token caption")
    labels = {
        "clipforge": "clipforge encode_text (0-padded 77, runs to last EOT)",
        "transformers_pad77": "transformers get_text_features, padded to 77",
        "transformers_longest": "transformers get_text_features, padded to longest+mask",
    }
    header = (f"  {'implementation':<55} | {'tokens':>6} | {'captions/s':>10} | "
              f"{'vs cf':>6} | {'% ceil':>6} | {'spread':>6}")
    print(header)
    print("  " + "-" * (len(header) - 2))
    cf_rate = text_results["clipforge"]["per_s"]
    for name, res in text_results.items():
        print(f"  {labels[name]:<55} | {tokens_run[name]:>6} | {res['per_s']:>10.1f} | "
              f"{res['per_s'] / cf_rate:>5.2f}x | "
              f"{100 * res['per_s'] * txt_gf[name] / ceiling:>5.1f}% | "
              f"{res['spread_pct']:>5.1f}%")
    print("  (% ceil counts the FLOPs of the tokens each implementation actually runs; "
          f"others during these timings: {fmt_load(loads['text'])})")

    print(f"\nTokenizer: same {len(prompts)} prompts, to [N, {config.text.context_length}] "
          f"int64 tensors")
    print(f"  clipforge Tokenizer() construction (vocabulary load): {vocab_load_s * 1e3:.0f} ms")
    print(f"  clipforge first call (fresh Tokenizer, cold BPE cache, one call): "
          f"{len(prompts) / first_call_s:,.0f} texts/s")
    print(f"  clipforge cached (median of {args.repeats} x {TOKENIZER_LOOPS} calls): "
          f"{tok_results['clipforge']['per_s']:,.0f} texts/s")
    kind = "Rust tokenizers backend" if getattr(hf_tokenizer, "is_fast", False) else "Python"
    print(f"  transformers CLIPTokenizer ({kind}, padding=max_length, median of "
          f"{args.repeats} x {TOKENIZER_LOOPS} calls): "
          f"{tok_results['transformers']['per_s']:,.0f} texts/s")
    loads["tokenizer"] = tok_load

    print("\nspread = (slowest - fastest) / median of the timed repetitions;\n"
          "others = average CPU cores used by other processes during the timed repetitions")
    busy = {name: load for name, load in loads.items() if load is not None and load > 0.1}
    if busy:
        print("WARNING: other processes used CPU during "
              + ", ".join(f"{name} ({load:.2f} cores)" for name, load in busy.items())
              + "; those figures are disturbed: re-run on a quiet machine")

    if args.json:
        report = {
            "environment": env, "model": args.model, "repeats": args.repeats,
            "warmup": args.warmup, "ceiling_gflops": ceiling, "hf_attention": attn_impl,
            "checks_max_abs_diff": checks, "hf_tokenizer_ids_identical": hf_ids_same,
            "other_processes_cores": loads,
            "image": {"gflops_per_image": img_gf, "image_size": size,
                      "batches": {str(b): r for b, r in image_results.items()}},
            "text": {"prompts": len(prompts), "template": TEMPLATE, "longest_tokens": longest,
                     "tokens_run": tokens_run, "gflops_per_caption": txt_gf,
                     "results": text_results},
            "tokenizer": {"vocab_load_s": vocab_load_s, "first_call_s": first_call_s,
                          "first_call_per_s": len(prompts) / first_call_s,
                          "cached": tok_results},
        }
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
