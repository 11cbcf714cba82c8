"""The stop-string matcher on its own (pure Python): against str.find on every way of cutting a
text into streamed pieces."""

from __future__ import annotations

import itertools
import random

import pytest

from elm_mlx.engine.stops import StopMatcher


def stream(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    """What a consumer sees: the emitted pieces and whether a stop string ended the stream."""
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return out, True
    out.append(matcher.flush())
    return out, False


def oracle(text: str, stops: list[str]) -> tuple[str, bool]:
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


def cuts(text: str, n: int) -> list[str]:
    """The text cut at n - 1 positions."""
    points = sorted(random.sample(range(1, len(text)), n - 1)) if n > 1 else []
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize(
    "stops",
    [["STOP"], ["\n\n"], ["abcab"], ["ab", "b"], ["xyz", "yzq", "zq"], ["</s>", "User:"], []],
)
def test_every_split_agrees_with_find(stops):
    random.seed(0)
    alphabet = "abqxyz\n STOP</>User:"
    for _ in range(400):
        text = "".join(random.choice(alphabet) for _ in range(random.randint(1, 30)))
        expected, hit = oracle(text, stops)
        for n in {1, min(len(text), 2), min(len(text), 5), len(text)}:
            pieces, stopped = stream(cuts(text, n), stops)
            assert ("".join(pieces), stopped) == (expected, hit), (text, stops, n)


def test_text_that_may_begin_a_stop_is_held_back_then_released():
    matcher = StopMatcher(["END"])
    assert matcher.feed("the E") == ("the ", False)  # "E" may begin "END"
    assert matcher.feed("N") == ("", False)
    assert matcher.feed("ergy") == ("ENergy", False)  # it did not
    assert matcher.feed(" EN") == (" ", False)
    assert matcher.feed("D and more") == ("", True)
    assert matcher.flush() == ""


def test_the_earliest_stop_string_wins_and_nothing_after_is_emitted():
    matcher = StopMatcher(["world", "lo w"])
    assert matcher.feed("hello world") == ("hel", True)
