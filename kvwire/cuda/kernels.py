"""numba.cuda kernels: fused gather+quantize and dequantize+scatter of paged KV.

They perform exactly the arithmetic of kvwire.codecs (every step exact or one IEEE
float32 operation, rounding half to even), so their codes and scales equal the CPU
path's bit for bit. Inputs and outputs of type bfloat16/float16 are handled as raw
uint16 bits, converted arithmetically (numba has no bfloat16 type).

Layout of a launch: the source (or destination) is the engine's pool flattened to
``(pool_rows, heads * dim)``; ``rows[t]`` is the pool row of token t (from block ids).
A "group" shares one scale: fp8 = 16 tokens x 1 head x dim, int8 = 1 token x 1 head x
dim, int4 = 1 token x 1 head x 128 dims. One CUDA block reduces and quantizes one group.
"""

from __future__ import annotations

import math

from numba import float32

from .compat import cuda

THREADS = 128  # threads per block (the shared-memory reduction is sized for it)

# source/destination kinds
KIND_F32, KIND_BF16, KIND_F16 = 0, 1, 2
# codecs
CODEC_FP8, CODEC_INT8, CODEC_INT4 = 0, 1, 2


@cuda.jit(device=True)
def rint_half_even(x):
    r = math.floor(x)
    d = x - r
    if d > 0.5 or (d == 0.5 and (int(r) & 1) == 1):
        r += 1.0
    return r


@cuda.jit(device=True)
def clamp(x, limit):
    """x limited to [-limit, limit] (no builtin min/max: numba cannot compile them to
    PTX without a device present)."""
    if x > limit:
        return limit
    if x < -limit:
        return -limit
    return x


@cuda.jit(device=True)
def nan_max(a, b):
    """max that keeps a NaN once seen (so NaN input is reported, never scaled)."""
    if math.isnan(a) or math.isnan(b):
        return float32(math.nan)
    return a if a >= b else b


@cuda.jit(device=True)
def load_value(src, kind, row, col):
    if kind == KIND_F32:
        return float32(src[row, col])
    bits = int(src[row, col])
    if kind == KIND_BF16:
        sign, exp, man, man_bits, bias, max_exp = bits >> 15, (bits >> 7) & 0xFF, bits & 0x7F, 7, 127, 255
    else:
        sign, exp, man, man_bits, bias, max_exp = bits >> 15, (bits >> 10) & 0x1F, bits & 0x3FF, 10, 15, 31
    if exp == max_exp:
        value = math.inf if man == 0 else math.nan
    elif exp == 0:
        value = math.ldexp(float(man), 1 - bias - man_bits)
    else:
        value = math.ldexp(float(man + (1 << man_bits)), exp - bias - man_bits)
    return float32(-value if sign else value)


@cuda.jit(device=True)
def round_bits(a, man_bits, bias):
    """Bits (without sign) of finite a >= 0 rounded half-even to a float with ``man_bits``
    mantissa bits and exponent ``bias``; subnormals included."""
    min_normal = math.ldexp(1.0, 1 - bias)
    if a < min_normal:
        return int(rint_half_even(math.ldexp(a, bias - 1 + man_bits)))
    mant, exp = math.frexp(a)
    e = exp - 1
    m = int(rint_half_even((math.ldexp(a, -e) - 1.0) * (1 << man_bits)))
    if m == (1 << man_bits):
        m = 0
        e += 1
    return ((e + bias) << man_bits) | m


@cuda.jit(device=True)
def store_value(dst, kind, row, col, value):
    if kind == KIND_F32:
        dst[row, col] = value
        return
    sign = 1 if value < 0 or (value == 0 and math.copysign(1.0, value) < 0) else 0
    a = abs(value)
    if kind == KIND_BF16:
        bits = round_bits(a, 7, 127)
    else:
        bits = round_bits(a, 10, 15)
    dst[row, col] = (sign << 15) | bits


@cuda.jit(device=True)
def e4m3_code(q):
    a = abs(q)
    sign = 0x80 if (q < 0 or (q == 0 and math.copysign(1.0, q) < 0)) else 0
    return sign | round_bits(a, 3, 7)


@cuda.jit(device=True)
def e4m3_value(code):
    code = int(code)
    exp = (code >> 3) & 0xF
    man = code & 0x7
    if exp == 0:
        value = math.ldexp(float(man), -9)
    else:
        value = math.ldexp(float(man + 8), exp - 10)
    return float32(-value if code & 0x80 else value)


@cuda.jit(device=True)
def group_of(codec, group_index, tokens, heads, dim, block_tokens, group):
    """(first token, number of tokens, head, first dim, number of dims) of a group."""
    if codec == CODEC_FP8:
        tb, h = group_index // heads, group_index % heads
        t0 = tb * block_tokens
        left = tokens - t0
        return t0, (block_tokens if block_tokens < left else left), h, 0, dim
    if codec == CODEC_INT8:
        return group_index // heads, 1, group_index % heads, 0, dim
    groups = dim // group
    t = group_index // (heads * groups)
    rest = group_index % (heads * groups)
    return t, 1, rest // groups, (rest % groups) * group, group


@cuda.jit
def gather_quantize(
    src, kind, rows, codec, tokens, heads, dim, block_tokens, group, codes, scales_f32, scales_f16, error
):
    """One block per scale group: reduce max|x|, write the scale, then the codes."""
    g = cuda.blockIdx.x
    t0, nt, h, d0, nd = group_of(codec, g, tokens, heads, dim, block_tokens, group)
    shared = cuda.shared.array(THREADS, float32)
    tid = cuda.threadIdx.x
    amax = float32(0.0)
    for i in range(tid, nt * nd, cuda.blockDim.x):
        t = t0 + i // nd
        amax = nan_max(amax, abs(load_value(src, kind, rows[t], h * dim + d0 + i % nd)))
    shared[tid] = amax
    cuda.syncthreads()
    step = cuda.blockDim.x // 2
    while step > 0:
        if tid < step:
            shared[tid] = nan_max(shared[tid], shared[tid + step])
        cuda.syncthreads()
        step //= 2
    amax = shared[0]
    if not math.isfinite(amax):
        if tid == 0:
            error[0] = 1
        return
    if codec == CODEC_FP8:
        scale = float32(amax / float32(448.0))
        if tid == 0:
            scales_f32[g] = scale
    else:
        raw = float32(amax / float32(127.0 if codec == CODEC_INT8 else 7.0))
        bits = round_bits(raw, 10, 15)
        if bits >= 0x7C00:
            if tid == 0:
                error[0] = 2
            return
        exp, man = bits >> 10, bits & 0x3FF
        scale = float32(math.ldexp(float(man), -24) if exp == 0 else math.ldexp(float(man + 1024), exp - 25))
        if tid == 0:
            scales_f16[g] = bits
    divisor = scale if scale != 0 else float32(1.0)
    if codec == CODEC_INT4:
        for i in range(tid, nd // 2, cuda.blockDim.x):
            d = d0 + 2 * i
            c0 = clamp(rint_half_even(float32(load_value(src, kind, rows[t0], h * dim + d) / divisor)), 7.0)
            c1 = clamp(rint_half_even(float32(load_value(src, kind, rows[t0], h * dim + d + 1) / divisor)), 7.0)
            codes[t0, h * (dim // 2) + d // 2] = (int(c0) & 0xF) | ((int(c1) & 0xF) << 4)
        return
    for i in range(tid, nt * nd, cuda.blockDim.x):
        t = t0 + i // nd
        d = d0 + i % nd
        q = float32(load_value(src, kind, rows[t], h * dim + d) / divisor)
        if codec == CODEC_FP8:
            codes[t, h * dim + d] = e4m3_code(clamp(q, 448.0))
        else:
            codes[t, h * dim + d] = int(clamp(rint_half_even(q), 127.0)) & 0xFF


@cuda.jit
def dequantize_scatter(codes, scales_f32, scales_f16, codec, tokens, heads, dim, block_tokens, group, rows, dst, kind):
    """One thread per element: code * scale, written to the destination pool row."""
    i = cuda.grid(1)
    if i >= tokens * heads * dim:
        return
    t = i // (heads * dim)
    h = (i // dim) % heads
    d = i % dim
    if codec == CODEC_FP8:
        scale = scales_f32[(t // block_tokens) * heads + h]
        value = e4m3_value(codes[t, h * dim + d]) * scale
    else:
        if codec == CODEC_INT8:
            bits = int(scales_f16[t * heads + h])
            code = int(codes[t, h * dim + d])
            code = code - 256 if code > 127 else code
        else:
            bits = int(scales_f16[(t * heads + h) * (dim // group) + d // group])
            code = (int(codes[t, h * (dim // 2) + d // 2]) >> (4 * (d & 1))) & 0xF
            code = code - 16 if code > 7 else code
        exp, man = bits >> 10, bits & 0x3FF
        scale = float32(math.ldexp(float(man), -24) if exp == 0 else math.ldexp(float(man + 1024), exp - 25))
        value = float32(code) * scale
    store_value(dst, kind, rows[t], h * dim + d, float32(value))


@cuda.jit
def gather_rows(src, rows, dst):
    """Bit-exact copy of pool rows (as bytes) into a contiguous buffer: codec "none"."""
    i = cuda.grid(1)
    width = src.shape[1]
    if i < dst.shape[0] * width:
        dst[i // width, i % width] = src[rows[i // width], i % width]


@cuda.jit
def scatter_rows(src, rows, dst):
    """Bit-exact copy of a contiguous buffer's rows into pool rows: codec "none"."""
    i = cuda.grid(1)
    width = src.shape[1]
    if i < src.shape[0] * width:
        dst[rows[i // width], i % width] = src[i // width, i % width]
