"""TTT_MODE=doc_lora and the n-gram tilt: every target is scored once, by adapters and weights that
trained only on what was scored before it (checked by changing tokens and comparing scores bit for
bit), the global phases train only on documents already scored, 2 processes give what 1 gives,
the tilt is a normalised distribution (brute force over the vocabulary) and its hints never look at
the token they hint or later ones (a brute-force count of the same tables)."""

import copy
import dataclasses
import json

import pytest
import torch

from conftest import run_script, tiny_env
from test_eval import on_cpu, tiny_tables
from test_model import randomize, tiny_args
from train_gpt import (BOS_ID, CPU_RUNTIME_FOR_TESTS, GPT, ConfigError, Context, DocLoRA, ValidationSet,
                       compile_for_scoring, doc_queue, document_spans, evaluate, evaluate_doc_ttt, ngram_hints,
                       phase_pauses, tilted_nll)

DOC_ENV = dict(NUM_LAYERS="2", EVAL_SEQ_LEN="32", TTT_ENABLED="1", TTT_MODE="doc_lora", TTT_DOC_CHUNK="8",
               TTT_DOC_BATCH="4", TTT_LORA_RANK="4", TTT_LORA_LR="0.01", TTT_PHASE_DOCS="12", TTT_PHASES="2",
               TTT_CHUNK_TOKENS="64", TTT_EPOCHS="1", TTT_LR="0.01", TTT_BATCH_SEQS="4")


def test_document_spans_cover_every_target_once():
    for tokens in ([1, 5, 6, 1, 7, 1, 1, 8], [4, 5, 1, 6, 7], [1, 2, 3], [1, 2, 1], [3, 4]):
        t = torch.tensor(tokens)
        spans = document_spans(t)
        targets = [j for s, n in spans for j in range(s + 1, s + n)]
        assert targets == list(range(1, len(tokens)))  # each target once, in order
        assert all(t[s] == BOS_ID or s == 0 for s, _ in spans)
        # a document's last target is the next document's BOS (or the end of the stream)
        assert all(t[s + n - 1] == BOS_ID for s, n in spans[:-1])


def test_queue_and_phases():
    spans = [(0, n) for n in (5, 9, 3, 12, 7, 7, 2, 30, 4)]
    queue = doc_queue(spans, 2)
    assert sorted(i for _, b in queue for i in b) == list(range(9))
    assert [max(spans[i][1] for i in b) for _, b in queue] == [30, 12, 7, 5, 3]  # longest batch first
    assert [len(b) for _, b in queue] == [1, 2, 2, 2, 2]  # the shortest-first cut leaves the longest alone
    args = tiny_args(**dict(DOC_ENV, TTT_PHASE_DOCS="6", TTT_PHASES="3"))
    assert phase_pauses(queue, args) == [(1, 2), (2, 4), (3, 6)]  # after 3, 5 and 7 documents scored
    assert phase_pauses(queue, args.replace("t", ttt_phase_docs=0)) == []


@pytest.fixture(scope="module")
def doc_setup():
    torch.manual_seed(0)
    model = randomize(GPT(tiny_args(NUM_LAYERS="2"))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.3)
    gen = torch.Generator().manual_seed(1)
    val = torch.randint(2, 64, (1201,), generator=gen)
    val[torch.randint(1, 1200, (22,), generator=gen)] = BOS_ID
    val[0] = BOS_ID
    return model, val


def run_doc_ttt(model, val, **env):
    """The per-target scores (NaN where nothing was scored), the result and the batch records."""
    args = tiny_args(**dict(DOC_ENV, **env))
    scores = torch.full((len(val),), float("nan"), dtype=torch.float64)
    result, records = evaluate_doc_ttt(copy.deepcopy(model), ValidationSet.from_tables(val, tiny_tables()),
                                       on_cpu(args), scores=scores)
    return scores, result, records, args


def test_every_target_scored_once_with_the_plain_totals(doc_setup):
    model, val = doc_setup
    scores, result, records, args = run_doc_ttt(model, val, NGRAM_TILT="1", NGRAM_ORDER="3")
    plain = evaluate(model, ValidationSet.from_tables(val, tiny_tables()), on_cpu(args))
    assert (result.tokens, result.bytes) == (plain.tokens, plain.bytes) == (len(val) - 1, result.bytes)
    assert scores[0].isnan() and not scores[1:].isnan().any()
    assert scores[1:].sum().item() == pytest.approx(result.nll, rel=1e-12)
    assert sum(r["tokens"] for r in records) == result.tokens and [r["batch"] for r in records] == list(
        range(len(records)))


def spans_by_batch(val, args):
    spans = document_spans(val)
    return spans, [b for _, b in doc_queue(spans, args.ttt_doc_batch)]


def test_a_document_never_changes_earlier_scores(doc_setup):
    """Change document k's tokens (its length and BOS kept): every document of an earlier batch, and
    the other documents of its own batch (rows never mix), score bit for bit the same; k's own do not."""
    model, val = doc_setup
    base, _, _, args = run_doc_ttt(model, val, TTT_PHASE_DOCS="0")
    spans, batches = spans_by_batch(val, args)
    j = 2
    k = batches[j][1]
    start, n = spans[k]
    changed = val.clone()
    changed[start + 1:start + n - 1] = torch.randint(2, 64, (n - 2,), generator=torch.Generator().manual_seed(5))
    after, _, _, _ = run_doc_ttt(model, changed, TTT_PHASE_DOCS="0")
    for b, batch in enumerate(batches):
        for i in batch:
            s, m = spans[i]
            same = torch.equal(after[s + 1:s + m], base[s + 1:s + m])
            if b < j or (b == j and i != k):
                assert same, (b, i)
            elif i == k:
                assert not same


def test_a_chunk_never_changes_earlier_chunks(doc_setup):
    """Change the targets of chunk c of a long document: its chunks before c are bit-identical, chunk c
    is not (it is scored by the adapters trained on chunks < c only)."""
    model, val = doc_setup
    base, _, _, args = run_doc_ttt(model, val, TTT_PHASE_DOCS="0")
    spans = document_spans(val)
    k = max(range(len(spans)), key=lambda i: spans[i][1])
    start, n = spans[k]
    C, c = args.ttt_doc_chunk, 3
    assert n - 1 > (c + 1) * C
    changed = val.clone()
    lo = start + 1 + c * C  # chunk c's first target
    changed[lo:lo + C] = torch.randint(2, 64, (C,), generator=torch.Generator().manual_seed(6))
    after, _, _, _ = run_doc_ttt(model, changed, TTT_PHASE_DOCS="0")
    assert torch.equal(after[start + 1:lo], base[start + 1:lo])
    assert not torch.equal(after[lo:lo + C], base[lo:lo + C])


def test_global_phases_train_only_on_scored_documents(doc_setup):
    """A document of the last batch changes nothing before it, also after the phases; a document of
    the first batch (in the phases' training set) changes what later batches score after a phase."""
    model, val = doc_setup
    base, _, _, args = run_doc_ttt(model, val)
    spans, batches = spans_by_batch(val, args)
    pauses = phase_pauses(list(enumerate(batches)), args)
    assert len(pauses) == 2 and pauses[-1][0] < len(batches) - 2  # documents scored after both phases

    def change(i):
        s, m = spans[i]
        out = val.clone()
        out[s + 1:s + m - 1] = torch.randint(2, 64, (m - 2,), generator=torch.Generator().manual_seed(i))
        return out

    def batch_scores(scores, b):
        return torch.cat([scores[spans[i][0] + 1:spans[i][0] + spans[i][1]] for i in batches[b]])

    last = run_doc_ttt(model, change(batches[-1][0]))[0]
    for b in range(len(batches) - 1):
        assert torch.equal(batch_scores(last, b), batch_scores(base, b)), b
    first = run_doc_ttt(model, change(batches[0][0]))[0]
    first_after_phase = pauses[0][0] + 1
    # with a single process, batches share the adapters' A: a change can reach the next batches through
    # it, but after a phase the adapters are new, so only the phase's training carries it
    assert not torch.equal(batch_scores(first, len(batches) - 1), batch_scores(base, len(batches) - 1))
    assert first_after_phase < len(batches) - 1


def test_adapters_start_as_the_identity_and_train(doc_setup):
    model, val = doc_setup
    args = tiny_args(**DOC_ENV)
    lora = DocLoRA(model, 3, args, torch.Generator().manual_seed(0))
    assert len(lora.slots) == len(model.layer_order()) and set(lora.slots[0]) == {"q", "k", "v", "o", "mlp"}
    x = val[None, :32].repeat(3, 1)
    with torch.no_grad():
        assert torch.equal(model.forward_logits(x, lora=lora), model.forward_logits(x))  # B = 0
        for m in lora.modules():
            if hasattr(m, "B"):
                m.B.normal_()
        with_b = model.forward_logits(x, lora=lora)
    assert not torch.equal(with_b, model.forward_logits(x))
    # one adapter set per row: row 1's adapters change row 1 only
    with torch.no_grad():
        for m in lora.modules():
            if hasattr(m, "B"):
                m.B[1].zero_()
        y = model.forward_logits(x, lora=lora)
    assert torch.equal(y[0], with_b[0]) and torch.equal(y[1], model.forward_logits(x)[1])
    no_k = DocLoRA(model, 3, tiny_args(**dict(DOC_ENV, TTT_LORA_TARGETS="q,v,o,mlp,head")),
                   torch.Generator().manual_seed(0))
    assert set(no_k.slots[0]) == {"q", "v", "o", "mlp"} and set(no_k.final) == {"head"}


def test_compiled_doc_ttt_is_one_dynamic_graph_with_the_eager_scores(doc_setup, monkeypatch):
    """With COMPILE on, the per-document TTT compiles the transformer body with a dynamic length (its
    windows grow chunk by chunk: here 128 and 256 tokens wide), not once per width: Dynamo's
    graphs counted with a backend that runs them eagerly (one that scores only, one that trains), and
    the scores equal the eager run's."""
    model, val = doc_setup
    assert max(n for _, n in document_spans(val)) > 130  # a document needs windows of both widths
    eager, result, _, args = run_doc_ttt(model, val, TTT_PHASE_DOCS="0", EVAL_SEQ_LEN="300")
    graphs, compile_ = [], torch.compile

    def counting(fn, **kw):
        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward
        return compile_(fn, backend=backend, **kw)

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", counting)
    scores = torch.full((len(val),), float("nan"), dtype=torch.float64)
    ctx = Context(args, dataclasses.replace(CPU_RUNTIME_FOR_TESTS, compile=True))
    m = compile_for_scoring(copy.deepcopy(model), ctx.rt)
    scoring_graph = m.hidden
    compiled, _ = evaluate_doc_ttt(m, ValidationSet.from_tables(val, tiny_tables()), ctx, scores=scores)
    assert len(graphs) == 2
    assert compiled.nll == pytest.approx(result.nll, rel=1e-9) and torch.allclose(scores[1:], eager[1:], rtol=1e-6)
    assert m.hidden is scoring_graph  # put back after the stage


def test_doc_ttt_beats_no_adaptation(doc_setup):
    """Not a check of quality (random weights), only that the adapters do something at all: the
    scores differ from the plain evaluation's."""
    model, val = doc_setup
    _, result, _, args = run_doc_ttt(model, val, TTT_PHASE_DOCS="0")
    plain = evaluate(model, ValidationSet.from_tables(val, tiny_tables()), on_cpu(args))
    assert result.nll != pytest.approx(plain.nll, rel=1e-6)


def test_doc_lora_settings_are_checked():
    with pytest.raises(ConfigError, match="TTT_LORA_RANK is set, but only TTT_ENABLED=1 TTT_MODE=doc_lora reads it"):
        tiny_args(TTT_ENABLED="1", TTT_LORA_RANK="8")
    with pytest.raises(ConfigError, match="NGRAM_ORDER is set, but only NGRAM_TILT=1"):
        tiny_args(**dict(DOC_ENV, NGRAM_ORDER="8"))
    with pytest.raises(ConfigError, match="TTT_DOC_CHUNK=48 must be at most EVAL_SEQ_LEN=32"):
        tiny_args(**dict(DOC_ENV, TTT_DOC_CHUNK="48"))
    with pytest.raises(ConfigError, match="TTT_LORA_TARGETS names kk"):
        tiny_args(**dict(DOC_ENV, TTT_LORA_TARGETS="q,kk"))


# --- the n-gram tilt

def brute_hints(tokens: list[int], order: int, threshold: float) -> list[int]:
    """The counting tables as a plain loop: per context (the previous order-1 tokens), its total, each
    next token's count, and the top token (replaced only when another's count exceeds it)."""
    width, total, pairs, top = order - 1, {}, {}, {}
    out = []
    for i, tok in enumerate(tokens):
        if i < width:
            out.append(-1)
            continue
        ctx = tuple(tokens[i - width:i])
        hint = -1
        if ctx in total:
            count, token = top[ctx]
            if torch.tensor(count, dtype=torch.float32) / torch.tensor(total[ctx], dtype=torch.float32) >= threshold:
                hint = token
        out.append(hint)
        pairs[ctx, tok] = pairs.get((ctx, tok), 0) + 1
        total[ctx] = total.get(ctx, 0) + 1
        if ctx not in top or pairs[ctx, tok] > top[ctx][0]:
            top[ctx] = (pairs[ctx, tok], tok)
    return out


@pytest.mark.parametrize("order, threshold, vocab", [(3, 0.8, 4), (2, 0.5, 3), (4, 0.0, 5), (16, 0.8, 3)])
def test_hints_equal_brute_force_counting(order, threshold, vocab):
    gen = torch.Generator().manual_seed(order)
    tokens = torch.randint(0, vocab, (3000,), generator=gen)
    tokens[1000:1400] = tokens[:400]  # a repeated stretch: long contexts fire too
    hints = ngram_hints(tokens, order, threshold)
    expected = brute_hints(tokens.tolist(), order, threshold)
    assert hints.tolist() == expected
    assert sum(h >= 0 for h in expected) > 20


def test_no_hint_depends_on_its_token_or_later():
    gen = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, 4, (2000,), generator=gen)
    base = ngram_hints(tokens, 3, 0.6)
    for i in (5, 700, 1999):
        changed = tokens.clone()
        changed[i:] = torch.randint(0, 4, (2000 - i,), generator=gen)
        assert torch.equal(ngram_hints(changed, 3, 0.6)[:i + 1], base[:i + 1])


def test_tilt_is_a_normalised_distribution_in_closed_form():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 11, generator=gen, dtype=torch.float64) * 3
    hint = torch.randint(0, 11, (50,), generator=gen)
    target = torch.randint(0, 11, (50,), generator=gen)
    target[:10] = hint[:10]  # some hits
    for boost in (0.0, 2.625, 5.0):
        p = torch.softmax(logits, -1)
        tilted = p * torch.exp(boost * torch.nn.functional.one_hot(hint, 11).double())
        tilted = tilted / tilted.sum(-1, keepdim=True)  # renormalised over the whole vocabulary
        assert torch.allclose(tilted.sum(-1), torch.ones(50, dtype=torch.float64))
        logp = torch.log_softmax(logits, -1)
        nll = -logp.gather(1, target[:, None]).squeeze(1)
        log_q = logp.gather(1, hint[:, None]).squeeze(1)
        closed = tilted_nll(nll, log_q, target == hint, boost)
        brute = -torch.log(tilted.gather(1, target[:, None]).squeeze(1))
        assert torch.allclose(closed, brute, rtol=1e-12, atol=0)
        if boost:
            hit = target == hint
            assert (closed[hit] < nll[hit]).all() and (closed[~hit] > nll[~hit]).all()  # hits gain, misses pay


# --- end to end: 1 and 2 processes

@pytest.fixture(scope="module")
def doc_artifact(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("doc_run")
    proc = run_script(tiny_env(tiny_data, out, ITERATIONS=20, TTT_ENABLED=0))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_one_and_two_processes_agree(doc_artifact, tiny_data, tmp_path):
    env = dict(EVAL_ONLY=1, ARTIFACT=doc_artifact / "model.ptz", TTT_ENABLED=1, TTT_MODE="doc_lora",
               TTT_DOC_BATCH=4, TTT_DOC_CHUNK=8, TTT_LORA_RANK=4, TTT_PHASE_DOCS=16, TTT_PHASES=2,
               TTT_CHUNK_TOKENS=512, NGRAM_TILT=1, NGRAM_ORDER=4)
    one = run_script(tiny_env(tiny_data, tmp_path / "one", **env))
    two = run_script(tiny_env(tiny_data, tmp_path / "two", **env), nproc=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-3000:]
    e1, e2 = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("one", "two"))
    t1, t2 = e1["stages"]["ttt"], e2["stages"]["ttt"]
    assert t2["val_bpb"] == pytest.approx(t1["val_bpb"], abs=1e-4)
    assert t1["val_bpb"] != e1["stages"]["roundtrip"]["val_bpb"]
    lines = [json.loads(x) for x in (tmp_path / "two" / "ttt_chunks.jsonl").read_text().splitlines()]
    assert {r["rank"] for r in lines} == {0, 1} and [r["batch"] for r in lines] == list(range(len(lines)))
    log = (tmp_path / "two" / "eval.log").read_text()
    assert "\nngram_tilt: " in log and "\ndoc ttt: global phase 2/2 on 16 documents" in log
