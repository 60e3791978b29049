"""The model registry's listing: glob patterns over family and preset names."""

from weightsmith.registry import get_preset, list_families, list_models


def test_a_family_name_lists_the_family_and_its_presets():
    names = list_models("gpt")
    assert names[0] == "gpt" and "gpt2" in names and "gpt-tiny" in names
    assert all(n == "gpt" or get_preset(n).family == "gpt" for n in names)
    assert "bert-base" not in names


def test_glob_matches_names_and_everything_by_default():
    assert "llama2-7b" in list_models("llama*") and "gpt2" not in list_models("llama*")
    assert set(list_families()) <= set(list_models())
