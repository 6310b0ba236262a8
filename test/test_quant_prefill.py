"""
The many-row (prefill) kernels: int8-quantised rows times Q4_1 blocks or int8 weights.

Tolerance: the only approximation is the activations' rounding to int8 per block of 32 (the
weights are used exactly as stored). A row's block b is stored as d·q with d = max|x_b| / 127
and |x - d·q| <= d / 2; a block that also gets its residual pass (``outlier``) is within d / 256
(d / 512 by rounding, d / 256 where the residual code clamps at 127). So an output differs from
``x @ W_deq^T`` by at most sum_b err_b · sum_{k in b} |w_k|; that bound (plus fp32 summation
slack) is what ``errors`` measures, elementwise. Beside it the relative error of plain int8 stays
under 2 % (~0.5 % for Gaussian rows, ~1 % with an outlier channel that takes a block's range;
4-bit weights themselves cost ~8 %), and with every block twice under 1e-4.
"""

import json
import os

from conftest import run_python
import pytest
from timebill_ros.core import kernels
from timebill_ros.core import weights as W
import torch

K = kernels.load()
needs_kernels = pytest.mark.skipif(K is None, reason=f'kernels off: {kernels.why_not()}')
ROWS = (1, 7, 9, 64, 300)
SHAPES = ((40, 64), (100, 160), (136, 896), (33, 4864 // 4))  # (N, K): N not a tile multiple
# outlier threshold -> (per-block error in steps of d, relative error cap); 8: some blocks twice
OUTLIERS = {float('inf'): (1 / 2, 0.02), 8.0: (1 / 2, 0.02), 0.0: (1 / 256, 1e-4)}


def bound(x, w, err=0.5):
    """Return the elementwise error bound of int8 rows (block error ``err`` · d) times ``w``."""
    m, k = x.shape
    block_err = x.reshape(m, k // 32, 32).abs().amax(-1) / 127 * err
    wabs = w.abs().reshape(w.shape[0], k // 32, 32).sum(-1)
    slack = 1e-5 * (x.abs() @ w.abs().t()) + 1e-6  # fp32 sums in another order
    return block_err @ wabs.t() * 1.001 + slack


def errors(x, y, w, err=0.5):
    """Return (largest error / bound, relative Frobenius error) of ``y`` vs ``x @ w^T``."""
    ref = x @ w.t()
    over = float(((y - ref).abs() / bound(x, w, err)).max())
    return over, float((y - ref).norm() / ref.norm().clamp(min=1e-30))


def split_equal(kern, x, *weights) -> bool:
    """Tell whether rows computed in uneven groups equal the same rows in one call, bitwise."""
    fn = kern.q4_1_gemm if len(weights) == 3 else kern.q8_gemm
    whole = fn(x, *weights, 8.0)
    parts = torch.cat([fn(x[a:b].contiguous(), *weights, 8.0)
                       for a, b in ((0, 1), (1, 8), (8, 21), (21, len(x)))])
    return torch.equal(whole, parts)


def check_all(kern):
    """Run both GEMMs over ROWS x SHAPES x OUTLIERS; return {case: (error / bound, rel)}."""
    out = {}
    g = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        q4 = W.Int4Linear.quantize(torch.randn(n, k, generator=g) * 0.1)
        q8 = W.Int8Linear(torch.randn(n, k, generator=g), None)
        for m in ROWS:
            x = torch.randn(m, k, generator=g) * 3
            x[:, 5] *= 40  # an outlier channel, as LLM activations have
            for outlier, (err, _) in OUTLIERS.items():
                y4 = kern.q4_1_gemm(x, q4.q4_blocks, q4.q4_d, q4.q4_m, outlier)
                y8 = kern.q8_gemm(x, q8.qweight, q8.scale32, outlier)
                out[f'q4 {m}x{k}x{n} outlier {outlier}'] = errors(x, y4, q4.dequantized(), err)
                out[f'q8 {m}x{k}x{n} outlier {outlier}'] = errors(x, y8, q8.dequantized(), err)
        x = torch.randn(300, k, generator=g)
        x[::3, 5] *= 40  # some rows' blocks take the residual pass, their neighbours' not
        out[f'split {k}x{n}'] = (
            split_equal(kern, x, q4.q4_blocks, q4.q4_d, q4.q4_m)
            and split_equal(kern, x, q8.qweight, q8.scale32)
        )
    return out


@needs_kernels
@pytest.mark.parametrize('isa', ['avx2', 'avx512'])
def test_each_variant_this_cpu_runs_stays_within_the_activation_rounding(isa):
    # each variant in its own process (load() keeps one per process), as test_kernels does
    if isa not in kernels.cpu_isas():
        pytest.skip(f'this CPU does not run {isa}')
    code = (
        'import json, sys\n'
        'sys.path.insert(0, sys.argv[1])\n'
        'from timebill_ros.core import kernels\n'
        'import test_quant_prefill as t\n'
        'print(json.dumps([kernels.origin(), t.check_all(kernels.load())]))\n'
    )
    run = run_python(code, os.path.dirname(__file__), TIMEBILL_KERNELS_ISA=isa)
    info, result = json.loads(run.stdout.splitlines()[-1])
    assert info['isa'] == isa
    split = {case: result.pop(case) for case in list(result) if case.startswith('split')}
    assert split and all(split.values()), split  # a row's result is its own, however grouped
    assert len(result) == 2 * len(ROWS) * len(SHAPES) * len(OUTLIERS)
    for case, (over, rel) in result.items():
        assert over <= 1.0, (case, over)
        assert rel < OUTLIERS[float(case.split()[-1])][1], (case, rel)


@needs_kernels
@pytest.mark.parametrize('rows', [9, 64])
def test_layers_take_the_many_row_kernel_without_a_dense_copy(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(48, 96, generator=g) * 0.1, torch.randn(48, generator=g)
    layer = W.Int4Linear.quantize(w, b)
    assert layer.dense is None
    x = torch.randn(2, rows, 96, generator=g)
    deq = layer.dequantized()
    y = layer(x)
    assert y.shape == (2, rows, 48) and y.dtype == x.dtype
    x2 = x.reshape(-1, 96)
    direct = K.q4_1_gemm(x2, layer.q4_blocks, layer.q4_d, layer.q4_m, W.PREFILL_OUTLIER) + b
    assert torch.equal(y.reshape(-1, 48), direct)
    assert (((y.reshape(-1, 48) - b) - x2 @ deq.t()).abs() <= bound(x2, deq)).all()
    head = W.Int8Linear(torch.randn(40, 96, generator=g), None)
    assert torch.equal(head(x2), K.q8_gemm(x2, head.qweight, head.scale32, W.PREFILL_OUTLIER))
    # bf16 activations go through the same kernels (cast to fp32 at the boundary)
    yb = layer(x.bfloat16()).float()
    assert float((yb - y).norm() / y.norm()) < 0.02


@needs_kernels
def test_auto_keeps_no_dense_copy_where_the_kernels_run():
    assert W.prefill_dtype('auto') is None
    assert W.prefill_dtype('none') is None
    assert W.prefill_dtype('fp32') is torch.float32 and W.prefill_dtype('bf16') is torch.bfloat16
    layer = W.Int4Linear.quantize(torch.randn(32, 64), dense=W.prefill_dtype('auto'))
    assert layer.dense is None


@needs_kernels
def test_bad_inputs_are_refused_by_name():
    layer = W.Int4Linear.quantize(torch.randn(64, 64) * 0.1)
    blocks, d, m = layer.q4_blocks, layer.q4_d, layer.q4_m
    x = torch.randn(20, 64)
    meta = {'device': 'meta'}
    cases = [
        (lambda: K.q4_1_gemm(x.to(**meta), blocks, d, m), 'x must be a CPU tensor, got one on'),
        (lambda: K.q4_1_gemm(x, blocks.to(**meta), d, m), 'Q4_1 blocks must be a CPU tensor'),
        (lambda: K.q4_1_gemm(x, blocks, d, m.to(**meta)), 'Q4_1 m must be a CPU tensor'),
        (lambda: K.q4_1_gemm(x.double(), blocks, d, m), 'x must be fp32'),
        (lambda: K.q4_1_gemm(x.t().contiguous().t(), blocks, d, m), r'x must be \[M, 64\]'),
        (lambda: K.q4_1_gemm(x[:, :40].contiguous(), blocks, d, m), r'x must be \[M, 64\]'),
        (lambda: K.q4_1_gemm(x, blocks.view(torch.int8), d, m), 'blocks: contiguous uint8'),
        (lambda: K.q4_1_gemm(x, blocks, d.half(), m), 'd and m must be fp32'),
        (lambda: K.q8_gemm(x, torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, **meta)),
         'scale must be a CPU tensor'),
        (lambda: K.q8_gemm(x, torch.zeros(4, 64), torch.ones(4)), 'w must be int8'),
        (lambda: K.q8_gemm(torch.randn(3, 40), torch.zeros(4, 40, dtype=torch.int8),
                           torch.ones(4)), 'multiple of 32'),
        (lambda: K.q4_1_gemm(x, blocks, d, m, -1.0), 'outlier must be >= 0'),
    ]
    for call, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_kernels
def test_zero_rows_and_zero_activations():
    layer = W.Int4Linear.quantize(torch.randn(40, 64))
    args = (layer.q4_blocks, layer.q4_d, layer.q4_m)
    assert K.q4_1_gemm(torch.zeros(0, 64), *args).shape == (0, 40)
    zeros = K.q4_1_gemm(torch.zeros(11, 64), *args)
    assert torch.equal(zeros, torch.zeros(11, 40))  # a zero block: scale 0, no division by it
