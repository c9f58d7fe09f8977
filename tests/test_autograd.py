"""Backward passes: the data-carrying custom ops, and training through a pruned model.

The ops are checked with ``torch.autograd.gradcheck`` in float64 on tiny shapes, on the reference
path and (where they dispatch there) on the Triton path under ``TRITON_INTERPRET=1``. The model
tests use the tiny LLaVA of ``tiny.py``: PyramidDrop's training mode (``labels`` given) must
train, and pruning must not change gradients where it keeps everything.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before vtprune.kernels defines its kernels

import pytest  # noqa: E402
import tiny  # noqa: E402
import torch  # noqa: E402

import vtprune  # noqa: E402
import vtprune.kernels as K  # noqa: E402
from vtprune.kernels import dispatch  # noqa: E402

F64 = dict(dtype=torch.float64, requires_grad=True)
INDEX = torch.tensor([[0, 3, 3, -1], [4, 1, -1, -1]])  # a repeated row, padding slots
TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        os.environ.get("TRITON_INTERPRET") != "1" or not dispatch.triton_importable(),
        reason="the Triton path runs on CPU only under TRITON_INTERPRET=1 with Triton installed",
    ),
)
BACKENDS = ["reference", TRITON]


def gradcheck(fn, args, backend: str) -> bool:
    # Each interpreted Triton launch costs milliseconds: check random directional derivatives
    # there (fast mode) instead of the full Jacobian.
    return torch.autograd.gradcheck(fn, args, fast_mode=backend == "triton")


@pytest.fixture(autouse=True)
def _default_backend_env(monkeypatch):
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)


# ---------------------------------------------------------------- ops


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_rows_gradcheck(backend):
    torch.manual_seed(0)
    hidden = torch.randn(2, 5, 3, **F64)
    cos = torch.randn(1, 5, 2, **F64)  # batch 1: broadcast, its gradient sums over the batch
    keys = torch.randn(2, 2, 5, 3, **F64)  # a KV-cache layer [B, H, L, D]

    def gather(h, c, k):
        return tuple(K.gather_rows([h, c, k], INDEX, backend=backend))

    assert gradcheck(gather, (hidden, cos, keys), backend)


def test_gather_rows_gradient_is_a_scatter_add():
    x = torch.randn(2, 5, 3, requires_grad=True)
    K.gather_rows(x, INDEX).sum().backward()
    counts = torch.tensor([[1.0, 0, 0, 2, 0], [0, 1, 0, 0, 1]])  # row 3 taken twice; padding sends nothing
    torch.testing.assert_close(x.grad, counts[..., None].expand(-1, -1, 3))


@pytest.mark.parametrize("batch", [2, 1])
def test_gather_rows_rmsnorm_gradcheck(batch):
    torch.manual_seed(1)
    hidden, weight = torch.randn(batch, 5, 4, **F64), torch.randn(4, **F64)

    def fused(h, w):
        return K.gather_rows_rmsnorm(h, INDEX, w, 1e-6, backend="reference")

    assert torch.autograd.gradcheck(fused, (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gather_rows_rmsnorm_backward_matches_autograd_of_reference(backend, dtype):
    # The Triton kernel keeps its statistics in fp32 even for fp64 input, so its path is checked
    # against autograd through the (differentiable) reference instead of by gradcheck.
    torch.manual_seed(2)
    hidden = torch.randn(2, 5, 8).to(dtype).requires_grad_()
    weight = torch.randn(8).requires_grad_()
    gathered, normed = K.gather_rows_rmsnorm(hidden, INDEX, weight, 1e-6, backend=backend)
    seeds = torch.randn_like(gathered), torch.randn_like(normed)
    got = torch.autograd.grad((gathered, normed), (hidden, weight), seeds)
    ref = K.gather_rows_rmsnorm_ref(hidden, INDEX, weight, 1e-6)
    want = torch.autograd.grad(ref, (hidden, weight), seeds)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)


def _attention_cases(backend):
    q, k, v = torch.randn(1, 2, 6, 4, **F64), torch.randn(1, 1, 6, 4, **F64), torch.randn(1, 1, 6, 4, **F64)
    key_valid = torch.ones(1, 6, dtype=torch.bool)
    key_valid[0, 0] = False
    heads = torch.tensor([True, False])

    def window(q, k, v):
        return K.visual_window_attention(q, k, v, 1, 2, 2, 1, 0.5, key_valid=key_valid, backend=backend)

    def head_masked(q, k, v):
        return K.head_masked_attention(q, k, v, 1, 4, heads, 0.5, backend=backend)

    def varlen(q, k, v):
        packed = [t[0].transpose(0, 1) for t in (q, k, v)]
        return K.varlen_attention(*packed, torch.tensor([0, 2, 6]), 0.5, backend=backend)

    return {"window": window, "head_masked": head_masked, "varlen": varlen}, (q, k, v)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["window", "head_masked", "varlen"])
def test_attention_ops_gradcheck(backend, op):
    torch.manual_seed(3)
    fns, args = _attention_cases(backend)
    assert gradcheck(fns[op], args, backend)


def test_score_ops_refuse_backward_clearly():
    q, k = torch.randn(1, 2, 1, 4, requires_grad=True), torch.randn(1, 2, 5, 4)
    probs = K.query_key_probs(q, k, None, torch.tensor([[4]]), 0.5)
    with pytest.raises(RuntimeError, match="query_key_probs is not differentiable.*torch.no_grad"):
        probs.sum().backward()
    colsum = K.key_attention_colsum(q.expand(-1, -1, 5, -1), k, None, None, 0.5)
    with pytest.raises(RuntimeError, match="key_attention_colsum is not differentiable"):
        colsum.sum().backward()


def _data_op_cases():
    def grad(t):
        return t.double().requires_grad_()

    q, k = grad(torch.randn(1, 2, 6, 8)), grad(torch.randn(1, 1, 6, 8))
    ones, start = torch.ones(1, 6, dtype=torch.bool), torch.tensor([1])
    packed_q, packed_k = grad(torch.randn(6, 2, 8)), grad(torch.randn(6, 1, 8))
    index = torch.tensor([[0, 4], [2, -1]])
    return {
        "gather_rows": ([grad(torch.randn(2, 5, 8)), grad(torch.randn(1, 5, 4))], index),
        "gather_rows_rmsnorm": (grad(torch.randn(2, 5, 8)), index, grad(torch.randn(8)), 1e-6),
        "varlen_attention": (packed_q, packed_k, packed_k, torch.tensor([0, 2, 6]), 0.3, True, 4),
        "visual_window_attention": (q, k, k, start, 2, 2, 1, 0.3, start, ones),
        "head_masked_attention": (q, k, k, start, 4, torch.tensor([True, False]), 0.3, None),
    }


@pytest.mark.parametrize("op", list(_data_op_cases()))
def test_data_ops_autograd_opcheck(op):
    # The registered backward is the one autograd and AOT-autograd (torch.compile) use.
    args = (*_data_op_cases()[op], "reference")
    torch.library.opcheck(
        getattr(torch.ops.vtprune, op).default,
        args,
        test_utils=("test_autograd_registration", "test_aot_dispatch_dynamic"),
    )


# ---------------------------------------------------------------- through the model


def _batch(model):
    kw = tiny.inputs("llava", model, [1, 0])  # an image row and a text-only row (padding slots)
    labels = kw["input_ids"].masked_fill(kw["attention_mask"] == 0, -100)
    labels[:, :-4] = -100  # the last 4 tokens of each row are the answer
    return kw, labels


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_grads(model, kw, labels):
    model.zero_grad(set_to_none=True)
    loss = model(**kw, labels=labels).loss
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("method", ["pdrop", "fastv"])
def test_keep_everything_has_the_unpruned_gradients(method):
    model = tiny.llava().train()
    kw, labels = _batch(model)
    loss, want = _loss_grads(model, kw, labels)
    with vtprune.pruned(model, method, keep=1.0):
        got_loss, got = _loss_grads(model, kw, labels)
    torch.testing.assert_close(got_loss, loss)
    assert got.keys() == want.keys() and "model.multi_modal_projector.linear_1.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_pruned_gradients_equal_plain_autograd_of_the_gather(monkeypatch):
    # The same pruned forward with the gather op replaced by its plain-PyTorch reference (whose
    # gradient autograd derives itself): the registered backward must give the same gradients.
    model = tiny.llava().train()
    kw, labels = _batch(model)
    with vtprune.pruned(model, "pdrop", keep=0.5):
        loss, got = _loss_grads(model, kw, labels)
        assert vtprune.stats(model).visual_tokens_per_layer[-1] < 64
        monkeypatch.setattr(
            K, "gather_rows", lambda xs, index, backend=None: K.gather_rows_ref(list(xs), index)
        )
        ref_loss, want = _loss_grads(model, kw, labels)
    torch.testing.assert_close(loss, ref_loss)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)


def test_pdrop_training_mode_lowers_the_loss(monkeypatch):
    from vtprune.methods.pdrop import PyramidDropStage

    used_answer_queries = []
    select = PyramidDropStage.select

    def spy(self, ctx):
        used_answer_queries.append(ctx.answer_query is not None and bool(ctx.answer_query.any()))
        return select(self, ctx)

    monkeypatch.setattr(PyramidDropStage, "select", spy)
    model = tiny.llava().train()
    kw, labels = _batch(model)
    optimiser = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    with vtprune.pruned(model, "pdrop", keep=0.5):
        for _ in range(5):
            optimiser.zero_grad()
            loss = model(**kw, labels=labels).loss
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
        assert vtprune.stats(model).visual_tokens_per_layer[-1] < 64  # really pruned
    assert used_answer_queries and all(used_answer_queries)  # training-mode scores
    assert losses[-1] < losses[0] - 0.1, losses


@pytest.mark.parametrize("env", ["auto", "reference"])
def test_eval_forward_under_grad_can_backward(monkeypatch, env):
    monkeypatch.setenv(dispatch.ENV_VAR, env)
    model = tiny.llava()
    kw = tiny.inputs("llava", model, [1, 1])
    with vtprune.pruned(model, "pdrop", keep=0.5):
        logits = model(**kw).logits
        logits[:, -1].logsumexp(-1).sum().backward()
    grads = _grads(model)
    projector = grads["model.multi_modal_projector.linear_2.weight"]
    assert projector.abs().sum() > 0  # the kept visual tokens pass gradient back to the projector
    assert all(bool(g.isfinite().all()) for g in grads.values())


@pytest.mark.parametrize("method", vtprune.method_names())
def test_every_method_can_backward(method):
    options = {"layerskip": {"thin_ffn": True, "window": 3}}.get(method, {"keep": 0.5})
    model = tiny.llava()
    kw, labels = _batch(model)
    with vtprune.pruned(model, method, **options):
        loss, grads = _loss_grads(model, kw, labels)
    assert loss.isfinite() and all(bool(g.isfinite().all()) for g in grads.values())
    assert grads["model.multi_modal_projector.linear_2.weight"].abs().sum() > 0
