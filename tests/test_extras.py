"""A missing optional dependency names how to install it the ways openrerank is installed (a clone's setup script
or the wheel built from it: it is not on PyPI)."""

from __future__ import annotations

import pytest

from openrerank import __version__
from openrerank.extras import MissingExtraError, require


def test_a_missing_extra_names_the_setup_script_and_the_wheel_never_a_pypi_package():
    with pytest.raises(MissingExtraError) as missing:
        require("openrerank_no_such_module", "eval", "openrerank eval")
    message = str(missing.value)
    assert message.startswith("openrerank eval needs the 'eval' extra (openrerank_no_such_module is not installed)")
    assert "scripts/setup.sh eval" in message
    assert f"dist/openrerank-{__version__}-py3-none-any.whl[eval]" in message
    assert "pip install 'openrerank[" not in message  # no index has it
