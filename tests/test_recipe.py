import pytest

from tlq.errors import TlqError
from tlq.recipe import Recipe, parse_scheme


def test_presets_follow_the_design():
    w3 = parse_scheme("W3A16")
    # symmetric since the serving check (docs/serving.md): asymmetric outputs do not load everywhere
    assert (w3.weight_bits, w3.group_size, w3.symmetric, w3.act_bits) == (3, 128, True, None)
    assert parse_scheme("W3A16", symmetric=False).symmetric is False
    w4a8 = parse_scheme("w4a8")
    assert (w4a8.weight_bits, w4a8.group_size, w4a8.symmetric, w4a8.act_bits) == (4, None, True, 8)
    assert parse_scheme("W8A8").quantizes_activations
    assert parse_scheme("W3A16-g64").group_size == 64
    assert parse_scheme("W4A16", group_size=0).group_size is None


def test_group_is_clamped_to_in_features():
    assert parse_scheme("W4A16").group_for(64) == 64
    assert parse_scheme("W4A16").group_for(4096) == 128


@pytest.mark.parametrize("text, kwargs, words", [
    ("W5A3", {}, "unknown scheme"),
    ("fp8", {}, "unknown scheme"),
    ("W4A8-g128", {}, "per-channel"),
    ("W4A8", {"symmetric": False}, "symmetric"),
    ("W4A16", {"group_size": 48}, "power of two"),
])
def test_invalid_schemes_are_refused(text, kwargs, words):
    with pytest.raises(TlqError, match=words):
        parse_scheme(text, **kwargs)


def test_recipe_validates_and_round_trips():
    recipe = Recipe(method="rtn", scheme="W3A16", seed=4)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(TlqError, match="unknown method"):
        Recipe(method="magic")
    with pytest.raises(TlqError, match="unknown keys"):
        Recipe.from_dict({"methd": "gptq"})
    with pytest.raises(TlqError, match="num-samples"):
        Recipe(num_samples=0)
    with pytest.raises(TlqError, match="importance pass"):
        Recipe(method="tlq", importance_pass="partial")


def test_scale_candidates_default_per_method_and_an_explicit_choice_wins():
    """auto: AWQ + GPTQ searches llm-compressor's duo form only (the validation split's choice), every other
    scale-search method both forms; a form given by the user is used as given."""
    forms = {m: Recipe(method=m).resolve().scale_search.form for m in ("awq", "awq_gptq", "mbq", "tlq")}
    assert forms == {"awq": "both", "awq_gptq": "duo", "mbq": "both", "tlq": "both"}
    assert Recipe(method="awq_gptq", scale_form="both").resolve().scale_search.form == "both"
    assert Recipe(method="tlq", scale_form="activation").resolve().scale_search.form == "activation"
