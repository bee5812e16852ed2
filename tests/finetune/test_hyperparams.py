"""Hyperparameters: the published "auto" rules at their boundaries, explicit values kept,
validation messages that name the field, and merging top-level with method hyperparameters."""

from __future__ import annotations

import pytest

from shoal.finetune.hyperparams import (BASE_LR, learning_rate, merge_hyperparameters,
                                        resolve_hyperparameters, validate_hyperparameters)


@pytest.mark.parametrize("n,epochs,batch", [
    (1, 25, 1), (5, 20, 1), (10, 10, 1), (20, 5, 1), (33, 4, 1), (34, 3, 1), (100, 3, 1),
    (749, 3, 1), (750, 3, 2), (8333, 3, 17), (8334, 2, 17), (10_000, 2, 20), (12_500, 2, 25),
    (12_501, 1, 25), (200_000, 1, 256)])
def test_auto_rules(n, epochs, batch):
    h = resolve_hyperparameters({}, n, 1000 * n)
    assert (h["n_epochs"], h["batch_size"]) == (epochs, batch)
    assert h["learning_rate_multiplier"] == 1.0 and isinstance(h["learning_rate_multiplier"], float)
    assert (h["r"], h["lora_alpha"], h["target_modules"]) == (8, 16, "all-linear")


def test_auto_epochs_keep_examples_times_epochs_in_range():
    for n in range(4, 30_000, 7):
        e = resolve_hyperparameters({"n_epochs": "auto"}, n, 0)["n_epochs"]
        assert 1 <= e <= 25
        if 4 <= n <= 25_000:
            assert 100 <= n * e <= 25_000, n


def test_explicit_values_are_kept():
    req = {"n_epochs": 7, "batch_size": 4, "learning_rate_multiplier": 0.5, "r": 16,
           "lora_alpha": 32, "target_modules": ["q_proj", "v_proj"]}
    assert resolve_hyperparameters(req, 10_000, 0) == req
    h = resolve_hyperparameters({"n_epochs": 2.0, "batch_size": "auto", "r": None}, 10, 0)
    assert (h["n_epochs"], h["batch_size"], h["r"]) == (2, 1, 8) and isinstance(h["n_epochs"], int)
    assert learning_rate(resolve_hyperparameters({"learning_rate_multiplier": 2}, 10, 0)) == 2 * BASE_LR


@pytest.mark.parametrize("h,message", [
    ({"n_epochs": 0}, 'hyperparameters.n_epochs: must be an integer in [1, 50] or "auto"'),
    ({"n_epochs": -3}, "hyperparameters.n_epochs: "),
    ({"n_epochs": 2.5}, "hyperparameters.n_epochs: "),
    ({"n_epochs": 51}, "hyperparameters.n_epochs: "),
    ({"n_epochs": "3"}, "hyperparameters.n_epochs: "),
    ({"n_epochs": True}, "hyperparameters.n_epochs: "),
    ({"batch_size": 0}, 'hyperparameters.batch_size: must be an integer in [1, 256]'),
    ({"batch_size": 257}, "hyperparameters.batch_size: "),
    ({"learning_rate_multiplier": 0}, "hyperparameters.learning_rate_multiplier: must be a number in (0, 10]"),
    ({"learning_rate_multiplier": -1}, "hyperparameters.learning_rate_multiplier: "),
    ({"learning_rate_multiplier": 10.5}, "hyperparameters.learning_rate_multiplier: "),
    ({"learning_rate_multiplier": float("nan")}, "hyperparameters.learning_rate_multiplier: "),
    ({"r": 0}, "hyperparameters.r: must be an integer in [1, 256]"),
    ({"r": 512}, "hyperparameters.r: "),
    ({"lora_alpha": 0}, "hyperparameters.lora_alpha: must be a number > 0"),
    ({"target_modules": []}, 'hyperparameters.target_modules: must be "all-linear" or'),
    ({"target_modules": "q_proj"}, "hyperparameters.target_modules: "),
    ({"target_modules": ["q_proj", 3]}, "hyperparameters.target_modules: "),
    ({"beta": 0.1}, "hyperparameters.beta: unknown hyperparameter"),
    ([1], "hyperparameters: must be an object"),
])
def test_validation_names_the_field(h, message):
    with pytest.raises(ValueError) as e:
        validate_hyperparameters(h)
    assert str(e.value).startswith(message)


def test_valid_values_pass():
    validate_hyperparameters({"n_epochs": "auto", "batch_size": 256, "learning_rate_multiplier": 10,
                              "r": 1, "lora_alpha": 0.5, "target_modules": "all-linear"})
    validate_hyperparameters({"n_epochs": 50, "batch_size": 1, "learning_rate_multiplier": 1e-3,
                              "r": 256, "target_modules": ["model.layers.0.self_attn.q_proj"]})
    validate_hyperparameters(None)


def sup(h=None, type_="supervised"):
    return {"type": type_, "supervised": {"hyperparameters": h} if h is not None else {}}


def test_merge():
    assert merge_hyperparameters(None, None) == {}
    assert merge_hyperparameters({"n_epochs": 3}, None) == {"n_epochs": 3}
    assert merge_hyperparameters(None, sup({"batch_size": 2})) == {"batch_size": 2}
    assert merge_hyperparameters({"n_epochs": 3, "r": 4}, sup({"n_epochs": 3, "batch_size": 2})) == {
        "n_epochs": 3, "r": 4, "batch_size": 2}
    # "auto" (or null) on one side yields to a value on the other
    assert merge_hyperparameters({"n_epochs": "auto"}, sup({"n_epochs": 5})) == {"n_epochs": 5}
    assert merge_hyperparameters({"n_epochs": 5}, sup({"n_epochs": "auto"})) == {"n_epochs": 5}
    assert merge_hyperparameters({"n_epochs": None}, sup({"n_epochs": None})) == {}
    assert merge_hyperparameters(None, {"type": "supervised"}) == {}


def test_merge_refusals():
    with pytest.raises(ValueError, match=r"^method\.supervised\.hyperparameters\.n_epochs: "):
        merge_hyperparameters({"n_epochs": 3}, sup({"n_epochs": 4}))
    with pytest.raises(ValueError, match=r"^method\.type: "):
        merge_hyperparameters(None, sup({}, type_="dpo"))
    with pytest.raises(ValueError, match=r"^method\.type: "):
        merge_hyperparameters(None, {"supervised": {}})
    with pytest.raises(ValueError, match=r"^method\.supervised\.hyperparameters\.batch_size: "):
        merge_hyperparameters(None, sup({"batch_size": 0}))
    with pytest.raises(ValueError, match=r"^hyperparameters\.r: "):
        merge_hyperparameters({"r": 0}, sup({}))
    with pytest.raises(ValueError, match=r"^method\.supervised: "):
        merge_hyperparameters(None, {"type": "supervised", "supervised": 3})
