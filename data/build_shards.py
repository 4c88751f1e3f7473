"""Build a SentencePiece tokenizer and token shards from your own text.

    python data/build_shards.py --input FILE [FILE ...] --vocab-size V --val-docs N --out DIR

Documents: a `.txt` file is split into documents at blank lines (`--txt-docs file` makes each file
one document); a `.jsonl` file gives one document per line from its `text` field. The first N
documents, in input order, are the validation split and are never used for training, not even to
train the tokenizer (the overlap of challenge issue #2127 cannot happen here).

Writes, each file atomically:
    DIR/tokenizer.model                SentencePiece BPE, the challenge's settings
    DIR/fineweb_val_000000.bin ...     the validation documents
    DIR/fineweb_train_000000.bin ...   the training documents
    DIR/fineweb_val_bytes_000000.bin   with --caseops: each validation token's bytes of the original text
    DIR/build_info.json                counts, settings and input hashes
Every document starts with BOS (id 1); there is no EOS. Train with DATA_PATH=DIR
TOKENIZER_PATH=DIR/tokenizer.model VOCAB_SIZE=V.

--caseops writes every document in its CaseOps form (data/caseops.py) and trains the tokenizer with
the four operators as pieces of their own, with no normalisation, so that the tokens spell the
transformed text exactly; the build checks that they do, document by document. The sidecar shard
beside each validation shard gives every token the number of bytes of the ORIGINAL text it stands
for (operators, ESC and BOS: 0), and train_gpt.py divides by those: val_bpb stays in bytes of the
text as it was.
"""

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import caseops  # noqa: E402
from train_gpt import BOS_ID, atomic_write_text, write_shard  # noqa: E402  (one definition of the format)


class BuildError(Exception):
    """Bad input: printed as one line, exit status 2."""


def read_documents(paths: list[str], txt_docs: str = "blocks") -> list[str]:
    docs = []
    for path in paths:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise BuildError(f"input {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as e:
            raise BuildError(f"input {path} cannot be read as UTF-8 text: {e}") from None
        if path.endswith(".jsonl"):
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise BuildError(f"{path}:{lineno}: expected a JSON object with a 'text' field") from None
                if not isinstance(doc, str):
                    raise BuildError(f"{path}:{lineno}: the 'text' field is not a string")
                if doc.strip():
                    docs.append(doc.strip())
        elif txt_docs == "file":
            if text.strip():
                docs.append(text.strip())
        else:
            docs.extend(block.strip() for block in re.split(r"\n\s*\n", text) if block.strip())
    return docs


def train_tokenizer(docs: list[str], vocab_size: int, out_path: Path, normalization: str, threads: int,
                    symbols: tuple[str, ...] = ()) -> None:
    """Train on the training documents only. Lines are the training sentences (documents can be
    longer than SentencePiece's sentence limit); at most 10M lines are sampled. `symbols` become
    pieces of their own (CaseOps' operators); with normalisation "identity" whitespace is kept as
    it is, so that the pieces spell the text exactly."""
    import sentencepiece as spm

    def sentences():
        for doc in docs:
            for line in doc.splitlines():
                if line.strip():
                    yield line

    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "tok")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences(), model_prefix=prefix, model_type="bpe", vocab_size=vocab_size,
                byte_fallback=True, split_digits=True, add_dummy_prefix=False,
                pad_id=0, bos_id=1, eos_id=2, unk_id=3, character_coverage=0.999,
                normalization_rule_name=normalization, input_sentence_size=10_000_000,
                remove_extra_whitespaces=normalization != "identity", user_defined_symbols=list(symbols),
                shuffle_input_sentence=True, max_sentence_length=1 << 16, num_threads=threads,
                minloglevel=2)
        except RuntimeError as e:
            raise BuildError(f"SentencePiece could not train a {vocab_size}-piece tokenizer on this text "
                             f"({str(e).strip().splitlines()[-1]}); try another --vocab-size or more text") from None
        out_path.parent.mkdir(parents=True, exist_ok=True)
        staged = out_path.with_name(f".{out_path.name}.tmp")
        shutil.copyfile(prefix + ".model", staged)
        os.replace(staged, out_path)


def encode_documents(sp, docs: list[str], label: str, batch: int = 2000) -> np.ndarray:
    """BOS + ids of every document, concatenated, as uint16."""
    parts, last = [], time.time()
    for i in range(0, len(docs), batch):
        for ids in sp.encode(docs[i:i + batch]):
            parts.append(np.asarray([BOS_ID] + ids, dtype=np.uint16))
        if time.time() - last > 10:
            print(f"encode {label}: {min(i + batch, len(docs))}/{len(docs)} documents", flush=True)
            last = time.time()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def piece_bytes(sp) -> list[bytes]:
    """The bytes each token id spells: '▁' is a space, a byte piece <0xAB> its byte, BOS and the other
    control pieces nothing."""
    out = []
    for i in range(sp.vocab_size()):
        if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
            out.append(b"")
        elif sp.IsByte(i):
            out.append(bytes([int(sp.IdToPiece(i)[1:-1], 16)]))
        else:
            out.append(sp.IdToPiece(i).replace("\u2581", " ").encode("utf-8"))
    return out


def original_bytes_per_token(sp, docs: list[str], tokens: np.ndarray) -> np.ndarray:
    """CaseOps validation: for each token of `tokens` (BOS + ids of each transformed document), the
    bytes of the original text it stands for. The tokens must spell the documents exactly (checked,
    document by document on a mismatch); then each token's count is the sum of
    caseops.original_byte_weights over its own bytes, so the counts of a document add up to the
    UTF-8 length of its original text."""
    spelled = piece_bytes(sp)
    lengths = np.array([len(b) for b in spelled], dtype=np.int64)[tokens]
    text = "".join(docs)
    if b"".join(spelled[t] for t in tokens.tolist()) != text.encode("utf-8"):
        starts = np.flatnonzero(tokens == BOS_ID).tolist() + [len(tokens)]
        for k, doc in enumerate(docs):
            ids = tokens[starts[k]:starts[k + 1]].tolist()
            if b"".join(spelled[t] for t in ids) != doc.encode("utf-8"):
                raise BuildError(f"validation document {k} ({doc[:40]!r}...) is not spelled exactly by its tokens; "
                                 "the byte counts would be wrong (the tokenizer normalises the text)")
    weights = np.concatenate([[0], np.cumsum(caseops.original_byte_weights(text), dtype=np.int64)])
    ends = np.cumsum(lengths)
    counts = weights[ends] - weights[ends - lengths]
    if counts.max(initial=0) >= 2 ** 16:
        raise BuildError(f"a validation token stands for {counts.max()} bytes; the sidecar holds at most 65535")
    return counts


def write_split(tokens: np.ndarray, out: Path, split: str, shard_tokens: int) -> int:
    """Shards fineweb_<split>_NNNNNN.bin of `shard_tokens` values each (the last one shorter)."""
    for old in out.glob(f"fineweb_{split}_*.bin"):  # a rebuild must not mix with stale shards
        old.unlink()
    n = max(1, -(-len(tokens) // shard_tokens))
    for i in range(n):
        write_shard(out / f"fineweb_{split}_{i:06d}.bin", tokens[i * shard_tokens:(i + 1) * shard_tokens])
    return n


def build(inputs, vocab_size, val_docs, out, *, txt_docs="blocks", shard_tokens=100_000_000,
          normalization="nmt_nfkc", threads=None, caseops_form=False) -> dict:
    import sentencepiece as spm

    if vocab_size > 65536:
        raise BuildError(f"--vocab-size {vocab_size} does not fit uint16 shards (max 65536)")
    docs = read_documents(inputs, txt_docs)
    if not docs:
        raise BuildError(f"no documents in {', '.join(inputs)} (empty input)")
    if len(docs) <= val_docs:
        raise BuildError(f"{len(docs)} documents found, need more than --val-docs {val_docs} "
                         "(the validation documents are never trained on)")
    if caseops_form:
        docs = [caseops.encode(doc) for doc in docs]
        normalization = "identity"  # the tokens must spell the transformed text exactly
    val, train = docs[:val_docs], docs[val_docs:]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train_tokenizer(train, vocab_size, out / "tokenizer.model", normalization, threads or os.cpu_count() or 1,
                    caseops.OPERATORS if caseops_form else ())
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    if sp.PieceToId("\u2581") == sp.unk_id():
        raise BuildError("the trained tokenizer has no '▁' piece; val_bpb would be wrong (challenge issue #897)")
    print(f"tokenizer: {vocab_size} pieces trained on {len(train)} documents in {time.time() - t0:.1f}s", flush=True)
    val_tokens = encode_documents(sp, val, "val")
    train_tokens = encode_documents(sp, train, "train")
    info = {
        "inputs": {p: hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in inputs},
        "vocab_size": vocab_size, "normalization": normalization, "txt_docs": txt_docs, "caseops": caseops_form,
        "val_docs": len(val), "train_docs": len(train),
        "val_tokens": int(len(val_tokens)), "train_tokens": int(len(train_tokens)),
        "val_shards": write_split(val_tokens, out, "val", shard_tokens),
        "train_shards": write_split(train_tokens, out, "train", shard_tokens),
    }
    if caseops_form:  # after the val shards: write_split("val") clears every fineweb_val_* file
        counts = original_bytes_per_token(sp, val, val_tokens)
        write_split(counts, out, "val_bytes", shard_tokens)
        info["val_original_bytes"] = int(counts.sum())
    atomic_write_text(out / "build_info.json", json.dumps(info, indent=2) + "\n")
    print(f"wrote {out}: {info['val_docs']} val docs ({info['val_tokens']} tokens), "
          f"{info['train_docs']} train docs ({info['train_tokens']} tokens) in {time.time() - t0:.1f}s", flush=True)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--input", nargs="+", required=True, help=".txt or .jsonl files")
    ap.add_argument("--vocab-size", type=int, required=True)
    ap.add_argument("--val-docs", type=int, required=True, help="the first N documents are the validation split")
    ap.add_argument("--out", required=True)
    ap.add_argument("--txt-docs", choices=("blocks", "file"), default="blocks",
                    help="a .txt file is split at blank lines (blocks) or is one document (file)")
    ap.add_argument("--shard-tokens", type=int, default=100_000_000)
    ap.add_argument("--normalization", default=None,
                    help="SentencePiece normalization rule (default nmt_nfkc; with --caseops only identity)")
    ap.add_argument("--caseops", action="store_true",
                    help="CaseOps form of the text, operators as tokenizer pieces, and the validation byte sidecar")
    args = ap.parse_args(argv)
    if args.val_docs < 1 or args.shard_tokens < 1 or args.vocab_size < 8:
        print("error: --val-docs and --shard-tokens must be >= 1 and --vocab-size >= 8", file=sys.stderr)
        return 2
    if args.caseops and args.normalization not in (None, "identity"):
        print(f"error: --caseops needs --normalization identity (the tokens must spell the text exactly), "
              f"not {args.normalization}", file=sys.stderr)
        return 2
    try:
        build(args.input, args.vocab_size, args.val_docs, args.out, txt_docs=args.txt_docs,
              shard_tokens=args.shard_tokens, normalization=args.normalization or "nmt_nfkc",
              caseops_form=args.caseops)
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
