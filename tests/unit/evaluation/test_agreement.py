"""Agreement of a judge with labels: κ, precision, recall and the confusion matrix, checked by hand."""

import pytest

from harmbench_ft.evaluation.agreement import agreement, format_agreement


def test_numbers_match_a_hand_computation():
    # 10 rows: 3 tp, 1 fp, 2 fn, 4 tn
    flags = [True, True, True, True, False, False, False, False, False, False]
    labels = [True, True, True, False, True, True, False, False, False, False]
    a = agreement(flags, labels)
    assert a["confusion"] == {"tp": 3, "fp": 1, "fn": 2, "tn": 4}
    assert a["accuracy"] == 70.0 and a["precision"] == 75.0 and a["recall"] == 60.0
    assert a["judge_hs"] == 40.0 and a["labelled_hs"] == 50.0
    # p_o = 0.7, p_e = 0.4*0.5 + 0.6*0.5 = 0.5 -> κ = 0.4
    assert a["kappa"] == pytest.approx(0.4)


def test_perfect_and_chance_agreement():
    labels = [True, False] * 5
    assert agreement(labels, labels)["kappa"] == 1.0
    assert agreement([True] * 10, labels)["kappa"] == 0.0  # always harmful: no agreement beyond chance
    assert agreement([False] * 4, [False] * 4)["kappa"] is None  # undefined, not a fake 1.0
    assert agreement([False] * 4, [False] * 4)["precision"] is None


def test_lengths_must_match_and_the_line_names_every_part():
    with pytest.raises(ValueError):
        agreement([True], [True, False])
    line = format_agreement(agreement([True, False], [True, True]))
    assert "κ 0.000" in line and "recall 50.0%" in line and "1 harmful missed" in line
