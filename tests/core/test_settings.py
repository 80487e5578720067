"""How errors name a setting: the flag as typed, else the variable (and value) the operator set."""

from __future__ import annotations

from openrerank.core.settings import setting, setting_item


def test_a_setting_is_named_by_its_flag_unless_it_came_from_elsewhere():
    assert setting("dtype", "fp16") == "--dtype fp16"
    assert setting("dtype", "fp16", {"dtype": "OPENRERANK_DTYPE='fp16'"}) == "OPENRERANK_DTYPE='fp16'"
    assert setting("dtype", "fp16", {"port": "NIM_HTTP_API_PORT='1'"}) == "--dtype fp16"


def test_one_value_of_a_variable_holding_several_is_picked_out():
    assert setting_item("alias", "bad") == "--alias 'bad'"
    assert setting_item("model", "/m", quote=False) == "--model /m"
    one = {"model": "OPENRERANK_MODEL='r=/m'"}
    assert setting_item("model", "/m", one) == "OPENRERANK_MODEL='r=/m'"
    several = {"model": "OPENRERANK_MODEL='a=/x,/m'"}
    assert setting_item("model", "/m", several) == "OPENRERANK_MODEL='a=/x,/m', item '/m'"
