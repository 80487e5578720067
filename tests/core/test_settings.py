"""How errors name a setting: the flag as typed, else the variable (and value) the operator set."""

from __future__ import annotations

from openrerank.core.settings import setting, setting_item, setting_name


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


def test_a_setting_whose_value_a_refusal_states_is_named_without_it_unless_it_came_from_elsewhere():
    """A refusal says its limit already ("above the limit of 500"): the flag alone, or the variable as set."""
    assert setting_name("max-queue") == "--max-queue"
    assert setting_name("max-queue", {"max-queue": "OPENRERANK_MAX_QUEUE='8'"}) == "OPENRERANK_MAX_QUEUE='8'"
    assert setting_name("max-queue", {"port": "NIM_HTTP_API_PORT='1'"}) == "--max-queue"
