"""Triton kernels vs their PyTorch references, run on CPU through the Triton interpreter.

Shapes are tiny on purpose: the interpreter costs about 2 ms per program instance.
"""

import os
import subprocess
import sys

# Must precede the first import of triton / vtprune.kernels: Triton decides at decoration time
# whether a kernel is interpreted (tests/conftest.py sets it too).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import vtprune.kernels as K  # noqa: E402
from vtprune.kernels import attention_scores, dispatch, gather, ragged_attention, visual_attention  # noqa: E402

if (
    os.environ.get("TRITON_INTERPRET") != "1"
    or type(gather._gather_rows_kernel).__name__ != "InterpretedFunction"
):
    pytest.skip("run with TRITON_INTERPRET=1 set before vtprune.kernels is imported", allow_module_level=True)

# (atol, rtol) of a kernel output against the reference, per input dtype. fp32: summation order
# only. fp16: p is rounded to fp16 before p @ v (as flash attention does). bf16: the interpreter
# truncates fp32 -> bf16 stores (torch rounds), so allow 1 ulp = 2**-7 relative plus rounding.
TOL = {
    torch.float32: (2e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 1.6e-2),
}
# Scores are fp32 outputs of products of the (exact) inputs: tight for every input dtype.
SCORE_TOL = (1e-5, 1e-4)
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def _default_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


def _close(out, ref, tol):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    torch.testing.assert_close(out.float(), ref.float(), atol=tol[0], rtol=tol[1])


def _rand(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


# ---------------------------------------------------------------- gather


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "index",
    [
        [[0, 3, 6, -1], [6, 5, -1, -1]],  # padding slots in both rows
        [[0], [-1]],  # a single token; one row fully padded
        [[1, 1, 4, 2, 0], [6, 6, 6, 6, 6]],  # repeats
    ],
)
def test_gather_rows(dtype, index):
    torch.manual_seed(0)
    index = torch.tensor(index)
    hidden, cos, sin = _rand(2, 7, 13, dtype=dtype), _rand(1, 7, 6, dtype=dtype), _rand(1, 7, 6, dtype=dtype)
    keys = _rand(2, 3, 7, 5, dtype=dtype)
    values = _rand(2, 3, 5, 7, dtype=dtype).transpose(2, 3)  # non-contiguous cache layer
    inputs = [hidden, cos, sin, keys, values, hidden.float()]
    outs = K.gather_rows(inputs, index, backend="triton")
    for out, ref in zip(outs, K.gather_rows_ref(inputs, index)):
        assert torch.equal(out, ref)  # a copy: bit exact in every dtype
    assert torch.equal(outs[0][index == -1], torch.zeros_like(outs[0][index == -1]))


def test_gather_rows_single_tensor_and_errors():
    x, index = torch.randn(2, 9, 4), torch.tensor([[8, 0], [3, -1]])
    out = K.gather_rows(x, index, backend="triton")
    assert isinstance(out, torch.Tensor) and torch.equal(out, K.gather_rows_ref([x], index)[0])
    with pytest.raises(ValueError, match="int64"):
        K.gather_rows(x, index.int())
    with pytest.raises(ValueError, match="sequence length"):
        K.gather_rows([x, torch.randn(2, 8, 4)], index)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [13, 33])
def test_gather_rows_rmsnorm(dtype, width):
    torch.manual_seed(1)
    hidden, weight = _rand(2, 7, width, dtype=dtype), _rand(width, dtype=dtype)
    index = torch.tensor([[6, 0, 2], [1, -1, -1]])
    got = K.gather_rows_rmsnorm(hidden, index, weight, 1e-6, backend="triton")
    ref = K.gather_rows_rmsnorm_ref(hidden, index, weight, 1e-6)
    assert torch.equal(got[0], ref[0])
    _close(got[1], ref[1], TOL[dtype])
    assert not got[1][1, 1:].any()


# ---------------------------------------------------------------- attention scores

SCORE_CASES = [  # (B, H, H_kv, Q, L, D)
    (2, 4, 4, 3, 13, 24),
    (2, 4, 2, 1, 7, 16),
    (1, 4, 1, 2, 33, 8),
    (1, 2, 2, 1, 1, 16),
]


def _padding(batch, length):
    key_valid = torch.ones(batch, length, dtype=torch.bool)
    key_valid[0, : min(2, length - 1)] = False  # left padding in row 0
    return key_valid


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SCORE_CASES)
def test_query_key_probs(dtype, case):
    b, h, h_kv, nq, length, d = case
    torch.manual_seed(2)
    q, k = _rand(b, h, nq, d, dtype=dtype), _rand(b, h_kv, length, d, dtype=dtype)
    key_valid = _padding(b, length)
    query_pos = torch.randint(0, length, (b, nq))
    query_pos[:, -1] = length - 1
    if nq > 1:
        query_pos[0, 0] = -1  # a padding query: all zeros
    got = K.query_key_probs(q, k, key_valid, query_pos, d**-0.5, backend="triton")
    ref = K.query_key_probs_ref(q, k, key_valid, query_pos, d**-0.5)
    _close(got, ref, SCORE_TOL)
    assert got.dtype == torch.float32 and not got[:, :, ~key_valid[0]][0].any()
    if length > 3 and dtype == torch.float32:
        part = K.query_key_probs(
            q, k, key_valid, query_pos, d**-0.5, key_range=(2, length - 1), backend="triton"
        )
        _close(part, ref[..., 2 : length - 1], SCORE_TOL)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "case", [(2, 4, 2, 13, 13, 16), (1, 4, 1, 5, 33, 8), (1, 2, 2, 1, 1, 16), (2, 2, 1, 7, 7, 24)]
)
def test_key_attention_colsum(dtype, case):
    b, h, h_kv, nq, length, d = case
    torch.manual_seed(3)
    q, k = _rand(b, h, nq, d, dtype=dtype), _rand(b, h_kv, length, d, dtype=dtype)
    key_valid = _padding(b, length)
    query_valid = key_valid[:, length - nq :].clone()
    query_valid[-1, 0] = False
    got = K.key_attention_colsum(q, k, key_valid, query_valid, d**-0.5, backend="triton")
    ref = K.key_attention_colsum_ref(q, k, key_valid, query_valid, d**-0.5)
    _close(got, ref, (SCORE_TOL[0] * nq, SCORE_TOL[1]))
    torch.testing.assert_close(got.sum(1), query_valid.sum(1).float())  # each query's row sums to 1


def test_scores_with_several_blocks(monkeypatch):
    # 16-wide tiles: the causal loop bounds and the colsum's first-query-tile skip are exercised.
    monkeypatch.setattr(attention_scores, "_BLOCKS", (16, 16))
    torch.manual_seed(9)
    q, k = torch.randn(2, 2, 37, 8), torch.randn(2, 1, 40, 8)
    key_valid = _padding(2, 40)
    query_pos = torch.tensor([[39] * 36 + [20], list(range(3, 40))])
    got = K.query_key_probs(q, k, key_valid, query_pos, 0.3, key_range=(5, 38), backend="triton")
    _close(got, K.query_key_probs_ref(q, k, key_valid, query_pos, 0.3, (5, 38)), SCORE_TOL)
    got = K.key_attention_colsum(q, k, key_valid, None, 0.3, backend="triton")
    _close(got, K.key_attention_colsum_ref(q, k, key_valid, key_valid[:, 3:], 0.3), (1e-4, 1e-4))


# ---------------------------------------------------------------- ragged / masked attention


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads,causal", [((4, 4), True), ((4, 2), False), ((4, 1), True)])
def test_varlen_attention(dtype, heads, causal):
    torch.manual_seed(4)
    cu = torch.tensor([0, 1, 8, 8, 21], dtype=torch.int32)  # lengths 1, 7, 0, 13
    q, k, v = (
        _rand(21, heads[0], 24, dtype=dtype),
        _rand(21, heads[1], 24, dtype=dtype),
        _rand(21, heads[1], 24, dtype=dtype),
    )
    got = K.varlen_attention(q, k, v, cu, 0.2, causal, backend="triton")
    _close(got, K.varlen_attention_ref(q, k, v, cu, 0.2, causal), TOL[dtype])


def test_varlen_attention_several_blocks(monkeypatch):
    monkeypatch.setattr(ragged_attention, "_BLOCKS", (16, 16))
    torch.manual_seed(10)
    cu = torch.tensor([0, 33, 34, 41])  # 3 query tiles for the first sequence, early exits for the rest
    q, k, v = torch.randn(41, 2, 16), torch.randn(41, 1, 16), torch.randn(41, 1, 16)
    for causal in (True, False):
        got = K.varlen_attention(q, k, v, cu, 0.25, causal, backend="triton")
        _close(got, K.varlen_attention_ref(q, k, v, cu, 0.25, causal), TOL[torch.float32])


def _qkv(b, h, h_kv, lq, lk, d, dtype):
    return (
        _rand(b, h, lq, d, dtype=dtype),
        _rand(b, h_kv, lk, d, dtype=dtype),
        _rand(b, h_kv, lk, d, dtype=dtype),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prefix", [None, 1])
def test_visual_window_attention(dtype, prefix):
    torch.manual_seed(5)
    q, k, v = _qkv(2, 4, 2, 19, 19, 16, dtype)  # 3 text + a 3x4 grid + 4 text (row 1: 1 pad)
    key_valid = torch.ones(2, 19, dtype=torch.bool)
    key_valid[1, 0] = False
    start = torch.tensor([3, 2])
    args = (q, k, v, start, 3, 4, 3, 0.25, prefix, key_valid)
    _close(
        K.visual_window_attention(*args, backend="triton"), K.visual_window_attention_ref(*args), TOL[dtype]
    )


@pytest.mark.parametrize("window", [1, 3, 5])
def test_visual_window_attention_skips_blocks(monkeypatch, window):
    # 16-wide tiles over a 6x6 grid: the all-visual query tile [16, 32) takes the prefix + band path.
    monkeypatch.setattr(visual_attention, "_BLOCKS", (16, 16))
    torch.manual_seed(6)
    q, k, v = _qkv(1, 2, 1, 43, 43, 16, torch.float32)  # 3 text + a 6x6 grid + 4 text
    got = K.visual_window_attention(q, k, v, 3, 6, 6, window, 0.25, backend="triton")
    ref = K.visual_window_attention_ref(q, k, v, 3, 6, 6, window, 0.25)
    _close(got, ref, TOL[torch.float32])
    decode = K.visual_window_attention(q[:, :, -2:], k, v, 3, 6, 6, window, 0.25, backend="triton")
    _close(decode, ref[:, :, -2:], TOL[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lq", [19, 3])
def test_head_masked_attention(dtype, lq):
    torch.manual_seed(7)
    q, k, v = _qkv(2, 4, 1, lq, 19, 16, dtype)
    key_valid = torch.ones(2, 19, dtype=torch.bool)
    key_valid[0, :2] = False
    head_mask = torch.tensor([True, False, False, True])
    args = (q, k, v, torch.tensor([3, 0]), 12, head_mask, 0.25, key_valid)  # row 1: image first
    _close(K.head_masked_attention(*args, backend="triton"), K.head_masked_attention_ref(*args), TOL[dtype])


def test_head_masked_attention_skips_blocks(monkeypatch):
    monkeypatch.setattr(visual_attention, "_BLOCKS", (16, 16))
    q, k, v = _qkv(1, 2, 2, 71, 71, 16, torch.float32)
    args = (q, k, v, 3, 64, torch.tensor([False, True]), 0.25)
    _close(
        K.head_masked_attention(*args, backend="triton"),
        K.head_masked_attention_ref(*args),
        TOL[torch.float32],
    )


# ---------------------------------------------------------------- dispatch, custom ops


def test_dispatch_defaults_to_reference_on_cpu(monkeypatch):
    x = torch.zeros(2)
    assert dispatch.resolve_backend(x) == "reference"
    assert dispatch.resolve_backend(x, backend="triton") == "triton"  # interpreter on

    class OnCuda:
        device = torch.device("cuda")

    assert dispatch.resolve_backend(OnCuda(), backend=None) == "triton"
    monkeypatch.setattr(gather, "_gather_rows_triton", _fail)
    index = torch.tensor([[1, 0]])
    assert torch.equal(K.gather_rows(torch.ones(1, 3, 2), index), torch.ones(1, 2, 2))
    with pytest.raises(AssertionError, match="Triton path"):
        K.gather_rows(torch.ones(1, 3, 2), index, backend="triton")


def _fail(*args):
    raise AssertionError("the Triton path was taken")


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")

    class OnCuda:
        device = torch.device("cuda")

    assert dispatch.resolve_backend(OnCuda(), backend="triton") == "reference"
    monkeypatch.setattr(attention_scores, "_lse_triton", _fail)
    q, k = torch.randn(1, 2, 1, 8), torch.randn(1, 2, 5, 8)
    K.query_key_probs(q, k, None, torch.tensor([[4]]), 0.3, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        dispatch.resolve_backend(q, backend="cuda")
    monkeypatch.setenv(dispatch.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="VTPRUNE_KERNELS"):
        dispatch.resolve_backend(q)


def test_import_does_not_initialise_cuda():
    assert not torch.cuda.is_initialized()
    assert set(K.__all__) <= set(dir(K))


def test_reference_path_without_triton():
    # Where Triton is missing (macOS, Windows) the modules still import and the references run.
    # The kernels folder is loaded as a stand-alone package: importing vtprune costs seconds.
    code = (
        "import importlib.util, sys; sys.modules['triton'] = None\n"
        f"path = {os.path.dirname(K.__file__)!r}\n"
        "spec = importlib.util.spec_from_file_location('vtk', path + '/__init__.py', submodule_search_locations=[path])\n"
        "K = sys.modules['vtk'] = importlib.util.module_from_spec(spec); spec.loader.exec_module(K)\n"
        "import torch, vtk._triton\n"
        "assert not vtk._triton.HAS_TRITON\n"
        "assert K.gather_rows(torch.randn(1, 4, 8), torch.tensor([[3, -1]])).shape == (1, 2, 8)\n"
        "try:\n"
        "    K.gather_rows(torch.randn(1, 4, 8), torch.tensor([[3]]), backend='triton')\n"
        "except RuntimeError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise AssertionError('triton backend accepted without Triton')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def _compiled_pipeline(hidden, cos, index, q, k, key_valid):
    g, c = K.gather_rows([hidden, cos], index)
    probs = K.query_key_probs(q, k, key_valid, index[:, -1:], 0.5, key_range=(1, 5))
    colsum = K.key_attention_colsum(q.expand(-1, -1, 6, -1), k, key_valid, None, 0.5)
    cu = torch.tensor([0, 2, 6])
    var = K.varlen_attention(
        q[0].transpose(0, 1).expand(6, -1, -1),
        k[0].transpose(0, 1),
        k[0].transpose(0, 1),
        cu,
        0.5,
        max_seqlen=4,
    )
    win = K.visual_window_attention(q, k, k, 1, 2, 2, 1, 0.5)
    heads = K.head_masked_attention(q, k, k, 1, 4, torch.tensor([True, False]), 0.5)
    return g.sum() + c.sum() + probs.sum() + colsum.sum() + var.sum() + win.sum() + heads.sum()


def test_custom_ops_under_torch_compile():
    torch._dynamo.reset()
    torch.manual_seed(8)
    args = (
        torch.randn(2, 6, 8),
        torch.randn(1, 6, 4),
        torch.tensor([[0, 2, 5], [1, 4, -1]]),
        torch.randn(2, 2, 1, 4),
        torch.randn(2, 2, 6, 4),
        torch.ones(2, 6, dtype=torch.bool),
    )
    expected = _compiled_pipeline(*args)
    # aot_eager traces every op through its fake implementation without a C++ toolchain.
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_compiled_pipeline, backend=counter, fullgraph=False)
    torch.testing.assert_close(compiled(*args), expected)
    traced = {str(n.target) for g in counter.graphs for n in g.graph.nodes if "vtprune" in str(n.target)}
    assert counter.frame_count == 1 and len(traced) == 6, traced  # one graph, no break at our ops


def test_bench_smoke_and_no_gpu(tmp_path, capsys):
    from vtprune.kernels import bench

    out = tmp_path / "bench.csv"
    assert bench.main(["--smoke", "--ops", "gather", "--out", str(out)]) == 0
    rows = out.read_text().splitlines()
    assert rows[0].startswith("op,case,impl") and len(rows) == 1 + 3 * 2
    assert dispatch.ENV_VAR not in os.environ
    if not torch.cuda.is_available():
        assert bench.main([]) == 0 and "No CUDA GPU" in capsys.readouterr().out


def _opcheck_cases():
    q, k, ones = torch.randn(1, 2, 6, 8), torch.randn(1, 1, 6, 8), torch.ones(1, 6, dtype=torch.bool)
    start = torch.tensor([1])
    return {
        "gather_rows": ([torch.randn(2, 5, 8), torch.randn(1, 5, 4)], torch.tensor([[0, 4], [2, -1]])),
        "gather_rows_rmsnorm": (torch.randn(2, 5, 8), torch.tensor([[0, 4], [2, -1]]), torch.randn(8), 1e-6),
        "query_key_probs": (q[:, :, :2], k, ones, torch.tensor([[2, 5]]), 0.3, 1, 4),
        "key_attention_colsum": (q, k, ones, ones, 0.3),
        "varlen_attention": (q[0].transpose(0, 1), k[0].transpose(0, 1), k[0].transpose(0, 1), torch.tensor([0, 2, 6]), 0.3, True, 4),
        "visual_window_attention": (q, k, k, start, 2, 2, 1, 0.3, start, ones),
        "head_masked_attention": (q, k, k, start, 4, torch.tensor([True, False]), 0.3, None),
    }  # fmt: skip


@pytest.mark.parametrize("op", list(_opcheck_cases()))
def test_custom_op_opcheck(op):
    # Schema and fake (meta) implementation agree with the real op (reference backend on CPU).
    args = (*_opcheck_cases()[op], "reference")
    torch.library.opcheck(
        getattr(torch.ops.vtprune, op).default, args, test_utils=("test_schema", "test_faketensor")
    )
