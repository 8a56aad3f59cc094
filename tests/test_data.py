"""The corpus is deterministic, mixes the four domains, and the tokenizer round-trips any text; packing keeps
the end-of-text separators; fill-in-the-middle rewrites about 10% of code documents in PSM order, by seed."""
import hashlib
import math
import random

import pytest
import torch

from dsv3_lite.data import (DOMAINS, QUESTION, ByteTokenizer, Corpus, Document, build_documents, final_answer,
                            fim_encode, fim_split, held_out_questions, read_documents)

# sha256 of the default train split: any change to the generator (or to Python's `random`) changes it, and
# with it every chapter's numbers.
DEFAULT_CORPUS_DIGEST = "4f3dbc07c427eabe"


@pytest.fixture(scope="module")
def corpus():
    return Corpus.default()


def test_corpus_is_identical_on_every_build():
    a, b = build_documents(docs_per_domain=50), build_documents(docs_per_domain=50)
    assert a == b
    assert build_documents(docs_per_domain=50, seed=1) != a


def test_default_corpus_fingerprint(corpus):
    digest = hashlib.sha256(corpus.train.numpy().astype("int16").tobytes()).hexdigest()[:16]
    assert digest == DEFAULT_CORPUS_DIGEST


def test_all_domains_in_both_splits(corpus):
    assert corpus.domains == DOMAINS
    for domains in (corpus.train_domains, corpus.val_domains):
        counts = torch.bincount(domains.long(), minlength=len(DOMAINS))
        assert (counts > 0).all()
    assert len(corpus.train_domains) == len(corpus.train) and len(corpus.val_domains) == len(corpus.val)


def test_corpus_is_big_enough(corpus):
    assert len(corpus.train) > 5_000_000 and len(corpus.val) > 500_000
    assert corpus.train.max() < corpus.tokenizer.vocab_size


def test_arithmetic_answers_are_correct():
    for doc in build_documents(docs_per_domain=200):
        if doc.domain != "arithmetic":
            continue
        question = doc.text.splitlines()[0]
        answer = int(doc.text.rsplit("#### ", 1)[1])
        if question.startswith("Question: What is "):
            expr = question.removeprefix("Question: What is ").rstrip("?")
            assert eval(expr) == answer, doc.text  # the expression is digits and one operator


def test_code_snippets_compile():
    for doc in build_documents(docs_per_domain=100):
        if doc.domain == "code":
            compile(doc.text, "<snippet>", "exec")


@pytest.mark.parametrize("text", ["", "hello", "深度求索 DeepSeek-V3 🚀", "tab\tnew\nline", "<|endoftext|>"])
def test_tokenizer_round_trips(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens():
    tok = ByteTokenizer()
    assert tok.vocab_size == 260 and tok.eot_id == tok.special_id("<|endoftext|>") == 256
    assert tok.decode([104, 105, tok.special_id("<|fim_middle|>"), 33]) == "hi<|fim_middle|>!"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([260])
    with pytest.raises(ValueError, match="unknown special token"):
        tok.special_id("<|bos|>")


def test_batches_are_shifted_windows_and_seeded(corpus):
    x, y = corpus.batch("train", 4, 32, torch.Generator().manual_seed(0))
    x2, _ = corpus.batch("train", 4, 32, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(x, x2)
    # with domains: the same windows, plus the domain of each target token
    for split in ("train", "val"):
        x3, y3, dom = corpus.batch(split, 64, 32, torch.Generator().manual_seed(0), domains=True)
        x4, _ = corpus.batch(split, 64, 32, torch.Generator().manual_seed(0))
        assert torch.equal(x3, x4) and dom.shape == y3.shape and dom.dtype == torch.long
        chinese = dom == corpus.domains.index("chinese")
        assert (y3[chinese] >= 128).float().mean() > 0.5  # UTF-8 bytes of CJK characters
        arithmetic = y3[dom == corpus.domains.index("arithmetic")]
        assert ((arithmetic < 128) | (arithmetic == corpus.tokenizer.eot_id)).all()  # ASCII (and <|endoftext|>)


def test_unigram_entropy():
    small = Corpus([Document("text", "ab")] * 10)  # every split reads a, b, <|endoftext|>, a, b, ...
    assert small.unigram_entropy() == pytest.approx(math.log(3))
    assert small.unigram_entropy("val") == pytest.approx(math.log(3))
    assert 4.0 < Corpus.default().unigram_entropy() < 4.3  # bytes of four domains: about 4.15 nats


def test_batch_rejects_bad_requests(corpus):
    with pytest.raises(ValueError, match="split"):
        corpus.batch("test", 1, 8)
    with pytest.raises(ValueError, match="batch_size"):
        corpus.batch("train", 0, 8)
    small = Corpus([Document("text", "ab")] * 10)
    with pytest.raises(ValueError, match=r"seq_len \(64\) must be <"):
        small.batch("train", 1, 64)
    with pytest.raises(TypeError, match=r"seq_len must be an int, got float"):
        corpus.batch("train", 1, 1.5)
    with pytest.raises(TypeError, match=r"docs_per_domain must be an int, got str"):
        build_documents("8")


def test_any_local_text_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(f"Paragraph {i}: 你好, world." for i in range(30)), encoding="utf-8")
    corpus = Corpus.from_text_file(path)
    assert corpus.domains == ("text",)
    assert corpus.tokenizer.decode(corpus.val[:28]).startswith("Paragraph 9: 你好, world.")
    assert len(corpus.train) + len(corpus.val) == 30 + sum(
        len(f"Paragraph {i}: 你好, world.".encode()) for i in range(30))



def test_text_file_errors_name_the_file_and_the_rule(tmp_path):
    few = tmp_path / "few.txt"
    few.write_text("one paragraph\nstill the same one\n\nanother", encoding="utf-8")
    with pytest.raises(ValueError, match=r"few.txt: 2 paragraphs, but at least val_every \(10\).*blank lines"):
        Corpus.from_text_file(few)
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("\n\n".join(["café"] * 20).encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt: not UTF-8 text \(byte 3 is b'\\xe9'\)"):
        Corpus.from_text_file(latin)
    bom = tmp_path / "bom.txt"
    bom.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(f"p{i}" for i in range(10)).encode())
    corpus = Corpus.from_text_file(bom)  # the byte-order mark is not text, CRLF blank lines separate too
    assert corpus.tokenizer.decode(corpus.train[:3]) == "p0<|endoftext|>"
    for path, message in [(tmp_path, r"is a directory: give a text file"), (tmp_path / "none.txt", "no such file")]:
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            Corpus.from_text_file(path)
    with pytest.raises(ValueError, match=r"bom.txt has 59 bytes, more than the limit of 10"):
        read_documents(bom, limit=10)
    with pytest.raises(TypeError, match=r"documents must be Document\(domain, text\) items, got str"):
        Corpus([f"plain text {i}" for i in range(20)])


def test_default_corpus_copies_are_independent():
    a, b = Corpus.default(), Corpus.default()
    assert a is not b and torch.equal(a.train, b.train)
    a.train[:100] = 0
    assert not torch.equal(a.train[:100], b.train[:100]) and Corpus.default().train[:100].ne(0).any()


def test_the_corpus_encodes_with_its_tokenizer():
    class Words:  # a word-level tokenizer: any object with encode, eot_id and vocab_size will do
        vocab = {"hello": 0, "world": 1, "again": 2}
        eot_id, vocab_size = 3, 4

        def encode(self, text):
            return [self.vocab[w] for w in text.split()]

    corpus = Corpus([Document("text", "hello world again")] * 10, tokenizer=Words())
    assert corpus.train[:4].tolist() == [0, 1, 2, 3] and len(corpus.train) == 9 * 4
    assert corpus.train_domains.shape == corpus.train.shape


# ------------------------------------------------------------------------------------- fill-in-the-middle
def test_fim_split_cuts_a_document_in_three():
    rng = random.Random(0)
    text = "def f(x):\n    return x + 1\n"
    for _ in range(50):
        prefix, middle, suffix = fim_split(text, rng)
        assert prefix + middle + suffix == text


def test_a_fim_sample_decodes_in_psm_order():
    tok = ByteTokenizer()
    text = "def clamp(x, low=0, high=9):\n    return max(low, min(high, x))\n"
    prefix, middle, suffix = fim_split(text, random.Random(3))
    assert middle  # this seed cuts a non-empty middle
    decoded = tok.decode(fim_encode(tok, prefix, middle, suffix))
    assert decoded == f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>{middle}"
    before_middle, written_middle = decoded.split("<|fim_middle|>")
    reread_prefix, reread_suffix = before_middle.removeprefix("<|fim_prefix|>").split("<|fim_suffix|>")
    assert reread_prefix + written_middle + reread_suffix == text  # the original document


def fim_documents(corpus, split="train"):
    """(fim documents, documents) in a split: a document starts after each <|endoftext|>."""
    data, tok = corpus.split(split), corpus.tokenizer
    starts = torch.cat([torch.tensor([0]), (data == tok.eot_id).nonzero().flatten()[:-1] + 1])
    return int((data[starts] == tok.special_id("<|fim_prefix|>")).sum()), len(starts)


def test_fim_rewrites_about_a_tenth_of_the_code_documents_by_seed():
    docs = build_documents(docs_per_domain=1000)
    corpus = Corpus(docs, fim_rate=0.1, seed=0)
    n_fim, _ = fim_documents(corpus)
    n_code = sum(d.domain == "code" for i, d in enumerate(docs) if i % 10 != 9)
    assert 0.07 < n_fim / n_code < 0.13
    assert fim_documents(corpus, "val")[0] == 0  # validation text stays as written
    again, other = Corpus(docs, fim_rate=0.1, seed=0), Corpus(docs, fim_rate=0.1, seed=1)
    assert torch.equal(again.train, corpus.train) and not torch.equal(other.train, corpus.train)
    fim = corpus.train_domains[corpus.train == corpus.tokenizer.special_id("<|fim_middle|>")]
    assert (fim == corpus.domains.index("code")).all()
    plain = Corpus(docs)
    assert torch.equal(Corpus(docs, fim_rate=0.0, seed=5).train, plain.train)
    assert len(corpus.train) == len(plain.train) + 3 * n_fim  # three markers per FIM document
    with pytest.raises(ValueError, match=r"fim_rate \(1.5\) must be a number in \[0, 1\]"):
        Corpus(docs, fim_rate=1.5)


# ------------------------------------------------------------------------------------------------ packing
def test_packed_sequences_cover_the_stream_with_separators(corpus):
    rows, domains = corpus.packed("train", 64)
    assert rows.shape == domains.shape == ((len(corpus.train) - 65) // 64 + 1, 65)
    assert torch.equal(rows[:-1, -1], rows[1:, 0])  # the last target of a row is the next row's first input
    assert torch.equal(rows[0], corpus.train[:65]) and torch.equal(rows[3, 1:], corpus.train[3 * 64 + 1:4 * 64 + 1])
    assert torch.equal(domains[3], corpus.train_domains[192:257])
    assert (rows == corpus.tokenizer.eot_id).any(dim=1).float().mean() > 0.2  # documents end inside rows
    with pytest.raises(ValueError, match=r"seq_len \(0\) must be an int >= 1"):
        corpus.packed("train", 0)
    with pytest.raises(ValueError, match="must be <"):
        Corpus([Document("text", "ab")] * 10).packed("val", 64)


# ------------------------------------------------------------------------------------- held-out questions
def test_held_out_questions_are_new_distinct_and_answered_correctly():
    docs = build_documents(300)
    questions = held_out_questions(60, seed=1, exclude=docs)
    asked = {d.text.split("\n", 1)[0] for d in docs if d.domain == "arithmetic"}
    assert len(questions) == len({q for q, _ in questions}) == 60
    assert not {QUESTION.format(text=q).rstrip("\n") for q, _ in questions} & asked
    kinds = {"+": 0, "-": 0, "*": 0, "has": 0}
    for question, answer in questions:
        if question.startswith("What is "):
            x, op, y = question.removeprefix("What is ").rstrip("?").split()
            kinds[op] += 1
            assert answer == {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        else:  # "<name> has x <things>, finds y more and gives away z. ..."
            words = question.split()
            x, y, z = int(words[2]), int(words[5]), int(words[10].rstrip("."))
            kinds["has"] += 1
            assert answer == x + y - z
    assert all(kinds.values())  # all four kinds of the corpus
    assert held_out_questions(60, seed=1, exclude=docs) == questions  # deterministic
    with pytest.raises(ValueError, match=r"n \(0\) must be > 0"):
        held_out_questions(0)


def test_final_answer_reads_the_number_after_the_last_mark():
    assert final_answer("Work: 3 + 4 = 7.\nAnswer: 3 + 4 = 7\n#### 7") == 7
    assert final_answer("#### 1\n#### -12\nmore text") == -12
    for text in ("Answer: 7", "#### ", "#### seven", "####7", "#### --5", "#### ²", "#### 1.5"):
        assert final_answer(text) is None
