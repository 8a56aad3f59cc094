"""The byte-level BPE tokenizer: exact round trips (Chinese, emoji, whitespace), special tokens only from
their ids, compression on every domain, tokenizer.json save and load, clear errors."""
import pytest
import torch

from dsv3_lite.data import ByteTokenizer, Corpus, build_documents
from dsv3_lite.tokenizer import SPECIAL_TOKENS, BPETokenizer


@pytest.fixture(scope="module")
def documents():
    return build_documents(docs_per_domain=150)


@pytest.fixture(scope="module")
def tok(documents):
    return BPETokenizer.train((d.text for d in documents), vocab_size=600)


@pytest.mark.parametrize("text", ["", "hello", "深度求索 DeepSeek-V3 🚀", "tab\tnew\nline  two  spaces ",
                                  " leading space", "x = [i * i for i in range(9)]\n", "1234567890",
                                  "<|endoftext|>", "a<|fim_prefix|>b", "\x00\x7f\u00e9\U0010ffff"])
def test_round_trips_any_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_vocabulary_and_special_tokens(tok):
    assert tok.vocab_size == 600
    ids = [tok.special_id(name) for name in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS) and tok.eot_id == tok.special_id("<|endoftext|>")
    assert {"<|user|>", "<|assistant|>"} <= set(SPECIAL_TOKENS)  # chat roles, for inference
    # a special token's name in text is plain text; the token itself comes only from its id
    assert tok.eot_id not in tok.encode("<|endoftext|>")
    assert tok.decode(tok.encode("hi") + [tok.special_id("<|fim_middle|>")] + tok.encode("!")) == "hi<|fim_middle|>!"
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special_id("<|bos|>")
    with pytest.raises(ValueError, match=r"token id 600 is outside the vocabulary \[0, 600\)"):
        tok.decode([600])
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode(b"bytes")


def test_digits_stand_alone_and_words_merge(tok):
    assert tok.pieces("12345") == list("12345")
    assert len(tok.encode("The lantern was finally safe.")) < len("The lantern was finally safe.") / 2


def test_compresses_every_domain(tok, documents):
    """Fewer tokens than bytes in every domain; Chinese (3 bytes a character) gains the most."""
    byte_tok, ratio = ByteTokenizer(), {}
    for domain in ("english", "chinese", "arithmetic", "code"):
        texts = [d.text for d in documents if d.domain == domain]
        n_bytes = sum(len(byte_tok.encode(t)) for t in texts)
        ratio[domain] = n_bytes / sum(len(ids) for ids in tok.encode_batch(texts))
    assert all(r > 1.3 for r in ratio.values()), ratio
    assert ratio["chinese"] == max(ratio.values())


def test_training_is_deterministic(documents, tok):
    again = BPETokenizer.train((d.text for d in documents), vocab_size=600)
    assert again.tokenizer.to_str() == tok.tokenizer.to_str()


def test_a_small_text_gives_a_smaller_vocabulary():
    tiny = BPETokenizer.train(["abab abab"] * 5, vocab_size=1000)
    assert 256 + len(SPECIAL_TOKENS) < tiny.vocab_size < 300
    assert tiny.decode(tiny.encode("abab 你好")) == "abab 你好"


def test_save_and_load(tok, tmp_path):
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = BPETokenizer.load(path)
    text = "小明 went to the market 42 times.\n<|user|>"
    assert loaded.encode(text) == tok.encode(text) and loaded.vocab_size == tok.vocab_size
    assert loaded.eot_id not in loaded.encode("<|endoftext|>")  # still plain text after loading
    path.write_text(path.read_text(encoding="utf-8")[:500], encoding="utf-8")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        BPETokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        BPETokenizer.load(tmp_path / "absent.json")


def test_bad_vocab_size(documents):
    with pytest.raises(ValueError, match=r"vocab_size \(200\) must be >= 262: 256 bytes \+ 6 special tokens"):
        BPETokenizer.train(["abc"], vocab_size=200)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        BPETokenizer.train(["abc"], vocab_size=600.0)


def test_bad_texts_and_ids_are_named(tok):
    """One string where a list of texts belongs used to train on its characters one by one; ids that are not
    integers and text with a lone surrogate failed inside tokenizers without naming what was wrong."""
    for texts in ("one long text", 3):  # one str would be read character by character
        with pytest.raises(TypeError, match=rf"texts must be an iterable of str .*, got {type(texts).__name__}"):
            BPETokenizer.train(texts, vocab_size=300)
    for ids in ([1.5], "abc"):
        with pytest.raises(TypeError, match=r"ids must be a sequence of int token ids or a tensor"):
            tok.decode(ids)
    with pytest.raises(ValueError, match=r"text holds a lone surrogate"):
        tok.encode("a\ud800b")


def test_a_corpus_encodes_with_it(tok, documents):
    corpus = Corpus(documents, tokenizer=tok)
    assert corpus.train.max() < tok.vocab_size
    first_doc = (corpus.train == tok.eot_id).nonzero()[0].item()
    assert tok.decode(corpus.train[:first_doc]) == documents[0].text


def test_a_very_long_word_is_learned_from_in_pieces(documents, count_calls):
    """The BPE trainer's time grows with the square of a word's length: a 3 MB word ran for most of an hour. Runs of
    more than LONGEST_RUN characters without a space are cut for training (the book's corpus has none, so its
    tokenizer is unchanged), and such a word still encodes and decodes exactly."""
    import random

    from dsv3_lite import tokenizer
    from dsv3_lite.tokenizer import LONGEST_RUN, _bounded

    text = "short words. " + "x" * (2 * LONGEST_RUN + 5) + " end"
    pieces = list(_bounded([text]))
    assert "".join(pieces) == text and max(len(p) for p in pieces) <= LONGEST_RUN + len("short words. ")
    assert all(len(run) <= LONGEST_RUN for p in pieces for run in p.split())
    assert list(_bounded(d.text for d in documents)) == [d.text for d in documents]
    with pytest.raises(TypeError, match="texts must be str, got int"):
        list(_bounded([1]))
    word = "".join(random.Random(0).choice("abcdefghij") for _ in range(30_000))
    calls = count_calls(tokenizer, "_bounded")
    tok = BPETokenizer.train([word, "hello world"], vocab_size=400)
    assert calls["_bounded"] == 1  # the trainer reads the texts through the cut
    assert tok.decode(tok.encode(word)) == word
