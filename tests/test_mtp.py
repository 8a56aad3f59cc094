"""Multi-Token Prediction (dsv3_lite.mtp): shared modules, the causal chain, the loss and its gradients."""
import pytest
import torch
import torch.nn.functional as F

from dsv3_lite.config import ModelArgs
from dsv3_lite.model import Transformer
from dsv3_lite.mtp import MTPModule, mtp_chain, mtp_loss
from tests.models import seeded

ARGS = ModelArgs.tiny(max_seq_len=64, original_seq_len=64, max_batch_size=4, vocab_size=80, mtp_depth=2,
                      init_std=0.1)


def build(args: ModelArgs = ARGS, seed: int = 0) -> Transformer:
    return seeded(args, seed)


def test_embedding_and_head_are_shared_objects():
    model = build()
    for module in model.mtp:
        assert module.embed is model.embed and module.head is model.head
        assert module.embed.weight.data_ptr() == model.embed.weight.data_ptr()
        assert module.head.weight.data_ptr() == model.head.weight.data_ptr()
    state = model.state_dict()  # stored beside each module, as in DeepSeek's checkpoint, same storage
    assert state["mtp.1.embed.weight"].data_ptr() == state["embed.weight"].data_ptr()
    # parameters() lists each shared tensor once, so an optimizer updates it once
    assert len({id(p) for p in model.parameters()}) == len(list(model.parameters()))


def test_mtp_loss_gradients_reach_the_shared_embedding_and_head_and_the_main_blocks():
    model = build().train()
    x = torch.randint(0, ARGS.vocab_size, (2, 16))
    y = torch.randint(0, ARGS.vocab_size, (2, 16))
    model.loss(x, y, mtp_lambda=0.3).mtp.backward()
    assert model.embed.weight.grad.abs().sum() > 0 and model.head.weight.grad.abs().sum() > 0
    assert model.layers[0].attn.wkv_b.weight.grad.abs().sum() > 0  # through h^0: a denser signal
    for module in model.mtp:
        assert module.eh_proj.weight.grad.abs().sum() > 0


def test_chain_shapes_and_loss_formula():
    model = build().eval()
    B, T, V = 2, 10, ARGS.vocab_size
    x, y = torch.randint(0, V, (B, T)), torch.randint(0, V, (B, T))
    with torch.no_grad():
        logits = mtp_chain(model.mtp, model.hidden_states(x)[0], x)[0]
    assert [tuple(lg.shape) for lg in logits] == [(B, T - 1, V), (B, T - 2, V)]
    # eq. 24-25: depth k at position i is scored on t_{i+k+1} = y[:, i+k]; each depth's sum divided by T
    expected = 0.0
    for k, lg in enumerate(logits, start=1):
        expected += sum(F.cross_entropy(lg[b], y[b, k:], reduction="sum") for b in range(B)) / (B * T)
    l_mtp, depth_means = mtp_loss(logits, y, 0.3)
    torch.testing.assert_close(l_mtp, 0.3 / 2 * expected)
    for k, (lg, mean) in enumerate(zip(logits, depth_means), start=1):  # each depth's own mean cross-entropy
        torch.testing.assert_close(mean, F.cross_entropy(lg.flatten(0, 1), y[:, k:].flatten()))
    with pytest.raises(ValueError, match="MTP depth"):
        mtp_chain(model.mtp, model.hidden_states(x[:, :2])[0], x[:, :2])


def test_the_chain_is_causal():
    """Depth k at position i may read tokens up to t_{i+k} and nothing later."""
    model = build(seed=1).eval()
    x = torch.randint(0, ARGS.vocab_size, (1, 12))
    changed = x.clone()
    j = 8
    changed[0, j] = (x[0, j] + 1) % ARGS.vocab_size
    with torch.no_grad():
        before = mtp_chain(model.mtp, model.hidden_states(x)[0], x)[0]
        after = mtp_chain(model.mtp, model.hidden_states(changed)[0], changed)[0]
    for k, (b, a) in enumerate(zip(before, after), start=1):
        unaffected = j - k  # positions i < j - k never see t_j
        torch.testing.assert_close(a[:, :unaffected], b[:, :unaffected])
        assert not torch.allclose(a[:, unaffected], b[:, unaffected])


def test_module_checks_its_inputs():
    model = build()
    module: MTPModule = model.mtp[0]
    with pytest.raises(ValueError, match="same"):
        module(torch.zeros(1, 5, ARGS.dim), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        mtp_loss([], torch.zeros(1, 4, dtype=torch.long), 0.3)
