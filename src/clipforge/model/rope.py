"""2D rotary position encoding of image patches, as timm computes it for its Eva towers
(``RotaryEmbeddingCat`` with ``in_pixels=False``: PE-Core, EVA02).

Why a module of its own: it is the one operation of those towers that no other family has.  Each
attention head's channels are taken in pairs (0, 1), (2, 3)...; the first half of the pairs is
turned by angles proportional to one coordinate of the patch, the second half by the other.
The angles are ``coordinate * theta ** (-i / bands)`` for band ``i`` of ``bands = head_width / 4``;
the coordinates are the patch's row and column indices plus ``offset``, optionally rescaled to
a reference grid (``ref_grid``: the grid the tower was trained at, so that a fine-tuned
resolution keeps the trained angles), in (row, column) order (``ij``) or (column, row) (``xy``,
PE's).  Only the patch tokens are turned: tokens before them (a class token) keep their query
and key.  The tables are computed in float32 exactly as timm computes them (same operations in
the same order) and are not weights: nothing is stored.
"""

from __future__ import annotations

import torch

# (sin, cos): [patches, head_width / 2] each, float32; with a leading [batch, 1] when each
# image keeps other patches (patch dropout)
Rope = tuple[torch.Tensor, torch.Tensor]


def rope_tables(grid: int, head_width: int, theta: float = 10000.0, ref_grid: int = 0,
                offset: int = 0, indexing: str = "ij",
                device: torch.device | str | None = None) -> Rope:
    """Sine and cosine of every patch's angles, patches in row-major order (the order the
    patch convolution's output is flattened in).  ``ref_grid`` 0: no rescaling."""
    bands = head_width // 4
    exponent = torch.arange(0, bands, dtype=torch.int64).to(torch.float32) / bands
    frequencies = (1.0 / (theta ** exponent)).to(device)
    shape = [grid, grid]  # square grids; timm swaps (rows, columns) for 'xy' indexing
    axes = [torch.arange(size, device=device, dtype=torch.int64).to(torch.float32) + offset
            for size in shape]
    if ref_grid:
        axes = [axis / size * ref_grid for axis, size in zip(axes, shape)]
    coords = torch.stack(torch.meshgrid(axes, indexing=indexing), dim=-1)  # [H, W, 2]
    angles = coords.unsqueeze(-1) * frequencies  # [H, W, 2, bands]
    return angles.sin().flatten(-2).flatten(0, -2), angles.cos().flatten(-2).flatten(0, -2)


def rotate(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Queries or keys [batch, heads, tokens, head_width] with the last tokens (as many as the
    tables have rows) turned pair by pair: ``(a, b) -> (a cos - b sin, b cos + a sin)``,
    computed in the tables' float32 and returned in ``x``'s dtype (timm's
    ``apply_rot_embed_cat``, interleaved layout, the same products and sums)."""
    sin, cos = rope
    first = x.shape[-2] - sin.shape[-2]
    even, odd = x[..., first:, :].unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1)
    turned = turned.flatten(-2).to(x.dtype)
    return turned if first == 0 else torch.cat((x[..., :first, :], turned), dim=-2)


def keep_rows(rope: Rope, index: torch.Tensor) -> Rope:
    """The tables of the patches each image keeps (``index`` [batch, kept], patch numbers),
    shaped [batch, 1, kept, head_width / 2] to broadcast over the heads."""
    return tuple(table[index].unsqueeze(1) for table in rope)  # type: ignore[return-value]


__all__ = ["Rope", "keep_rows", "rope_tables", "rotate"]
