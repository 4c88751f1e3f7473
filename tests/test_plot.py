"""records/plot_runs.py on real runs: the PNG has its size, the parser reads every logged step,
switch, stage, TTT chunk and byte count (counted here from the files independently), seeds of one
configuration form one group, a cut-off log still plots with a warning naming what is missing, and
bad input is one `error:` line with exit status 2."""

import json
import re
import shutil
import struct
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "records"))
import plot_runs  # noqa: E402


def png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def step_lines(log_text: str) -> list[str]:
    return re.findall(r"^step:\d+/\d+ train_loss:.*$", log_text, re.M)


def test_plot_of_two_seeds(two_seeds, tmp_path, capsys):
    out = tmp_path / "compare.png"
    assert plot_runs.main([*map(str, two_seeds), "--out", str(out)]) == 0
    assert png_size(out) == (1600, 1000)
    assert not list(tmp_path.glob(".compare.png.*"))  # no temporary file left behind
    assert "warning" not in capsys.readouterr().err  # every stage, chunk and size line is there
    warnings = []
    runs = [run for d in two_seeds for run in plot_runs.read_folder(d, warnings.append)]
    assert warnings == []
    for d, run in zip(two_seeds, runs):
        text = (d / "train.log").read_text()
        sub = json.loads((d / "submission.json").read_text())
        assert len(run.steps) == len(step_lines(text)) == 5
        assert [s for s, _, _ in run.steps] == [int(x) for x in re.findall(r"^step:(\d+)/\d+ train_loss:", text, re.M)]
        assert run.switches == {name: int(step) for name, step in re.findall(r"^(\w+): on at step (\d+) ", text, re.M)}
        assert set(run.switches) == {"looping", "late_qat"}
        assert list(run.stages) == ["pre_quant", "roundtrip", "sliding", "ttt"]
        assert run.stages == pytest.approx(sub["stages"], abs=5e-5)  # the log's digits: 8, pre-quant 4
        chunks = (d / "ttt_chunks.jsonl").read_text().splitlines()
        assert len(run.chunks) == len(chunks) > 1 and run.chunk_key == "chunk"
        assert run.bytes == {"total": sub["bytes_total"], "model": sub["bytes_model"], "code": sub["bytes_code"]}
    groups = plot_runs.group_runs(runs)
    assert len(groups) == 1 and len(groups[0].runs) == 2 and "2 seeds: 7, 8" in groups[0].label


def test_other_settings_are_another_group_and_batches_are_accepted(two_seeds, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(two_seeds[1], other)
    log = other / "train.log"
    log.write_text(log.read_text().replace("  MATRIX_LR=0.04  (preset smoke)", "  MATRIX_LR=0.05  (env)", 1))
    chunks = other / "ttt_chunks.jsonl"  # the per-document TTT's lines: `batch` in place of `chunk`
    lines = [json.loads(x) for x in chunks.read_text().splitlines()]
    chunks.write_text("".join(json.dumps({"batch": d.pop("chunk"), **d}) + "\n" for d in lines))
    out = tmp_path / "two.png"
    groups = plot_runs.plot_runs([two_seeds[0], other], out, warn=lambda m: None)
    assert [len(g.runs) for g in groups] == [1, 1] and png_size(out) == (1600, 1000)
    assert groups[1].runs[0].chunk_key == "batch" and len(groups[1].runs[0].chunks) == len(lines)


def test_a_cut_off_run_still_plots_with_warnings(two_seeds, tmp_path, capsys):
    cut = tmp_path / "cut"
    cut.mkdir()
    text = (two_seeds[0] / "train.log").read_text()
    third = step_lines(text)[2]
    head = text[:text.index(third) + len(third) // 2]  # two whole step lines, the third cut in half
    (cut / "train.log").write_text(head)
    assert plot_runs.main([str(cut), str(two_seeds[1]), "--out", str(tmp_path / "p.png")]) == 0
    err = capsys.readouterr().err
    n = head.count("\n") + 1
    assert f"cut/train.log: line {n} truncated, ignored" in err
    assert "cut: no TTT chunks (ttt_chunks.jsonl missing)" in err
    assert "cut/train.log: no round trip score (the log ends before it)" in err
    assert "cut/train.log: no artifact size line" in err
    assert png_size(tmp_path / "p.png") == (1600, 1000)
    run = plot_runs.read_folder(cut, lambda m: None)[0]
    assert len(run.steps) == 2 and run.stages == {}


def test_a_records_folder_is_read_like_its_runs(two_seeds, tmp_path):
    folder = tmp_path / "rec"
    folder.mkdir()
    for seed, d in zip((7, 8), two_seeds):
        shutil.copyfile(d / "train.log", folder / f"train_seed{seed}.log")
    warnings = []
    runs = plot_runs.read_folder(folder, warnings.append)
    assert [r.name for r in runs] == ["rec/seed7", "rec/seed8"]
    assert [len(r.steps) for r in runs] == [5, 5] and all(r.stages and r.bytes for r in runs)
    assert warnings == [f"{folder}/train_seed7.log: no TTT chunks (a records folder keeps none)",
                        f"{folder}/train_seed8.log: no TTT chunks (a records folder keeps none)"]


def test_bad_input_is_one_line(tmp_path, capsys):
    assert plot_runs.main([str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'missing'}: no such folder (give a run's OUT_DIR or a records folder)\n"
    (tmp_path / "empty").mkdir()
    assert plot_runs.main([str(tmp_path / "empty")]) == 2
    assert "no train.log and no train_seed<S>.log files" in capsys.readouterr().err
    (tmp_path / "empty" / "train.log").write_text("step:1/5 train_loss:3.0 train_time:10ms step_avg:10.00ms lr_mult:1.0\n")
    assert plot_runs.main([str(tmp_path / "empty"), "--out", str(tmp_path / "nowhere" / "x.png")]) == 2
    assert "nowhere: no such folder for --out" in capsys.readouterr().err
