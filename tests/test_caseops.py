"""CaseOps (data/caseops.py) and its byte sidecar: the transform round-trips exactly on any text,
its encodings match hand-written ones, malformed input is refused, the byte weights count exactly
the original text, a --caseops build's sidecar adds up to the UTF-8 length of the original
validation documents, and the script's val_bytes is the sidecar's sum over the scored targets."""

import random

import numpy as np
import pytest
import torch

from build_shards import build, read_documents
from conftest import ROOT, run_script, tiny_env
from caseops import ALLCAPS, CAPNEXT, ESC, TITLE, CaseOpsError, decode, encode, original_byte_weights
from train_gpt import (CPU_RUNTIME_FOR_TESTS, GPT, Context, DataError, Hyperparameters, evaluate, load_validation,
                       read_shard, shard_files, write_shard)

MULTILINGUAL = [
    "Café au lait, crème brûlée et PÂTÉ — très bien.",
    "Grüße aus MÜNCHEN: Straße, Öl, Ähre, Übermut.",
    "中文文本测试：你好，世界。 第二句有 123 个字。",
    "Emoji 🦜🦜 and MATH ∑∫√ with  two spaces\tand tabs.\nA new LINE: iPhone, McDonald, eBay, NASA's.",
    "Ελληνικά: ΚΑΛΗΜΕΡΑ κόσμε. Русский: Привет, МИР! ÉCOLE normale.",
]
# Text that already holds the operator characters, alone, doubled and next to letters.
WITH_OPERATORS = f"a{TITLE}b {ALLCAPS}{ALLCAPS} {ESC} {ESC}{ESC}X{CAPNEXT}y Z{ESC}"


@pytest.mark.parametrize("text, expected", [
    ("the cat", "the cat"),
    ("The Cat", f"{TITLE}the {TITLE}cat"),
    ("I am", f"{TITLE}i am"),
    ("NASA and THE", f"{ALLCAPS}nasa and {ALLCAPS}the"),
    ("iPhone", f"i{CAPNEXT}phone"),
    ("McDonald", f"{TITLE}mc{CAPNEXT}donald"),
    ("ABc", f"{TITLE}a{CAPNEXT}bc"),
    ("x1Y", f"x1{TITLE}y"),  # a digit ends a run
    ("ÉCOLE", f"É{ALLCAPS}cole"),  # only ASCII letters are runs
    (f"a{TITLE}", f"a{ESC}{TITLE}"),
    (ESC, ESC + ESC),
])
def test_encodings_by_hand(text, expected):
    assert encode(text) == expected
    assert decode(expected) == text


@pytest.mark.parametrize("name, text", [
    ("sample", (ROOT / "data/sample/tinyshakespeare.txt").read_text(encoding="utf-8")[:300_000]),
    ("multilingual", "\n\n".join(MULTILINGUAL)),
    ("operators", WITH_OPERATORS),
])
def test_round_trip(name, text):
    assert decode(encode(text)) == text
    assert int(original_byte_weights(encode(text)).sum()) == len(text.encode("utf-8"))


def random_text(rng: random.Random) -> str:
    alphabet = ("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ" * 3 + "  \n\t.,'-0123456789éÉßΣσ中🦜"
                + TITLE + ALLCAPS + CAPNEXT + ESC + "\ue000\ue005")
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 60)))


def test_round_trip_property_over_random_strings():
    rng = random.Random(0)
    for _ in range(3000):
        text = random_text(rng)
        e = encode(text)
        assert decode(e) == text, repr(text)
        assert not any(c.isupper() for c in e if c.isascii()), repr(text)  # no ASCII capital is left
        assert int(original_byte_weights(e).sum()) == len(text.encode("utf-8")), repr(text)


def weights_by_characters(transformed: str) -> list[int]:
    """An independent count: walk the characters, operators 0, ESC 0 and its escaped character its
    UTF-8 length, every other character its UTF-8 length, spread as one weight per byte."""
    out, escaped = [], False
    for ch in transformed:
        n = len(ch.encode("utf-8"))
        keep = escaped or ch not in (TITLE, ALLCAPS, CAPNEXT, ESC)
        out += [1 if keep else 0] * n
        escaped = ch == ESC and not escaped
    return out


def test_byte_weights_match_a_character_walk():
    rng = random.Random(1)
    for text in [WITH_OPERATORS, *MULTILINGUAL] + [random_text(rng) for _ in range(500)]:
        e = encode(text)
        assert original_byte_weights(e).tolist() == weights_by_characters(e), repr(text)


@pytest.mark.parametrize("bad", [TITLE, f"{TITLE} a", f"{ALLCAPS}1", f"{CAPNEXT}a", f"{ALLCAPS}a{CAPNEXT}b",
                                 f"{ESC}a", f"ab{ESC}", f"a{TITLE}{TITLE}b"])
def test_malformed_input_is_refused(bad):
    with pytest.raises(CaseOpsError):
        decode(bad)


@pytest.fixture(scope="module")
def caseops_data(tmp_path_factory):
    """A --caseops build: the multilingual documents (three times over) are the validation split,
    the sample's first speeches the training split."""
    src = tmp_path_factory.mktemp("caseops_src") / "text.txt"
    speeches = (ROOT / "data/sample/tinyshakespeare.txt").read_text(encoding="utf-8").split("\n\n")[:1500]
    docs = [d.replace("\n\n", "\n") for d in MULTILINGUAL] * 3 + [f"{WITH_OPERATORS} end"]
    src.write_text("\n\n".join(docs + speeches), encoding="utf-8")
    out = tmp_path_factory.mktemp("caseops_data")
    info = build([str(src)], 320, len(docs), out, shard_tokens=20_000, threads=1, caseops_form=True)
    return out, read_documents([str(src)])[:len(docs)], info


def test_sidecar_counts_the_original_bytes(caseops_data):
    out, originals, info = caseops_data
    tokens = read_shard(out / "fineweb_val_000000.bin", 320)
    counts = read_shard(out / "fineweb_val_bytes_000000.bin", 1 << 16).astype(np.int64)
    assert len(counts) == len(tokens) and shard_files(str(out), "val") == [str(out / "fineweb_val_000000.bin")]
    assert counts.sum() == sum(len(d.encode("utf-8")) for d in originals) == info["val_original_bytes"]
    starts = np.flatnonzero(tokens == 1).tolist() + [len(tokens)]  # BOS opens every document
    assert counts[tokens == 1].sum() == 0
    for k, doc in enumerate(originals):
        assert counts[starts[k]:starts[k + 1]].sum() == len(doc.encode("utf-8")), k
    # the transformed text takes more bytes than the original: the sidecar is not the tokens' own bytes
    assert sum(len(encode(d).encode("utf-8")) for d in originals) > counts.sum()


def test_val_bytes_is_the_sidecar_sum_over_the_scored_targets(caseops_data):
    out, _, _ = caseops_data
    args = Hyperparameters.from_env(dict(PRESET="baseline", DATA_PATH=str(out), TOKENIZER_PATH=str(out / "tokenizer.model"),
                                         VOCAB_SIZE="320", NUM_LAYERS="1", MODEL_DIM="32", NUM_HEADS="2",
                                         NUM_KV_HEADS="1", EVAL_SEQ_LEN="32", EVAL_BATCH_SEQS="8"))
    val = load_validation(args)
    counts = read_shard(out / "fineweb_val_bytes_000000.bin", 1 << 16).astype(np.int64)
    assert val.byte_source == "sidecar" and torch.equal(val.target_bytes.long(), torch.from_numpy(counts))
    ctx = Context(args, CPU_RUNTIME_FOR_TESTS)
    for stride in (0, 8):
        result = evaluate(GPT(args), val, ctx, stride=stride)
        assert result.tokens == len(counts) - 1 and result.bytes == counts[1:].sum()


def test_a_missing_or_misaligned_sidecar_is_an_error(caseops_data, tmp_path):
    out, _, _ = caseops_data
    env = dict(PRESET="baseline", DATA_PATH=str(tmp_path), TOKENIZER_PATH=str(out / "tokenizer.model"), VOCAB_SIZE="320")
    tokens = read_shard(out / "fineweb_val_000000.bin", 320)
    write_shard(tmp_path / "fineweb_val_000000.bin", tokens)
    write_shard(tmp_path / "fineweb_val_000001.bin", tokens)
    write_shard(tmp_path / "fineweb_val_bytes_000000.bin", np.ones(len(tokens) - 1, dtype=np.int64))
    with pytest.raises(DataError, match="fineweb_val_bytes_000001.bin is missing"):
        load_validation(Hyperparameters.from_env(env))
    write_shard(tmp_path / "fineweb_val_bytes_000001.bin", np.ones(len(tokens), dtype=np.int64))
    with pytest.raises(DataError, match=f"holds {len(tokens) - 1} byte counts for the {len(tokens)} tokens"):
        load_validation(Hyperparameters.from_env(env))


def test_the_log_says_the_bytes_come_from_the_sidecar(caseops_data, tmp_path):
    out, _, _ = caseops_data
    proc = run_script(tiny_env(out, tmp_path / "run", ITERATIONS=2, TTT_ENABLED=0, EVAL_STRIDE=0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = read_shard(out / "fineweb_val_bytes_000000.bin", 1 << 16).astype(np.int64)
    lines = [line for line in proc.stdout.splitlines() if "val_bytes:" in line]
    assert lines and all(f"val_bytes:{counts[1:].sum()} bytes_from:sidecar" in line for line in lines)
    assert "bytes per target from the byte sidecars (original text)" in proc.stdout
