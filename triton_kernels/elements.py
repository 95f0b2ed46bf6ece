"""Reading and writing gradient elements in Triton, for every kernel family: the four float dtypes by
tag (``DTYPE_TAGS``), converted to and from their arithmetic type (fp32, fp64 for fp64) with the
rounding c10 uses, through raw addresses (the kernels reach gradients through tables of addresses)
or through pointers declared 16-byte aligned (so the compiler emits vector loads and stores).
"""

from __future__ import annotations

import struct

import torch
import triton
import triton.language as tl

# dtype tags of the tables (the same as csrc/common/clip_types.h)
DTYPE_TAGS = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}


@triton.jit
def bf16_bits_to_f32(bits):
    return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def f32_to_bf16_bits(x):
    # Round to nearest even like c10::BFloat16, every NaN to 0x7FC0. Written out because the
    # interpreter's float->bf16 cast truncates.
    bits = x.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return tl.where(x != x, 0x7FC0, rounded).to(tl.uint16)


@triton.jit
def round_f32_to(x, DTYPE: tl.constexpr):
    """x (fp32) rounded to a dtype's precision, kept in fp32."""
    if DTYPE == 1:
        return x.to(tl.float16).to(tl.float32)
    elif DTYPE == 2:
        return bf16_bits_to_f32(f32_to_bf16_bits(x))
    else:
        return x


@triton.jit
def load_math(address, offsets, mask, DTYPE: tl.constexpr):
    """Elements of a gradient in its arithmetic type (fp32, or fp64 for fp64)."""
    if DTYPE == 0:
        return tl.load(address.to(tl.pointer_type(tl.float32)) + offsets, mask=mask, other=0.0)
    elif DTYPE == 1:
        return tl.load(address.to(tl.pointer_type(tl.float16)) + offsets, mask=mask, other=0.0).to(tl.float32)
    elif DTYPE == 2:
        return bf16_bits_to_f32(tl.load(address.to(tl.pointer_type(tl.uint16)) + offsets, mask=mask, other=0))
    else:
        return tl.load(address.to(tl.pointer_type(tl.float64)) + offsets, mask=mask, other=0.0)


@triton.jit
def aligned_block_pointer(address, begin, DTYPE: tl.constexpr):
    """The pointer to element ``begin`` of a gradient at a 16-byte aligned ``address``, declared as
    such (``tl.multiple_of``): with it and block offsets that are multiples of the block, the
    compiler emits 16-byte vector loads, which it cannot prove from an address read from a table.
    ``begin`` is a multiple of CHUNK, so the pointer stays aligned."""
    if DTYPE == 0:
        return tl.multiple_of(address.to(tl.pointer_type(tl.float32)) + begin, 16)
    elif DTYPE == 1:
        return tl.multiple_of(address.to(tl.pointer_type(tl.float16)) + begin, 16)
    elif DTYPE == 2:
        return tl.multiple_of(address.to(tl.pointer_type(tl.uint16)) + begin, 16)
    else:
        return tl.multiple_of(address.to(tl.pointer_type(tl.float64)) + begin, 16)


@triton.jit
def load_block_math(pointer, offsets, DTYPE: tl.constexpr):
    """A full block from a typed pointer, unmasked, in the arithmetic type (as load_math)."""
    if DTYPE == 1:
        return tl.load(pointer + offsets).to(tl.float32)
    elif DTYPE == 2:
        return bf16_bits_to_f32(tl.load(pointer + offsets))
    else:
        return tl.load(pointer + offsets)


@triton.jit
def store_math(address, offsets, mask, value, DTYPE: tl.constexpr):
    """Stores arithmetic-type values into a gradient, rounding like c10 (doubles via float)."""
    if DTYPE == 0:
        tl.store(address.to(tl.pointer_type(tl.float32)) + offsets, value.to(tl.float32), mask=mask)
    elif DTYPE == 1:
        tl.store(address.to(tl.pointer_type(tl.float16)) + offsets, value.to(tl.float32).to(tl.float16), mask=mask)
    elif DTYPE == 2:
        tl.store(address.to(tl.pointer_type(tl.uint16)) + offsets, f32_to_bf16_bits(value.to(tl.float32)), mask=mask)
    else:
        tl.store(address.to(tl.pointer_type(tl.float64)) + offsets, value.to(tl.float64), mask=mask)


@triton.jit
def store_block_math(pointer, offsets, value, DTYPE: tl.constexpr):
    """store_math of a full block through a typed (aligned) pointer, unmasked."""
    if DTYPE == 0:
        tl.store(pointer + offsets, value.to(tl.float32))
    elif DTYPE == 1:
        tl.store(pointer + offsets, value.to(tl.float32).to(tl.float16))
    elif DTYPE == 2:
        tl.store(pointer + offsets, f32_to_bf16_bits(value.to(tl.float32)))
    else:
        tl.store(pointer + offsets, value.to(tl.float64))


def float_bits(value: float) -> int:
    """A float64 as the int64 with its bits: Triton passes Python floats as fp32, so doubles travel
    as integers and are bitcast back in the kernel."""
    return struct.unpack("<q", struct.pack("<d", value))[0]
