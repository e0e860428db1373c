"""The shared method test matrix, generated from the registry and each method's traits.

Which methods a check runs on comes from what the methods declare on their config classes
(:class:`qaft.methods.MethodTraits`, ``example_fields``, ``int_zero_fields``, ``calibrated_fields``), never from a
list of names in a test: ``methods(merges_to=INTEGER, trains=True)`` is every registered method with those trait
values, ``applied(name)`` the tiny LLaMA with the method's small example config. Adding a method is its file and
its preset; it joins every check its traits call for.

:data:`CHECKS` maps each trait value to the tests that exercise it. ``test_methods.py`` asserts that every value
some registered method has is mapped, and that the mapped tests, together, are parametrized over every method
with that value (:func:`parametrized_methods` reads their ``name`` parameters), so no trait goes unchecked; and
that the tests of :data:`EVERY_METHOD` run on every registered method.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any

from torch import nn

import qaft
from qaft.methods import FLOAT, INTEGER, MethodConfig, MethodTraits, registered, traits

from helpers import tiny_llama, token_batch

TRAITS = tuple(f.name for f in dataclasses.fields(MethodTraits))
PROPERTIES = tuple(k for k, v in vars(MethodTraits).items() if isinstance(v, property))  # ("trains",)

_CHECK_FORWARD = "test_methods::test_merged_model_equals_training_forward"
_CHECK_MEMBERS = "test_methods::test_the_trained_members_are_the_declared_ones"
_CHECK_DEPLOYED = "test_methods::test_deployed_weights_are_the_trained_quantized_weights"
_CHECK_BIT_FOR_BIT_INT_ZERO = "test_zero_point::test_merged_equals_trained_bit_for_bit"
_CHECK_CT_EXACT = "test_ct_export::test_the_traits_say_which_integer_merges_export_exactly"
# Trait value -> the tests ("module::function", modules under tests/unit) that check it.
CHECKS: dict[tuple[str, Any], tuple[str, ...]] = {
    ("merges_to", INTEGER): (_CHECK_FORWARD, _CHECK_DEPLOYED,
                             "test_act_kv_quant::test_packed_checkpoint_records_and_restores_act_kv"),
    ("merges_to", FLOAT): (_CHECK_FORWARD,
                           "test_act_kv_quant::test_float_merged_model_keeps_act_kv_through_save_merged_and_ptq",
                           "test_zero_point::test_float_merged_methods_on_an_integer_base_merge_exactly"),
    ("bit_exact", True): (_CHECK_FORWARD, _CHECK_DEPLOYED, _CHECK_BIT_FOR_BIT_INT_ZERO),
    ("trains_quantizer", True): (
        _CHECK_MEMBERS, _CHECK_BIT_FOR_BIT_INT_ZERO,
        "test_methods_structure::test_the_quantizer_is_a_submodule_and_its_state_is_named_under_it",
        "test_methods_structure::test_state_dicts_with_the_old_flat_quantizer_names_still_load"),
    ("trains_weights", True): (_CHECK_MEMBERS, _CHECK_DEPLOYED),
    ("starts_at_ptq", True): ("test_methods::test_at_init_equals_ptq_with_the_same_init",),
    ("adapter", True): (_CHECK_MEMBERS, _CHECK_FORWARD, "test_methods::test_lowrank_qat_layer_merges_bit_exactly",
                        "test_methods_structure::test_frozen_bases_keep_their_group_parameters_in_checkpoints"),
    ("teacher", True): ("test_methods::test_a_teacher_computes_the_float_model",),
    ("zero_point", True): ("test_zero_point::test_every_quantizer_method_takes_the_option",
                           "test_zero_point::test_the_integer_base_starts_on_the_integer_grid",
                           "test_zero_point::test_float_zero_point_models_are_unchanged"),
    ("act_kv", True): ("test_act_kv_quant::test_sixteen_bits_is_the_weight_only_model_bit_for_bit", _CHECK_FORWARD),
    ("offsets_move", True): (_CHECK_CT_EXACT,),
    ("symmetric_grid", True): (_CHECK_CT_EXACT,),
    ("calibration", True): ("test_act_kv_quant::test_calibrated_methods_keep_the_quantizers_through_merge",
                            "test_gptq::test_a_config_that_needs_calibration_says_so_and_carries_the_gptq_options"),
}


# The tests that run on every registered method, whatever its traits.
EVERY_METHOD = (_CHECK_FORWARD, _CHECK_MEMBERS, "test_methods::test_save_and_load_reproduce_the_model",
                "test_methods_structure::test_in_place_merge_equals_the_copying_merge",
                "test_act_kv_quant::test_sixteen_bits_is_the_weight_only_model_bit_for_bit")


def methods(**wanted: Any) -> list[str]:
    """The registered methods (sorted) whose traits have every ``wanted`` value; ``methods()`` is all of them."""
    unknown = sorted(set(wanted) - set(TRAITS) - set(PROPERTIES))
    if unknown:  # a misspelt trait would select nothing, and its checks would silently run on no method
        raise ValueError(f"no trait(s) {unknown}; traits: {TRAITS + PROPERTIES}")
    return [name for name in qaft.available()
            if all(getattr(traits(name), key) == value for key, value in wanted.items())]


def example_fields(name: str, **extra: Any) -> dict[str, Any]:
    """The method's small example config fields (its class's ``example_fields``), with ``extra`` on top."""
    return {**registered(name).example_fields, **extra}


def int_zero_fields(name: str, **extra: Any) -> dict[str, Any]:
    """What ``zero_point="int"`` needs besides the example fields (LoftQ: ``base='int'``), with ``extra``."""
    return {**registered(name).int_zero_fields, **extra}


def config(name: str, **extra: Any) -> MethodConfig:
    return qaft.config_for(name, **example_fields(name, **extra))


def applied(name: str, seed: int = 0, **extra: Any) -> nn.Module:
    """The tiny LLaMA with method ``name`` applied, from its example config and ``extra``; a config that needs
    calibration data (EfficientQAT's Block-AP) gets two token batches."""
    method = config(name, **extra)
    calib = None if method.calibration_options() is None else [token_batch(seed=s) for s in (1, 2)]
    return qaft.apply_method(tiny_llama(seed), method, calib_batches=calib)


def calibrated_cases() -> list[tuple[str, dict[str, Any]]]:
    """``(name, fields)`` for every setting in which a method needs calibration data."""
    return [(name, dict(fields)) for name in methods(calibration=True) for fields in registered(name).calibrated_fields]


def parametrized_methods(check: str) -> set[str]:
    """The values of the ``name`` parameter that test ``check`` ("module::function") is parametrized over."""
    module, _, function = check.partition("::")
    test = getattr(importlib.import_module(module), function)
    names: set[str] = set()
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames = [a.strip() for a in mark.args[0].split(",")] if isinstance(mark.args[0], str) else list(mark.args[0])
        if "name" not in argnames:
            continue
        index = argnames.index("name")
        for case in mark.args[1]:
            values = getattr(case, "values", case)  # a pytest.param, or the bare value / tuple
            names.add(values[index] if len(argnames) > 1 else (values[0] if hasattr(case, "values") else values))
    return names


__all__ = ["CHECKS", "EVERY_METHOD", "PROPERTIES", "TRAITS", "applied", "calibrated_cases", "config", "example_fields",
           "int_zero_fields", "methods", "parametrized_methods"]
