"""`smoothmix` CLI end to end on tiny settings: train -> certify (+resume) -> predict -> analyze."""

import subprocess
import sys

import numpy as np
import pytest

from smoothmix_tf import analysis
from smoothmix_tf.cli import build_parser, main

COMMANDS = ["train", "certify", "predict", "analyze", "quickstart", "export", "tune"]


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    rng = np.random.default_rng(1)
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    y = rng.integers(0, 10, 80).astype(np.uint8)
    x = rng.integers(0, 40, (80, 28, 28), dtype=np.uint8)
    for c in range(10):
        x[y == c, 2 + 2 * c: 4 + 2 * c, 4:24] = 240
    np.savez(path, x_train=x[:64], y_train=y[:64], x_test=x[64:], y_test=y[64:])
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_npz):
    run = tmp_path_factory.mktemp("runs") / "gauss"
    code = main(["train", "--dataset", f"npz:{tiny_npz}", "--architecture", "lenet", "--method",
                 "gaussian", "--sigma", "0.25", "--epochs", "2", "--batch-size", "16", "--lr",
                 "0.05", "--set", "lr_decay_epochs=[]", "--quiet", "--out", str(run)])
    assert code == 0
    return run


def test_every_command_has_complete_help():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name in COMMANDS:
        assert name in sub.choices, name
        text = sub.choices[name].format_help()
        assert "usage: smoothmix " + name in text
        for action in sub.choices[name]._actions:  # every option documents itself
            assert action.help, f"{name} {action.option_strings} has no help"


def test_help_runs_as_a_console_script():
    out = subprocess.run([sys.executable, "-m", "smoothmix_tf.cli", "certify", "--help"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--n0" in out.stdout and "--resume" in out.stdout


def test_certify_resume_and_analyze(tmp_path, trained_run, capsys):
    tsv = tmp_path / "c.tsv"
    args = ["certify", "--checkpoint", str(trained_run), "--n0", "20", "--n", "200", "--batch",
            "100", "--alpha", "0.01", "--max", "4", "--out", str(tsv)]
    assert main(args) == 0
    full = tsv.read_text()
    # interrupt: keep the header, two rows and half of the third; resume must finish it exactly
    lines = full.splitlines(keepends=True)
    tsv.write_text("".join(lines[:3]) + lines[3][:5])
    assert main(args + ["--resume"]) == 0
    assert tsv.read_text() .split("\n")[0] == full.split("\n")[0]
    resumed = analysis.load_certification(tsv)
    original = [line.split("\t")[:5] for line in full.splitlines()[1:]]
    assert [line.split("\t")[:5] for line in tsv.read_text().splitlines()[1:]] == original
    assert list(resumed.idx) == [0, 1, 2, 3]
    assert (tsv.with_suffix(".json")).exists()  # the run's configuration beside its output
    capsys.readouterr()
    assert main(["analyze", str(tsv), "--names", "tiny", "--plot", str(tmp_path / "p.png")]) == 0
    printed = capsys.readouterr().out
    assert f"{analysis.average_certified_radius(resumed):.3f}" in printed
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_writes_rows(tmp_path, trained_run):
    tsv = tmp_path / "p.tsv"
    assert main(["predict", "--checkpoint", str(trained_run), "--n", "100", "--batch", "100",
                 "--max", "3", "--out", str(tsv)]) == 0
    header, *rows = tsv.read_text().splitlines()
    assert header.split("\t") == ["idx", "label", "predict", "correct", "time"] and len(rows) == 3


@pytest.mark.parametrize("argv,message", [
    (["certify", "--checkpoint", "/nonexistent", "--out", "x.tsv"], "no checkpoint"),
    (["train", "--preset", "nope", "--out", "x"], "unknown preset"),
    (["train", "--dataset", "mnist6k", "--out", "OUT"], "mnist5k"),
    (["train", "--sigma", "-1", "--out", "OUT"], "sigma"),
    (["analyze", "/nonexistent.tsv"], "nonexistent"),
])
def test_bad_arguments_exit_2_with_one_clear_message(argv, message, tmp_path, capsys):
    argv = [str(tmp_path / "o") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_certify_settings_exit_2(tmp_path, trained_run, capsys):
    for flag, value, name in (("--alpha", "1.5", "alpha"), ("--n0", "0", "n0"),
                              ("--n", "0", "n "), ("--batch", "0", "batch")):
        code = main(["certify", "--checkpoint", str(trained_run), flag, value, "--max", "1",
                     "--out", str(tmp_path / "x.tsv")])
        assert code == 2, flag
        assert name in capsys.readouterr().err, flag


def test_help_imports_neither_tensorflow_nor_keras_tuner():
    """`smoothmix --help` and every `smoothmix COMMAND --help` start without the heavy imports."""
    code = (
        "import contextlib, io, sys\n"
        "from smoothmix_tf import cli\n"
        "parser = cli.build_parser()\n"
        f"for argv in [['--help']] + [[c, '--help'] for c in {COMMANDS!r}]:\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            parser.parse_args(argv)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "heavy = sorted(m for m in ('tensorflow', 'keras', 'keras_tuner') if m in sys.modules)\n"
        "print('heavy:', heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout, out.stdout


def test_argparse_lives_only_in_the_cli_package():
    from pathlib import Path

    import smoothmix_tf

    root = Path(smoothmix_tf.__file__).parent
    users = [str(p.relative_to(root)) for p in root.rglob("*.py")
             if "import argparse" in p.read_text() and p.parent.name != "cli"]
    assert not users, f"argparse outside smoothmix_tf/cli: {users}"


def test_sequential_certify_resume_and_analyze(tmp_path, trained_run, tiny_npz, capsys):
    """`certify --sequential`: the reference columns + samples, rows equal to the library's
    certify_sequential / certify_at with the input's seed, --resume, analyze reads the file."""
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import input_seed
    from smoothmix_tf.training import load_trained

    tsv = tmp_path / "s.tsv"
    args = ["certify", "--checkpoint", str(trained_run), "--sequential", "--n0", "20",
            "--max-n", "800", "--batch", "100", "--alpha", "0.01", "--max", "3", "--out", str(tsv)]
    assert main(args) == 0
    full = tsv.read_text()
    header, *rows = full.splitlines()
    assert header.split("\t") == [*analysis.CERTIFY_COLUMNS, "samples"] and len(rows) == 3
    lines = full.splitlines(keepends=True)
    tsv.write_text("".join(lines[:2]) + lines[2][:4])
    assert main(args + ["--resume"]) == 0
    strip_time = [line.split("\t")[:5] + line.split("\t")[6:] for line in full.splitlines()]
    assert [line.split("\t")[:5] + line.split("\t")[6:]
            for line in tsv.read_text().splitlines()] == strip_time
    base, sigma, _ = load_trained(trained_run)
    smooth = Smooth(base, num_classes=10, sigma=sigma)
    x = np.load(tiny_npz)["x_test"][:3, :, :, None].astype(np.float32) / 255
    for i, row in enumerate(rows):
        found = smooth.certify_sequential(x[i:i + 1], alpha=0.01, n0=20, max_n=800,
                                          batch_size=100, seed=input_seed(0, i))
        fields = row.split("\t")
        assert int(fields[2]) == found["classes"][0] and int(fields[6]) == found["samples"][0]
        assert float(fields[3]) == pytest.approx(float(found["radius"][0]), abs=1e-3)
    assert len(analysis.load_certification(tsv).idx) == 3
    at = tmp_path / "at.tsv"
    assert main(args[:-2] + ["--radius", "0.1", "--out", str(at)]) == 0
    for row in at.read_text().splitlines()[1:]:
        fields = row.split("\t")
        assert float(fields[3]) == (0.1 if int(fields[2]) >= 0 else 0.0)
    capsys.readouterr()
    assert main(["certify", "--checkpoint", str(trained_run), "--radius", "0.1", "--out",
                 str(tmp_path / "x.tsv")]) == 2
    assert "--sequential" in capsys.readouterr().err


def test_sequential_grid_rule_settings_cli(tmp_path, trained_run, tiny_npz):
    """`certify --sequential --radii ... --optimism SD --patience N`: rows equal the library's
    certify_sequential with the same settings and the input's seed; the rule is recorded."""
    import json

    from smoothmix_tf import sequential
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import input_seed
    from smoothmix_tf.training import load_trained

    tsv = tmp_path / "g.tsv"
    radii = [0.25, 0.5, 1.0]
    assert main(["certify", "--checkpoint", str(trained_run), "--sequential", "--n0", "20",
                 "--max-n", "800", "--batch", "100", "--alpha", "0.01", "--max", "3",
                 "--radii", *map(str, radii), "--optimism", "0.5", "--patience", "300",
                 "--out", str(tsv)]) == 0
    assert json.loads(tsv.with_suffix(".json").read_text())["sequential_rule"] == {
        "first_look": 100, "growth": sequential.DEFAULT_GROWTH, "optimism": 0.5,
        "patience": 300}
    base, sigma, _ = load_trained(trained_run)
    smooth = Smooth(base, num_classes=10, sigma=sigma)
    x = np.load(tiny_npz)["x_test"][:3, :, :, None].astype(np.float32) / 255
    default = []  # the default grid rule uses other samples: the flags were passed on
    for i, row in enumerate(tsv.read_text().splitlines()[1:]):
        found = smooth.certify_sequential(x[i:i + 1], alpha=0.01, n0=20, max_n=800,
                                          batch_size=100, seed=input_seed(0, i), radii=radii,
                                          optimism=0.5, patience=300)
        fields = row.split("\t")
        assert int(fields[2]) == found["classes"][0] and int(fields[6]) == found["samples"][0]
        default.append(smooth.certify_sequential(x[i:i + 1], alpha=0.01, n0=20, max_n=800,
                                                 batch_size=100, seed=input_seed(0, i),
                                                 radii=radii)["samples"][0])
    assert [int(r.split("\t")[6]) for r in tsv.read_text().splitlines()[1:]] != default


@pytest.mark.parametrize("argv,message", [
    (["certify", "--sequential", "--optimism", "1"], "Pass radii (CLI --radii R ..."),
    (["certify", "--sequential", "--radius", "0.1", "--patience", "200"], "--radii"),
    (["certify", "--optimism", "1", "--radii", "0.5"], "Add --sequential"),
    (["certify", "--sequential", "--radii", "0.5", "--optimism", "-1"], "optimism must be"),
    (["certify", "--sequential", "--radii", "0.5", "--n", "1000", "--patience", "2000"],
     "patience=2000 is larger than max_n=1000"),
    (["export", "--sequential-optimism", "1"], "--sequential-radii"),
    (["export", "--sequential-patience", "200"], "--sequential-radii"),
    (["export", "--sequential-radii", "0.5", "--n", "1000", "--sequential-patience", "2000"],
     "patience=2000 is larger than max_n=1000"),
])
def test_grid_rule_flags_are_checked_before_loading(argv, message, tmp_path, capsys):
    """Bad --optimism / --patience (and export's --sequential-*) exit 2 with the fix, before the
    (missing) checkpoint is even opened."""
    out = ["--out", str(tmp_path / ("m/1" if argv[0] == "export" else "x.tsv"))]
    assert main([argv[0], "--checkpoint", "/nonexistent", *argv[1:], *out]) == 2
    err = capsys.readouterr().err
    assert message in err and "no checkpoint" not in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_export_grid_rule_flags_parse():
    args = build_parser().parse_args(["export", "--checkpoint", "c", "--out", "m/1",
                                      "--sequential-radii", "0.25", "0.75",
                                      "--sequential-optimism", "0.5",
                                      "--sequential-patience", "300"])
    assert (args.sequential_radii, args.sequential_optimism, args.sequential_patience) == (
        [0.25, 0.75], 0.5, 300)
