"""Every dataset is de-duplicated on normalised text before it is split, so no test text (up to case and
spacing) is in any client's data; each dataset's own default test size; fractions; the central validation
split for tuning is held out from every client and disjoint from the test split."""

from __future__ import annotations

import pytest

from fedlora import data
from fedlora.data import DATASETS, DEFAULT_TEST_SIZE, dedup_dataset, normalise_text
from fedlora.run_config import ConfigError, parse_run_config

CLIENTS = 10


def _norm(texts) -> set[str]:
    return {normalise_text(t) for t in texts}


def _client_texts(name: str, **kw) -> set[str]:
    out: set[str] = set()
    for pid in range(CLIENTS):
        cd = data.load_client_data(name, pid, CLIENTS, partitioner="iid", seed=3, **kw)
        out |= _norm(cd.train["text"]) | _norm(cd.val["text"])
    return out


def test_normalise_text():
    assert normalise_text("  A  Film\u00a0of\tNOTE \n") == "a film of note"
    assert normalise_text("ﬁne") == "fine"  # NFKC folds the ligature


def test_dedup_keeps_first_occurrence_and_order():
    ds = data.synthetic_dataset(6)
    texts = ["b", "A film", "a  FILM", "c", "B", "d"]
    ds = ds.remove_columns("text").add_column("text", texts)
    out = dedup_dataset(ds)
    assert out["text"] == ["b", "A film", "c", "d"]
    assert out["label"] == [ds["label"][i] for i in (0, 1, 3, 5)]
    assert dedup_dataset(out) is out  # nothing left to drop: the same object


@pytest.mark.parametrize("name", DATASETS)
def test_no_test_text_in_any_clients_data(name):
    """The issue's test: for every dataset, with its default test size, no normalised test text appears in
    any client's train or val data; and the dataset itself holds each normalised text once."""
    ds = data.load_dataset_by_name(name)
    assert len(_norm(ds["text"])) == len(ds)
    test = _norm(data.load_test_set(name, seed=3)["text"])
    clients = _client_texts(name)
    assert test and clients
    assert not test & clients
    assert len(test) + len(clients) == len(ds)  # pool and test cover the dataset


@pytest.mark.parametrize("name", DATASETS)
def test_default_test_size_is_the_datasets_own(name):
    n = len(data.load_dataset_by_name(name))
    want = DEFAULT_TEST_SIZE[name]
    got = len(data.load_test_set(name, seed=0))
    assert got == (want if isinstance(want, int) else pytest.approx(want * n, abs=1))
    # the run config's default (test-size = 0) is the dataset's own size
    assert parse_run_config({"dataset": name}).test_split_size is None


def test_bbc_trains_on_80_percent_by_default():
    pool, test = data.partitions._split_cached("bbc", 0, DEFAULT_TEST_SIZE["bbc"])
    assert len(test) == 425 and len(pool) == 2124 - 425


def test_test_size_fraction_and_count_accepted():
    assert parse_run_config({"test-size": 0.25}).test_split_size == 0.25
    assert parse_run_config({"test-size": 300}).test_split_size == 300
    assert isinstance(parse_run_config({"test-size": 300}).test_split_size, int)
    assert len(data.load_test_set("bbc", seed=0, test_size=0.25)) == 531
    assert len(data.load_test_set("bbc", seed=0, test_size=300)) == 300
    for bad in (-1, 1.5, 2000.5):
        with pytest.raises(ConfigError, match="'test-size'"):
            parse_run_config({"test-size": bad})
    with pytest.raises(ConfigError, match="'validation-size'"):
        parse_run_config({"validation-size": 3.5})


def test_validation_split_is_held_out_from_clients_and_disjoint_from_test():
    name = "rotten_tomatoes"
    test = _norm(data.load_test_set(name, seed=3)["text"])
    val = _norm(data.load_validation_set(name, 1000, seed=3)["text"])
    clients = _client_texts(name, validation_size=1000)
    assert len(val) == 1000
    assert not val & test and not val & clients and not test & clients
    assert len(val) + len(test) + len(clients) == len(data.load_dataset_by_name(name))
    # the test split does not depend on whether a validation split is held out
    assert test == _norm(data.load_test_set(name, seed=3)["text"])


def test_validation_size_too_large_names_the_key():
    with pytest.raises(ValueError, match="validation-size"):
        data.load_validation_set("bbc", 5000, seed=0)
