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

    python benchmarks/bench_attention.py [--repeats 10] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from machine import cpu_name
from torch.nn.attention import SDPBackend, sdpa_kernel

from clipforge.model.transformer import attention

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpu": cpu_name(), "torch": torch.__version__, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
