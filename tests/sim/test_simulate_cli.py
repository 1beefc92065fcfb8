"""`multicloud simulate` as a user runs it: a summary, one seed's story, a shrunk repro."""

from __future__ import annotations

import json

import pytest

from multicloud.ui.cli import main


def test_many_seeds_print_speed_fault_mix_and_outcomes(capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    assert main(["simulate", "--seeds", "4", "--first", "20"]) == 0
    out = capsys.readouterr().out
    assert "4 seeds in" in out
    assert "seeds/s): every invariant held" in out
    assert "faults: crash" in out
    assert "outcomes: committed" in out


def test_one_seed_shows_its_history(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--seed", "4", "--ops", "6"]) == 0
    out = capsys.readouterr().out
    assert "seed 4: " in out
    assert "step 0: run b1" in out
    assert "end: healed, every node up" in out
    assert "every invariant held" in out


def test_a_broken_build_prints_a_shrunk_reproduction_that_replays(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--seed", "6", "--mutation", "quorum-1"]) == 1
    out = capsys.readouterr().out
    assert "invariant 2" in out
    assert "shrunk to 1 step(s)" in out
    assert "replay: multicloud simulate --seed 6 --steps 2" in out
    assert main(["simulate", "--seed", "6", "--steps", "2", "--mutation", "quorum-1",
                 "--no-shrink", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["invariant"] == 2
    assert [s["index"] for s in data["steps"]] == [2]


def test_json_summary_of_many_seeds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--seeds", "3", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["seeds"] == 3
    assert data["failed"] == 0
    assert data["seeds_per_second"] > 0
    assert data["counts"]["committed"] > 0


def test_a_failing_summary_lists_the_seed_and_its_replay(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--seeds", "7", "--mutation", "quorum-1"]) == 1
    out = capsys.readouterr().out
    assert "seed 6: invariant 2" in out
    assert "failed" in out
    assert "replay: multicloud simulate --seed 6 --steps" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--steps", "1,2"], "--steps replays part of one seed"),
    (["--seed", "3", "--steps", "x"], "--steps takes step numbers"),
    (["--seed", "3", "--steps", "99"], "there is no step 99"),
    (["--ops", "0"], "--ops must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
])
def test_bad_arguments_end_in_one_line(argv: list[str], message: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert message in err
    assert err.count("\n") == 1
