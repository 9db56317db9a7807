import pytest

from megatron_xopd.trainer.scoring import exact_match, load_scorer


@pytest.mark.parametrize("response,reference,score", [
    ("8", "8", 1.0), ("The answer is 8.", "8", 1.0), ("<answer>12</answer> because", "12", 1.0),
    ("It is 7, not 8", "7", 0.0), ("Paris.", "paris", 1.0), ("", "3", 0.0),
])
def test_exact_match(response, reference, score):
    assert exact_match(response, reference) == score


def test_load_scorer():
    assert load_scorer("exact_match") is exact_match
    assert load_scorer("megatron_xopd.trainer.scoring:exact_match") is exact_match
    with pytest.raises(ValueError, match="data.scorer"):
        load_scorer("nonsense")
