"""The paper's presets: every one loads and validates; the recipes match the paper's Appendix C."""

import pytest

from smoothmix_tf import presets
from smoothmix_tf._checks import SmoothMixError
from smoothmix_tf.training import TrainConfig

ALL = presets.list_presets()


def test_the_grid_of_the_issue_is_complete():
    for ds in ("mnist", "cifar10"):
        for s in ("0.25", "0.50", "1.00"):
            for method in ("gaussian", "stability", "smoothadv", "macer", "consistency",
                           "smoothmix-eta1", "smoothmix-eta5", "smoothmix-eta1-onestep",
                           "smoothmix-eta5-onestep"):
                assert f"{ds}-{method}-s{s}" in ALL
    for s in ("0.50", "1.00"):
        assert f"imagenet-gaussian-s{s}" in ALL and f"imagenet-smoothmix-eta5-onestep-s{s}" in ALL


@pytest.mark.parametrize("name", sorted(ALL))
def test_every_preset_is_a_valid_config(name):
    config = TrainConfig.from_dict(presets.load_preset(name)).validate()
    objective = config.make_objective()
    # batch semantics (docs/method.md): 256 clean-image draws per reference loader batch, split in m
    assert config.batch_size * objective.noise_samples == 256
    assert ALL[name]  # every preset documents itself in its first line


def test_recipes_follow_the_method_spec():
    sm = presets.load_preset("mnist-smoothmix-eta5-s1.00")
    assert (sm["epochs"], sm["lr"], sm["lr_decay_epochs"]) == (90, 0.01, [30, 60])
    assert sm["objective"] == {"method": "smoothmix", "noise_samples": 4, "attack_steps": 8,
                               "step_size": 1.0, "eta": 5.0, "one_step_adversary": False,
                               "warmup_epochs": 10}
    assert presets.load_preset("mnist-smoothmix-eta1-s0.25")["objective"]["attack_steps"] == 3
    assert presets.load_preset("mnist-smoothmix-eta5-s0.25")["objective"]["attack_steps"] == 2
    c = presets.load_preset("cifar10-smoothmix-eta5-onestep-s1.00")
    assert (c["architecture"], c["epochs"], c["lr"], c["lr_decay_epochs"]) == (
        "cifar_resnet110", 150, 0.1, [50, 100])
    assert c["objective"]["step_size"] == 2.0 and c["objective"]["one_step_adversary"]
    assert presets.load_preset("cifar10-stability-s1.00")["objective"]["lam"] == 1.0
    assert presets.load_preset("mnist-macer-s1.00")["objective"]["lam"] == 6.0
    assert presets.load_preset("mnist-consistency-s0.25")["objective"]["lam"] == 10.0
    assert presets.load_preset("cifar10-smoothadv-s0.50")["objective"]["noise_samples"] == 8
    im = presets.load_preset("imagenet-smoothmix-eta5-onestep-s0.50")["objective"]
    assert (im["attack_steps"], im["noise_samples"], im["step_size"], im["one_step_radius"]) == (1, 1, 8.0, 1.0)
    assert "max_norm" not in im  # Appendix G projects the clean end, not the attack
    for p in ALL:  # reference code: plain momentum 0.9, coupled L2 1e-4
        cfg = presets.load_preset(p)
        assert (cfg["momentum"], cfg["nesterov"], cfg["weight_decay"]) == (0.9, False, 1e-4)


def test_overrides_reach_every_field_and_parse_values():
    cfg = presets.apply_overrides(presets.load_preset("mnist-gaussian-s0.50"),
                                  ["sigma=0.25", "objective.noise_samples=2",
                                   "lr_decay_epochs=[5, 8]", "dataset=mnist5k",
                                   "nesterov=true"])
    assert cfg["sigma"] == 0.25 and cfg["objective"]["noise_samples"] == 2
    assert cfg["lr_decay_epochs"] == [5, 8] and cfg["dataset"] == "mnist5k" and cfg["nesterov"] is True
    TrainConfig.from_dict(cfg).validate()


def test_toml_round_trip(tmp_path):
    cfg = presets.load_preset("cifar10-macer-s1.00")
    path = tmp_path / "p.toml"
    path.write_text(presets.dumps_toml(cfg, comment="round trip"))
    assert presets.read_preset_file(path) == cfg


def test_bad_presets_and_overrides_are_clear_errors():
    with pytest.raises(SmoothMixError, match="unknown preset.*--list-presets"):
        presets.load_preset("mnist-smoothmix-eta7-s1.00")
    with pytest.raises(SmoothMixError, match="KEY=VALUE"):
        presets.apply_overrides({}, ["sigma"])
    with pytest.raises(SmoothMixError, match="unknown configuration field.*sgima"):
        TrainConfig.from_dict({"sgima": 0.5})
    with pytest.raises(SmoothMixError, match="unknown training method"):
        TrainConfig(objective={"method": "mixup"}).validate()
