"""Shards (round trip and every header error), the training loader's slicing across ranks, the
val_bpb byte tables against the UTF-8 length of decoded text, and the shard builder's errors."""

import json

import numpy as np
import pytest
import sentencepiece as spm
import torch

from build_shards import BuildError, build, read_documents
from conftest import TINY_VOCAB
from train_gpt import (BOS_ID, HEADER_BYTES, DataError, DistributedTokenLoader, ShuffledLoader, build_byte_tables,
                       load_tokenizer, read_shard, write_shard)


def test_shard_round_trip(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65535, size=10_001)
    write_shard(tmp_path / "s.bin", tokens)
    assert (tmp_path / "s.bin").stat().st_size == HEADER_BYTES + 2 * len(tokens)
    np.testing.assert_array_equal(read_shard(tmp_path / "s.bin", 65536), tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left


def _corrupt(path, edit):
    data = bytearray(path.read_bytes())
    edit(data)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("edit, words", [
    (lambda d: d.__setitem__(slice(0, 4), (123).to_bytes(4, "little")), ["magic", "123"]),
    (lambda d: d.__setitem__(slice(4, 8), (2).to_bytes(4, "little")), ["version", "2"]),
    (lambda d: d.__delitem__(slice(-3, None)), ["token count", "truncated"]),
    (lambda d: d.extend(b"\0\0"), ["token count", "truncated"]),
    (lambda d: d.__delitem__(slice(100, None)), ["header", "shorter"]),
])
def test_header_errors_name_file_and_field(tmp_path, edit, words):
    path = tmp_path / "fineweb_train_000000.bin"
    write_shard(path, np.arange(100))
    _corrupt(path, edit)
    with pytest.raises(DataError) as e:
        read_shard(path, 1024)
    assert str(path) in str(e.value)
    for w in words:
        assert w in str(e.value)


def test_token_id_beyond_vocab_is_an_error(tmp_path):
    write_shard(tmp_path / "s.bin", [1, 5, 1024])
    with pytest.raises(DataError, match="token id 1024 >= VOCAB_SIZE=1024"):
        read_shard(tmp_path / "s.bin", 1024)


def test_loader_one_rank_many_micro_steps_equals_many_ranks(tmp_path):
    files = []
    for i, n in enumerate((700, 300, 450)):  # uneven shards: spans cross boundaries and wrap
        files.append(str(tmp_path / f"fineweb_train_{i:06d}.bin"))
        write_shard(files[-1], np.arange(n) + 1000 * i)
    local, seq, world = 64, 16, 4
    single = DistributedTokenLoader(files, 5000, rank=0, world_size=1, device="cpu")
    ranks = [DistributedTokenLoader(files, 5000, rank=r, world_size=world, device="cpu") for r in range(world)]
    for _ in range(6):  # 6 steps x 4 x 65 tokens > 1450: wraps around
        per_rank = [r.next_batch(local, seq) for r in ranks]
        for r in range(world):
            x, y = single.next_batch(local, seq)  # one process takes the same spans one after another
            assert torch.equal(x, per_rank[r][0]) and torch.equal(y, per_rank[r][1])
            assert torch.equal(x.flatten()[1:], y.flatten()[:-1])


def seed_shuffled_reference(files, share, shares, n_rows, seq_len):
    """PR #1493's shuffled loader for rank `share` of `shares` GPUs, written out from its description:
    shards share, share+shares, ...; PCG64(share); per shard a random phase and a permutation of its
    windows; each row picks a shard in proportion to its windows left and pops that shard's last."""
    mine = files[share::shares]
    rng = np.random.Generator(np.random.PCG64(share))
    tokens = [read_shard(f, 1 << 16) for f in mine]
    starts = []
    for t in tokens:
        max_phase = min(seq_len - 1, max(0, len(t) - seq_len - 1))
        phase = int(rng.integers(max_phase + 1)) if max_phase > 0 else 0
        starts.append(list(phase + rng.permutation((len(t) - 1 - phase) // seq_len) * seq_len))
    rows = []
    for _ in range(n_rows):
        left = np.array([len(s) for s in starts], dtype=np.float64)
        i = int(rng.choice(len(mine), p=left / left.sum()))
        start = starts[i].pop()
        rows.append(tokens[i][start:start + seq_len + 1].astype(np.int64))
    return torch.from_numpy(np.stack(rows))


@pytest.fixture(scope="module")
def sixteen_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards16")
    rng = np.random.default_rng(0)
    files = []
    for i in range(16):
        files.append(str(out / f"fineweb_train_{i:06d}.bin"))
        write_shard(files[-1], rng.integers(0, 60000, size=int(rng.integers(400, 900))))
    return files


def test_shuffled_loader_is_the_records_loader(sixteen_shards):
    """Share v of the batch draws exactly what rank v of 8 GPUs drew in PR #1493's loader; its
    windows do not overlap within an epoch of a shard."""
    seq = 16
    for share in (0, 5):
        loader = ShuffledLoader(sixteen_shards, 1 << 16, rank=share, world_size=8, accum=1, device="cpu")
        x, y = loader.next_batch(20 * seq, seq)
        x2, _ = loader.next_batch(20 * seq, seq)
        ref = seed_shuffled_reference(sixteen_shards, share, 8, 40, seq)
        assert torch.equal(x, ref[:20, :-1]) and torch.equal(y, ref[:20, 1:]) and torch.equal(x2, ref[20:, :-1])


@pytest.mark.parametrize("world", [2, 8])
def test_shuffled_loader_one_process_equals_many(sixteen_shards, world):
    """1 process with 8 micro-steps sees the sequences that `world` processes see with 8/world."""
    seq, rows = 16, 6
    single = ShuffledLoader(sixteen_shards, 1 << 16, rank=0, world_size=1, accum=8, device="cpu")
    ranks = [ShuffledLoader(sixteen_shards, 1 << 16, rank=r, world_size=world, accum=8 // world, device="cpu")
             for r in range(world)]
    for _ in range(3):  # steps
        alone = [single.next_batch(rows * seq, seq)[0] for _ in range(8)]
        together = [r.next_batch(rows * seq, seq)[0] for r in ranks for _ in range(8 // world)]
        assert all(torch.equal(a, b) for a, b in zip(alone, together))


def test_shuffled_loader_needs_a_shard_per_share(sixteen_shards):
    with pytest.raises(DataError, match="at least 32 training shards"):
        ShuffledLoader(sixteen_shards, 1 << 16, rank=0, world_size=4, accum=8, device="cpu")


def test_shuffled_loader_refuses_shards_shorter_than_a_window(sixteen_shards):
    loader = ShuffledLoader(sixteen_shards, 1 << 16, rank=0, world_size=8, accum=1, device="cpu")
    with pytest.raises(DataError, match="holds a sequence of 1001 tokens"):
        loader.next_batch(4 * 1000, 1000)  # the shards have 400-900 tokens


MULTIBYTE_DOCS = [
    "Café au lait, crème brûlée et pâté — très bien.",
    "Grüße aus München: Straße, Öl, Ähre, Übermut.",
    "中文文本测试：你好，世界。 第二句有 123 个字。",
    "Emoji 🦜🦜 and math ∑∫√ with spaces  and\ttabs.",
    "Ελληνικά: καλημέρα κόσμε. Русский: привет, мир!",
    "plain ascii words: the quick brown fox jumps over the lazy dog 42 times",
]


@pytest.fixture(scope="module")
def multibyte_data(tmp_path_factory):
    src = tmp_path_factory.mktemp("mb") / "docs.jsonl"
    rng = np.random.default_rng(1)
    docs = [" ".join(rng.permutation(MULTIBYTE_DOCS[i % 6].split())) for i in range(400)]
    docs[3] += " 𝄞 ꙮ"  # rare characters (4 and 3 UTF-8 bytes): below the coverage, so byte fallback
    src.write_text("\n".join(json.dumps({"text": d}) for d in docs), encoding="utf-8")
    out = tmp_path_factory.mktemp("mb_out")
    build([str(src)], 400, 40, out, threads=1)
    return out, docs


def test_val_bytes_equal_utf8_length_of_decoded_documents(multibyte_data):
    out, docs = multibyte_data
    sp = load_tokenizer(str(out / "tokenizer.model"), 400)
    tables = build_byte_tables(sp)
    val = torch.from_numpy(read_shard(out / "fineweb_val_000000.bin", 400).astype(np.int64))
    counted = int(tables.count(val[:-1], val[1:]).sum())
    # Independent: split the stream at BOS, decode each document, measure UTF-8.
    starts = (val == BOS_ID).nonzero().flatten().tolist() + [len(val)]
    decoded = [sp.decode(val[a + 1:b].tolist()) for a, b in zip(starts, starts[1:])]
    assert len(decoded) == 40
    assert counted == sum(len(d.encode("utf-8")) for d in decoded)
    assert any(sp.IsByte(int(t)) for t in val)  # byte fallback exercised (emoji)
    assert sum(len(d.encode()) for d in decoded) > sum(len(d) for d in decoded)  # multi-byte text


def test_byte_tables_by_hand(multibyte_data):
    out, _ = multibyte_data
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    t = build_byte_tables(sp)
    byte_id = sp.PieceToId("<0xF0>")
    assert t.base_bytes[byte_id] == 1 and not t.boundary[byte_id]
    assert t.boundary[BOS_ID] and t.base_bytes[BOS_ID] == 0
    space_piece = sp.PieceToId("\u2581")
    word = next(i for i in range(sp.vocab_size()) if sp.IdToPiece(i).startswith("\u2581") and len(sp.IdToPiece(i)) > 2)
    n = len(sp.IdToPiece(word)[1:].encode())
    prev, tgt = torch.tensor([BOS_ID, word, space_piece]), torch.tensor([word, word, word])
    assert t.count(prev, tgt).tolist() == [n, n + 1, n + 1]  # no space counted right after BOS


def test_tokenizer_without_space_piece_is_refused():
    class NoSpace:
        def vocab_size(self): return 4
        def IsControl(self, i): return i < 3
        def IsUnknown(self, i): return i == 3
        def IsUnused(self, i): return False
        def IsByte(self, i): return False
        def PieceToId(self, p): return 3
        def unk_id(self): return 3
    with pytest.raises(DataError, match="#897"):
        build_byte_tables(NoSpace())


def test_tokenizer_size_mismatch(tiny_data):
    with pytest.raises(DataError, match=f"has {TINY_VOCAB} pieces but VOCAB_SIZE=1024"):
        load_tokenizer(str(tiny_data / "tokenizer.model"), 1024)


def test_builder_keeps_validation_out_of_training(tiny_data):
    info = json.loads((tiny_data / "build_info.json").read_text())
    assert info["val_docs"] == 50 and info["train_shards"] > 1
    sp = spm.SentencePieceProcessor(model_file=str(tiny_data / "tokenizer.model"))
    val = read_shard(tiny_data / "fineweb_val_000000.bin", TINY_VOCAB)
    train = np.concatenate([read_shard(p, TINY_VOCAB) for p in sorted(tiny_data.glob("fineweb_train_*.bin"))])
    assert (val == BOS_ID).sum() == 50 and val[0] == BOS_ID and train[0] == BOS_ID
    assert (train == BOS_ID).sum() == info["train_docs"]
    val_docs = {sp.decode(d.tolist()) for d in np.split(val, np.nonzero(val == BOS_ID)[0][1:])}
    train_docs = {sp.decode(d.tolist()) for d in np.split(train, np.nonzero(train == BOS_ID)[0][1:])}
    assert not (val_docs & train_docs)


def test_builder_errors(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    (tmp_path / "few.txt").write_text("one\n\ntwo\n")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"nope": 1}\n')
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x00bad")
    cases = [
        ([str(tmp_path / "empty.txt")], "empty input"),
        ([str(tmp_path / "few.txt")], "2 documents found, need more than --val-docs 5"),
        ([str(tmp_path / "bad.jsonl")], "bad.jsonl:2: expected a JSON object with a 'text' field"),
        ([str(tmp_path / "binary.txt")], "cannot be read as UTF-8"),
        ([str(tmp_path / "missing.txt")], "does not exist"),
    ]
    for inputs, words in cases:
        with pytest.raises(BuildError, match=words):
            build(inputs, 300, 5, tmp_path / "out")


def test_documents_split_at_blank_lines(tmp_path):
    (tmp_path / "a.txt").write_text("First:\nline one\nline two\n\n\nSecond:\nx\n   \nThird\n")
    assert read_documents([str(tmp_path / "a.txt")]) == ["First:\nline one\nline two", "Second:\nx", "Third"]
    assert len(read_documents([str(tmp_path / "a.txt")], txt_docs="file")) == 1
