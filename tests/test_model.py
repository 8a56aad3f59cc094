"""The assembled Transformer (dsv3_lite.model): structure, counting, cached decode, input checks, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from dsv3_lite.block import Block
from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.model import Transformer
from dsv3_lite.moe import MLP, MoE, balance_loss, expert_load
from dsv3_lite.mtp import mtp_chain
from dsv3_lite.train import TrainingLoss, train_lm
from tests.models import seeded

ARGS = ModelArgs.tiny(max_seq_len=64, original_seq_len=64, max_batch_size=4, vocab_size=80)


def build(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    return seeded(args, seed).eval()


def test_structure_follows_the_config():
    model = build(ARGS.replace(n_layers=4, n_dense_layers=2, mtp_depth=2))
    assert [type(b.ffn) for b in model.layers] == [MLP, MLP, MoE, MoE]
    assert all(isinstance(b, Block) for b in model.layers)
    assert len(model.mtp) == 2 and all(isinstance(m.block.ffn, MoE) for m in model.mtp)
    assert isinstance(build(ARGS.replace(n_dense_layers=ARGS.n_layers)).mtp[0].block.ffn, MLP)
    assert len(model.moe_layers()) == 4


@pytest.mark.parametrize("overrides", [
    {}, dict(q_lora_rank=0), dict(n_dense_layers=0), dict(n_dense_layers=3), dict(n_shared_experts=0),
    dict(n_shared_experts=2, mtp_depth=2), dict(mtp_depth=0)])
def test_parameter_counts_equal_model_args(overrides):
    args = ARGS.replace(**overrides)
    model = build(args)
    assert model.num_params() == args.num_params()
    main_ids = {id(p) for n, p in model.named_parameters() if not n.startswith("mtp.")}
    for module in model.mtp:
        assert sum(p.numel() for p in module.parameters() if id(p) not in main_ids) == args.mtp_module_params()
    assert model.num_params(mtp=True) == args.num_params() + args.mtp_depth * args.mtp_module_params()


def test_a_model_built_on_meta_materializes_and_loads_weights():
    """The way to load big checkpoints: build without allocating, to_empty, then load the weights."""
    reference = build()
    with torch.device("meta"):
        model = Transformer(ARGS)
    model.to_empty(device="cpu")
    model.load_state_dict(reference.state_dict())
    assert model.mtp[0].embed is model.embed and model.layers[-1].ffn.gate.bias.dtype == torch.float32
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), reference(tokens), rtol=0, atol=0)


def test_init_weights_draws_every_matrix_from_n_0_init_std():
    args = ARGS.replace(dim=128, init_std=0.006, mtp_depth=1)
    with torch.device("meta"):
        model = Transformer(args)
    model.to_empty(device="cpu")
    model.init_weights()  # materialise a model built on the meta device
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.equal(p, torch.ones_like(p)), name
        elif name.endswith("gate.bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            assert abs(p.std().item() - 0.006) < 0.1 * 0.006 and abs(p.mean().item()) < 0.006, name


def test_a_model_too_big_for_memory_is_refused_with_a_hint():
    with pytest.raises(ValueError, match=r"this ModelArgs \(dim 7,168, n_layers 61, vocab_size 129,280, .*\) has "
                                         r"671,026,419,200 parameters.*ModelArgs.tiny\(\).*meta device"):
        Transformer(ModelArgs.deepseek_v3(mtp_depth=0))
    with torch.device("meta"):
        assert Transformer(ModelArgs.deepseek_v3(n_layers=4)).num_params() > 0


def test_logits_shape_and_mtp_modules_do_not_touch_the_main_model():
    with_mtp = build(ARGS.replace(mtp_depth=2))
    without = build(ARGS.replace(mtp_depth=0))
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12))
    with torch.no_grad():
        logits = with_mtp(tokens)
        assert logits.shape == (2, 12, ARGS.vocab_size)
        # same seed, MTP built last: identical main weights, and the main logits ignore the MTP modules
        torch.testing.assert_close(without(tokens), logits, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["absorb", "naive"])
def test_cached_decode_equals_full_forward(impl):
    model = build(ARGS.replace(attn_impl=impl, init_std=0.1), seed=1)
    tokens = torch.randint(0, ARGS.vocab_size, (3, 30))
    with torch.no_grad():
        full = model(tokens)
        model.allocate_cache(3)
        steps = [model(tokens[:, :9], 0), model(tokens[:, 9:14], 9)]  # prefill, then a multi-token chunk
        steps += [model(tokens[:, t:t + 1], t) for t in range(14, 30)]  # then one token at a time
        model.free_cache()
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_bad_inputs_raise_clear_errors():
    model = build()
    with pytest.raises(ValueError, match=r"max_seq_len \(64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"max_seq_len"):
        model(torch.zeros(1, 4, dtype=torch.long), start_pos=62)
    with pytest.raises(TypeError, match=r"int64 or int32"):
        model(torch.zeros(1, 4))
    with pytest.raises(TypeError, match=r"torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, seq_len\)"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size \(80\)"):
        model(torch.tensor([[1, 80]]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match=r"batch >= 1"):
        model(torch.zeros(0, 4, dtype=torch.long))
    x = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"mtp_lambda"):
        model.loss(x, x, mtp_lambda=-1)
    with pytest.raises(TypeError, match=r"mtp_lambda must be a number, got str"):
        model.loss(x, x, mtp_lambda="0.3")
    for start_pos, error, message in ((1.5, TypeError, "start_pos must be an int, got float"),
                                      ("0", TypeError, "start_pos must be an int, got str"),
                                      (-1, ValueError, r"start_pos \(-1\) must be >= 0")):
        with pytest.raises(error, match=message):
            model(x, start_pos=start_pos)
    with pytest.raises(ValueError, match=r"targets: token ids must be in \[0, vocab_size \(80\)\)"):
        model.loss(x, torch.tensor([[1, 2, 3, 80]]))
    with pytest.raises(TypeError, match=r"targets must be an int64 or int32"):
        model.loss(x, x.float())
    with pytest.raises(ValueError, match=r"targets \(1, 3\) must have the shape of tokens \(1, 4\)"):
        model.loss(x, x[:, :3])
    torch.testing.assert_close(model.loss(x, x.int()).total, model.loss(x, x).total)


def test_int32_tokens_work():
    model = build()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 5))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens.int()), model(tokens))


def test_loss_parts_match_an_independent_computation():
    args = ARGS.replace(mtp_depth=2, seq_aux_alpha=0.01, aux_loss_alpha=0.003)
    model = build(args).train()
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    y = torch.randint(0, ARGS.vocab_size, (2, 16))
    parts = model.loss(x, y, mtp_lambda=0.3)
    main = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    h, routings = model.hidden_states(x)
    logits, mtp_routings = mtp_chain(model.mtp, h, x)
    # eq. 25: lambda / D * sum over depths of the summed log-loss of depth k, over T = 16 (eq. 24)
    mtp = 0.3 / 2 * sum(F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten(), reduction="sum") / y.numel()
                        for k, lg in enumerate(logits, start=1))
    every = routings + mtp_routings
    balance = sum(0.01 * balance_loss(r.scores, r.indices, 2) + 0.003 * balance_loss(r.scores, r.indices)
                  for r in every)
    for got, want in [(parts.main, main), (parts.mtp, mtp), (parts.balance, balance),
                      (parts.total, main + mtp + balance)]:
        torch.testing.assert_close(got, want)
    assert len(parts.mtp_depths) == 2 and len(every) == len(model.moe_layers()) == 4
    # the expert load: K_r choices per token of each layer; the MTP depths see T - k positions
    per_token = ARGS.n_activated_experts
    assert parts.expert_load.sum(1).tolist() == [2 * 16 * per_token] * 2 + [2 * 15 * per_token, 2 * 14 * per_token]
    assert torch.equal(parts.expert_load[0], expert_load(routings[0].indices, ARGS.n_routed_experts))
    parts.total.backward()
    # without MTP: its rows are zero, its balance losses absent; in eval mode no balance loss at all
    no_mtp = model.loss(x, y, mtp_lambda=0.0)
    assert no_mtp.mtp == 0 and no_mtp.mtp_depths == [] and no_mtp.expert_load[2:].sum() == 0
    torch.testing.assert_close(no_mtp.balance, sum(0.01 * balance_loss(r.scores, r.indices, 2)
                                                   + 0.003 * balance_loss(r.scores, r.indices) for r in routings))
    no_mtp.total.backward()  # a stale graph from the previous call would fail here
    assert model.eval().loss(x, y, 0.3).balance == 0


def test_bias_update_follows_each_layers_load():
    model = build(ARGS.replace(mtp_depth=1, bias_update_speed=0.01))
    load = torch.zeros(len(model.moe_layers()), ARGS.n_routed_experts, dtype=torch.long)
    load[0] = torch.tensor([9, 1, 5, 5, 5, 5, 5, 5])  # mean 5: expert 0 over, expert 1 under
    load[-1, 3] = 8  # the MTP module's MoE: expert 3 over, the rest under
    model.update_bias(load)
    biases = [m.gate.bias for m in model.moe_layers()]
    torch.testing.assert_close(biases[0], torch.tensor([-0.01, 0.01, 0, 0, 0, 0, 0, 0]))
    torch.testing.assert_close(biases[1], torch.zeros(8))  # a layer with no tokens keeps its bias
    torch.testing.assert_close(biases[-1], torch.tensor([0.01, 0.01, 0.01, -0.01, 0.01, 0.01, 0.01, 0.01]))
    with pytest.raises(ValueError, match=r"expert_load must be \(n MoE layers, n_routed_experts\) = \(3, 8\)"):
        model.update_bias(load[:2])


def test_a_model_holds_no_rope_tables_and_trains_after_decoding():
    model = build(ARGS.replace(mtp_depth=1))
    assert dict(model.named_buffers()) == {}
    tokens = torch.randint(0, ARGS.vocab_size, (1, 8))
    model.allocate_cache(1)
    with pytest.raises(RuntimeError, match=r"KV cache is allocated"):
        model.loss(tokens, tokens)
    model.free_cache()
    model.train().loss(tokens, tokens, 0.3).total.backward()
    assert all(layer.attn.wkv_a.weight.grad.abs().sum() > 0 for layer in model.layers)


@pytest.fixture
def one_thread():
    """Tiny matrices train fastest on one thread, and a busy shared CPU cannot stall it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_the_model_trains_below_the_unigram_entropy(one_thread):
    corpus = Corpus.default()
    unigram = corpus.unigram_entropy()  # about 4.15 nats per byte
    torch.manual_seed(0)
    model = Transformer(ModelArgs.tiny(mtp_depth=1))
    loss_fn = TrainingLoss(mtp_lambda=0.3)
    history = train_lm(model, corpus, steps=60, batch_size=16, seq_len=64, lr=5e-3, loss_fn=loss_fn,
                       on_step=loss_fn.update_bias, eval_batches=2, progress=False)
    assert math.isfinite(history.final_val_loss)
    assert history.final_val_loss < unigram - 1.0
    assert loss_fn.mtp_depths[-1][0] < unigram - 0.5  # the MTP module learned too
    assert len(loss_fn.expert_loads) == 60 and all(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())
