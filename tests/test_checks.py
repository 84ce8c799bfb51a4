import pytest

from gradtrace.checks import check_choice, check_int, check_range


def test_check_choice_names_the_valid_values():
    check_choice("mode", "a", ("a", "b"))
    with pytest.raises(ValueError, match=r"^mode must be one of a, b; got 'c'$"):
        check_choice("mode", "c", ("a", "b"))


@pytest.mark.parametrize("value", [True, 1.0, "3", -1])
def test_check_int_rejects_non_integers_and_small_values(value):
    with pytest.raises(ValueError, match=r"^n must be an integer >= 0; got "):
        check_int("n", value, 0)


def test_check_int_optional():
    check_int("n", None, 1, optional=True)
    check_int("n", 1, 1)
    with pytest.raises(ValueError, match="or None"):
        check_int("n", 0, 1, optional=True)


@pytest.mark.parametrize(
    ("value", "kwargs", "ok"),
    [
        (0.0, {"low": 0.0}, True),
        (0.0, {"low": 0.0, "low_inclusive": False}, False),
        (1.0, {"low": 0.0, "high": 1.0, "high_inclusive": False}, False),
        (0.5, {"low": 0.0, "high": 1.0}, True),
        (float("nan"), {}, False),
        ("0.1", {}, False),
        (None, {"optional": True}, True),
    ],
)
def test_check_range(value, kwargs, ok):
    if ok:
        check_range("x", value, **kwargs)
    else:
        with pytest.raises(ValueError, match=r"^x must be "):
            check_range("x", value, **kwargs)
