"""smoothmix_tf.hardware: bfloat16 units from the CPU flags, and the warnings of the bfloat16
options on a CPU without them (emulated bfloat16 is slower than float32)."""

from __future__ import annotations

import warnings

import keras
import pytest
import tensorflow as tf

from smoothmix_tf import hardware, training
from smoothmix_tf.certify import Smooth

X86 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx2 avx512f {extra}\n\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text, extra, expected", [
    (X86, "avx512_bf16", True), (X86, "amx_bf16 amx_tile", True), (X86, "avx512_vnni", False),
    (ARM, "bf16 i8mm", True), (ARM, "sve", False),
])
def test_bfloat16_units_from_the_flags(tmp_path, text, extra, expected):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(text.format(extra=extra))
    flags = hardware.cpu_flags(cpuinfo)
    assert extra.split()[0] in flags and "processor" not in flags
    assert hardware.cpu_has_bfloat16_units(flags) is expected


def test_unknown_flags_are_none_and_do_not_warn(tmp_path, monkeypatch):
    assert hardware.cpu_flags(tmp_path / "missing") is None
    (tmp_path / "empty").write_text("processor : 0\n")
    assert hardware.cpu_flags(tmp_path / "empty") is None
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": None)
    assert hardware.cpu_has_bfloat16_units() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hardware.warn_if_bfloat16_is_emulated("x")


def test_warning_only_without_bfloat16_units():
    with pytest.warns(RuntimeWarning, match="no bfloat16 units"):
        assert hardware.warn_if_bfloat16_is_emulated("training", frozenset({"avx2"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hardware.warn_if_bfloat16_is_emulated("training", frozenset({"avx512_bf16"}))


def test_bfloat16_options_warn_on_a_cpu_without_units(monkeypatch):
    real = tf.config.list_logical_devices  # a CPU-only view, also on a GPU host
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: [] if kind == "GPU" else real(kind))
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset({"avx2"}))
    with pytest.warns(RuntimeWarning, match="--mixed-precision training computes in bfloat16"):
        assert training.mixed_precision_policy() == "mixed_bfloat16"
    network = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                                keras.layers.Dense(3)])
    with pytest.warns(RuntimeWarning, match="certification"):
        Smooth(network, 3, 0.5, inference_dtype="bfloat16")
    monkeypatch.setattr(hardware, "cpu_flags",
                        lambda cpuinfo="/proc/cpuinfo": frozenset({"avx512_bf16"}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert training.mixed_precision_policy() == "mixed_bfloat16"
        Smooth(network, 3, 0.5, inference_dtype="bfloat16")
