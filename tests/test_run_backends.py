"""`tests/run_backends.py`: pytest's output streams live, the totals add up.

A stand-in test file (no Keras) keeps this fast: the runner's pytest child
only runs it.
"""

import io

import pytest
import run_backends

STAND_IN = """
import os, time

def test_first():
    pass

def test_second_waits_for_the_first_line():
    # The runner writes a flag once it has echoed test_first's line; buffered
    # output would only reach it after this test had given up.
    flag = os.environ["FLAG"]
    for _ in range(600):
        if os.path.exists(flag):
            return
        time.sleep(0.05)
    raise AssertionError("test_first's line was not shown while pytest ran")

def test_skipped():
    import pytest
    pytest.skip("a reason")
"""


class Recorder(io.StringIO):
    """A stdout that creates `flag` when it sees test_first's line."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def write(self, text):
        if "::test_first PASSED" in text:
            open(self.flag, "w").close()
        return super().write(text)


def test_output_streams_line_by_line(tmp_path, monkeypatch):
    test_file = tmp_path / "test_stand_in.py"
    test_file.write_text(STAND_IN)
    flag = tmp_path / "flag"
    monkeypatch.setenv("FLAG", str(flag))
    out = Recorder(str(flag))
    code, summary = run_backends.run_pytest(
        "jax", ["-v", str(test_file)], str(tmp_path), out=out
    )
    assert code == 0, out.getvalue()
    assert "test_second_waits_for_the_first_line PASSED" in out.getvalue()
    assert run_backends.count(summary) == {
        "passed": 2,
        "failed": 0,
        "skipped": 1,
        "errors": 0,
    }


def test_closing_line_adds_up_every_backend(tmp_path, monkeypatch, capsys):
    test_file = tmp_path / "test_one.py"
    test_file.write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 0\n")
    monkeypatch.setattr(run_backends, "BACKENDS", ["jax", "torch"])
    code = run_backends.main(["-q", str(test_file)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert "FAILED on: jax, torch" in lines
    assert lines[-1] == "total: 2 passed, 2 failed, 0 skipped"


@pytest.mark.parametrize(
    "summary, expected",
    [
        ("= 3 passed, 1 skipped in 2.0s =", (3, 0, 1, 0)),
        ("= 1 failed, 2 passed, 1 error in 5s =", (2, 1, 0, 1)),
        ("no tests ran", (0, 0, 0, 0)),
    ],
)
def test_count(summary, expected):
    counts = run_backends.count(summary)
    assert tuple(counts[k] for k in ("passed", "failed", "skipped", "errors")) == (
        expected
    )
