"""Which row of the WebUI's CFG batch is what: the layout `CFGDenoiser.forward` builds, and the rows
each of its inner-model (= UNet) calls covers.

`CFGDenoiser.forward` (A1111 v1.6–v1.10, `modules/sd_samplers_cfg_denoiser.py`) stacks
`x_in = [cond rows grouped by image, AND-subprompts in order] + [B uncond rows]` (edit models: a second
block of B uncond rows), then calls its inner model on row slices of `x_in`: all rows at once; chunks
of B rows (`batch_cond_uncond` off); cond chunks then the uncond rows (English token lengths differ);
the cond rows only (skip-uncond: NGMS / `skip_early_cond`). Every slice is a view of `x_in`, so the
row offset of a call is readable from the data pointers; and the calls always walk the rows in order
from row 0, so a cursor gives the same answer where the pointer trick cannot be used.

Forge says the roles of a UNet call's rows itself (`chunked_row_roles`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class RowRole:
    """One row of `x_in`: `role` "cond" (image `image`, AND-subprompt `subprompt`) or "uncond"."""

    role: str
    image: int
    subprompt: int = 0

    @property
    def is_cond(self) -> bool:
        return self.role == "cond"


def cond_counts(conds_list_or_batch=None, n_cond: int | None = None, batch: int | None = None) -> list[int]:
    """Cond rows per image: from the WebUI's `conds_list` / `MulticondLearnedConditioning.batch` (a list
    per image of its AND-subprompts), or, without it, `n_cond` rows spread evenly over `batch` images."""
    if conds_list_or_batch is not None:
        counts = [len(c) for c in conds_list_or_batch]
        if n_cond is None or sum(counts) == n_cond:
            return counts
    if n_cond is None or not batch or n_cond % batch:
        raise ValueError(f"BDM: cannot tell the cond rows per image ({n_cond} cond rows, {batch} images)")
    return [n_cond // batch] * batch


def row_roles(counts: Sequence[int], uncond_blocks: int = 1) -> list[RowRole]:
    """Roles of all `x_in` rows: cond rows of image 0 (subprompts in order), image 1 …, then
    `uncond_blocks` blocks (1; 2 for edit models) of one uncond row per image."""
    roles = [RowRole("cond", image, sub) for image, n in enumerate(counts) for sub in range(n)]
    for _ in range(uncond_blocks):
        roles += [RowRole("uncond", image) for image in range(len(counts))]
    return roles


def rows_of(cond) -> int:
    """Rows of a conditioning tensor as `CFGDenoiserParams` gives it (SDXL: a dict of tensors)."""
    if isinstance(cond, dict):
        cond = cond.get("crossattn", next(iter(cond.values())))
    return int(cond.shape[0])


def cfg_rows(x_rows: int, n_cond: int, n_uncond: int, conds_batch=None) -> list[RowRole]:
    """Roles of the `x_rows` rows of one `CFGDenoiser.forward` call, from what `on_cfg_denoiser` sees:
    `n_cond` rows of text cond, `n_uncond` (= images) rows of text uncond, and the WebUI's per-image
    AND-subprompt lists when known (`MulticondLearnedConditioning.batch`). An edit model's x carries a
    second block of uncond rows. Raises ValueError when `x_rows` fits neither layout."""
    counts = cond_counts(conds_batch, n_cond, n_uncond)
    for blocks in (1, 2):
        if x_rows == n_cond + blocks * len(counts):
            return row_roles(counts, blocks)
    raise ValueError(f"BDM: unexpected CFG batch of {x_rows} rows for cond rows {list(counts)} per image")


def row_offset(x, base) -> int | None:
    """Row offset of tensor `x` inside `base` when `x` is a row slice (view) of it, else None."""
    try:
        if x.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
            return None
    except Exception:  # noqa: BLE001 - tensors without storage (meta, some wrappers)
        return None
    if (x.dtype != base.dtype or tuple(x.shape[1:]) != tuple(base.shape[1:])
            or tuple(x.stride()) != tuple(base.stride())):
        return None
    row_bytes = base.stride(0) * base.element_size()
    delta = x.data_ptr() - base.data_ptr()
    if row_bytes <= 0 or delta % row_bytes:
        return None
    offset = delta // row_bytes
    if offset < 0 or offset + x.shape[0] > base.shape[0]:
        return None
    return int(offset)


def chunked_row_roles(cond_or_uncond: Sequence[int], rows: int) -> list[RowRole]:
    """Roles of the rows of one Forge UNet call. Forge's sampler (`calc_cond_uncond_batch`) stacks
    whole copies of the batch, one per chunk, and says what each chunk is in
    `transformer_options["cond_or_uncond"]` (0 = cond, 1 = uncond; uncond first at CFG > 1, no uncond
    chunk at CFG 1); row i of every chunk is image i. A cond chunk is one AND-subprompt of every image;
    `subprompt` numbers the call's cond chunks in call order (Forge runs them last subprompt first; the
    Chinese context is the image's either way)."""
    chunks = len(cond_or_uncond)
    if not chunks or rows % chunks:
        raise ValueError(f"BDM: a UNet call of {rows} rows cannot be split into the {chunks} chunks "
                         f"{list(cond_or_uncond)}")
    per_chunk, roles, sub = rows // chunks, [], 0
    for kind in cond_or_uncond:
        if int(kind) == 0:
            roles += [RowRole("cond", image, sub) for image in range(per_chunk)]
            sub += 1
        else:
            roles += [RowRole("uncond", image) for image in range(per_chunk)]
    return roles


class CallRows:
    """The rows of one `CFGDenoiser.forward` call, handed out to its inner-model calls in order."""

    def __init__(self, roles: Sequence[RowRole], base=None):
        self.roles = list(roles)
        self.base = base  # params.x: the inner calls' x are row views of it
        self.cursor = 0

    def locate(self, x=None, rows: int | None = None) -> tuple[int, int]:
        """`[a, b)` for an inner call on `x` (or on `rows` rows): the data-pointer offset into the base
        when `x` is a view of it, else the next rows in order. Raises ValueError when out of range."""
        n = int(x.shape[0]) if x is not None else int(rows)
        offset = row_offset(x, self.base) if (x is not None and self.base is not None) else None
        a = self.cursor if offset is None else offset
        if a + n > len(self.roles):
            raise ValueError(f"BDM: a UNet call over {n} rows from row {a} does not fit the batch of "
                             f"{len(self.roles)} rows")
        self.cursor = a + n
        return a, a + n

    def roles_for(self, a: int, b: int) -> list[RowRole]:
        return self.roles[a:b]
