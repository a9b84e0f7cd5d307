"""Tests for bpe.py, prepare_fineweb.py and gpt.py. Run: python -m pytest -q test_gpt.py"""
from pathlib import Path

REPO = Path(__file__).resolve().parent
DATA = REPO.parent / "shared" / "data"


def test_shared_data_is_present():
    # Every other test reads these files; fail loudly if the checkout is not beside ../shared.
    assert (DATA / "gpt2" / "vocab.bpe").stat().st_size == 456_318
    assert (DATA / "tinyshakespeare.txt").stat().st_size == 1_115_394
