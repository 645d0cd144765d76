"""Linear layers whose weights oneDNN packs once for CPU inference.

Why: ``F.linear`` on the CPU hands the weight to a GEMM that re-reads it in its plain layout on
every call.  oneDNN can reorder a weight once into the blocked layout its AVX-512 kernels read
(what ``torch.compile``'s freezing and IPEX do); the products then run at the machine's peak.
Measured here (2 Zen 4 cores, float32): 205-214 GFLOP/s packed against 117-170 for
``F.linear`` on ViT-B-32's layer shapes, twice as fast at batch-1 text shapes, the same in
bf16 (10-13 %).  The results differ from ``F.linear`` by float32 round-off only (another
summation order).

The packed weight is a cache, not a parameter: it is made at the first call that may use it
and only then, so training never pays for it.  A call may use it when it is on the CPU, in
float32 or bfloat16, and no gradient is wanted (``torch.no_grad()``/``inference_mode()``, or
nothing requires grad), and nothing is tracing or watching the model (ONNX export,
``torch.compile``, a ``FlopCounterMode``).
The cache follows the weight: it is dropped by ``train()``, ``to()``/``cuda()`` and in copies
or pickles, and rebuilt when the weight changes in place (an optimiser step).  Weights made
inside ``torch.inference_mode()`` have no version counter to tell such a change, so they are
never packed: load a model outside inference mode, run it inside.  The cost is
memory: a second copy of each packed weight (about 0.5 GB for ViT-B-32 in float32).

int8 weights (:class:`clipforge.precision.Int8Linear`) are packed the same way for oneDNN's
integer matrix products (``onednn::qlinear_pointwise``): AMX tiles on Intel Xeons that have
them, VNNI (AVX-512 or AVX2) elsewhere.  Its activations come unsigned (zero point 128), the
form oneDNN has fast kernels for on every x86 instruction set; signed activations run its
reference kernel on CPUs without AMX (97 s instead of 13 ms for one ViT-B-32 MLP product).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn

try:
    from torch.compiler import is_compiling as _is_compiling
except ImportError:  # torch < 2.3
    from torch._dynamo import is_compiling as _is_compiling

# bf16 packing needs AVX-512 (BW, VL, DQ) or AVX-NE-CONVERT: on an AVX2-only CPU oneDNN
# refuses to reorder bf16 weights, so bf16 products stay F.linear there
_PACKABLE = ((torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported()
             else (torch.float32,))
# the ops packing needs (torch builds without oneDNN, or too old, keep F.linear)
_HAVE_ONEDNN = (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


# oneDNN's int8 products (x86 only: elsewhere its int8 kernels are reference code), on CPUs
# with VNNI: without it (AVX2 only) oneDNN multiplies u8 by s8 in 16-bit sums that saturate, and
# embeddings fell to a cosine of 0.85 against float32 (an AVX2 EPYC, 2026-12-03)
_HAVE_ONEDNN_INT8 = (torch.backends.mkldnn.is_available()
                     and platform.machine().lower() in ("x86_64", "amd64")
                     and bool(getattr(torch.cpu, "_is_vnni_supported", lambda: False)())
                     and hasattr(torch.ops.onednn, "qlinear_prepack")
                     and hasattr(torch.ops.onednn, "qlinear_pointwise"))


def _untraced() -> bool:
    """Nothing is tracing or watching the call (ONNX export, ``torch.compile``, a dispatch mode
    such as ``FlopCounterMode``, which must see plain aten products)."""
    return (not _is_compiling() and not torch.jit.is_tracing()
            and not torch.jit.is_scripting()
            and torch._C._len_torch_dispatch_stack() == 0)


def _may_pack(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and weight.device.type == "cpu"
            and x.dtype == weight.dtype and weight.dtype in _PACKABLE
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and _HAVE_ONEDNN and _untraced())


def may_pack_int8(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :meth:`PacksWeights.packed_int8` applies to a product of ``x`` with the int8
    ``weight``: both on an x86 CPU whose torch has oneDNN's int8 linear ops, untraced."""
    return (x.device.type == "cpu" and weight.device.type == "cpu"
            and weight.dtype == torch.int8 and _HAVE_ONEDNN_INT8 and _untraced())


class PacksWeights(nn.Module):
    """Mixin: ``self.packed_linear(x, weight, bias)`` is ``F.linear(x, weight, bias)``, through a
    oneDNN-packed copy of ``weight`` where that is allowed (see the module docstring)."""

    def packed_linear(self, x: torch.Tensor, weight: torch.Tensor,
                      bias: torch.Tensor | None) -> torch.Tensor:
        if (not _may_pack(x, weight) or (bias is not None and bias.dtype != weight.dtype)
                or weight.is_inference()):  # no version counter: a change could go unseen
            return F.linear(x, weight, bias)
        cache = self.__dict__.setdefault("_packed", {})
        key = (weight.data_ptr(), weight._version, weight.dtype)
        entry = cache.get(id(weight))
        if entry is None or entry[0] != key:
            entry = cache[id(weight)] = (key, torch.ops.mkldnn._reorder_linear_weight(weight))
        # contiguous: a strided input (the ResNet attention pool's query, x[:, :1]) is what
        # oneDNN's reorder would otherwise copy, and F.linear in bf16 turns into a batched
        # product that copies the weight per image
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), entry[1], bias, "none", [], "")

    def packed_int8(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The oneDNN-packed copy of an int8 [out, in] ``weight`` (check
        :func:`may_pack_int8` first) and its zero points (all 0: symmetric), made at the first
        call and kept like the float weights' (rebuilt if the weight changes in place)."""
        cache = self.__dict__.setdefault("_packed", {})
        version = None if weight.is_inference() else weight._version
        key = (weight.data_ptr(), version, weight.dtype)
        entry = cache.get(id(weight))
        if entry is None or entry[0] != key:
            packed = torch.ops.onednn.qlinear_prepack(weight.contiguous(), None)
            zeros = torch.zeros(weight.shape[0], dtype=torch.long)
            entry = cache[id(weight)] = (key, (packed, zeros))
        return entry[1]

    def drop_packed(self) -> None:
        self.__dict__.pop("_packed", None)

    def train(self, mode: bool = True):
        self.drop_packed()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self.drop_packed()
        return super()._apply(fn, recurse)

    def __getstate__(self) -> dict:
        state = super().__getstate__().copy()
        state.pop("_packed", None)  # opaque oneDNN tensors: repacked at first use
        return state


class Linear(PacksWeights, nn.Linear):
    """``nn.Linear`` (same parameters, same state-dict names) with packed CPU inference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.packed_linear(x, self.weight, self.bias)


__all__ = ["Linear", "PacksWeights", "may_pack_int8"]
