"""The records folder and the submission workflow: the generated tables are current, every preset
has its folder, the significance helper's p-value equals a hand-computed t-test, and the
records-folder command turns real run directories into a submission (and refuses what it must)."""

import json
import math
import shutil
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "records"))
import make_record  # noqa: E402
import preset_docs  # noqa: E402
import significance  # noqa: E402
from train_gpt import PRESETS  # noqa: E402


def test_generated_tables_are_current():
    assert preset_docs.main([]) == 0, "run: python records/preset_docs.py --write"


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "smoke"])
def test_every_preset_has_a_records_folder(name):
    text = (ROOT / "records" / name / "README.md").read_text()
    seed = PRESETS[name].get("seed", 1337)  # the record's seed
    assert f"PRESET={name} SEED={seed} torchrun --standalone --nproc_per_node=8 train_gpt.py" in text
    assert "reported **val_bpb 1." in text
    assert "## Settings" in text and f"`{sorted(PRESETS[name])[0].upper()}`" in text
    variant = "sp8192" if PRESETS[name]["vocab_size"] == 8192 else "sp1024"
    if "caseops" in PRESETS[name]["data_path"]:
        variant = "caseops"
    assert f"python data/download_fineweb.py --variant {variant}" in text


# ---- the t distribution against closed forms (df 1, 2, 3) and the normal limit
@pytest.mark.parametrize("t", [-4.0, -2.598, -1.0, -0.1, 0.0, 0.5, 1.7, 3.3])
def test_student_t_cdf_closed_forms(t):
    cdf1 = 0.5 + math.atan(t) / math.pi
    cdf2 = 0.5 + t / (2 * math.sqrt(2 + t * t))
    u = t / math.sqrt(3)
    cdf3 = 0.5 + (u / (1 + u * u) + math.atan(u)) / math.pi
    normal = 0.5 * (1 + math.erf(t / math.sqrt(2)))
    assert significance.student_t_cdf(t, 1) == pytest.approx(cdf1, abs=1e-12)
    assert significance.student_t_cdf(t, 2) == pytest.approx(cdf2, abs=1e-12)
    assert significance.student_t_cdf(t, 3) == pytest.approx(cdf3, abs=1e-12)
    assert significance.student_t_cdf(t, 100000) == pytest.approx(normal, abs=1e-4)


def fixture_log(path, seed, loss, bpb, stage="legal_ttt"):
    path.write_text(f"hyperparameters:\n  SEED={seed}  (env)\nstep:10/10 train_loss:2.0\n"
                    f"final_int6_brotli_roundtrip_exact val_loss:{loss + 0.03:.8f} val_bpb:{bpb + 0.02:.8f}\n"
                    f"{stage}_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\n")
    return path


def test_significance_matches_a_hand_computed_t_test(tmp_path, capsys):
    # losses 1.80, 1.81, 1.79: mean 1.80, sd 0.01; record 1.82 - 0.005 = 1.815
    # t = (1.80 - 1.815) / (0.01 / sqrt 3) = -2.5980762; df 2: p = 0.5 + t / (2 sqrt(2 + t^2)) = 0.0608450
    logs = [fixture_log(tmp_path / f"s{i}.log", seed, loss, loss / 1.5)
            for i, (seed, loss) in enumerate([(1, 1.80), (2, 1.81), (3, 1.79)])]
    out_json = tmp_path / "sig.json"
    assert significance.main(["--record-val-loss", "1.82", "--json", str(out_json), *map(str, logs)]) == 0
    doc = json.loads(out_json.read_text())
    assert doc["mean"] == pytest.approx(1.80) and doc["std"] == pytest.approx(0.01)
    assert doc["t"] == pytest.approx(-2.5980762, abs=1e-6)
    assert doc["p_value"] == pytest.approx(0.0608450, abs=1e-6)
    printed = capsys.readouterr().out
    assert "p_value:0.060845" in printed and "not significant at p < 0.01" in printed
    assert "seed:2" in printed and "legal_ttt" in printed  # the last stage is the score
    # the same record in val_bpb (ratio 1.5 nats per bpb here) gives the same test
    assert significance.main(["--record-val-bpb", str(1.82 / 1.5), "--json", str(out_json), *map(str, logs)]) == 0
    assert json.loads(out_json.read_text())["p_value"] == pytest.approx(0.0608450, abs=1e-6)


def test_significance_bad_input(tmp_path, capsys):
    one = fixture_log(tmp_path / "a.log", 1, 1.8, 1.2)
    assert significance.main(["--record-val-loss", "1.9", str(one)]) == 2
    assert "at least 2 runs" in capsys.readouterr().err
    assert significance.main(["--record-val-loss", "1.9", str(one), str(tmp_path / "missing.log")]) == 2
    assert "missing.log: no such log" in capsys.readouterr().err
    (tmp_path / "cut.log").write_text("hyperparameters:\n  SEED=3  (env)\nstep:1/10 train_loss:3.0\n")
    assert significance.main(["--record-val-loss", "1.9", str(one), str(tmp_path / "cut.log")]) == 2
    assert "did the run finish" in capsys.readouterr().err


# ---- the records-folder command on real runs (two_seeds: conftest.py)
def test_make_record_from_two_seeds(two_seeds, tmp_path):
    out = tmp_path / "records" / "2026-11-25_tiny"
    assert make_record.main([*map(str, two_seeds), "--out", str(out), "--name", "Tiny", "--author", "Me"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "requirements.txt", "runs.png", "submission.json",
                                                     "train_gpt.py", "train_gpt_readable.py",
                                                     "train_seed7.log", "train_seed8.log"]
    subs = [json.loads((d / "submission.json").read_text()) for d in two_seeds]
    doc = json.loads((out / "submission.json").read_text())
    assert doc["name"] == "Tiny" and doc["author"] == "Me" and doc["seed"] == [7, 8]
    assert doc["val_bpb"] == pytest.approx((subs[0]["val_bpb"] + subs[1]["val_bpb"]) / 2)
    assert doc["val_bpb_std"] == pytest.approx(abs(subs[0]["val_bpb"] - subs[1]["val_bpb"]) / math.sqrt(2))
    assert doc["bytes_total"] == max(s["bytes_total"] for s in subs)
    assert doc["eval_seconds"]["roundtrip"] == max(s["eval_seconds"]["roundtrip"] for s in subs)
    assert doc["compliance"]["artifact_under_16000000_bytes"] is True
    assert [r["val_bpb"] for r in doc["runs"]] == [s["val_bpb"] for s in subs]
    assert "SEED" not in doc["hyperparameters"]
    # the counted code is the runs' packed copy, and it unpacks to the source they ran
    assert (out / "train_gpt.py").read_bytes() == (two_seeds[0] / "train_gpt_packed.py").read_bytes()
    assert len((out / "train_gpt.py").read_bytes()) == doc["bytes_code"]
    assert (out / "train_gpt_readable.py").read_text() == (ROOT / "train_gpt.py").read_text()
    assert (out / "train_seed8.log").read_text() == (two_seeds[1] / "train.log").read_text()
    readme = (out / "README.md").read_text()
    assert readme.startswith("# Tiny\n") and f"**val_bpb {doc['val_bpb']:.4f}**" in readme
    assert "| 7 | 5 |" in readme and "| 8 | 5 |" in readme
    assert "PRESET=smoke " in readme and " NUM_LAYERS=2 " in readme and "SEED=<seed> torchrun" in readme
    assert "| `MODEL_DIM` | `32` | env |" in readme
    assert "](runs.png)" in readme and (out / "runs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.parent.glob(".2026-11-25_tiny.*"))  # no temporary folder left behind
    (out / "stale.txt").write_text("from an earlier attempt")
    assert make_record.main([*map(str, two_seeds), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "README.md").exists()
    assert [p.name for p in out.parent.iterdir()] == [out.name]  # neither the old nor a temporary folder


def test_make_record_refuses_a_packed_copy_of_other_code(two_seeds, tmp_path, capsys):
    """The packed copy must hold the logged source's code (docstrings and comments may differ, a
    statement may not)."""
    import base64
    import lzma

    other = tmp_path / "other"
    shutil.copytree(two_seeds[0], other)
    source = (ROOT / "train_gpt.py").read_text(encoding="utf-8")
    for text, ok in ((source.replace('"""', '"""Another docstring. ', 1), True),
                     (source.replace("BOS_ID = 1", "BOS_ID = 2", 1), False)):
        blob = base64.b85encode(lzma.compress(text.encode("utf-8"))).decode("ascii")
        packed = (two_seeds[0] / "train_gpt_packed.py").read_text()
        (other / "train_gpt_packed.py").write_text(make_record.PACKED_SOURCE.sub(f'b85decode("{blob}")', packed, 1))
        out = tmp_path / f"rec{ok}"
        assert (make_record.main([str(other), "--out", str(out)]) == 0) == ok
        assert ok or "does not unpack to the code of the source" in capsys.readouterr().err


def test_make_record_refuses_mismatched_runs(two_seeds, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(two_seeds[1], other)
    log = other / "train.log"
    log.write_text(log.read_text().replace("  MATRIX_LR=0.04  (preset smoke)", "  MATRIX_LR=0.05  (env)", 1))
    out = tmp_path / "rec"
    assert make_record.main([str(two_seeds[0]), str(other), "--out", str(out)]) == 2
    assert "differ in MATRIX_LR" in capsys.readouterr().err and not out.exists()
    assert make_record.main([str(two_seeds[0]), str(two_seeds[0]), "--out", str(out)]) == 2
    assert "repeat a seed" in capsys.readouterr().err
    log.write_text(log.read_text().replace("def main()", "def main2()", 1))
    assert make_record.main([str(two_seeds[0]), str(other), "--out", str(out)]) == 2
    assert "does not match its sha256" in capsys.readouterr().err
    (other / "submission.json").unlink()
    assert make_record.main([str(other), "--out", str(out)]) == 2
    assert "no submission.json" in capsys.readouterr().err
    out.mkdir()
    assert make_record.main([str(two_seeds[0]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
