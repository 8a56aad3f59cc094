"""The Triton kernels equal their PyTorch references, at ragged shapes too. Without a GPU they run in
Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before the package is imported). On Linux they
never skip: a missing Triton fails here instead of passing silently."""
import sys

import pytest
import torch

from dsv3_lite import fp8, kernels
from dsv3_lite.config import ModelArgs
from dsv3_lite.generate import generate
from dsv3_lite.model import Transformer
from dsv3_lite.moe import grouped_linear

pytestmark = pytest.mark.skipif(kernels.triton is None and sys.platform != "linux",
                                reason="Triton is not installed (not Linux)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_the_kernels_can_run_on_this_machine():
    assert kernels.triton is not None, "Triton must be installed on Linux (requirements.txt)"
    assert DEVICE == "cuda" or kernels.interpreted(), "no GPU and no TRITON_INTERPRET=1"
    assert kernels.use_triton("triton", torch.device(DEVICE))
    assert not kernels.use_triton("reference", torch.device(DEVICE))
    assert kernels.use_triton("auto", torch.device("cpu")) is False  # the CPU runs PyTorch
    with pytest.raises(ValueError, match="kernels \\('gpu'\\) must be one of"):
        kernels.use_triton("gpu", torch.device(DEVICE))


def fp8_bits(q):
    return q.view(torch.uint8)


@pytest.mark.parametrize("shape, block", [((3, 128), 128), ((5, 300), 128), ((2, 3, 70), 32),
                                          ((4, 50), 16)])
def test_act_quant_is_bit_equal_to_the_reference(shape, block):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * torch.logspace(-4, 3, shape[-1])  # every binade
    x[..., 0] = -0.0
    x.view(-1, shape[-1])[0, :] = 0.0  # an all-zero row: finite scales
    x = x.to(DEVICE)
    q, scale = kernels.act_quant(x, block)
    q_ref, scale_ref = fp8.act_quant(x, block)
    assert torch.equal(fp8_bits(q), fp8_bits(q_ref))
    assert torch.equal(scale, scale_ref)


@pytest.mark.parametrize("shape", [(128, 128), (200, 300), (7, 33)])
def test_weight_dequant_is_bit_equal_to_the_reference(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    q, scale_inv = fp8.weight_quant(w)
    assert torch.equal(kernels.weight_dequant(q, scale_inv), fp8.weight_dequant(q, scale_inv))


@pytest.mark.parametrize("m, n, k", [(16, 16, 128), (40, 200, 300), (3, 7, 50)])
def test_fp8_gemm_equals_the_reference(m, n, k):
    gen = torch.Generator().manual_seed(2)
    a, w, b = (torch.randn(s, generator=gen).to(DEVICE) for s in ((m, k), (n, k), (n, k)))
    a_q, a_s = fp8.act_quant(a)
    w_q, w_s = fp8.weight_quant(w)
    b_q, b_s = fp8.act_quant(b)
    for rhs, rhs_scale in ((w_q, w_s), (b_q, b_s)):  # 128x128 blocks, 1x128 tiles
        ours = kernels.fp8_gemm(a_q, a_s, rhs, rhs_scale)
        ref = fp8.fp8_gemm(a_q, a_s, rhs, rhs_scale)
        # FP8 products are exact; only the order of the FP32 sums may differ
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def reference_decode(q_latent, q_pe, kv, pe, scale):
    scores = (q_latent @ kv.mT + q_pe @ pe.mT) * scale
    return scores.softmax(dim=-1) @ kv


@pytest.mark.parametrize("b, h, t, c, r, splits", [(1, 4, 1, 32, 8, 1), (2, 4, 150, 32, 8, 3),
                                                   (3, 5, 77, 24, 6, None), (1, 16, 600, 64, 16, 7)])
def test_mla_decode_split_kv_equals_one_softmax_over_the_whole_cache(b, h, t, c, r, splits):
    gen = torch.Generator().manual_seed(3)
    q_latent, q_pe, kv, pe = (torch.randn(s, generator=gen).to(DEVICE)
                              for s in ((b, h, c), (b, h, r), (b, t, c), (b, t, r)))
    out = kernels.mla_decode(q_latent, q_pe, kv, pe, 0.3, n_splits=splits)
    torch.testing.assert_close(out, reference_decode(q_latent, q_pe, kv, pe, 0.3),
                               rtol=1e-5, atol=1e-5)


def test_mla_decode_reads_a_bf16_cache_and_computes_in_fp32():
    gen = torch.Generator().manual_seed(6)
    inputs = [torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16)
              for s in ((2, 4, 32), (2, 4, 8), (2, 100, 32), (2, 100, 8))]
    out = kernels.mla_decode(*inputs, 0.3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, reference_decode(*(x.float() for x in inputs), 0.3),
                               rtol=1e-5, atol=1e-5)


def test_mla_decode_rejects_mismatched_shapes():
    x = torch.zeros(1, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="must agree"):
        kernels.mla_decode(x, x, torch.zeros(1, 5, 4, device=DEVICE), x, 1.0)
    with pytest.raises(ValueError, match="n_splits \\(9\\) must be in \\[1, T = 5\\]"):
        kernels.mla_decode(x, x[..., :4], torch.zeros(1, 5, 8, device=DEVICE),
                           torch.zeros(1, 5, 4, device=DEVICE), 1.0, n_splits=9)


@pytest.mark.parametrize("counts, k, n", [([3, 0, 40, 1, 7], 24, 20), ([0, 0, 5], 64, 64),
                                          ([33, 31, 64, 1], 40, 96)])
def test_grouped_linear_equals_the_reference(counts, k, n):
    gen = torch.Generator().manual_seed(4)
    counts = torch.tensor(counts, device=DEVICE)
    x = torch.randn(int(counts.sum()), k, generator=gen).to(DEVICE)
    weight = torch.randn(len(counts), n, k, generator=gen).to(DEVICE)
    torch.testing.assert_close(kernels.grouped_linear(x, weight, counts),
                               grouped_linear(x, weight, counts), rtol=1e-5, atol=1e-5)


def test_grouped_linear_in_bf16_rounds_once_from_fp32_sums():
    gen = torch.Generator().manual_seed(7)
    counts = torch.tensor([10, 0, 30], device=DEVICE)
    x = torch.randn(40, 24, generator=gen).to(DEVICE, torch.bfloat16)
    weight = torch.randn(3, 20, 24, generator=gen).to(DEVICE, torch.bfloat16)
    out = kernels.grouped_linear(x, weight, counts)
    assert out.dtype == torch.bfloat16
    exact = grouped_linear(x.float(), weight.float(), counts)
    assert torch.equal(out, exact.to(torch.bfloat16))


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="block_size \\(100\\) must be a power of two"):
        kernels.act_quant(torch.ones(2, 100, device=DEVICE), 100)


def test_the_model_with_kernels_decodes_like_the_reference(monkeypatch):
    """The tiny model with kernels="triton" (MLA decode and the experts' GEMM) against
    kernels="reference", same weights: every decode step's logits, and the greedy tokens."""
    calls = {"mla_decode": 0, "grouped_linear": 0}
    for name in calls:
        def counted(*args, _name=name, _fn=getattr(kernels, name), **kwargs):
            calls[_name] += 1
            return _fn(*args, **kwargs)
        monkeypatch.setattr(kernels, name, counted)
    torch.manual_seed(0)
    ref = Transformer(ModelArgs.tiny(kernels="reference")).to(DEVICE).eval()
    ours = Transformer(ModelArgs.tiny(kernels="triton")).to(DEVICE).eval()
    ours.load_state_dict(ref.state_dict())
    prompt = torch.randint(0, 260, (2, 5), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    tokens = {}
    for name, model in (("ref", ref), ("ours", ours)):
        tokens[name] = generate(model, prompt, 6)[0]
    assert torch.equal(tokens["ours"], tokens["ref"])
    with torch.inference_mode():
        for model in (ref, ours):
            model.allocate_cache(2)
        steps = [ref(prompt), ours(prompt)]
        torch.testing.assert_close(steps[1], steps[0], rtol=1e-5, atol=1e-5)
        token = steps[0][:, -1:].argmax(-1)
        for pos in range(5, 9):  # one new token per step: the split-KV kernel's case
            torch.testing.assert_close(ours(token, pos), ref(token, pos), rtol=1e-5, atol=1e-5)
    # the kernels ran: every MLA layer and MoE layer of every decode step of `ours`
    args = ours.args
    steps = 5 + 4  # generate's 5 decode steps after its prefill, then the 4 above
    assert calls["mla_decode"] == steps * args.n_layers
    assert calls["grouped_linear"] >= 2 * (steps + 2) * args.n_moe_layers  # + the prefills
