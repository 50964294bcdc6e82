"""vidtag.progress: a bar in a terminal, periodic status lines in logs (DVC), nothing when disabled."""

from __future__ import annotations

import io
import re
import sys

import pytest

from vidtag import progress as prog
from vidtag.progress import Progress, progress


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


def test_non_tty_prints_periodic_lines_with_counts_then_a_final_line(capsys):
    got = list(progress(range(3), desc="extract", unit="frame", interval=0))
    assert got == [0, 1, 2]
    out = lines(capsys.readouterr().err)
    assert [re.match(r"extract: (\d+)/3 frame \(", ln).group(1) for ln in out] == ["1", "2", "3", "3"]
    assert out[0].endswith(")") and "ETA" in out[0] and "frame/s" in out[0]
    assert out[-1].endswith(", done)") and "\r" not in "".join(out)


def test_lines_are_rate_limited_by_the_interval(capsys, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(prog.time, "monotonic", lambda: clock[0])
    with Progress(total=10, desc="train", unit="batch", interval=30) as p:
        for _ in range(10):
            clock[0] += 10  # one batch per 10 s: a line every third batch
            p.update()
    out = lines(capsys.readouterr().err)
    assert [ln.split()[1] for ln in out] == ["3/10", "6/10", "9/10", "10/10"]
    assert out[0] == "train: 3/10 batch (10.0 s/batch, 0:30, ETA 1:10)"  # slow steps: seconds per unit
    assert out[-1] == "train: 10/10 batch (10.0 s/batch, 1:40, done)"


def test_environment_sets_the_interval_and_a_bad_value_falls_back(monkeypatch, capsys):
    monkeypatch.setenv("VIDTAG_PROGRESS_S", "0")
    assert Progress().interval == 0
    list(progress(range(2), desc="x"))
    assert len(lines(capsys.readouterr().err)) == 3  # a line per item, then the final one
    monkeypatch.setenv("VIDTAG_PROGRESS_S", "soon")
    with pytest.warns(UserWarning, match="VIDTAG_PROGRESS_S"):
        assert Progress().interval == prog.DEFAULT_INTERVAL
    monkeypatch.delenv("VIDTAG_PROGRESS_S")
    assert Progress().interval == prog.DEFAULT_INTERVAL
    assert Progress(interval=5).interval == 5


def test_without_a_total_lines_count_and_an_early_stop_is_reported(capsys):
    list(progress(iter([1, 2]), desc="scan", unit="file", interval=0))
    out = lines(capsys.readouterr().err)
    assert out[0].startswith("scan: 1 file (") and "ETA" not in out[0]
    assert out[-1].startswith("scan: 2 file (") and out[-1].endswith("done)")

    with Progress(total=5, desc="scan", interval=1e9) as p:
        p.update(2)
    assert lines(capsys.readouterr().err) == [p.status(final=True)]  # the clock stops at close
    assert p.status(final=True).endswith("stopped)")


def test_disabled_prints_nothing(capsys):
    assert list(progress(range(5), desc="quiet", interval=0, enabled=False)) == [0, 1, 2, 3, 4]
    with Progress(total=3, enabled=False, interval=0) as p:
        p.update(3)
    assert p.mode == "off" and p.n == 3
    assert capsys.readouterr() == ("", "")


def test_write_goes_to_stderr_in_every_mode(capsys):
    with Progress(total=1, enabled=False) as p:
        p.write("bad frame: manifest row 3: missing")
    assert capsys.readouterr().err == "bad frame: manifest row 3: missing\n"


def test_a_terminal_gets_a_tqdm_bar(monkeypatch):
    tty = FakeTTY()
    monkeypatch.setattr(sys, "stderr", tty)
    with Progress(total=4, desc="extract", unit="frame", interval=0) as p:
        assert p.mode == "bar" and p._bar is not None
        p.update(4)
        p.write("a message")
    text = tty.getvalue()
    assert "\r" in text and "4/4" in text and "a message" in text
    assert not re.search(r"^extract: 4/4 frame \(", text, re.M)  # no log lines next to the bar


def test_not_a_terminal_gets_no_bar():
    p = Progress(total=1, file=io.StringIO())
    assert p.mode == "log" and p._bar is None
    p.close()
    p.close()  # idempotent: one final line
    assert len(lines(p.file.getvalue())) == 1


def test_a_closed_stream_never_breaks_the_work():
    stream = io.StringIO()
    p = Progress(total=2, file=stream, interval=0)
    stream.close()
    p.update(2)
    p.close()
