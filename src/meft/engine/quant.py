"""Compact number formats for the host state: bf16 with stochastic rounding, 8-bit log codes.

The host tables and their AdamW moments are most of meft's memory (fp32: 12 bytes per adapter
parameter). These formats bring it to 4, or 3 with the factored second moment of
:mod:`meft.engine.optim` (which uses them):

* **bf16 with stochastic rounding** (:func:`round_bf16_`). An fp32 number keeps its top 16 bits;
  adding uniform random bits to the 16 it drops before truncating rounds up with probability
  equal to the dropped fraction, so E[round(x)] = x and updates far below bf16's resolution
  (2^-8 relative) still move a weight on average instead of vanishing. The noise
  (:class:`RoundingNoise`) is numpy's SFC64 generator, which the caller seeds per table and
  step, so a run and its resume round identically; each 64-bit draw gives four elements'
  16 bits, added to the fp32 bits in place (:func:`round_bf16_`). ``torch.randint`` makes one
  serial Mersenne-twister call per element, which was two thirds of the compact update's
  time; without it the update of 60 bf16 tables x 2,400 rows takes 175-195 ms instead of
  434-653 (``benchmarks/results/step-time/ratio-b166f7c``).

* **8-bit codes on a log scale, per row** (:func:`encode_signed` / :func:`encode_unsigned`).
  A row (d,) keeps one fp32 scale (its largest magnitude) and one byte per element:
  unsigned (for sqrt of Adam's second moment) code c in 0..254 means scale * 2^(-c/16), 255
  means 0 (relative step 4.4%, range 2^-15.9); signed (for the first moment) 1 sign bit and a
  7-bit code c in 0..126 meaning scale * 2^(-c/8), 127 meaning 0 (step 9%, range 2^-15.9).
  Rounding is to the nearest code in the log domain. Linear 8-bit codes would flush the small
  second moments of most elements to zero and blow their updates up; a log scale keeps the
  relative error bounded, which is what a ratio m / sqrt(v) needs (as bitsandbytes' dynamic
  quantization does, simpler).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

U_STEPS, U_ZERO = 16.0, 255  # unsigned: codes per octave, the code meaning 0
S_STEPS, S_ZERO = 8.0, 127  # signed magnitude: codes per octave, the code meaning 0


class RoundingNoise:
    """Uniform 16-bit noise for :func:`round_bf16_`, reproducible from one seed (0 <= seed <
    2^63): four elements' noise from each 64-bit draw of numpy's SFC64."""

    def __init__(self, seed: int) -> None:
        self._bits = np.random.SFC64(seed)

    def uint16(self, n: int) -> np.ndarray:
        """n independent uniform integers in [0, 2^16), (n,) uint16."""
        return self._bits.random_raw((n + 3) // 4).view(np.uint16)[:n]


def round_bf16_(x: Tensor, noise: RoundingNoise) -> Tensor:
    """fp32 x (on the CPU, contiguous) -> bf16, rounded stochastically (unbiased; module doc),
    using x as scratch: the noise is added to the 16 low bits of each element's fp32 bits
    (carrying into the high ones, in int32 arithmetic, which wraps) and the high halves are
    the result. Overwrites x."""
    if x.dtype != torch.float32 or not x.is_contiguous():
        layout = "contiguous" if x.is_contiguous() else "non-contiguous"
        raise ValueError(f"round_bf16_ needs a contiguous float32 tensor, got a {layout} "
                         f"{x.dtype} one")
    bits = x.view(torch.int32)
    words = bits.numpy()  # the same memory; numpy adds the uint16 noise without a widened copy
    np.add(words, noise.uint16(x.numel()).reshape(words.shape), out=words)
    if sys.byteorder != "little":  # cut the low halves off; converting then is exact
        return bits.bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)
    return bits.view(torch.int16)[..., 1::2].contiguous().view(torch.bfloat16)  # high halves


def _scale(x: Tensor) -> Tensor:
    return x.abs().amax(dim=1, keepdim=True)  # (R, 1)


def encode_unsigned(x: Tensor) -> tuple[Tensor, Tensor]:
    """x >= 0 (R, d) -> (codes uint8 (R, d), scales fp32 (R, 1))."""
    scale = _scale(x).float()
    ratio = x.float() / scale.clamp_min(torch.finfo(torch.float32).tiny)
    code = (-U_STEPS * torch.log2(ratio)).round_()
    code = torch.where(ratio > 0, code.clamp_(0, U_ZERO - 1), torch.full_like(code, U_ZERO))
    return code.to(torch.uint8), scale


def decode_unsigned(code: Tensor, scale: Tensor) -> Tensor:
    c = code.float()
    return torch.where(code == U_ZERO, 0.0, scale * torch.exp2(-c / U_STEPS))


def encode_signed(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (R, d) -> (codes int8 (R, d): sign in the top bit, scales fp32 (R, 1))."""
    scale = _scale(x).float()
    ratio = x.float().abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)
    mag = (-S_STEPS * torch.log2(ratio)).round_()
    mag = torch.where(ratio > 0, mag.clamp_(0, S_ZERO - 1), torch.full_like(mag, S_ZERO))
    code = torch.where(x < 0, -(mag + 1), mag)  # -1..-127 negative, 0..127 positive or zero
    return code.to(torch.int8), scale


def decode_signed(code: Tensor, scale: Tensor) -> Tensor:
    c = code.to(torch.int16)
    mag = torch.where(c < 0, -c - 1, c).float()
    value = torch.where(mag == S_ZERO, 0.0, scale * torch.exp2(-mag / S_STEPS))
    return torch.where(c < 0, -value, value)
