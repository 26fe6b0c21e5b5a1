"""Which cubes each side of VideoMAE V2 sees: tube, running-cell and random masks.

A clip of T frames at H x W pixels is cut into cubes of tubelet x patch x patch pixels, giving a grid
(T', H', W') = (T / tubelet, H / patch, W / patch) of N = T'·H'·W' tokens, numbered in raster order
(time, then row, then column). A mask is a (B, N) bool tensor, True = hidden from that side:

- tube_mask (the encoder's, ratio 0.9): one random spatial pattern of int(ratio·H'·W') hidden positions
  per clip, the same in every temporal slot, so a hidden cube cannot be copied from the next frame.
- running_cell_mask (the decoder's, ratio 0.5): every 2x2 cell of the frame drops int(4·ratio) of its four
  positions; which ones walks along the cell from one temporal slot to the next, so over any four
  consecutive slots every position is dropped the same number of times. One of four phases per clip.
- random_mask: int(ratio·N) positions chosen uniformly (the plain MAE mask, for either side).

The model takes not the masks but the positions they leave: `visible` (B, N_vis), the cubes the encoder
sees, and `queries` (B, N_q), the cubes the decoder predicts. Every mask of a setting hides as many tokens in
every clip, so these are fixed-length index tensors, sorted out of the masks on the device. `MaskConfig`
holds a run's choice for both sides on one grid and draws a batch of `Masks`. The recipes name the masks by
`MASKS`: a new kind is a function with tube_mask's signature and a line there.
"""
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

Grid = tuple[int, int, int]  # (T', H', W')


class MaskError(ValueError):
    """A mask the makers cannot draw: an unknown kind, a ratio outside its range, a grid that does not fit."""


def _check_ratio(ratio: float) -> None:
    if not 0.0 <= ratio < 1.0:
        raise MaskError(f"the ratio must be in [0, 1), got {ratio}")


def _random_hidden(batch_size: int, n: int, num_hidden: int, device, generator) -> Tensor:
    """(B, n) bool with exactly `num_hidden` True per row, uniformly at random."""
    noise = torch.rand(batch_size, n, device=device, generator=generator)
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, n): a random permutation of 0..n-1 per row
    return rank < num_hidden


def tube_mask(batch_size: int, grid: Grid, ratio: float, device=None, generator=None) -> Tensor:
    """Encoder mask: int(ratio·H'·W') hidden positions per frame, the same positions in every slot."""
    _check_ratio(ratio)
    slots, h, w = grid
    num_hidden = int(ratio * h * w)  # the reference's count: 0.9 of 14x14 -> 176 hidden, 20 visible
    frame = _random_hidden(batch_size, h * w, num_hidden, device, generator)  # (B, H'·W')
    return frame[:, None, :].expand(batch_size, slots, h * w).reshape(batch_size, slots * h * w)


def random_mask(batch_size: int, grid: Grid, ratio: float, device=None, generator=None) -> Tensor:
    """int(ratio·N) hidden positions anywhere in the clip, drawn independently per clip."""
    _check_ratio(ratio)
    n = grid[0] * grid[1] * grid[2]
    return _random_hidden(batch_size, n, int(ratio * n), device, generator)


def running_cell_phases(grid: Grid, ratio: float, device=None) -> Tensor:
    """The four running-cell patterns, (4, N) bool, True = dropped from the decoder.

    Number the positions of a 2x2 cell in raster order, c = 0 top-left, 1 top-right, 2 bottom-left,
    3 bottom-right. In phase s and temporal slot t, position c is dropped when (c + s + t + 1) mod 4 is
    below k = 4·ratio. For ratio 0.5, phase 0 drops {TL, BR}, then {BL, BR}, {TR, BL}, {TL, TR}, and repeats.
    (The reference rotates a queue [1]*k + [0]*(4-k) left by s + t + 1 for each slot: the same rule.)
    """
    slots, h, w = grid
    k = 4 * ratio
    if not (round(k) == k and 1 <= k <= 3):
        raise MaskError(f"a 2x2 running cell cannot hide a share of {ratio}: use 0.25, 0.5 or 0.75")
    if h % 2 or w % 2:
        raise MaskError(f"running-cell masking tiles 2x2 cells, so the token grid must be even; "
                        f"got H'={h}, W'={w} (input_size / patch_size)")
    cell = (torch.arange(h, device=device) % 2)[:, None] * 2 + torch.arange(w, device=device) % 2  # (H', W')
    phase = torch.arange(4, device=device)[:, None, None, None]  # (4, 1, 1, 1)
    slot = torch.arange(slots, device=device)[None, :, None, None]  # (1, T', 1, 1)
    dropped = (cell + phase + slot + 1) % 4 < int(k)  # (4, T', H', W')
    return dropped.reshape(4, slots * h * w)


def running_cell_mask(batch_size: int, grid: Grid, ratio: float, device=None, generator=None) -> Tensor:
    """Decoder mask: each clip follows one of the four running-cell patterns, chosen uniformly."""
    phases = running_cell_phases(grid, ratio, device)  # (4, N)
    pick = torch.randint(0, 4, (batch_size,), device=device, generator=generator)  # (B,)
    return phases[pick]


# The mask makers by the name the command line uses (--mask_type, --decoder_mask_type).
MASKS = {"tube": tube_mask, "run_cell": running_cell_mask, "random": random_mask}


def num_hidden(kind: str, grid: Grid, ratio: float) -> int:
    """How many tokens per clip a mask of this kind hides (the same in every clip: one drawn on the CPU tells)."""
    if kind not in MASKS:
        raise MaskError(f"unknown mask kind {kind!r}; expected one of {', '.join(MASKS)}")
    return int(MASKS[kind](1, grid, ratio, device="cpu").sum())


# -----------------------------------------------------------------------------------------------------
# Both sides: the masks and the positions the model runs on


class Masks(NamedTuple):
    encoder: Tensor  # (B, N) bool, True = hidden from the encoder
    decoder: Tensor | None  # (B, N) bool, True = dropped from the decoder; None = VideoMAE V1
    visible: Tensor  # (B, N_vis) positions the encoder sees, ascending
    queries: Tensor  # (B, N_q) positions the decoder predicts, ascending
    in_loss: Tensor  # (B, N_q) bool: the query was hidden from the encoder, so it counts in the loss


def split(mask: Tensor, num_kept: int) -> tuple[Tensor, Tensor]:
    """(B, N) bool with num_kept False per row -> (positions of False (B, num_kept), of True), each ascending."""
    order = mask.to(torch.uint8).argsort(dim=1, stable=True)  # (B, N): the False positions first
    return order[:, :num_kept], order[:, num_kept:]


def with_positions(encoder: Tensor, decoder: Tensor | None, num_visible: int, num_queries: int) -> Masks:
    """The masks and their positions: with a decoder mask the queries are every position it keeps (the
    few the encoder saw included, as in the reference; in_loss leaves them out); without one (V1) they
    are every position hidden from the encoder."""
    visible, hidden = split(encoder, num_visible)
    queries = hidden if decoder is None else split(decoder, num_queries)[0]
    return Masks(encoder, decoder, visible, queries, encoder.gather(1, queries))


def from_masks(encoder: Tensor, decoder: Tensor | None = None) -> Masks:
    """Masks made elsewhere (e.g. the reference's), with the counts read off them: a host sync, so not for
    a training step. Every row of a mask must keep as many positions as the others."""
    kept = [(~mask).sum(dim=1) for mask in (encoder, decoder) if mask is not None]  # (B,) each
    for counts in kept:
        if not bool((counts == counts[0]).all()):
            raise MaskError(f"every row of a mask must hide the same number of tokens; got per-row kept counts "
                            f"{counts.tolist()}")
    return with_positions(encoder, decoder, int(kept[0][0]), int(kept[-1][0]))


@dataclass(frozen=True)
class MaskConfig:
    """Which mask each side gets on a token grid, and how much it hides; checked when made (MaskError).
    decoder_mask_ratio 0 turns decoder masking off (VideoMAE V1: it predicts every cube the encoder missed)."""
    grid: Grid
    mask_type: str = "tube"
    mask_ratio: float = 0.9
    decoder_mask_type: str = "run_cell"
    decoder_mask_ratio: float = 0.5

    def __post_init__(self):  # the counts, known before any batch is drawn: plain numbers in the step
        n = self.grid[0] * self.grid[1] * self.grid[2]
        num_visible = n - num_hidden(self.mask_type, self.grid, self.mask_ratio)
        num_queries = (n - num_hidden(self.decoder_mask_type, self.grid, self.decoder_mask_ratio) if self.dual
                       else n - num_visible)
        object.__setattr__(self, "num_visible", num_visible)  # tokens per clip the encoder sees
        object.__setattr__(self, "num_queries", num_queries)  # tokens per clip the decoder predicts

    @property
    def dual(self) -> bool:
        return self.decoder_mask_ratio > 0

    def draw(self, batch_size: int, device=None, generator=None) -> Masks:
        """Both masks for a batch and their positions, made on `device`."""
        encoder = MASKS[self.mask_type](batch_size, self.grid, self.mask_ratio, device, generator)
        decoder = (MASKS[self.decoder_mask_type](batch_size, self.grid, self.decoder_mask_ratio, device, generator)
                   if self.dual else None)
        return with_positions(encoder, decoder, self.num_visible, self.num_queries)
