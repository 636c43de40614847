"""Tests of smoothmix_tf.analysis: reference TSV, ACR / certified accuracy, resume, table, plot.

Expected values come from independent re-computations (csv module + NumPy), closed forms on tiny
hand-built results, the SmoothMix authors' released files and the published numbers of the paper.
"""

from __future__ import annotations

import csv
import datetime
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from _shared import SHARED, require
from smoothmix_tf import analysis
from smoothmix_tf._checks import SmoothMixError

REFERENCE = SHARED / "reference" / "certify"
HEADER = "idx\tlabel\tpredict\tradius\tcorrect\ttime\n"

# ACR over all rows, as published in reference/certify/README.md (3 decimals).
PUBLISHED_ACR = {
    "mnist_gaussian_sigma1.00.tsv": 1.619,
    "mnist_smoothmix_sigma1.00_eta5_onestep.tsv": 1.823,
    "cifar10_smoothmix_sigma0.50_onestep.tsv": 0.736,
}
# Paper Table 2, MNIST σ = 1.00, certified accuracy (%) at r = 0.00, 0.25, ..., 2.75.
PAPER_TABLE2_SIGMA1 = {
    "mnist_gaussian_sigma1.00.tsv":
        [96.3, 94.4, 91.4, 86.8, 79.8, 70.9, 59.4, 46.2, 32.5, 19.7, 10.9, 5.8],
    "mnist_smoothmix_sigma1.00_eta5_onestep.tsv":
        [93.3, 90.9, 87.5, 83.0, 77.5, 70.6, 62.7, 53.4, 44.9, 37.1, 29.3, 22.4],
}
TABLE_RADII = [0.25 * i for i in range(12)]


def _reference_file(name: str) -> Path:
    return require(REFERENCE / name)


def _independent_columns(path: Path) -> dict[str, np.ndarray]:
    """Plain csv parsing, no analysis code."""
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    return {
        "predict": np.array([int(r["predict"]) for r in rows]),
        "label": np.array([int(r["label"]) for r in rows]),
        "radius": np.array([float(r["radius"]) for r in rows]),
        "correct": np.array([int(r["correct"]) for r in rows]),
    }


def _independent_accuracy(columns: dict[str, np.ndarray], radius: float) -> float:
    certified = ((columns["predict"] != -1) & (columns["correct"] == 1)
                 & (columns["radius"] >= radius))
    return float(np.count_nonzero(certified)) / len(certified)


def _tiny_result() -> analysis.CertificationResult:
    """Four inputs: correct r=0.0, correct r=0.5, wrong r=1.0, abstain (radius 0)."""
    return analysis.CertificationResult(
        idx=[10, 11, 12, 13], label=[1, 2, 3, 4], predict=[1, 2, 0, -1],
        radius=[0.0, 0.5, 1.0, 0.0], correct=[1, 1, 0, 0], time=[1.0, 2.0, 3.0, 4.0])


# ------------------------------------------------------------------------------------------------
# the authors' released files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PUBLISHED_ACR))
def test_reference_files_acr_and_accuracy(name):
    path = _reference_file(name)
    columns = _independent_columns(path)
    result = analysis.load_certification(path)
    assert len(result) == len(columns["radius"]) == 10_000

    expected_acr = float(np.mean(columns["radius"] * columns["correct"]))
    acr = analysis.average_certified_radius(result)
    assert acr == pytest.approx(expected_acr, rel=1e-12)
    assert abs(acr - PUBLISHED_ACR[name]) <= 0.0005 + 1e-12

    radii = [0.0, 0.25, 0.5, 1.0, 1.37, 2.0, 3.5, 10.0]
    expected = [_independent_accuracy(columns, r) for r in radii]
    np.testing.assert_allclose(analysis.certified_accuracy(result, radii), expected, rtol=0,
                               atol=1e-15)


@pytest.mark.parametrize("name", sorted(PAPER_TABLE2_SIGMA1))
def test_reference_files_match_paper_table2(name):
    result = analysis.load_certification(_reference_file(name))
    percent = 100 * analysis.certified_accuracy(result, TABLE_RADII)
    np.testing.assert_allclose(percent, PAPER_TABLE2_SIGMA1[name], rtol=0, atol=0.05 + 1e-9)


@pytest.mark.parametrize("name", sorted(PUBLISHED_ACR))
def test_rewriting_a_reference_file_reproduces_it_byte_for_byte(name, tmp_path):
    path = _reference_file(name)
    out = analysis.write_certification(analysis.load_certification(path), tmp_path / "copy.tsv")
    assert out.read_bytes() == path.read_bytes()


# ------------------------------------------------------------------------------------------------
# metrics on hand-built results (closed forms)
# ------------------------------------------------------------------------------------------------
def test_metrics_closed_form_abstain_and_wrong_count_zero():
    result = _tiny_result()
    # ACR = (0.0 + 0.5 + 0 + 0) / 4
    assert analysis.average_certified_radius(result) == pytest.approx(0.125, abs=1e-15)
    # r = 0 counts correct non-abstained rows (2 of 4), r in (0, 0.5] only the 0.5 row
    np.testing.assert_array_equal(
        analysis.certified_accuracy(result, [0.0, 1e-9, 0.5, 0.5000001, 1.0]),
        [0.5, 0.25, 0.25, 0.0, 0.0])
    assert analysis.certified_accuracy(result, 0.0).shape == ()


def test_abstain_never_counts_even_if_marked_correct():
    result = analysis.CertificationResult(idx=[0, 1], label=[-1, 2], predict=[-1, 2],
                                          radius=[0.7, 0.3], correct=[1, 1], time=[0, 0])
    assert analysis.average_certified_radius(result) == pytest.approx(0.15, abs=1e-15)
    np.testing.assert_array_equal(analysis.certified_accuracy(result, [0.0, 0.5]), [0.5, 0.0])


def test_empty_result_is_a_clear_error():
    empty = analysis.CertificationResult(idx=[], label=[], predict=[], radius=[], correct=[],
                                         time=[])
    with pytest.raises(SmoothMixError, match="no rows"):
        analysis.average_certified_radius(empty)
    with pytest.raises(SmoothMixError, match="no rows"):
        analysis.certified_accuracy(empty, [0.0])
    with pytest.raises(SmoothMixError, match="no rows"):
        analysis.markdown_table({"empty": empty})
    with pytest.raises(SmoothMixError, match="non-empty dict"):
        analysis.markdown_table({})


def test_mismatched_column_lengths_rejected():
    with pytest.raises(SmoothMixError, match="different lengths"):
        analysis.CertificationResult(idx=[0, 1], label=[0], predict=[0], radius=[0.1],
                                     correct=[1], time=[0.0])


# ------------------------------------------------------------------------------------------------
# writing, reading, resuming
# ------------------------------------------------------------------------------------------------
def _random_rows(rng: np.random.Generator, indices) -> list[tuple]:
    rows = []
    for i in indices:
        label = int(rng.integers(10))
        predict = int(rng.choice([-1, label, (label + 1) % 10]))
        radius = 0.0 if predict == -1 else float(rng.uniform(0, 4))
        rows.append((i, label, predict, radius, int(predict == label), float(rng.uniform(0, 5000))))
    return rows


def test_write_read_round_trip(tmp_path):
    rows = _random_rows(np.random.default_rng(0), [3, 1, 4, 15, 9, 2, 6, 53, 5])
    path = tmp_path / "sub" / "certify.tsv"
    with analysis.TsvWriter(path) as writer:
        for row in rows:
            writer.write_row(*row)
    lines = path.read_text().splitlines(keepends=True)
    assert lines[0] == HEADER and len(lines) == len(rows) + 1
    for line, row in zip(lines[1:], rows):  # the reference formatting, built independently
        expected = "{}\t{}\t{}\t{:.3}\t{}\t{}\n".format(
            *row[:5], str(datetime.timedelta(seconds=row[5])))
        assert line == expected

    result = analysis.load_certification(path)
    columns = list(zip(*rows))
    np.testing.assert_array_equal(result.idx, columns[0])
    np.testing.assert_array_equal(result.label, columns[1])
    np.testing.assert_array_equal(result.predict, columns[2])
    np.testing.assert_array_equal(result.radius, [float(f"{r:.3}") for r in columns[3]])
    np.testing.assert_array_equal(result.correct, columns[4])
    np.testing.assert_allclose(result.time, columns[5], rtol=0, atol=5e-7 + 1e-9)


def test_time_parsing_variants(tmp_path):
    assert analysis.parse_seconds("0:00:04.246721") == pytest.approx(4.246721, abs=1e-12)
    assert analysis.parse_seconds("1:02:03") == 3723.0
    assert analysis.parse_seconds("2 days, 0:00:01.5") == pytest.approx(2 * 86400 + 1.5)
    assert analysis.parse_seconds("12.25") == 12.25
    path = tmp_path / "floats.tsv"
    path.write_text(HEADER + "0\t1\t1\t0.5\t1\t3.5\n1\t2\t-1\t0.0\t0\t0:00:01\n")
    np.testing.assert_allclose(analysis.load_certification(path).time, [3.5, 1.0])


def test_rows_are_flushed_while_the_writer_is_open(tmp_path):
    path = tmp_path / "certify.tsv"
    writer = analysis.TsvWriter(path)
    try:
        writer.write_row(0, 7, 7, 1.23456, 1, 0.5)
        with open(path) as reader:  # a separate reader sees the row before close()
            assert reader.read() == HEADER + "0\t7\t7\t1.23\t1\t0:00:00.500000\n"
        writer.write_row(1, 2, -1, 0.0, 0, 1.0)
        assert len(path.read_text().splitlines()) == 3
    finally:
        writer.close()


def test_resume_repairs_a_cut_last_line_and_appends(tmp_path):
    path = tmp_path / "certify.tsv"
    rows = _random_rows(np.random.default_rng(1), range(6))
    with analysis.TsvWriter(path) as writer:
        for row in rows[:3]:
            writer.write_row(*row)
    complete = path.read_bytes()
    with open(path, "ab") as handle:  # an interrupted write: part of row 3, no newline
        handle.write(b"3\t5\t5\t1.2")

    writer = analysis.TsvWriter(path, resume=True)
    assert writer.done == {0, 1, 2}
    assert path.read_bytes() == complete  # the partial line was cut
    with writer:
        for row in rows[3:]:
            writer.write_row(*row)
        with pytest.raises(SmoothMixError, match="already"):
            writer.write_row(*rows[0])

    text = path.read_text()
    assert text.count("idx\t") == 1
    result = analysis.load_certification(path)
    np.testing.assert_array_equal(result.idx, range(6))

    # a fresh (non-resumed) writer starts a new file
    with analysis.TsvWriter(path) as writer:
        assert writer.done == set()
    assert path.read_text() == HEADER


def test_resume_edge_cases(tmp_path):
    missing = tmp_path / "new.tsv"
    with analysis.TsvWriter(missing, resume=True) as writer:
        assert writer.done == set()
        writer.write_row(0, 1, 1, 0.5, 1, 0.1)
    assert missing.read_text().startswith(HEADER) and missing.read_text().count("\n") == 2

    cut_header = tmp_path / "cut.tsv"
    cut_header.write_text("idx\tlab")  # interrupted before the header was complete
    with analysis.TsvWriter(cut_header, resume=True) as writer:
        assert writer.done == set()
        writer.write_row(4, 1, 1, 0.5, 1, 0.1)
    assert analysis.load_certification(cut_header).idx.tolist() == [4]

    predict_file = tmp_path / "predict.tsv"
    with analysis.TsvWriter(predict_file, columns=analysis.PREDICT_COLUMNS) as writer:
        writer.write_row(0, 3, 3, 1, 2.0)
    assert predict_file.read_text() == "idx\tlabel\tpredict\tcorrect\ttime\n0\t3\t3\t1\t0:00:02\n"
    with pytest.raises(SmoothMixError, match="PREDICT output"):
        analysis.TsvWriter(predict_file, resume=True)  # CERTIFY columns into a PREDICT file
    with analysis.TsvWriter(predict_file, columns=analysis.PREDICT_COLUMNS, resume=True) as writer:
        assert writer.done == {0}

    broken = tmp_path / "broken.tsv"
    broken.write_text(HEADER + "0\t1\t1\t0.5\t1\t0:00:01\n1\t1\tx\t0.5\t1\t0:00:01\n")
    with pytest.raises(SmoothMixError, match="line 3"):
        analysis.TsvWriter(broken, resume=True)


def test_writer_rejects_bad_values(tmp_path):
    with analysis.TsvWriter(tmp_path / "c.tsv") as writer:
        with pytest.raises(SmoothMixError, match="6 columns"):
            writer.write_row(0, 1, 1, 0.5, 1)
        with pytest.raises(SmoothMixError, match="cannot write row"):
            writer.write_row(0.5, 1, 1, 0.5, 1, 0.0)


def test_subset_of_test_set(tmp_path):
    path = tmp_path / "subset.tsv"
    path.write_text(HEADER + "100\t1\t1\t2.0\t1\t0:00:01\n7\t2\t3\t1.0\t0\t0:00:01\n")
    result = analysis.load_certification(path)
    assert result.idx.tolist() == [100, 7]
    assert analysis.average_certified_radius(result) == pytest.approx(1.0)  # (2.0 + 0) / 2
    np.testing.assert_array_equal(analysis.certified_accuracy(result, [0.0, 2.0, 2.01]),
                                  [0.5, 0.5, 0.0])


# ------------------------------------------------------------------------------------------------
# malformed files
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, line, pattern", [
    ("0\t1\t1\t0.5\t1\t0:00:01\n1\t1\t1\t0.5\t1\n", 3, "expected 6 tab-separated fields"),
    ("0\t1\t1\t0.5\t1\t0:00:01\n1\t1\t1\t0.5\t1\t0:00:01\n2\t1\t1\tabc\t1\t0:00:01\n", 4,
     "bad radius"),
    ("0\t1\t1\t-0.5\t1\t0:00:01\n", 2, "bad radius"),
    ("0\t1\t1\t0.5\t1\tyesterday\n", 2, "bad time"),
    ("0\t1\t1\t0.5\t2\t0:00:01\n", 2, "bad correct"),
    ("0\t1\t2\t0.5\t1\t0:00:01\n", 2, "correct = 1 but predict = 2"),
    ("0\t1\t1\t0.5\t1\t0:00:01\n\n0\t1\t1\t0.5\t1\t0:00:01\n", 4,
     "idx 0 already appeared on line 2"),
])
def test_malformed_rows_name_the_line(tmp_path, body, line, pattern):
    path = tmp_path / "bad.tsv"
    path.write_text(HEADER + body)
    with pytest.raises(SmoothMixError, match=pattern) as info:
        analysis.load_certification(path)
    assert f"line {line}:" in str(info.value) and str(path) in str(info.value)


def test_missing_file_wrong_header_and_empty_file(tmp_path):
    with pytest.raises(SmoothMixError, match="does not exist"):
        analysis.load_certification(tmp_path / "nope.tsv")
    wrong = tmp_path / "wrong.tsv"
    wrong.write_text("idx label predict radius correct time\n0 1 1 0.5 1 0:00:01\n")
    with pytest.raises(SmoothMixError, match="line 1: wrong header"):
        analysis.load_certification(wrong)
    predict = tmp_path / "predict.tsv"
    predict.write_text("idx\tlabel\tpredict\tcorrect\ttime\n0\t1\t1\t1\t0:00:01\n")
    with pytest.raises(SmoothMixError, match="PREDICT output"):
        analysis.load_certification(predict)
    blank = tmp_path / "blank.tsv"
    blank.write_text("")
    with pytest.raises(SmoothMixError, match="empty"):
        analysis.load_certification(blank)
    header_only = tmp_path / "header.tsv"
    header_only.write_text(HEADER)
    with pytest.raises(SmoothMixError, match="no rows"):
        analysis.load_certification(header_only)
    empty = analysis.load_certification(header_only, allow_empty=True)
    assert len(empty) == 0
    with pytest.raises(SmoothMixError, match="no rows"):
        analysis.average_certified_radius(empty)


# ------------------------------------------------------------------------------------------------
# table, plot
# ------------------------------------------------------------------------------------------------
def test_markdown_table_contents():
    tiny = _tiny_result()
    rng = np.random.default_rng(2)
    rows = _random_rows(rng, range(50))
    other = analysis.CertificationResult(*[np.array(c) for c in zip(*rows)])
    radii = [0.0, 0.25, 0.5, 1.0]
    table = analysis.markdown_table({"Tiny": tiny, "Random | model": other}, radii=radii,
                                    show_count=True)
    lines = table.splitlines()
    assert len(lines) == 4
    cells = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    assert cells[0] == ["Model", "ACR", "0.00", "0.25", "0.50", "1.00", "inputs"]
    assert set(lines[1]) <= set("|:-")
    # tiny: ACR 0.125; accuracy 50% at 0, 25% at 0.25 and 0.5, 0% at 1.0
    assert cells[2] == ["Tiny", "0.125", "50.0", "25.0", "25.0", "0.0", "4"]
    radius = np.array([r[3] for r in rows])
    certified = np.array([r[2] != -1 and r[4] == 1 for r in rows])
    assert cells[3][0] == "Random \\| model"
    assert cells[3][1] == f"{np.sum(radius * certified) / 50:.3f}"
    assert cells[3][2:6] == [f"{100 * np.mean(certified & (radius >= r)):.1f}" for r in radii]
    assert cells[3][6] == "50"
    assert "inputs" not in analysis.markdown_table({"Tiny": tiny})


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    saved_figures = []
    original_savefig = Figure.savefig

    def recording_savefig(self, *args, **kwargs):
        saved_figures.append(self)
        return original_savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    rng = np.random.default_rng(3)
    ours_rows = _random_rows(rng, range(40))
    ours = analysis.CertificationResult(*[np.array(c) for c in zip(*ours_rows)])
    ref = analysis.CertificationResult(*[np.array(c) for c in zip(*_random_rows(rng, range(40)))])
    path = tmp_path / "plots" / "curves.png"
    out = analysis.plot_certified_accuracy({"ours": ours}, path, reference={"paper": ref},
                                           title="test", max_radius=4.0)
    assert Path(out) == path
    data = path.read_bytes()
    width, height = _png_size(data)
    assert len(data) > 1000 and width > 200 and height > 200
    assert sorted(p.name for p in path.parent.iterdir()) == ["curves.png"]

    (axes,) = saved_figures[0].axes
    assert axes.get_xlabel() == "radius (ℓ2)" and axes.get_ylabel() == "certified accuracy"
    assert axes.get_title() == "test"
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend[0].startswith("ours (ACR") and legend[1].startswith("paper (ACR")
    ours_line, ref_line = axes.get_lines()
    assert ours_line.get_linestyle() == "-" and ref_line.get_linestyle() == "--"
    grid, curve = ours_line.get_data()  # the drawn curve is the certified accuracy on the grid
    assert grid[0] == 0.0 and grid[-1] == 4.0 and len(grid) > 500
    expected = [np.mean([row[2] != -1 and row[4] == 1 and row[3] >= r for row in ours_rows])
                for r in grid]
    np.testing.assert_allclose(curve, expected)

    with pytest.raises(SmoothMixError, match="non-empty dict"):
        analysis.plot_certified_accuracy({}, tmp_path / "x.png")
    with pytest.raises(SmoothMixError, match="max_radius"):
        analysis.plot_certified_accuracy({"ours": ours}, tmp_path / "x.png", max_radius=-1.0)
    assert not (tmp_path / "x.png").exists()


def test_plot_reference_files(tmp_path):
    gaussian = analysis.load_certification(_reference_file("mnist_gaussian_sigma1.00.tsv"))
    smoothmix = analysis.load_certification(
        _reference_file("mnist_smoothmix_sigma1.00_eta5_onestep.tsv"))
    path = analysis.plot_certified_accuracy({"SmoothMix (file)": smoothmix}, tmp_path / "mnist.png",
                                            reference={"Gaussian (paper)": gaussian},
                                            title="MNIST σ = 1.0")
    width, height = _png_size(path.read_bytes())
    assert width > 200 and height > 200
    if os.environ.get("SMOOTHMIX_KEEP_PLOT"):  # to look at it: SMOOTHMIX_KEEP_PLOT=/tmp/p.png
        Path(os.environ["SMOOTHMIX_KEEP_PLOT"]).write_bytes(path.read_bytes())
