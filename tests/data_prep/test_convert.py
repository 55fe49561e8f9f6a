"""The conversion engine: determinism, parallel == sequential, deterministic dedup, resume after interruption."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data_prep import units
from data_prep.cli import main as prep_main
from data_prep.convert import ConvertOptions, convert
from data_prep.normalize import NormalizeConfig
from data_prep.progress import Progress
from data_prep.reader import iter_documents
from data_prep.readers.html import HtmlReader
from prep_corpora import html_corpus, image_bytes, page, tree_bytes, write

REPO = Path(__file__).resolve().parents[2]
CFG = NormalizeConfig(min_image_side=16)


def opts(**kw):
    return ConvertOptions(created_by="test", quiet=True, **{"workers": 1, "shard_docs": 4, "unit_docs": 4, **kw})


class Interrupt(Exception):
    pass


def test_same_input_gives_the_same_bytes_sequential_or_parallel(tmp_path):
    inp = html_corpus(tmp_path / "web", n_pages=14)
    convert(HtmlReader(str(inp)), tmp_path / "seq", CFG, opts())
    convert(HtmlReader(str(inp)), tmp_path / "seq2", CFG, opts())
    convert(HtmlReader(str(inp)), tmp_path / "par", CFG, opts(workers=2))
    convert(HtmlReader(str(inp)), tmp_path / "units", CFG, opts(workers=2, unit_docs=1))
    seq = tree_bytes(tmp_path / "seq")
    assert len(seq) == 5  # 4 shards + manifest
    assert seq == tree_bytes(tmp_path / "seq2") == tree_bytes(tmp_path / "par") == tree_bytes(tmp_path / "units")


def test_dedup_first_occurrence_in_input_order_wins_whatever_the_workers(tmp_path):
    inp = tmp_path / "web"
    shared = write(inp / "img" / "shared.png", image_bytes(64, 64, 1))
    write(inp / "img" / "own.png", image_bytes(64, 64, 2))
    text = "<p>" + "Words on a page about rivers and stones. " * 2 + "</p>"
    write(inp / "p0.html", page(text + "<img src='img/shared.png'>"))
    write(inp / "p1.html", page("<p>Another text, other words entirely.</p><img src='img/shared.png'>"
                                "<p>middle</p><img src='img/own.png'><img src='img/own.png'>"))
    write(inp / "p2.html", page(text + "<img src='img/shared.png'>"))  # a copy of p0
    os.symlink(shared, inp / "img" / "alias.png")
    write(inp / "p3.html", page("<p>A third page with a reused picture.</p><img src='img/alias.png'>"))
    for w in (1, 2):
        res = convert(HtmlReader(str(inp)), tmp_path / f"o{w}", CFG, opts(workers=w, shard_docs=1, unit_docs=1))
        m = res.manifest
        assert m.rejected == {"duplicate_document": 1} and m.images_rejected == {"duplicate_image": 3}
        docs = {d.meta["source_path"]: d for d in iter_documents(tmp_path / f"o{w}")}
        assert sorted(docs) == ["p0.html", "p1.html", "p3.html"]
        assert len(docs["p0.html"].images) == 1
        p1 = docs["p1.html"]  # lost the shared image and its own second copy; fields renumbered
        assert [s.type for s in p1.segments] == ["text", "image"] and list(p1.images) == ["0000.png"]
        assert "Another text" in p1.segments[0].text and "middle" in p1.segments[0].text
        assert [im["src"] for im in p1.meta["images"]] == ["img/own.png"]
        assert docs["p3.html"].images == {}
    assert tree_bytes(tmp_path / "o1") == tree_bytes(tmp_path / "o2")


def test_resume_after_an_interruption_redoes_only_what_is_missing(tmp_path):
    inp = html_corpus(tmp_path / "web", n_pages=12)
    convert(HtmlReader(str(inp)), tmp_path / "ref", CFG, opts())
    out = tmp_path / "out"

    def stop_after_two(i):
        if i == 1:
            raise Interrupt

    with pytest.raises(Interrupt):
        convert(HtmlReader(str(inp)), out, CFG, opts(), on_unit_done=stop_after_two)
    visible = [p.name for p in out.iterdir() if not p.name.startswith(".")]
    assert visible == []  # no manifest, no shard: nothing that looks finished
    # what a kill in the middle of writing leaves behind: temp files under hidden names
    write(out / ".shard-000000.tar.tmp-12345", b"half a shard")
    write(out / ".work" / ".part-000002.tar.tmp-12345", b"half a part")
    res = convert(HtmlReader(str(inp)), out, CFG, opts())
    assert (res.units_run, res.units_skipped) == (1, 2)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    assert not list(out.glob(".*.tmp-*")) and not list((out / ".work").glob(".*.tmp-*"))
    again = convert(HtmlReader(str(inp)), out, CFG, opts())
    assert (again.units_run, again.shards_written, again.shards_skipped) == (0, 0, 3)
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_resume_after_an_interruption_while_writing_shards(tmp_path, monkeypatch):
    inp = html_corpus(tmp_path / "web", n_pages=12)
    out = tmp_path / "out"
    real = units.write_shard

    def failing(work, out_dir, index, entries, digest):
        if index == 2:
            raise Interrupt
        return real(work, out_dir, index, entries, digest)

    monkeypatch.setattr(units, "write_shard", failing)
    with pytest.raises(Interrupt):
        convert(HtmlReader(str(inp)), out, CFG, opts())
    assert not (out / "manifest.json").exists()
    first = (out / "shard-000000.tar").stat()
    monkeypatch.setattr(units, "write_shard", real)
    res = convert(HtmlReader(str(inp)), out, CFG, opts())
    assert (res.units_run, res.shards_written, res.shards_skipped) == (0, 1, 2)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first.st_mtime_ns  # not rewritten
    convert(HtmlReader(str(inp)), tmp_path / "ref", CFG, opts())
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_changed_settings_or_inputs_are_redone_not_mixed(tmp_path):
    inp = html_corpus(tmp_path / "web", n_pages=8)
    out = tmp_path / "out"
    convert(HtmlReader(str(inp)), out, CFG, opts())
    res = convert(HtmlReader(str(inp)), out, NormalizeConfig(min_image_side=16, max_image_side=32), opts())
    assert res.units_run == 2
    convert(HtmlReader(str(inp)), tmp_path / "ref", NormalizeConfig(min_image_side=16, max_image_side=32), opts())
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")
    res = convert(HtmlReader(str(inp)), out, NormalizeConfig(min_image_side=16, max_image_side=32), opts(shard_docs=8))
    assert len(res.manifest.shards) == 1 and sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar"]
    time.sleep(0.01)
    write(inp / "a" / "page000.html", page("<p>This page was edited after the first run.</p>"))
    res = convert(HtmlReader(str(inp)), out, NormalizeConfig(min_image_side=16, max_image_side=32), opts(shard_docs=8))
    # the edited unit is redone; so is the other unit of the same shard, whose spill part a finished run
    # deleted (spill parts are kept only until a run finishes)
    assert res.units_run == 2 and res.units_skipped == 0
    assert "edited" in next(iter_documents(out)).segments[0].text


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, capsys):
    inp = html_corpus(tmp_path / "web", n_pages=8)
    out = tmp_path / "out"

    def second_run(i):
        if i == 0:
            assert prep_main(["html", str(inp), "--output", str(out), "--workers", "1", "--quiet"]) == 2

    res = convert(HtmlReader(str(inp)), out, CFG, opts(), on_unit_done=second_run)
    assert res.manifest.documents == 8
    assert "another msa-prep is writing" in capsys.readouterr().err


def test_killed_process_resumes_to_the_same_bytes(tmp_path):
    inp = html_corpus(tmp_path / "web", n_pages=40)
    args = ["html", str(inp), "--workers", "1", "--unit-docs", "1", "--min-image-side", "16", "--quiet"]
    assert prep_main([*args, "--output", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "data_prep.cli", *args, "--output", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not (out / ".work" / "part-000003.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be killed"
    res = subprocess.run([sys.executable, "-m", "data_prep.cli", *args, "--output", str(out)], cwd=REPO, env=env,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    run, skipped = map(int, re.search(r"units run (\d+), skipped (\d+)", res.stdout).groups())
    assert skipped >= 4 and run + skipped == 40
    assert tree_bytes(out) == tree_bytes(tmp_path / "ref")


def test_demo_goes_through_the_same_machinery_with_any_workers(tmp_path):
    for w in ("1", "2"):
        assert prep_main(["demo", "--output", str(tmp_path / w), "--documents", "60", "--shard-docs", "25",
                          "--vocab-size", "0", "--workers", w, "--quiet"]) == 0
    assert tree_bytes(tmp_path / "1") == tree_bytes(tmp_path / "2")
    m = json.loads((tmp_path / "1" / "manifest.json").read_text())
    assert [s["documents"] for s in m["shards"]] == [25, 25, 10] and m["rejected"] == {}


def test_progress_bar_shows_rates_on_a_terminal_only():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress("normalize", 10, stream=tty)
    bar.update(10, 8, 20)
    bar.close()
    line = tty.getvalue().strip().split("\r")[-1]
    assert line.startswith("normalize [") and "10/10" in line and "docs/s" in line and "images/s" in line
    for stream, enabled in ((io.StringIO(), True), (Terminal(), False)):  # a pipe or a log; --quiet
        bar = Progress("normalize", 10, enabled=enabled, stream=stream)
        bar.update(10, 8, 20)
        bar.close()
        assert stream.getvalue() == ""
