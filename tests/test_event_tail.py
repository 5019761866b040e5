"""The one events reader: follows appends, and notices a rerun's new file."""

import json
import os

from gaussreg.runs.store import EventTail, RunDir


def _write(path, events, mode="w"):
    with open(path, mode) as f:
        f.write("".join(json.dumps(e) + "\n" for e in events))


def _start(t):
    return {"type": "start", "time": t}


def test_tail_follows_appends_and_leaves_a_partial_line(tmp_path):
    run = RunDir(tmp_path)
    tail = EventTail(run)
    assert tail.read() == ([], False)  # no file yet
    _write(run.file("events.jsonl"), [_start("a"), {"type": "mark", "epoch": 1}])
    events, restarted = tail.read()
    assert [e["type"] for e in events] == ["start", "mark"] and not restarted
    with open(run.file("events.jsonl"), "a") as f:
        f.write('{"type": "mark", "epo')  # a writer mid-line
    assert tail.read() == ([], False)
    with open(run.file("events.jsonl"), "a") as f:
        f.write('ch": 2}\n')
    assert tail.read() == ([{"type": "mark", "epoch": 2}], False)


def test_tail_restarts_on_a_truncated_file_that_grew_past_the_old_offset(tmp_path):
    run = RunDir(tmp_path)
    path = run.file("events.jsonl")
    _write(path, [_start("first"), {"type": "mark", "epoch": 1}])
    tail = EventTail(run)
    assert len(tail.read()[0]) == 2
    old_offset = tail.offset
    # a fresh worker truncates the file in place and writes more than before between two reads
    _write(path, [_start("second"), {"type": "mark", "epoch": 1, "pad": "x" * 50},
                  {"type": "mark", "epoch": 2}])
    assert os.path.getsize(path) > old_offset
    events, restarted = tail.read()
    assert restarted and [e.get("epoch") for e in events] == [None, 1, 2]
    assert events[0]["time"] == "second"


def test_tail_restarts_on_a_smaller_or_deleted_or_replaced_file(tmp_path):
    run = RunDir(tmp_path)
    path = run.file("events.jsonl")
    _write(path, [_start("a"), {"type": "mark", "epoch": 1}, {"type": "mark", "epoch": 2}])
    tail = EventTail(run)
    tail.read()
    _write(path, [_start("a")])  # same first line, smaller: still a new file
    events, restarted = tail.read()
    assert restarted and events == [_start("a")]
    os.unlink(path)  # the scheduler deletes it for a rerun
    assert tail.read() == ([], True)
    assert tail.read() == ([], False)
    _write(path, [_start("b")])
    assert tail.read() == ([_start("b")], False)  # nothing was shown since the restart
    other = tmp_path / "other.jsonl"
    _write(other, [_start("b"), {"type": "mark", "epoch": 7}])
    os.replace(other, path)  # same first line, another file
    events, restarted = tail.read()
    assert restarted and [e.get("epoch") for e in events] == [None, 7]
