"""The HDF5 event-file layout: writing, counting from metadata, and reading in chunks."""

import h5py
import numpy as np
import pytest

from stagewise.events import EventFileError, check_file, count_splits, iter_chunks, read_events, write_event_file

NUM_BINS = 4


def signal_file(path, first, count, num_bins=NUM_BINS):
    """A signals file whose events are numbered first, first + 1, ...: label "x" is the
    number and h_plus / h_cross hold it in every bin (as real / imaginary part)."""
    x = np.arange(first, first + count, dtype=np.float64)
    h_plus = (x[:, None] * np.ones(num_bins)).astype(np.complex64)
    write_event_file(
        path,
        labels={"x": x, "y": -x},
        data={"h_plus": h_plus, "h_cross": 1j * h_plus},
        kind="signals",
        frequencies=np.linspace(20.0, 50.0, num_bins),
    )
    return path


def files_of_sizes(tmp_path, sizes):
    paths, first = [], 0
    for i, size in enumerate(sizes):
        paths.append(signal_file(tmp_path / f"events_{i}.h5", first, size))
        first += size
    return paths


def test_write_event_file_then_count_events_gives_the_number_written(tmp_path):
    path = signal_file(tmp_path / "events.h5", 0, 7)

    assert check_file(path) == (7, (4,))


def test_write_event_file_stores_labels_data_frequencies_and_attrs(tmp_path):
    path = tmp_path / "events.h5"
    labels = {"f0": np.array([50.0, 60.0, 70.0])}
    h_plus = np.array([[1 + 2j, 3 - 1j]] * 3, dtype=np.complex64)
    write_event_file(path, labels, {"h_plus": h_plus, "h_cross": 2 * h_plus}, "signals", [20.0, 21.0],
                     settings={})

    with h5py.File(path, "r") as f:
        assert f.attrs["stagewise_layout"] == "events/1"
        assert f.attrs["kind"] == "signals"
        assert f.attrs["settings"] == "{}"
        np.testing.assert_array_equal(f["labels/f0"][()], labels["f0"])
        np.testing.assert_array_equal(f["data/h_cross"][()], 2 * h_plus)
        np.testing.assert_array_equal(f["frequencies"][()], [20.0, 21.0])
    assert [p.name for p in tmp_path.iterdir()] == ["events.h5"]


def test_count_splits_gives_events_per_file_and_total_per_split(tmp_path):
    training = files_of_sizes(tmp_path, [5, 7])
    validation = [signal_file(tmp_path / "validation.h5", 100, 3)]

    counts = count_splits({"training": training, "validation": validation})

    assert counts["training"] == {"total": 12, "files": {str(training[0]): 5, str(training[1]): 7}}
    assert counts["validation"] == {"total": 3, "files": {str(validation[0]): 3}}


def test_count_splits_rejects_a_split_without_files(tmp_path):
    with pytest.raises(EventFileError, match="split 'validation': no event files given"):
        count_splits({"training": [signal_file(tmp_path / "a.h5", 0, 2)], "validation": []})


def missing_file(path):
    """Write nothing: the file does not exist."""


def text_file(path):
    path.write_text("f0,tau\n100.0,0.01\n")


def without_labels(path):
    with h5py.File(path, "w") as f:
        f.attrs["stagewise_layout"] = "events/1"
        f.attrs["kind"] = "signals"
        f["data/h_plus"] = np.zeros((3, NUM_BINS), dtype=np.complex64)
        f["data/h_cross"] = np.zeros((3, NUM_BINS), dtype=np.complex64)
        f["frequencies"] = np.arange(NUM_BINS, dtype=np.float64)


def without_h_plus(path):
    write_event_file(path, {"x": np.zeros(3)}, {"h_cross": np.zeros((3, NUM_BINS), dtype=np.complex64)},
                     "signals", np.arange(NUM_BINS))


def with_different_event_counts(path):
    data = {name: np.zeros((4, NUM_BINS), dtype=np.complex64) for name in ("h_plus", "h_cross")}
    write_event_file(path, {"x": np.zeros(3)}, data, "signals", np.arange(NUM_BINS))


def with_kind_observations(path):
    write_event_file(path, {"x": np.zeros(3)}, {"inputs": np.zeros((3, 2))}, "observations")


@pytest.mark.parametrize(
    "make_file, problem",
    [
        (missing_file, "not found"),
        (text_file, "not a readable HDF5 file"),
        (without_labels, "/labels"),
        (without_h_plus, "/data/h_plus"),
        (with_different_event_counts, "disagree on the number of events"),
        (with_kind_observations, "'kind' is 'observations', expected 'signals'"),
    ],
    ids=["missing", "not-hdf5", "no-labels", "no-h_plus", "event-counts-differ", "wrong-kind"],
)
def test_count_splits_error_names_the_file_and_the_problem(tmp_path, make_file, problem):
    good = signal_file(tmp_path / "good.h5", 0, 3)
    bad = tmp_path / "bad.h5"
    make_file(bad)

    with pytest.raises(EventFileError) as error:
        count_splits({"training": [good, bad]})

    assert str(bad) in str(error.value)
    assert problem in str(error.value)


def test_iter_chunks_yields_num_chunks_full_chunks_across_files_in_file_order(tmp_path):
    paths = files_of_sizes(tmp_path, [5, 7, 4])

    chunks = list(iter_chunks(paths, ["x", "y"], ["h_plus", "h_cross"], chunk_size=3, num_chunks=5))

    assert len(chunks) == 5
    for i, (labels, data) in enumerate(chunks):
        expected = np.arange(3 * i, 3 * i + 3, dtype=np.float64)
        np.testing.assert_array_equal(labels["x"], expected)
        np.testing.assert_array_equal(labels["y"], -expected)
        np.testing.assert_array_equal(data["h_plus"], expected[:, None] * np.ones(NUM_BINS))
        np.testing.assert_array_equal(data["h_cross"], 1j * expected[:, None] * np.ones(NUM_BINS))


def test_iter_chunks_with_chunks_larger_than_the_files_joins_them(tmp_path):
    paths = files_of_sizes(tmp_path, [2, 2, 2, 2])

    chunks = list(iter_chunks(paths, ["x"], ["h_plus"], chunk_size=5, num_chunks=1))

    assert len(chunks) == 1
    np.testing.assert_array_equal(chunks[0][0]["x"], np.arange(5.0))


def test_iter_chunks_raises_when_the_files_hold_fewer_events_than_asked(tmp_path):
    paths = files_of_sizes(tmp_path, [5, 7])

    with pytest.raises(EventFileError) as error:
        list(iter_chunks(paths, ["x"], ["h_plus"], chunk_size=5, num_chunks=3))

    assert "hold 12 events" in str(error.value)
    assert "need 15" in str(error.value)
    assert str(paths[0]) in str(error.value)


def test_read_events_with_limit_reads_the_first_events_in_file_order(tmp_path):
    paths = files_of_sizes(tmp_path, [5, 7, 4])

    labels, data = read_events(paths, ["x"], ["h_plus"], limit=9)

    np.testing.assert_array_equal(labels["x"], np.arange(9.0))
    assert labels["x"].dtype == np.float64
    np.testing.assert_array_equal(data["h_plus"], np.arange(9.0)[:, None] * np.ones(NUM_BINS))


def test_read_events_without_limit_reads_every_event(tmp_path):
    paths = files_of_sizes(tmp_path, [5, 7, 4])

    labels, data = read_events(paths, ["x", "y"], ["h_cross"])

    np.testing.assert_array_equal(labels["x"], np.arange(16.0))
    np.testing.assert_array_equal(labels["y"], -np.arange(16.0))
    assert data["h_cross"].shape == (16, NUM_BINS)


def test_read_events_names_the_file_that_lacks_a_label(tmp_path):
    paths = files_of_sizes(tmp_path, [3, 3])

    with pytest.raises(EventFileError) as error:
        read_events(paths, ["tau"], ["h_plus"])

    assert str(paths[0]) in str(error.value)
    assert "/labels/tau" in str(error.value)
