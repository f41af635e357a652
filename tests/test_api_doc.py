"""docs/api.md's examples run: every ``>>>`` line of the page, with the outputs it shows."""

import doctest
from pathlib import Path

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_the_api_page_examples_run():
    result = doctest.testfile(str(API), module_relative=False,
                              optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 10
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {API.name} failed (output above)"
