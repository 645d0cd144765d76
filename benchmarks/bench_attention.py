"""PyTorch's attention kernels on CPU: flash against math, forward alone and forward+backward.

``clipforge.model.transformer.attention`` takes the math kernel for bfloat16 training on CPU
with up to ``MATH_KERNEL_MAX_TOKENS`` keys, and leaves every other case to PyTorch's own choice
(the flash kernel on CPU).  This script measures the two kernels side by side at the shapes
that decision covers: the first run's text tower (batch 256, 2 heads, 40 tokens at most,
causal), ViT-B-32's image tower (50 tokens), a CLIP text tower (77, causal), ViT-B-16 (197) and
ViT-L-14 at 224 (257), in float32 and bfloat16, forward alone (inference) and forward plus
backward (training).  Each figure is the median of ``--repeats`` calls after a warm-up, in
milliseconds, with torch's default thread count; the last column says which kernel
``attention`` uses there.

Then what the choice is worth to a whole training step of the first run's model: small-rn at
batch 256 in bfloat16 autocast (forward, the CLIP loss, backward, gradient clipping, AdamW),
on built-in scenes and their captions (OpenAI's tokenizer here, so a little longer than the
learnt vocabulary's), once with ``attention``'s choice and once with the flash kernel forced
(``MATH_KERNEL_MAX_TOKENS`` set to 0), the two alternating step by step so that the machine's
drift hits them alike.  The data worker's share of the cores is not in it.  On a CPU without
AVX-512 BF16 or AMX the first run trains in float32 (``--precision auto``), so this part is
skipped there: it would time PyTorch's bfloat16 emulation.

    python benchmarks/bench_attention.py [--repeats 10] [--steps 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import clipforge.model.transformer as transformer
from clipforge.data.synthetic import render_scene
from clipforge.factory import create_model
from clipforge.image.augment import TrainTransform
from clipforge.model.transformer import attention
from clipforge.precision import native_bf16
from clipforge.training.objective import Objective
from clipforge.training.optim import build_optimizer
from machine import cpu_name

# (what, batch, heads, tokens, head width, causal)
SHAPES = (
    ("first-run text tower", 256, 2, 40, 64, True),
    ("ViT-B-32 image tower", 32, 12, 50, 64, False),
    ("CLIP text tower", 32, 8, 77, 64, True),
    ("ViT-B-16 image tower", 32, 12, 197, 64, False),
    ("ViT-L-14 image tower", 8, 16, 257, 64, False),
)
KERNELS = {"flash": SDPBackend.FLASH_ATTENTION, "math": SDPBackend.MATH}


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def measure(shape: tuple, dtype: torch.dtype, backward: bool, repeats: int) -> dict:
    _, n, heads, length, width, causal = shape
    q, k, v = (torch.randn(n, heads, length, width, dtype=dtype, requires_grad=backward)
               for _ in range(3))
    row = {}
    for name, kernel in KERNELS.items():
        def call(kernel=kernel):
            with sdpa_kernel(kernel), torch.set_grad_enabled(backward):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
            if backward:
                out.sum().backward()
        row[name] = _median_ms(call, repeats)
    with torch.no_grad():  # which kernel clipforge's choice takes: does it match the reference?
        chosen = "math" if _takes_math(q, k, v, causal) else "flash"
    row["clipforge"] = chosen
    return row


def _takes_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> bool:
    """Whether ``attention`` runs the math kernel for these inputs: it does when its output
    equals the math kernel's bit for bit and not the flash kernel's."""
    q, k, v = (t.detach().requires_grad_(q.requires_grad) for t in (q, k, v))
    with torch.set_grad_enabled(q.requires_grad):
        ours = attention(q, k, v, causal=causal)
        with sdpa_kernel(SDPBackend.MATH):
            math = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            flash = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return torch.equal(ours, math) and not torch.equal(ours, flash)


def first_run_step(steps: int) -> dict:
    """Median seconds of the first run's training step, with and without the math kernel."""
    torch.manual_seed(0)
    model = create_model("small-rn")
    transform = TrainTransform.from_config(model.config)
    scenes = [render_scene(i, language="en") for i in range(256)]
    rng = np.random.default_rng(0)
    pixels = torch.stack([transform(s.image, rng) for s in scenes])
    tokens = model.tokenizer([s.caption for s in scenes])
    objective = Objective(model, "clip")
    objective.init_temperature()
    optimizer = build_optimizer(objective, 1e-3, 1.0)
    params = [p for p in objective.parameters() if p.requires_grad]

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = objective(pixels, tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    times: dict[str, list[float]] = {"clipforge's choice": [], "flash forced": []}
    limit = transformer.MATH_KERNEL_MAX_TOKENS
    try:
        for i in range(2 * (steps + 1)):
            transformer.MATH_KERNEL_MAX_TOKENS = limit if i % 2 == 0 else 0
            start = time.perf_counter()
            step()
            if i >= 2:  # the first of each is a warm-up
                times[list(times)[i % 2]].append(time.perf_counter() - start)
    finally:
        transformer.MATH_KERNEL_MAX_TOKENS = limit
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=8,
                        help="timed training steps of each kind (0: none)")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'shape':<22} {'dtype':<9} {'pass':<17} {'flash ms':>9} {'math ms':>8}  clipforge")
    rows = []
    for shape in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for backward in (False, True):
                row = measure(shape, dtype, backward, args.repeats)
                what = "forward+backward" if backward else "forward"
                print(f"{shape[0]:<22} {str(dtype)[6:]:<9} {what:<17} {row['flash']:>9.1f} "
                      f"{row['math']:>8.1f}  {row['clipforge']}")
                rows.append({"shape": shape[0], "dtype": str(dtype)[6:], "pass": what, **row})
    step = first_run_step(args.steps) if args.steps and native_bf16("cpu") else {}
    if args.steps and not native_bf16("cpu"):
        print("first-run training step: not timed; this CPU has neither AVX-512 BF16 nor AMX, "
              "so the first run trains in float32 here and its bf16 step would time PyTorch's "
              "emulation")
    for name, seconds in step.items():
        print(f"first-run training step (small-rn, batch 256, bf16), {name}: {seconds:.3f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "torch": torch.__version__, "rows": rows,
                       "first_run_step_s": step}, f, indent=1)


if __name__ == "__main__":
    main()
