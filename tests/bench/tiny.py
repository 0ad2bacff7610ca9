"""The tiny config of the bench tests and overrides that shrink it to one cell."""

from pathlib import Path

from attention.bench.contenders import x_transformers_status

TINY = Path(__file__).resolve().parents[2] / "configs" / "bench" / "tiny.yaml"
HAS_X_TRANSFORMERS = x_transformers_status() is None


def one_cell(*extra: str) -> list[str]:
    """Overrides that shrink the tiny config to one cell per contender."""
    return ["lengths=[16]", "passes=[inference]", "cases=[padded]", "cpu_peak_rss=false",
            *extra]
