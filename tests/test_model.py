"""The assembled Transformer (dsv3_lite.model): structure, counting, cached decode, input checks, training."""
import math

import pytest
import torch

from dsv3_lite.config import ModelArgs
from dsv3_lite.data import Corpus
from dsv3_lite.model import Block, RMSNorm, Transformer, TrainingLoss
from dsv3_lite.moe import MLP, MoE
from dsv3_lite.norm import RMSNorm as NormRMSNorm
from dsv3_lite.train import train_lm

ARGS = ModelArgs.tiny(max_seq_len=64, original_seq_len=64, max_batch_size=4, vocab_size=80)


def build(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(args).eval()


def test_structure_follows_the_config():
    model = build(ARGS.replace(n_layers=4, n_dense_layers=2, mtp_depth=2))
    assert RMSNorm is NormRMSNorm
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
    model.load_state_dict(reference.state_dict())  # the rope tables are rebuilt, not loaded
    assert model.mtp[0].embed is model.embed and model.layers[-1].ffn.gate.bias.dtype == torch.float32
    tokens = torch.randint(0, ARGS.vocab_size, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(tokens), reference(tokens), rtol=0, atol=0)


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


def test_loss_parts_add_up_and_bias_update_reaches_every_moe():
    model = build(ARGS.replace(mtp_depth=2, seq_aux_alpha=0.01)).train()
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    y = torch.randint(0, ARGS.vocab_size, (2, 16))
    parts = model.loss(x, y, mtp_lambda=0.3)
    torch.testing.assert_close(parts.total, parts.main + parts.mtp + parts.balance)
    assert len(parts.mtp_depths) == 2 and parts.balance > 0 and parts.mtp > 0
    model.update_bias()
    assert all(m.gate.bias.abs().sum() > 0 for m in model.moe_layers())  # MTP modules' MoE included
    parts.total.backward()
    no_mtp = model.loss(x, y, mtp_lambda=0.0)
    assert no_mtp.mtp == 0 and no_mtp.mtp_depths == []
    # the skipped MTP modules' balance losses (from the step before) must not leak into this one
    main_moe = model.moe_layers(mtp=False)
    assert len(main_moe) < len(model.moe_layers())
    torch.testing.assert_close(no_mtp.balance, sum(m.aux_loss for m in main_moe))
    no_mtp.total.backward()  # a stale graph from the previous step would fail here


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
                       on_step=lambda m, _: m.update_bias(), eval_batches=2, progress=False)
    assert math.isfinite(history.final_val_loss)
    assert history.final_val_loss < unigram - 1.0
    assert loss_fn.mtp_depths[-1][0] < unigram - 0.5  # the MTP module learned too
