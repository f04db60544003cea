"""benchmarks/__main__.py: which topics a command line names."""

from __future__ import annotations

import pytest

from benchmarks.__main__ import _topic_args


@pytest.mark.parametrize("argv, topics", [
    (["train", "--quick", "--steps", "6", "attach"], ["train", "attach"]),   # a flag, then an option and its value
    (["train", "--steps", "6", "--quick"], ["train"]),
    (["--batch=64", "memory"], ["memory"]),
    ([], []),
])
def test_options_and_their_values_are_not_topics(argv, topics):
    assert _topic_args(argv) == topics
