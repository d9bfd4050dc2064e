import gc
import itertools
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from stages import jsonl, outputs
from stages.errors import StageError


def blocks_of(path, size):
    return [jsonl.read_span(path, offset, length) for offset, length in jsonl.block_spans(path, size)]


@pytest.mark.parametrize("size", [1, 7, 100, 4096, 1 << 20])
def test_block_spans_cover_the_file_in_whole_lines(tmp_path, size):
    lines = [b'{"a": %d}' % i + b"x" * (i % 37) for i in range(500)]
    data = b"\n".join(lines[:250]) + b"\r\n" + b"\n".join(lines[250:])  # a CRLF and no final newline
    f = tmp_path / "in.jsonl"
    f.write_bytes(data)
    blocks = blocks_of(f, size)
    assert b"".join(blocks) == data and all(b.endswith(b"\n") for b in blocks[:-1])
    assert all(len(b) >= size for b in blocks[:-1])
    if size == 100:
        assert len(blocks) > 50
    with open(f, "rb") as fh:  # the same lines as iterating the file, without their b"\n"
        by_iteration = [line.rstrip(b"\n") for line in fh]
    assert [line for b in blocks for line in jsonl.block_lines(b)] == by_iteration


def test_block_spans_keep_a_line_longer_than_the_block_whole(tmp_path):
    f = tmp_path / "in.jsonl"
    f.write_bytes(b"short\n" + b"y" * 200_000 + b"\n\nlast\n")
    blocks = blocks_of(f, 64)
    assert [line for b in blocks for line in jsonl.block_lines(b)] == [b"short", b"y" * 200_000, b"", b"last"]
    assert blocks[0] == b"short\n" + b"y" * 200_000 + b"\n"  # the cut at byte 64 moved to the line's end
    assert [len(b) for b in blocks_of(f, 1)] == [6, 200_001, 1, 5]  # a line a block
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert list(jsonl.block_spans(tmp_path / "empty.jsonl")) == []


def _square(x):
    return x * x


def _fail_on_three(x):
    if x == 3:
        raise ValueError("three")
    return x


@pytest.mark.parametrize("workers", [1, 2])
def test_map_ordered_keeps_order_and_reads_ahead_a_bounded_number(workers):
    pulled = []

    def tasks():
        for i in range(20):
            pulled.append(i)
            yield (i,)

    results = jsonl.map_ordered(_square, tasks(), workers, in_flight=3)
    assert next(results) == ((0,), 0) and len(pulled) <= 3  # streaming: not the whole input read first
    assert [r for _, r in results] == [i * i for i in range(1, 20)]


@pytest.mark.parametrize("workers", [1, 2])
def test_map_ordered_raises_the_workers_error(workers):
    with pytest.raises(ValueError, match="three"):
        list(jsonl.map_ordered(_fail_on_three, ((i,) for i in range(10)), workers))


def test_atomic_writer_keeps_the_previous_file_on_error_and_leaves_no_litter(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("previous\n")
    with pytest.raises(RuntimeError), jsonl.atomic_writer(out) as f:
        f.write(b"half of a new fi")
        raise RuntimeError("interrupted")
    assert out.read_text() == "previous\n" and os.listdir(tmp_path) == ["out.jsonl"]
    jsonl.write_jsonl(out, [{"a": 1}])
    assert out.read_bytes() == b'{"a":1}\n' and os.listdir(tmp_path) == ["out.jsonl"]


def test_atomic_path_replaces_a_directory_only_on_success(tmp_path):
    out = tmp_path / "dataset"
    out.mkdir()
    (out / "old.arrow").write_text("old")
    with pytest.raises(RuntimeError), jsonl.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.arrow").write_text("half")
        raise RuntimeError("interrupted")
    assert os.listdir(out) == ["old.arrow"] and os.listdir(tmp_path) == ["dataset"]
    with jsonl.atomic_path(out) as tmp:
        tmp.mkdir()
        (tmp / "new.arrow").write_text("new")
    assert os.listdir(out) == ["new.arrow"] and os.listdir(tmp_path) == ["dataset"]


def test_atomic_path_removes_what_a_killed_run_left(tmp_path):
    out = tmp_path / "adapter"
    stale = tmp_path / ".adapter.tmpk1ll3d" / "adapter"  # as an older version's killed run leaves it
    stale.mkdir(parents=True)
    (stale / "weights.bin").write_bytes(b"x" * 1000)
    dead = tmp_path / f".adapter.tmp{1 << 23}-x1y2z3"  # a pid above any pid_max: that run is gone
    dead.mkdir()
    running = tmp_path / f".adapter.tmp{os.getppid()}-a1b2c3"  # a run still going (here: our parent's)
    running.mkdir()
    other = tmp_path / ".adapter2.tmpabcdef"  # another output's: not touched
    other.mkdir()
    with jsonl.atomic_path(out) as tmp:
        tmp.mkdir()
    assert out.is_dir() and not stale.parent.exists() and not dead.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([".adapter2.tmpabcdef", running.name, "adapter"])


def test_a_previous_output_moved_aside_by_a_run_killed_while_committing_comes_back(tmp_path):
    out = tmp_path / "adapter"
    aside = tmp_path / f".adapter.tmp{1 << 23}-q1w2e3" / ".previous"  # the old adapter, the new not yet in
    aside.mkdir(parents=True)
    (aside / "adapter_config.json").write_text("old")
    with pytest.raises(RuntimeError), jsonl.atomic_path(out):
        raise RuntimeError("this run fails too")
    assert (out / "adapter_config.json").read_text() == "old" and os.listdir(tmp_path) == ["adapter"]


def test_staged_commits_every_output_or_none(tmp_path):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b", tmp_path / "c.json"
    a.write_text("old a")
    b.mkdir()
    (b / "old").write_text("old b")
    with pytest.raises(RuntimeError), outputs.staged(a, b, c) as (ta, tb, tc):  # a failure before the end
        ta.write_text("new a")
        raise RuntimeError
    assert a.read_text() == "old a" and os.listdir(b) == ["old"] and not c.exists()
    # a rename that fails at the commit (here: a file for the folder b) puts back a, moved before it
    with pytest.raises(StageError, match="would replace a folder with a file"), outputs.staged(a, b, c) as (ta, tb, tc):
        ta.write_text("new a")
        tb.write_text("a file")
        tc.write_text("new c")
    assert a.read_text() == "old a" and os.listdir(b) == ["old"] and not c.exists()
    with outputs.staged(a, None, c, b) as (ta, none, tc, tb):  # b left unwritten: kept as it is
        assert none is None
        ta.write_text("new a")
        tc.write_text("new c")
    assert a.read_text() == "new a" and c.read_text() == "new c" and os.listdir(b) == ["old"]
    assert sorted(os.listdir(tmp_path)) == ["a.jsonl", "b", "c.json"]


def test_check_accepts_missing_empty_and_own_outputs_only(tmp_path):
    report = tmp_path / "report.json"
    for text, ok in (("", True), ('{"kept": 1}', True), ("[1, 2]", False), ("not json", False)):
        report.write_text(text)
        if ok:
            outputs.check({}, {"--report": (report, outputs.METRICS)})
        else:
            with pytest.raises(StageError, match="exists and is not a metrics file"):
                outputs.check({}, {"--report": (report, outputs.METRICS)})
    data = tmp_path / "tokenized"
    outputs.check({}, {"--output": (data, outputs.TOKENIZED)})  # missing
    data.mkdir()
    outputs.check({}, {"--output": (data, outputs.TOKENIZED)})  # empty
    (data / "state.json").write_text("{}")
    with pytest.raises(StageError, match="--output .*tokenized exists and is not a tokenized dataset"):
        outputs.check({}, {"--output": (data, outputs.TOKENIZED)})
    (data / "dataset_info.json").write_text("{}")
    outputs.check({}, {"--output": (data, outputs.TOKENIZED)})


def test_gc_paused_restores_the_collector():
    assert gc.isenabled()
    with jsonl.gc_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError), jsonl.gc_paused():
        raise KeyError
    assert gc.isenabled()


def test_block_lines_of_blank_and_final_lines():
    assert jsonl.block_lines(b"\n") == [b""]
    assert jsonl.block_lines(b"a\n\n") == [b"a", b""]
    assert jsonl.block_lines(b"a\nb") == [b"a", b"b"]
    assert list(itertools.chain.from_iterable(map(jsonl.block_lines, [b"a\r\n", b"b"]))) == [b"a\r", b"b"]


def test_a_child_made_to_die_with_its_parent_ends_when_the_parent_is_killed(tmp_path):
    # as train starts `accelerate launch`: the parent starts a long child with die_with_parent, then
    # is killed by SIGKILL; the child must not stay behind under PID 1
    code = ("import functools, os, subprocess, sys, time; from stages.jsonl import die_with_parent; "
            "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "preexec_fn=functools.partial(die_with_parent, os.getpid())); print(c.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    child = psutil.Process(int(parent.stdout.readline()))
    parent.kill()
    parent.wait()
    _, alive = psutil.wait_procs([child], timeout=5)
    for p in alive:
        p.kill()
    assert not alive, "the child outlived its killed parent"
