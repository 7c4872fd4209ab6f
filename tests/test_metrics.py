import pytest

from sdlm.metrics import exact_match, lcs_ratio, token_accuracy


@pytest.mark.parametrize(
    "output, target, exact, accuracy, lcs",
    [
        ([1, 2, 3], [1, 2, 3], True, 1.0, 1.0),
        ([1, 2, 3, 4], [1, 2, 3], True, 1.0, 1.0),
        ([1, 2], [1, 2, 3], False, 2 / 3, 2 / 3),
        ([9, 1, 2], [1, 2, 3], False, 0.0, 2 / 3),
        ([3, 2, 1], [1, 2, 3], False, 1 / 3, 1 / 3),
        ([], [1, 2], False, 0.0, 0.0),
        ([5], [], True, 1.0, 1.0),
    ],
)
def test_scores(output, target, exact, accuracy, lcs):
    assert exact_match(output, target) is exact
    assert token_accuracy(output, target) == pytest.approx(accuracy)
    assert lcs_ratio(output, target) == pytest.approx(lcs)


def test_lcs_ignores_tokens_past_target():
    assert lcs_ratio([1, 9, 9, 2, 3], [1, 2, 3]) == pytest.approx(1 / 3)
