"""Masked diffusion attention (docs/method.md §2.3): Triton kernels against the float64 PyTorch reference.

On CPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), so shapes
stay small: L = 8/16/24 per half, K = 4/8/16, 4 query heads over 2 or 1 KV heads, head dim 16/32.
The tile geometry the GPU autotuner picks (BLOCK_M/BLOCK_N up to 128) is checked separately by probing
the tile-range helpers, which is cheap in the interpreter.
"""

from __future__ import annotations

import logging

import pytest
import torch
import transformers
import triton
import triton.language as tl
from tide_kernels.bd3lm_attention import (
    BD3LMAttentionFunction,
    bd3lm_attention,
    bd3lm_attention_reference,
)
from tide_kernels.bd3lm_attention import kernel as kernel_module
from tide_kernels.bd3lm_attention import op as op_module
from tide_kernels.bd3lm_attention.kernel import _key_len, _key_ranges, _query_ranges
from tide_kernels.bd3lm_attention.reference import reference_mask

from tests.kernels.compile_check import assert_compiles_without_interpreter
from tests.tolerances import assert_close
from tide_ds.models.block_mask import dense_bd3lm_mask
from tide_ds.models.qwen3 import BD3LMStudent, build_student, tiny_student_config

OP = "bd3lm_attention"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _qkv(
    generator: torch.Generator,
    *,
    batch: int,
    heads: int,
    kv_heads: int,
    tokens: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
    layout: str = "BHTD",
) -> tuple[torch.Tensor, ...]:
    """q, k, v leaf tensors ``[B, heads, T, Dh]`` and an upstream gradient g like q.

    ``layout="BTHD"`` builds them as ``.transpose(1, 2)`` views of ``[B, T, heads, Dh]`` memory, which is
    what transformers' Qwen3 attention hands to an attention function.
    """

    def make(n_heads: int) -> torch.Tensor:
        if layout == "BTHD":
            x = torch.randn(batch, tokens, n_heads, head_dim, generator=generator, dtype=torch.float64).transpose(1, 2)
        else:
            x = torch.randn(batch, n_heads, tokens, head_dim, generator=generator, dtype=torch.float64)
        return x.to(device=device, dtype=dtype)

    q, k, v, g = make(heads), make(kv_heads), make(kv_heads), make(heads)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g


def _run(fn, q, k, v, g, **kwargs) -> tuple[torch.Tensor, ...]:
    """Output and (dq, dk, dv) of ``fn`` via ``(out * g).sum().backward()``."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, **kwargs)
    (out * g).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


def _reference64(q, k, v, g, **kwargs) -> tuple[torch.Tensor, ...]:
    """The reference on the same inputs upcast to float64 (so input rounding is not counted as error)."""
    return _run(bd3lm_attention_reference, *(x.detach().double() for x in (q, k, v, g)), **kwargs)


def _assert_matches(ref: tuple[torch.Tensor, ...], tri: tuple[torch.Tensor, ...], dtype: torch.dtype) -> None:
    for name, r, t in zip(("out", "dq", "dk", "dv"), ref, tri):
        assert t.shape == r.shape
        assert_close(name, r, t, op=OP, dtype=dtype)


# (L, K, heads, kv_heads, head_dim, clean_first, layout): odd lengths, query/key tiles straddling the two
# copies (L=24 with 16-row tiles), 1 and 2 KV heads, blocks smaller / equal to the tile.
BD3LM_CASES = [
    pytest.param(8, 4, 4, 2, 16, False, "BHTD", id="L8-K4-h4kv2-d16-xt_x0"),
    pytest.param(16, 8, 4, 1, 32, True, "BTHD", id="L16-K8-h4kv1-d32-x0_xt-BTHD"),
    pytest.param(24, 8, 4, 2, 16, False, "BTHD", id="L24-K8-h4kv2-d16-xt_x0-BTHD"),
    pytest.param(24, 4, 4, 1, 16, True, "BHTD", id="L24-K4-h4kv1-d16-x0_xt"),
    pytest.param(16, 16, 2, 2, 16, False, "BHTD", id="L16-K16-h2kv2-d16-xt_x0"),
]


@pytest.mark.parametrize("seq_len, block_size, heads, kv_heads, head_dim, clean_first, layout", BD3LM_CASES)
def test_bd3lm_attention_matches_reference(
    generator, seq_len, block_size, heads, kv_heads, head_dim, clean_first, layout
) -> None:
    q, k, v, g = _qkv(generator, batch=2, heads=heads, kv_heads=kv_heads, tokens=2 * seq_len, head_dim=head_dim,
                      dtype=torch.float64, layout=layout)
    mask = {"seq_len": seq_len, "block_size": block_size, "clean_first": clean_first}
    _assert_matches(_reference64(q, k, v, g, **mask), _run(bd3lm_attention, q, k, v, g, **mask), torch.float64)


@pytest.mark.parametrize("block_m, block_n", [(32, 16), (16, 32)], ids=["BM32-BN16", "BM16-BN32"])
def test_bd3lm_attention_tile_shapes(generator, block_m, block_n) -> None:
    """Tiles spanning several BD3LM blocks and unequal query/key tiles (the GPU configs are of this kind)."""
    q, k, v, g = _qkv(generator, batch=1, heads=2, kv_heads=1, tokens=48, head_dim=16, dtype=torch.float64)
    mask = {"seq_len": 24, "block_size": 4, "clean_first": False}
    config = {"BLOCK_M": block_m, "BLOCK_N": block_n}

    def forced_tiles(q, k, v, *, seq_len, block_size, clean_first):
        return BD3LMAttentionFunction.apply(q, k, v, seq_len, block_size, clean_first, None, 16**-0.5, config)

    tri = _run(forced_tiles, q, k, v, g, **mask)
    _assert_matches(_reference64(q, k, v, g, **mask), tri, torch.float64)


# triton 3.9's interpreter multiplies bf16 tl.dot operands as raw uint16 bits (triton-lang/triton#11584,
# "not supported yet"), so bf16 is checked on a GPU only.
BF16 = pytest.param(torch.bfloat16, id="torch.bfloat16", marks=needs_cuda)


@pytest.mark.any_device
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, BF16], ids=str)
def test_bd3lm_attention_low_precision(generator, device, dtype) -> None:
    q, k, v, g = _qkv(generator, batch=1, heads=4, kv_heads=2, tokens=32, head_dim=32, dtype=dtype, device=device)
    mask = {"seq_len": 16, "block_size": 4, "clean_first": False}
    tri = _run(bd3lm_attention, q, k, v, g, **mask)
    assert all(t.dtype == dtype for t in tri)
    _assert_matches(_reference64(q, k, v, g, **mask), tri, dtype)


def test_bd3lm_attention_key_lens(generator) -> None:
    """Padded bidirectional attention: a full row, a partial one, a fully padded one; padding is never read."""
    tokens = 40
    key_lens = torch.tensor([tokens, 17, 0])
    q, k, v, g = _qkv(generator, batch=3, heads=4, kv_heads=2, tokens=tokens, head_dim=16, dtype=torch.float64)
    ref = _reference64(q, k, v, g, key_lens=key_lens)
    # Poison the padding: the kernel must neither read it into a real row nor turn it into NaN.
    pad = torch.arange(tokens)[None, None, :, None] >= key_lens[:, None, None, None]
    q_nan, k_nan, v_nan = (torch.where(pad, float("nan"), x.detach()) for x in (q, k, v))
    tri = _run(bd3lm_attention, q_nan, k_nan, v_nan, g, key_lens=key_lens)
    _assert_matches(ref, tri, torch.float64)
    out, dq, dk, dv = tri
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert (t.masked_select(pad.expand_as(t)) == 0).all(), f"{name} is not 0 on padding"


@pytest.mark.parametrize("seq_len, block_size", [(1, 1), (4, 4)], ids=["one-token-per-copy", "one-block"])
def test_bd3lm_attention_smallest_layouts(generator, seq_len, block_size) -> None:
    """L = K = 1 (two tokens: x_t attends only to itself, x_0 to itself) and a single block per copy."""
    q, k, v, g = _qkv(generator, batch=2, heads=2, kv_heads=1, tokens=2 * seq_len, head_dim=16, dtype=torch.float64)

    def check(ref, tri):
        # Elementwise (not relative RMS): with one key per query, dq is 0 in exact arithmetic.
        for name, r, t in zip(("out", "dq", "dk", "dv"), ref, tri):
            torch.testing.assert_close(t, r, atol=1e-12, rtol=1e-9, msg=lambda m, name=name: f"{name}: {m}")

    for clean_first in (False, True):
        mask = {"seq_len": seq_len, "block_size": block_size, "clean_first": clean_first}
        check(_reference64(q, k, v, g, **mask), _run(bd3lm_attention, q, k, v, g, **mask))
    if seq_len == 1:  # every query sees exactly one key, its own token: the output is its own value
        out = bd3lm_attention(q, k, v, seq_len=1, block_size=1)
        torch.testing.assert_close(out, v.detach().repeat_interleave(2, dim=1))
    key_lens = torch.tensor([1, 2 * seq_len])  # one real token in the first sequence
    check(_reference64(q, k, v, g, key_lens=key_lens), _run(bd3lm_attention, q, k, v, g, key_lens=key_lens))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_bd3lm_attention_extreme_scores(generator, dtype) -> None:
    """Scores of order 1e4 (softmax one-hot in practice): the online softmax neither overflows nor makes NaN."""
    q, k, v, g = _qkv(generator, batch=1, heads=2, kv_heads=1, tokens=32, head_dim=16, dtype=torch.float64)
    q = (q.detach() * 300.0).to(dtype).requires_grad_()
    k, v, g = k.detach().to(dtype).requires_grad_(), v.detach().to(dtype).requires_grad_(), g.to(dtype)
    mask = {"seq_len": 16, "block_size": 4}
    ref, tri = _reference64(q, k, v, g, **mask), _run(bd3lm_attention, q, k, v, g, **mask)
    if dtype == torch.float64:
        _assert_matches(ref, tri, dtype)
        return
    # fp32: a score of 1e4 carries an absolute rounding error of ~1e-3, i.e. a relative error of ~1e-3 in the
    # near-tied probabilities; compare at that scale.
    for name, r, t in zip(("out", "dq", "dk", "dv"), ref, tri):
        assert torch.isfinite(t).all(), name
        assert ((t.double() - r).norm() / r.norm()).item() < 1e-2, name


def test_bd3lm_attention_gradcheck(generator) -> None:
    """torch.autograd.gradcheck in float64 (the interpreter runs float64 dots exactly), fast mode."""
    q, k, v, _ = _qkv(generator, batch=1, heads=2, kv_heads=1, tokens=16, head_dim=16, dtype=torch.float64)

    def fn(q, k, v):
        return bd3lm_attention(q, k, v, seq_len=8, block_size=4, clean_first=True)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True)


def test_bd3lm_attention_in_qwen3_student(generator) -> None:
    """Through transformers' attention interface, the tiny Qwen3 student gives SDPA's hidden states and
    parameter gradients (float64): the op accepts the q/k/v views the model produces."""
    seq_len, block_size = 16, 4

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        out = bd3lm_attention(query, key, value, seq_len=seq_len, block_size=block_size, scale=scaling)
        return out.transpose(1, 2), None  # transformers expects [B, T, H, Dh]

    transformers.AttentionInterface.register("tide_bd3lm_attention_test", attention)
    student = BD3LMStudent(build_student(tiny_student_config(), seed=0), block_size=block_size).double()
    x_0 = torch.randint(0, 1000, (1, seq_len), generator=generator)
    x_t = torch.where(torch.rand(1, seq_len, generator=generator) < 0.5, 1010, x_0)
    results = []
    for backend in ("sdpa", "tide_bd3lm_attention_test"):
        student.hf.config._attn_implementation = backend
        student.zero_grad()
        hidden = student(x_t, x_0)
        (hidden * torch.linspace(-1, 1, hidden.numel(), dtype=hidden.dtype).view_as(hidden)).sum().backward()
        results.append([hidden.detach()] + [p.grad.clone() for p in student.parameters()])
    for i, (ref, tri) in enumerate(zip(*results)):
        assert_close("hidden" if i == 0 else f"grad {i}", ref, tri, op=OP, dtype=torch.float64)


@pytest.mark.any_device
def test_bd3lm_attention_reference_implementation(generator) -> None:
    q, k, v, _ = _qkv(generator, batch=1, heads=2, kv_heads=1, tokens=8, head_dim=8, dtype=torch.float32)
    out = bd3lm_attention(q, k, v, seq_len=4, block_size=2, implementation="reference")
    torch.testing.assert_close(out, bd3lm_attention_reference(q, k, v, seq_len=4, block_size=2))


@pytest.mark.any_device
def test_bd3lm_attention_logs_choice_once(generator, caplog) -> None:
    q, k, v, _ = _qkv(generator, batch=1, heads=2, kv_heads=1, tokens=8, head_dim=8, dtype=torch.float32)
    op_module._log_choice.cache_clear()
    with caplog.at_level(logging.INFO, logger=op_module.__name__):
        for _ in range(2):
            bd3lm_attention(q, k, v, seq_len=4, block_size=2, implementation="reference")
    assert [r.getMessage() for r in caplog.records] == ["bd3lm_attention: using the reference implementation"]


@pytest.mark.any_device
def test_bd3lm_attention_reference_mask_is_spec_example() -> None:
    """The reference's mask is docs/method.md §2.3's (worked example L=4, K=2); key-lengths rows/columns of padding are off."""
    mask = reference_mask(num_tokens=8, seq_len=4, block_size=2, clean_first=False, key_lens=None, device="cpu")
    assert torch.equal(mask, dense_bd3lm_mask(4, 2))
    lens_mask = reference_mask(num_tokens=4, seq_len=None, block_size=None, clean_first=False,
                               key_lens=torch.tensor([3]), device="cpu")
    assert lens_mask[0, 0].int().tolist() == [[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


BAD_ARGS = [
    pytest.param({"q": _t(2, 8, 16)}, "q must be a 4-D tensor", id="q-3d"),
    pytest.param({"k": _t(1, 2, 8, 16, dtype=torch.int32)}, "k.dtype=torch.int32", id="k-int"),
    pytest.param({"v": _t(1, 2, 8, 16, dtype=torch.float16)}, "share one dtype", id="v-dtype"),
    pytest.param({"k": _t(1, 3, 8, 16), "v": _t(1, 3, 8, 16)}, "multiple of the KV heads", id="gqa"),
    pytest.param({"k": _t(1, 2, 6, 16), "v": _t(1, 2, 6, 16)}, r"expected \[B=1, H_kv, T=8", id="k-tokens"),
    pytest.param({"seq_len": 3, "block_size": 1}, "T = 2 \\* seq_len = 6", id="seq-len"),
    pytest.param({"block_size": 3}, "multiple of block_size=3", id="block-size"),
    pytest.param({"key_lens": torch.tensor([4])}, "must be left at None", id="key-lens-with-bd3lm"),
    pytest.param({"seq_len": None, "block_size": None, "key_lens": torch.tensor([4.0])}, "int32/int64", id="key-lens-dtype"),
    pytest.param({"seq_len": None, "block_size": None, "key_lens": torch.tensor([4, 4])}, r"\[B=1\]", id="key-lens-shape"),
    pytest.param({"q": _t(1, 4, 8, 24), "k": _t(1, 2, 8, 24), "v": _t(1, 2, 8, 24)}, "Dh=24", id="head-dim"),
    pytest.param({"implementation": "cuda"}, "implementation='cuda'", id="implementation"),
]


@pytest.mark.any_device
@pytest.mark.parametrize("override, message", BAD_ARGS)
def test_bd3lm_attention_rejects_bad_inputs(override, message) -> None:
    args = {"q": _t(1, 4, 8, 16), "k": _t(1, 2, 8, 16), "v": _t(1, 2, 8, 16), "seq_len": 4, "block_size": 2}
    args.update(override)
    with pytest.raises(ValueError, match=message):
        bd3lm_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@triton.jit
def _ranges_probe_kernel(out_ptr, key_lens_ptr, num_tokens, seq_len, block_size, TILE: tl.constexpr,
                         OTHER: tl.constexpr, CLEAN_FIRST: tl.constexpr, HAS_KEY_LENS: tl.constexpr,
                         FOR_QUERY_TILE: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    key_len = _key_len(key_lens_ptr, b, num_tokens, HAS_KEY_LENS)
    t0 = pid * TILE
    t1 = tl.minimum(t0 + TILE, num_tokens)
    if FOR_QUERY_TILE:
        r = _key_ranges(t0, t1, seq_len, block_size, key_len, OTHER, CLEAN_FIRST, HAS_KEY_LENS)
    else:
        r = _query_ranges(t0, t1, seq_len, block_size, key_len, OTHER, CLEAN_FIRST, HAS_KEY_LENS)
    base = out_ptr + (b * tl.num_programs(0) + pid) * 6
    tl.store(base + 0, r[0])
    tl.store(base + 1, r[1])
    tl.store(base + 2, r[2])
    tl.store(base + 3, r[3])
    tl.store(base + 4, r[4])
    tl.store(base + 5, r[5])


def _probe(*, tokens, seq_len, block_size, key_lens, tile, other, clean_first, for_query_tile) -> torch.Tensor:
    batch = 1 if key_lens is None else key_lens.numel()
    n_tiles = triton.cdiv(tokens, tile)
    out = torch.full((batch, n_tiles, 6), -1, dtype=torch.int32)
    _ranges_probe_kernel[(n_tiles, batch)](
        out, key_lens if key_lens is not None else out, tokens, seq_len, block_size, TILE=tile, OTHER=other,
        CLEAN_FIRST=clean_first, HAS_KEY_LENS=key_lens is not None, FOR_QUERY_TILE=for_query_tile,
    )
    return out


def _check_tiles(
    allowed_TT: torch.Tensor, ranges: torch.Tensor, *, tile: int, other: int, for_query_tile: bool, seq_len: int
) -> None:
    """Visited = exactly the indices some row of the tile needs; full ranges all-allowed and whole tiles.

    One allowance: a key tile straddling the two copies (L not a multiple of the tile) of order x0_xt
    needs x_t queries from two disjoint block ranges; the kernel visits the gap too (masked, so correct).
    """
    tokens = allowed_TT.shape[0]
    # Forward/dQ: (full, masked, masked); dK/dV: (masked, full, masked, full), as [lo, hi) pairs.
    bounds = [0, 1, 2, 3, 4, 5] if for_query_tile else [0, 1, 1, 2, 3, 4, 4, 5]
    full = [True, False, False] if for_query_tile else [False, True, False, True]
    for i, r in enumerate(ranges.tolist()):
        t0, t1 = i * tile, min((i + 1) * tile, tokens)
        block = allowed_TT[t0:t1] if for_query_tile else allowed_TT[:, t0:t1].T  # [tile rows, other index]
        visited = torch.zeros(tokens, dtype=torch.int64)
        for j, is_full in enumerate(full):
            lo, hi = r[bounds[2 * j]], r[bounds[2 * j + 1]]
            assert 0 <= lo <= hi <= tokens, (i, r)
            visited[lo:hi] += 1
            if is_full:
                assert (hi - lo) % other == 0, f"tile {i}: full range {lo}..{hi} is not whole {other}-tiles"
                assert block[:, lo:hi].all(), f"tile {i}: full range {lo}..{hi} holds masked pairs"
        assert visited.max() <= 1, f"tile {i}: ranges overlap {r}"
        needed = block.any(dim=0)
        msg = f"tile {i} [{t0}, {t1}): ranges {r}, needed {needed.nonzero().flatten().tolist()}"
        if not for_query_tile and t0 < seq_len < t1:
            assert (visited.bool() | ~needed).all(), msg
        else:
            assert torch.equal(visited.bool(), needed), msg


def _tile_shapes(for_query_tile: bool) -> list[tuple[int, int]]:
    """(own tile, other tile) of every GPU autotune config plus small interpreter-sized ones."""
    if for_query_tile:
        configs = kernel_module._FWD_CONFIGS + kernel_module._DQ_CONFIGS
        shapes = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in configs}
    else:
        shapes = {(c.kwargs["BLOCK_N"], c.kwargs["BLOCK_M"]) for c in kernel_module._DKDV_CONFIGS}
    return sorted(shapes | {(16, 16), (32, 16), (16, 32)})


@pytest.mark.parametrize("for_query_tile", [True, False], ids=["fwd-dq", "dkdv"])
@pytest.mark.parametrize("seq_len, block_size", [(8, 4), (24, 8), (24, 4), (16, 16), (40, 8), (96, 32), (128, 32)])
def test_bd3lm_attention_tile_ranges(seq_len, block_size, for_query_tile) -> None:
    """The tile-skipping arithmetic, for every tile shape the autotuner may pick and both orders."""
    for tile, other in _tile_shapes(for_query_tile):
        for clean_first in (False, True):
            allowed = dense_bd3lm_mask(seq_len, block_size, clean_first=clean_first)[0, 0]
            ranges = _probe(tokens=2 * seq_len, seq_len=seq_len, block_size=block_size, key_lens=None, tile=tile,
                            other=other, clean_first=clean_first, for_query_tile=for_query_tile)
            _check_tiles(allowed, ranges[0], tile=tile, other=other, for_query_tile=for_query_tile, seq_len=seq_len)


@pytest.mark.parametrize("for_query_tile", [True, False], ids=["fwd-dq", "dkdv"])
def test_bd3lm_attention_tile_ranges_key_lens(for_query_tile) -> None:
    tokens = 72
    key_lens = torch.tensor([72, 64, 41, 16, 1, 0, 100, -3], dtype=torch.int32)  # incl. out-of-range values
    for tile, other in _tile_shapes(for_query_tile):
        ranges = _probe(tokens=tokens, seq_len=tokens, block_size=tokens, key_lens=key_lens, tile=tile, other=other,
                        clean_first=False, for_query_tile=for_query_tile)
        allowed = reference_mask(num_tokens=tokens, seq_len=None, block_size=None, clean_first=False,
                                 key_lens=key_lens.clamp(0, tokens), device="cpu")
        for b in range(key_lens.numel()):
            _check_tiles(allowed[b, 0], ranges[b], tile=tile, other=other, for_query_tile=for_query_tile,
                         seq_len=tokens)


def _compile_for_sm90() -> None:
    """Compile each kernel (first GPU config, bf16, Dh=128, BD3LM) for sm_90 without a GPU; run with the
    interpreter off (the interpreter never runs Triton's type checks and MLIR lowering)."""
    from triton.backends.compiler import GPUTarget

    def compile_kernel(fn, config, consts):
        consts = {**consts, **config.kwargs}
        signature = {}
        for name in fn.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name == "key_lens_ptr":
                signature[name] = "*i64"
            elif name in ("lse_ptr", "delta_ptr"):
                signature[name] = "*fp32"
            elif name.endswith("_ptr"):
                signature[name] = "*bf16"
            else:
                signature[name] = "fp32" if "scale" in name else "i32"
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
        return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)

    consts = {"HEAD_DIM": 128, "GROUP": 2, "CLEAN_FIRST": False, "HAS_KEY_LENS": False, "ACC_DTYPE": tl.float32,
              "DOT_PRECISION": "tf32"}
    for kernel in (kernel_module._bd3lm_attention_fwd_kernel, kernel_module._bd3lm_attention_bwd_dq_kernel,
                   kernel_module._bd3lm_attention_bwd_dkdv_kernel):
        compiled = compile_kernel(kernel.fn, kernel.configs[0], consts)
        assert compiled.metadata.shared <= 228 * 1024, (kernel.fn.__name__, compiled.metadata.shared)
    # The teachers' mode (--teacher.attn_implementation=tide_bd3lm): key lengths, forward only (no gradient).
    forward = kernel_module._bd3lm_attention_fwd_kernel
    compile_kernel(forward.fn, forward.configs[0], {**consts, "HAS_KEY_LENS": True})
    compile_kernel(kernel_module._bd3lm_attention_bwd_preprocess_kernel, triton.Config({"BLOCK_M": 64}),
                   {"HEAD_DIM": 128, "ACC_DTYPE": tl.float32})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA tests run the compiled kernels")
def test_bd3lm_attention_compiles_for_sm90() -> None:
    """The GPU path at least compiles (types, layouts, shared memory) on a machine without a GPU."""
    assert_compiles_without_interpreter("tests.kernels.test_bd3lm_attention")


@pytest.mark.any_device
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_bd3lm_attention_student_shape_cuda(dtype, head_dim) -> None:
    """Compiled kernels at the student's geometry (L=512, K=32, 16/8 heads) against a float64 reference."""
    generator = torch.Generator().manual_seed(0)
    q, k, v, g = _qkv(generator, batch=2, heads=16, kv_heads=8, tokens=1024, head_dim=head_dim, dtype=dtype,
                      device="cuda", layout="BTHD")
    for clean_first in (False, True):
        mask = {"seq_len": 512, "block_size": 32, "clean_first": clean_first}
        _assert_matches(_reference64(q, k, v, g, **mask), _run(bd3lm_attention, q, k, v, g, **mask), dtype)


@pytest.mark.any_device
@needs_cuda
def test_bd3lm_attention_key_lens_cuda() -> None:
    generator = torch.Generator().manual_seed(0)
    key_lens = torch.tensor([1000, 513, 0, 1], device="cuda")
    q, k, v, g = _qkv(generator, batch=4, heads=16, kv_heads=4, tokens=1000, head_dim=128, dtype=torch.bfloat16,
                      device="cuda", layout="BTHD")
    _assert_matches(_reference64(q, k, v, g, key_lens=key_lens), _run(bd3lm_attention, q, k, v, g, key_lens=key_lens),
                    torch.bfloat16)
