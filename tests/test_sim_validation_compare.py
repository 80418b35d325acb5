"""The validation's comparison (pure): a simulated row against the mean and the range of
the measured repeats, and the counts the report gives; --repeats refuses what is not a count."""

import pytest

from mpiserve.bench.sim_validation import compare, counts, parse_args

KEY = ("chat", "pd", 2.0)


def _row(jct, ttft):
    return {KEY: {"completed": 16, "mean_jct": jct, "mean_ttft": ttft}}


def test_simulated_rows_meet_the_mean_and_range_of_the_repeats():
    (row,) = compare([_row(6.0, 0.80), _row(7.0, 0.60)], _row(6.9, 0.50))
    assert row["measured_mean_jct"] == 6.5
    assert abs(row["mean_jct_error"] - 0.4 / 6.5) < 1e-12
    assert row["mean_jct_inside_runs"] is True
    assert row["mean_ttft_inside_runs"] is False            # 0.50 is below both runs
    assert row["completed"] == [[16, 16], 16]
    assert counts([row], "mean_jct") == {"rows": 1, "within_10_percent": 1,
                                         "inside_measured_runs": 1}
    assert counts([row], "mean_ttft") == {"rows": 1, "within_10_percent": 0,
                                          "inside_measured_runs": 0}


def test_one_run_has_no_range_and_rows_missing_from_a_repeat_are_left_out():
    other = ("chat", "round_robin", 2.0)
    first = {**_row(6.0, 0.8), other: {"completed": 16, "mean_jct": 5.0, "mean_ttft": 0.4}}
    (row,) = compare([first, _row(6.2, 0.7)], {**_row(6.1, 0.75), other: first[other]})
    assert row["router"] == "pd"
    (single,) = compare([_row(6.0, 0.8)], _row(6.1, 0.75))
    assert single["mean_jct_inside_runs"] is None


@pytest.mark.parametrize("value", ["0", "-2", "x", "1.5"])
def test_repeats_must_be_a_whole_number_of_at_least_one(value, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--repeats", value])
    assert f"argument --repeats: {value!r}: use a whole number >= 1" in capsys.readouterr().err
    assert parse_args(["--repeats", "3"]).repeats == 3
