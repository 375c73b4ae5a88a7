"""tkpy._data: where the shared data (DuoAttention head patterns) is found, and the error when it is not."""

from pathlib import Path

import pytest

import tkpy
from tkpy import _data
from tkpy._data import SHARED_DATA_ENV, duo_attention_pattern, shared_data_dir, shared_data_file

MODEL = "Meta-Llama-3.1-8B-Instruct"


def write_pattern(folder: Path, model: str) -> Path:
    path = folder / "duo_attention" / f"{model}.full_attention_heads.tsv"
    path.parent.mkdir(parents=True)
    path.write_text("1.0\t0.0\n0.0\t1.0\n")
    return path


def test_env_var_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    path = write_pattern(tmp_path, MODEL)
    assert shared_data_dir() == tmp_path
    assert duo_attention_pattern(MODEL) == path
    assert shared_data_file(f"duo_attention/{path.name}") == path


def test_missing_file_names_the_path_and_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, str(tmp_path))
    expected = tmp_path / "duo_attention" / f"{MODEL}.full_attention_heads.tsv"
    with pytest.raises(FileNotFoundError, match=SHARED_DATA_ENV) as raised:
        duo_attention_pattern(MODEL)
    assert str(expected) in str(raised.value)


def test_source_checkout_looks_next_to_the_repository(monkeypatch):
    monkeypatch.delenv(SHARED_DATA_ENV, raising=False)
    repo = Path(tkpy.__file__).resolve().parents[2]
    if not (repo / "pyproject.toml").is_file():
        pytest.skip(f"tkpy is installed at {tkpy.__file__}, not run from a source checkout")
    assert shared_data_dir() == repo.parent / "shared" / "data"


def test_installed_package_needs_the_env_var(tmp_path, monkeypatch):
    monkeypatch.setenv(SHARED_DATA_ENV, "")  # empty counts as unset
    monkeypatch.setattr(_data, "_PACKAGE", tmp_path / "site-packages" / "tkpy")
    assert shared_data_dir() is None
    with pytest.raises(FileNotFoundError, match=f"set {SHARED_DATA_ENV}"):
        duo_attention_pattern(MODEL)
