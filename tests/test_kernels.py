"""The Triton kernels equal their PyTorch references, at ragged shapes too. Without a GPU they run in
Triton's interpreter (conftest.py sets TRITON_INTERPRET=1 before the package is imported); on a CUDA machine
without TRITON_INTERPRET they run compiled (benchmarks/gpu_check.sh). On Linux they never skip: a missing
Triton fails here instead of passing silently."""
import ast
import importlib.util
import inspect
import pathlib
import sys
import textwrap

import pytest
import torch

from dsv3_lite import fp8, kernels
from dsv3_lite.config import ModelArgs
from dsv3_lite.generate import generate
from dsv3_lite.model import Transformer
from dsv3_lite.moe import grouped_linear

pytestmark = pytest.mark.skipif(kernels.triton is None and sys.platform != "linux",
                                reason="Triton is not installed (not Linux)")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, else interpreted


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


def bf16_dots() -> bool:
    """Whether the kernels multiply BF16 inputs in BF16 here (compiled on a GPU) or in FP32."""
    return kernels._dot_dtype(torch.bfloat16, torch.device(DEVICE)) != kernels.tl.float32


def test_mla_decode_reads_a_bf16_cache_and_computes_in_fp32():
    gen = torch.Generator().manual_seed(6)
    inputs = [torch.randn(s, generator=gen).to(DEVICE, torch.bfloat16)
              for s in ((2, 4, 32), (2, 4, 8), (2, 100, 32), (2, 100, 8))]
    out = kernels.mla_decode(*inputs, 0.3)
    assert out.dtype == torch.float32
    # FP32 dots: exact products of BF16 values; BF16 dots on a GPU also round the softmax's
    # probabilities to BF16 before they weight the values (relative 2^-8)
    tol = 1e-2 if bf16_dots() else 1e-5
    torch.testing.assert_close(out, reference_decode(*(x.float() for x in inputs), 0.3),
                               rtol=tol, atol=tol)


def test_the_dots_take_bf16_on_a_gpu_and_fp32_elsewhere():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert kernels._dot_dtype(torch.bfloat16, cpu) == kernels.tl.float32
    assert kernels._dot_dtype(torch.float32, cuda) == kernels.tl.float32  # no TF32: "ieee"
    expected = kernels.tl.float32 if kernels.interpreted() else kernels.tl.bfloat16
    assert kernels._dot_dtype(torch.bfloat16, cuda) == expected


@pytest.mark.parametrize("lengths, splits", [([150, 1, 77], 3), ([40, 150, 150], None), ([5, 9, 2], 150)])
def test_mla_decode_attends_to_each_sequences_own_length(lengths, splits):
    """A batch of sequences of different lengths padded to T: each sees only its own positions, whatever
    the split count (splits past a short sequence do no work), and the padding's values do not matter."""
    gen = torch.Generator().manual_seed(8)
    b, h, t, c, r = len(lengths), 4, 150, 32, 8
    q_latent, q_pe, kv, pe = (torch.randn(s, generator=gen).to(DEVICE)
                              for s in ((b, h, c), (b, h, r), (b, t, c), (b, t, r)))
    for i, n in enumerate(lengths):
        kv[i, n:], pe[i, n:] = 1e4, -1e4  # padding that would dominate any softmax it entered
    out = kernels.mla_decode(q_latent, q_pe, kv, pe, 0.3, n_splits=splits,
                             lengths=torch.tensor(lengths, device=DEVICE))
    for i, n in enumerate(lengths):
        expected = reference_decode(q_latent[i], q_pe[i], kv[i, :n], pe[i, :n], 0.3)
        torch.testing.assert_close(out[i], expected, rtol=1e-5, atol=1e-5)


def test_mla_decode_rejects_bad_lengths():
    x, cache = torch.zeros(2, 2, 8, device=DEVICE), torch.zeros(2, 5, 8, device=DEVICE)
    for lengths, match in ((torch.tensor([5, 0]), "must be in \\[1, T = 5\\]"),
                           (torch.tensor([6, 1]), "must be in \\[1, T = 5\\]"),
                           (torch.tensor([5]), "must be \\(B,\\) = \\(2,\\) integers"),
                           (torch.tensor([5.0, 1.0]), "integers")):
        with pytest.raises(ValueError, match=match):
            kernels.mla_decode(x, x, cache, cache, 1.0, lengths=lengths.to(DEVICE))


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
    if bf16_dots():  # products of BF16 values are exact in FP32 either way; the sums' order may differ
        torch.testing.assert_close(out.float(), exact, rtol=2 ** -8, atol=1e-5)
    else:
        assert torch.equal(out, exact.to(torch.bfloat16))


def loop_schedule(counts, block_m):
    """The tile schedule as a loop over experts (the chapter's version): (expert, start, end) per tile."""
    tiles, begin = [], 0
    for expert, n in enumerate(counts):
        tiles += [(expert, start, begin + n) for start in range(begin, begin + n, block_m)]
        begin += n
    return tiles


@pytest.mark.parametrize("counts, block_m", [([3, 0, 40, 1, 7], 16), ([0, 0, 5], 32), ([0, 0, 0], 16),
                                             ([64, 32, 1, 0], 32), ([16] * 6, 16)])
def test_the_tile_schedule_fills_a_fixed_grid_from_the_shapes_alone(counts, block_m):
    n_rows = sum(counts)
    expert, start, end = kernels.grouped_tile_schedule(torch.tensor(counts, device=DEVICE), n_rows, block_m)
    slots = -(-n_rows // block_m) + len(counts)  # the grid, from T and E only
    assert len(expert) == len(start) == len(end) == slots
    real = loop_schedule(counts, block_m)
    rows = list(zip(expert.tolist(), start.tolist(), end.tolist()))
    assert rows[:len(real)] == real
    assert all(s >= e for _, s, e in rows[len(real):])  # past the last tile: empty, the program returns
    assert all(0 <= x < len(counts) for x, _, _ in rows)


def test_the_tile_schedule_reads_no_value_of_counts():
    """Built on the meta device, where tensors have shapes but no values: any host read of counts
    (.item(), .tolist(), a data-dependent shape) would raise here."""
    schedule = kernels.grouped_tile_schedule(torch.empty(5, dtype=torch.long, device="meta"), 51, 16)
    assert [x.shape for x in schedule] == [(4 + 5,)] * 3


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's sync debug mode needs a GPU")
def test_grouped_linear_does_not_synchronise_with_the_host():
    counts = torch.tensor([10, 0, 30], device=DEVICE)
    x, weight = torch.randn(40, 24, device=DEVICE), torch.randn(3, 20, 24, device=DEVICE)
    kernels.grouped_linear(x, weight, counts)  # compiled first: compilation may synchronise
    torch.cuda.set_sync_debug_mode("error")
    try:
        kernels.grouped_linear(x, weight, counts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_grouped_linear_does_not_depend_on_the_order_its_programs_run(order):
    """A GPU runs a launch's programs in any order; the interpreter runs them in grid order, which hides
    a tile that writes past its expert's rows (e.g. a store mask `rows < T` instead of `rows < end`):
    the next expert's tile overwrites the damage. Permuting the schedule's slots changes which program
    runs which tile, so the tiles run in another order here too; the result must not change."""
    gen = torch.Generator().manual_seed(9)
    counts = torch.tensor([3, 0, 40, 1, 7, 20], device=DEVICE)
    x = torch.randn(int(counts.sum()), 24, generator=gen).to(DEVICE)
    weight = torch.randn(len(counts), 20, 24, generator=gen).to(DEVICE)
    schedule = kernels.grouped_tile_schedule(counts, x.shape[0], 16)
    slots = len(schedule[0])
    perm = (torch.arange(slots - 1, -1, -1) if order == "reversed"
            else torch.randperm(slots, generator=torch.Generator().manual_seed(0))).to(DEVICE)
    out = kernels._grouped_linear_launch(x, weight, tuple(s[perm] for s in schedule), 16)
    torch.testing.assert_close(out, grouped_linear(x, weight, counts), rtol=1e-5, atol=1e-5)


def test_block_sizes_must_be_powers_of_two():
    with pytest.raises(ValueError, match="block_size \\(100\\) must be a power of two"):
        kernels.act_quant(torch.ones(2, 100, device=DEVICE), 100)
    with pytest.raises(ValueError, match="block_m \\(24\\) must be a power of two"):
        kernels.grouped_linear(torch.ones(2, 8, device=DEVICE), torch.ones(1, 4, 8, device=DEVICE),
                               torch.tensor([2], device=DEVICE), block_m=24)


def promotes_every_block(kernel_source: str) -> bool:
    """Whether an FP8 GEMM kernel keeps DeepSeek's promotion: every `tl.dot` starts a fresh sum (no
    accumulator argument), and the loop adds a dot's result, times both scales, into the FP32
    accumulator (`acc += partial * a_s ... * b_s`). `acc = tl.dot(a, b, acc)` instead leaves the whole
    K-long sum to the tensor cores, which on sm90 Triton does not promote by default."""
    tree = ast.parse(textwrap.dedent(kernel_source))
    dots = [node for node in ast.walk(tree) if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute) and node.func.attr == "dot"]
    fresh = bool(dots) and all(len(d.args) == 2 and not any(kw.arg == "acc" for kw in d.keywords)
                               for d in dots)
    dot_results = {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign)
                   and isinstance(node.value, ast.Call) and node.value in dots
                   for target in node.targets if isinstance(target, ast.Name)}
    scaled_adds = [node for node in ast.walk(tree) if isinstance(node, ast.AugAssign)
                   and isinstance(node.op, ast.Add) and getattr(node.target, "id", None) == "acc"
                   and {n.id for n in ast.walk(node.value) if isinstance(n, ast.Name)}
                   >= {"a_s", "b_s"} and dot_results & {n.id for n in ast.walk(node.value)
                                                          if isinstance(n, ast.Name)}]
    return fresh and len(scaled_adds) == 1


def test_the_fp8_gemm_promotes_every_block_into_fp32():
    source = inspect.getsource(kernels._fp8_gemm_kernel.fn)
    assert promotes_every_block(source)
    # the pitfall, planted: the same kernel with the sum left in the tensor cores' accumulator
    planted = source.replace("partial = tl.dot(a, tl.trans(b))", "acc = tl.dot(a, tl.trans(b), acc)")
    assert planted != source and not promotes_every_block(planted)
    unscaled = source.replace("acc += partial * a_s[:, None] * b_s[None, :]", "acc += partial")
    assert unscaled != source and not promotes_every_block(unscaled)
    # and the benchmark's one-accumulator kernel, which exists to measure that pitfall on a GPU
    assert not promotes_every_block(inspect.getsource(fp8_accumulation_gpu().one_accumulator_kernel.fn))


def fp8_accumulation_gpu():
    path = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "fp8_accumulation_gpu.py"
    spec = importlib.util.spec_from_file_location("fp8_accumulation_gpu", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_one_accumulator_variant_runs_and_agrees_where_sums_are_fp32():
    """The GPU script's two kernels on chapter 5's operands (at K = 512 for the interpreter's sake). Under
    the interpreter, or on a GPU without FP8 tensor cores, both sum in FP32: equal errors, tiny. On an
    FP8 GPU the gap between them is the measurement (benchmarks/gpu_check.sh prints it)."""
    if not kernels._fp8_dot_supported(torch.device(DEVICE)) and DEVICE == "cuda":
        pytest.skip("no FP8 E4M3 in Triton on this GPU")
    errors = fp8_accumulation_gpu().relative_errors(torch.device(DEVICE), k=512)
    promoted, one = errors.values()
    if kernels._fp8_dot_supported(torch.device(DEVICE)):
        assert promoted <= one  # limited accumulation: promotion can only help
    else:
        assert promoted < 1e-6 and one < 1e-6


def test_the_model_with_kernels_decodes_like_the_reference(count_calls):
    """The tiny model with kernels="triton" (MLA decode and the experts' GEMM) against
    kernels="reference", same weights: every decode step's logits, and the greedy tokens."""
    calls = count_calls(kernels, "mla_decode", "grouped_linear")
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
