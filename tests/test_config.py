"""FitConfig's options defined once (pyroseg.config.option): the checks validate() runs from
them, with the messages that name the option, for a config from any source (a config.json,
Python), not only the command line (tests/test_bad_inputs.py has the command line's)."""

from __future__ import annotations

import pytest

from pyroseg.config import FitConfig, config_options, flag_of, read_option
from pyroseg.errors import UsageError


@pytest.mark.parametrize("changes, message", [
    ({"elbo": "x"}, "--elbo 'x': expected meanfield or trace"),
    ({"objective": "vi"}, "--objective 'vi': expected elbo or geco"),
    ({"select_by": "x"}, "--select-by 'x': expected one of auto, val_dice_tumour, val_dice_all, val_loss, val_ged"),
    ({"data_on_device": "x"}, "--data-on-device 'x': expected auto, on or off"),
    ({"device": "tpu"}, "--device 'tpu': expected auto, cpu or cuda"),
    ({"epochs": 0}, "--epochs 0: expected at least 1"),
    ({"geco_rate": 0.0}, "--geco-rate 0.0: expected a positive rate"),
    ({"val_fraction": 0.9}, "--val-fraction 0.9 / --test-fraction 0.15: expected fractions in [0, 1) summing below 1"),
    ({"data_seed": "3"}, "data_seed '3': expected an integer"),  # a field no option sets: named as it is
])  # fmt: skip
def test_validate_names_the_option_and_what_was_expected(changes, message):
    with pytest.raises(UsageError) as e:
        FitConfig(**changes).validate()
    assert str(e.value) == message


def test_unset_is_valid_where_the_default_is_unset():
    cfg = FitConfig(device="cuda:1", geco_kappa=None, patience=None, task=None, init_seed=None).validate()
    assert cfg.beta_warmup == 5.0 and cfg.geco_rate == 1e-2 and cfg.geco_warmup == 0.0  # derived defaults resolved


def test_options_written_as_text_read_back():
    assert read_option("widths", "8,16") == (8, 16)
    assert read_option("geco_kappa", "auto") is None and read_option("geco_kappa", "0.5") == 0.5
    assert read_option("model_args", ("latent_dim=16", "name=x", "k-v=[1, 2]")) == {"latent_dim": 16, "name": "x", "k_v": [1, 2]}
    with pytest.raises(UsageError, match=r"^--model-arg 'nonsense': expected KEY=VALUE"):
        read_option("model_args", ("a=1", "nonsense"))
    with pytest.raises(UsageError, match=r"^--widths '8,x': expected comma-separated integers"):
        read_option("widths", "8,x")


def test_every_option_has_help_and_a_flag():
    for name, opt in config_options().items():
        assert opt.help.strip(), name
        assert flag_of(name).startswith("--"), name
