"""The client (dsv3_lite.client) and the terminal chat (dsv3_lite.chat), on a small random checkpoint."""
import dataclasses
import json
import os
import pathlib
import random
import re
import shlex
import signal
import subprocess
import sys

import pytest
import torch

from dsv3_lite import train
from dsv3_lite.chat import _printable
from dsv3_lite.checkpoint import BOOK_CHECKPOINT, save_checkpoint
from dsv3_lite.client import Client
from dsv3_lite.config import ModelArgs
from dsv3_lite.data import QUESTION, build_documents, final_answer, held_out_questions
from dsv3_lite.generate import generate
from dsv3_lite.model import Transformer
from dsv3_lite.tokenizer import BPETokenizer
from dsv3_lite.trainer import TrainArgs
from tests.models import make_agreeable

ROOT = pathlib.Path(__file__).resolve().parent.parent

QUESTIONS = ["What is 35 * 9?", "What is 1234 + 56?", "What is 7 * 8?",
             "Ada has 3 coins, finds 4 more and gives away 1. How many coins does Ada have now?", "What is 12 * 3?",
             "你好，今天去哪里？"]


@pytest.fixture(scope="module")
def tokenizer() -> BPETokenizer:
    return BPETokenizer.train([d.text for d in build_documents(40)], 400)


def write_checkpoint(path, tokenizer, data, seed=0):
    args = ModelArgs.tiny(vocab_size=tokenizer.vocab_size, mtp_depth=2, max_batch_size=4)
    torch.manual_seed(seed)
    model = make_agreeable(Transformer(args))  # its MTP drafts are sometimes right
    save_checkpoint(path, model, tokenizer, data=data)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tokenizer):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), tokenizer, {"text": None, "docs_per_domain": 40})


@pytest.fixture(scope="module")
def client(checkpoint) -> Client:
    return Client(checkpoint)


def without_timing(result):
    return {**result, "stats": {k: v for k, v in result["stats"].items() if k not in ("seconds", "tokens_per_second")}}


def test_generate_decodes_what_the_model_generates_from_the_corpus_question(client, tokenizer):
    result = client.generate(text="What is 35 * 9?", max_new_tokens=30)
    prompt = tokenizer.encode(QUESTION.format(text="What is 35 * 9?"))
    out, _ = generate(client.model, torch.tensor([prompt]), 30)
    assert result["generated_text"] == tokenizer.decode(out[0, len(prompt):])
    stats = result["stats"]
    assert stats["prompt_tokens"] == len(prompt) and stats["generated_tokens"] == 30
    assert stats["finish_reason"] == "length" and stats["main_forwards"] == 30
    assert stats["acceptance_rate"] is None and stats["seed"] is None
    assert stats["seconds"] > 0 and stats["tokens_per_second"] > 0
    whole = client.generate(text="What is 35 * 9?", stop=False)["stats"]  # as many tokens as fit
    assert whole["prompt_tokens"] + whole["generated_tokens"] == client.model.args.max_seq_len


@pytest.mark.parametrize("text", QUESTIONS)
@pytest.mark.parametrize("speculative", [False, True])
def test_stream_yields_pieces_that_add_up_to_generate(client, text, speculative):
    expected = client.generate(text=text, max_new_tokens=40, speculative=speculative)
    stream = client.stream(text=text, max_new_tokens=40, speculative=speculative)
    assert stream.result is None
    pieces = list(stream)
    assert len(pieces) > 1 and all(pieces)
    assert "".join(pieces) == expected["generated_text"]
    assert without_timing(stream.result) == without_timing(expected)


def test_speculative_greedy_answers_are_the_same_in_fewer_forwards(client):
    plain = client.generate(text=QUESTIONS, max_new_tokens=40)
    fast = client.generate(text=QUESTIONS, max_new_tokens=40, speculative=True)
    assert [r["generated_text"] for r in fast] == [r["generated_text"] for r in plain]
    stats = [r["stats"] for r in fast]
    assert all(0 < s["acceptance_rate"] < 1 and s["main_forwards"] < 40 for s in stats)
    assert all(sum(s["accepted_per_step"]) == sum(s["accepted"]) for s in stats)  # depths 1 and 2
    alone = client.generate(text=QUESTIONS[0], max_new_tokens=40, speculative=True)["stats"]
    # alone, every forward gives one token of its own, plus the drafts it accepted
    assert alone["main_forwards"] + sum(alone["accepted_per_step"]) == 40


def test_leaving_a_stream_early_ends_the_decoding(client):
    stream = client.stream(text="What is 7 * 8?", max_new_tokens=30, speculative=True)
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert not any(".cache_" in n for n, _ in client.model.named_buffers())  # freed at once
    assert stream.result is None
    with pytest.raises(RuntimeError, match="already iterated"):
        list(stream)


def test_each_answer_counts_its_own_drafts(client, tokenizer):
    texts = ["What is 12 * 3?", "What is 45 * 6?", "What is 78 * 9?"]  # one length in tokens: one batch
    results = client.generate(text=texts, max_new_tokens=30, speculative=True)
    tokens = torch.tensor([tokenizer.encode(QUESTION.format(text=t)) for t in texts])  # fails if lengths differ
    _, stats = generate(client.model, tokens, 30, speculative=True, stop_token=tokenizer.eot_id)
    assert [sum(r["stats"]["drafted"][k] for r in results) for k in range(2)] == stats.drafted
    assert [sum(r["stats"]["accepted"][k] for r in results) for k in range(2)] == stats.accepted
    for i, r in enumerate(results):
        s = r["stats"]
        assert s["acceptance_rate"] == s["accepted"][0] / s["drafted"][0]
        assert s["main_forwards"] == stats.main_forwards
        assert s["accepted_per_step"] == [int(a[i]) for a in stats.accepted_per_step if a[i] >= 0]


def test_a_list_of_texts_gives_each_texts_own_answer_in_order(client):
    texts = QUESTIONS + QUESTIONS[:3]  # some share a length in tokens, so they share a batch
    batched = client.generate(text=texts, max_new_tokens=25)
    single = [client.generate(text=t, max_new_tokens=25) for t in texts]
    assert [r["generated_text"] for r in batched] == [r["generated_text"] for r in single]
    assert batched[0]["stats"]["main_forwards"] == 25


def test_sampling_is_reproducible_from_the_reported_seed(client):
    first = client.generate(text="What is 7 * 8?", max_new_tokens=30, temperature=1.0, top_k=20)
    seed = first["stats"]["seed"]
    assert isinstance(seed, int)
    again = client.generate(text="What is 7 * 8?", max_new_tokens=30, temperature=1.0, top_k=20, seed=seed)
    assert again["generated_text"] == first["generated_text"]
    for speculative in (False, True):
        runs = [client.generate(text="What is 7 * 8?", max_new_tokens=30, temperature=0.9, top_p=0.9, seed=3,
                                speculative=speculative)["generated_text"] for _ in range(2)]
        assert runs[0] == runs[1]
    greedy = client.generate(text="What is 7 * 8?", max_new_tokens=30)["generated_text"]
    assert greedy != first["generated_text"]


@pytest.mark.parametrize("speculative", [False, True])
def test_decoding_ends_at_the_end_of_text_token(checkpoint, client, tokenizer, speculative):
    """A random model rarely says end-of-text, so a token it generates seventh or later stands in for it."""
    prompt = tokenizer.encode(QUESTION.format(text="What is 7 * 8?"))
    ids = generate(client.model, torch.tensor([prompt]), 30)[0][0, len(prompt):].tolist()
    at = next(i for i in range(6, 30) if ids[i] not in ids[:i])
    stopping = Client(checkpoint)
    stopping.tokenizer.eot_id = ids[at]
    stopped = stopping.generate(text="What is 7 * 8?", max_new_tokens=30, speculative=speculative)
    assert stopped["generated_text"] == tokenizer.decode(ids[:at])  # the stop token is not part of the text
    assert stopped["stats"]["finish_reason"] == "stop" and stopped["stats"]["generated_tokens"] == at
    stream = stopping.stream(text="What is 7 * 8?", max_new_tokens=30, speculative=speculative)
    assert "".join(stream) == stopped["generated_text"] and stream.result["stats"]["finish_reason"] == "stop"
    running = stopping.generate(text="What is 7 * 8?", max_new_tokens=30, stop=False)
    assert running["generated_text"] == tokenizer.decode(ids) and running["stats"]["finish_reason"] == "length"


def test_the_prompt_follows_the_checkpoints_corpus(tmp_path, tokenizer, checkpoint):
    assert Client(checkpoint).prompt == QUESTION
    own_text = write_checkpoint(tmp_path, tokenizer, {"text": "/data/my.txt", "docs_per_domain": 6000})
    assert Client(own_text).prompt == "{text}"
    assert Client(checkpoint, prompt="Q: {text}\nA:").prompt == "Q: {text}\nA:"
    with pytest.raises(ValueError, match=r"prompt \('Q: '\) must contain \{text\}"):
        Client(checkpoint, prompt="Q: ")


def test_bad_requests_raise_clear_errors(client, tmp_path):
    with pytest.raises(ValueError, match="text is empty"):
        client.generate(text="  ")
    with pytest.raises(TypeError, match="text must be str, got int"):
        client.generate(text=[3])
    with pytest.raises(TypeError, match="text must be str, got list"):
        client.stream(text=["a"])
    with pytest.raises(ValueError, match=r"seed \(-1\) must be an int in \[0, 2\*\*64\)"):
        client.generate(text="a", temperature=1.0, seed=-1)
    with pytest.raises(ValueError, match=r"top_p \(2\) must be in \(0, 1\]"):
        client.generate(text="a", temperature=1.0, top_p=2)
    with pytest.raises(ValueError, match=r"max_seq_len \(256\)"):
        client.generate(text="a", max_new_tokens=1000)
    with pytest.raises(ValueError, match=r"the prompt has \d+ tokens, but the model reads at most max_seq_len \(256\)"):
        client.generate(text="seven " * 300)
    with pytest.raises(FileNotFoundError, match="is not a dsv3_lite checkpoint"):
        Client(tmp_path)


# ------------------------------------------------------------------------------------------ the chat loop
def chat(*args, stdin=""):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "dsv3_lite.chat", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.slow
def test_chat_answers_each_question_until_q(checkpoint, client):
    done = chat("--checkpoint", checkpoint, "--max-new-tokens", 12,
                stdin="What is 35 * 9?\n\nWhat is 7 * 8?\nq\nnever asked\n")
    assert done.returncode == 0, done.stderr
    answers = [_printable(client.generate(text=q, max_new_tokens=12)["generated_text"])
               for q in ("What is 35 * 9?", "What is 7 * 8?")]
    assert done.stdout == (f"> What is 35 * 9?\n{answers[0]}\n> \n> What is 7 * 8?\n{answers[1]}\n> q\n")


@pytest.mark.slow
def test_chat_shows_the_accepted_drafts_and_ends_at_end_of_input(checkpoint, client):
    done = chat("--checkpoint", checkpoint, "--speculative", "--max-new-tokens", 20, stdin="What is 7 * 8?\n")
    assert done.returncode == 0, done.stderr
    stats = client.generate(text="What is 7 * 8?", max_new_tokens=20, speculative=True)["stats"]
    steps = " ".join(map(str, stats["accepted_per_step"]))
    assert (f"[20 tokens in {stats['main_forwards']} forwards; drafts accepted per step: {steps}; acceptance "
            in done.stdout)
    assert done.stdout.endswith("]\n> \n")


@pytest.mark.slow
@pytest.mark.parametrize("given", [None, "empty folder"])
def test_chat_without_a_checkpoint_says_how_to_make_one(tmp_path, given):
    done = chat(*([] if given is None else ["--checkpoint", tmp_path]), stdin="What is 2 + 2?\n")
    assert done.returncode == 2 and done.stdout == ""
    assert "python -m dsv3_lite.train --preset tiny --out runs/tiny" in done.stderr
    if given:
        assert "is not a dsv3_lite checkpoint: model.safetensors, config.json, tokenizer.json missing" in done.stderr


@pytest.mark.slow
def test_chat_reports_a_question_it_cannot_take_and_goes_on(checkpoint):
    done = chat("--checkpoint", checkpoint, "--max-new-tokens", 5, stdin="seven " * 300 + "\nWhat is 7 * 8?\n")
    assert done.returncode == 0, done.stderr
    assert "error: the prompt has" in done.stdout and done.stdout.count("> ") == 3


@pytest.mark.slow
def test_ctrl_c_ends_the_chat_without_a_traceback(checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen([sys.executable, "-m", "dsv3_lite.chat", "--checkpoint", str(checkpoint)],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    assert process.stdout.read(2) == "> "  # waiting for a question
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130 and out == "\n" and "Traceback" not in err


@pytest.mark.slow
def test_chat_rejects_bad_options_before_the_first_question(checkpoint):
    done = chat("--checkpoint", checkpoint, "--temperature", 1, "--top-k", 0, stdin="What is 2 + 2?\n")
    assert done.returncode == 2 and "top_k (0) must be an int >= 1" in done.stderr


def test_the_chat_writes_control_characters_as_escapes():
    assert _printable("a\x1b[2Jb\x07\u009b\n\tc 你好") == "a\\x1b[2Jb\\x07\\x9b\n\tc 你好"


@pytest.mark.slow
def test_chat_echoes_no_escape_sequence_and_survives_bytes_that_are_not_utf8(checkpoint):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "dsv3_lite.chat", "--checkpoint", str(checkpoint),
                           "--max-new-tokens", "4"], input=b"\x1b]0;owned\x07What is 7?\nbad \xff\xfe byte\n",
                          capture_output=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    out = done.stdout.decode()
    assert "\x1b" not in out and "\x07" not in out
    assert "> \\x1b]0;owned\\x07What is 7?\n" in out and "> bad \ufffd\ufffd byte\n" in out


@pytest.mark.parametrize("options, error, match", [
    (dict(stop="####"), TypeError, "stop must be True"),
    (dict(temperature=float("inf")), ValueError, "must be finite"),
    (dict(temperature="0.5"), TypeError, "temperature must be a number"),
    (dict(seed=2 ** 64), ValueError, r"seed .* must be an int in \[0, 2\*\*64\)"),
])
def test_client_options_that_would_do_something_else_are_refused(client, options, error, match):
    with pytest.raises(error, match=match):
        client.generate(text="What is 7 * 8?", max_new_tokens=2, **options)


def test_client_text_must_be_text(client):
    for text in (None, 7, []):
        with pytest.raises(TypeError, match="text must be"):
            client.generate(text=text)


def test_top_k_with_greedy_decoding_warns_that_it_changes_nothing(client):
    with pytest.warns(UserWarning, match="with temperature 0 decoding is greedy"):
        client.generate(text="What is 7 * 8?", max_new_tokens=2, top_k=5)


# ------------------------------------------------------------------------------------ the book's checkpoint
def test_the_book_checkpoint_is_small_and_the_readme_command_made_it():
    files = {p.name: p.stat().st_size for p in BOOK_CHECKPOINT.iterdir()}
    assert set(files) == {"model.safetensors", "config.json", "tokenizer.json", "history.json"}
    assert sum(files.values()) < 10 * 2**20
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = re.search(r"python -m dsv3_lite\.train (.*--export (\S+))\n", readme)
    assert ROOT / command.group(2) == BOOK_CHECKPOINT
    opts = vars(train._parser().parse_args(shlex.split(command.group(1))))
    saved = json.loads((BOOK_CHECKPOINT / "config.json").read_text(encoding="utf-8"))
    model_given = {k: opts[k] for k in train.MODEL_FIELDS if k in opts}
    train_given = {k: opts[k] for k in train.TRAIN_FIELDS if k in opts}
    assert saved["model"] == dataclasses.asdict(train.PRESETS[opts["preset"]]().replace(**model_given))
    assert saved["train"] == dataclasses.asdict(TrainArgs(**train_given, precision="fp32"))
    assert saved["data"] == train.DATA_DEFAULTS and saved["trainer_state"] is False


@pytest.mark.slow
def test_the_book_checkpoint_answers_in_the_corpus_format():
    """It is a poor calculator (chapter 8: 8 of 100 held-out questions), but it knows the products it was
    trained on and writes every answer in the corpus's worked format."""
    client = Client(BOOK_CHECKPOINT)
    rng = random.Random(0)
    products = [(rng.randint(12, 99), rng.randint(2, 9)) for _ in range(20)]
    results = client.generate(text=[f"What is {x} * {y}?" for x, y in products], speculative=True)
    assert sum(final_answer(r["generated_text"]) == x * y for r, (x, y) in zip(results, products)) >= 15
    held_out = client.generate(text=[q for q, _ in held_out_questions(12, seed=5, exclude=build_documents())])
    for r in results + held_out:
        assert r["stats"]["finish_reason"] == "stop"
        assert r["generated_text"].startswith("Work: ") and final_answer(r["generated_text"]) is not None
    done = chat("--book", "--speculative", stdin="What is 63 * 7?\n")
    assert done.returncode == 0 and final_answer(done.stdout.split("[")[0]) == 441
    assert "drafts accepted per step" in done.stdout


# ------------------------------------------------------------------------------ one client, many callers
def test_eight_threads_on_one_client_each_get_the_answer_asked_alone(checkpoint):
    """8 threads x 5 questions at once (greedy, plain and speculative, and sampled with a seed): every
    answer equals the same question asked alone."""
    import concurrent.futures
    client = Client(checkpoint)
    calls = [(QUESTIONS[(t + q) % len(QUESTIONS)], dict(max_new_tokens=12, speculative=q % 2 == 1,
                                                        temperature=0.8 if q == 4 else 0.0, seed=t))
             for t in range(8) for q in range(5)]
    alone = [client.generate(text=text, **options)["generated_text"] for text, options in calls]

    def ask(thread: int) -> list[str]:
        return [client.generate(text=text, **options)["generated_text"]
                for text, options in calls[5 * thread:5 * thread + 5]]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = [answer for answers in pool.map(ask, range(8)) for answer in answers]
    assert together == alone


def test_interleaved_streams_and_a_generate_between_them_each_get_their_own_answer(checkpoint):
    client = Client(checkpoint)
    alone = ["".join(client.stream(text=q, max_new_tokens=16)) for q in QUESTIONS[:2]]
    first, second = (iter(client.stream(text=q, max_new_tokens=16)) for q in QUESTIONS[:2])
    texts = [next(first), next(second)]
    assert client.generate(text=QUESTIONS[2], max_new_tokens=16)["generated_text"] == \
        Client(checkpoint).generate(text=QUESTIONS[2], max_new_tokens=16)["generated_text"]
    texts[0] += "".join(first)
    texts[1] += "".join(second)
    assert texts == alone
