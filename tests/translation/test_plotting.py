import json

import pytest
import torch

pytest.importorskip("matplotlib")

from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import imread  # noqa: E402

from attention.translation.plotting import plot_attention_grid, plot_curves, read_metrics  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tokens(n: int) -> list[str]:
    return [f"tok{i}" for i in range(n)]


def attention_weights(n_rows: int, n_cols: int, n_queries: int, n_keys: int) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.randn(n_rows, n_cols, n_queries, n_keys).softmax(-1)


def image_size(path) -> tuple[int, int]:
    """(height, width) in pixels."""
    assert path.read_bytes().startswith(PNG_SIGNATURE)
    return imread(path).shape[:2]


def test_grid_writes_a_png_that_grows_with_the_tokens(tmp_path):
    small = plot_attention_grid(
        attention_weights(1, 2, 3, 4), tokens(3), tokens(4), tmp_path / "small.png", title="t"
    )
    large = plot_attention_grid(
        attention_weights(1, 2, 20, 24), tokens(20), tokens(24), tmp_path / "large.png"
    )
    assert small == tmp_path / "small.png"
    small_h, small_w = image_size(small)
    large_h, large_w = image_size(large)
    assert 150 < small_h < 1500 and 300 < small_w < 3000
    assert large_h > small_h and large_w > small_w


def test_grid_takes_bfloat16_that_requires_grad(tmp_path):
    weights = attention_weights(2, 1, 3, 3).to(torch.bfloat16).requires_grad_()
    path = plot_attention_grid(weights, tokens(3), tokens(3), tmp_path / "nested" / "dir" / "a.png")
    assert image_size(path)[0] > 0


@pytest.mark.parametrize(
    "query_tokens, key_tokens, message",
    [
        (tokens(4), tokens(6), r"query_tokens: expected 5 labels \(weights.shape\[2\]\), got 4"),
        (tokens(5), tokens(7), r"key_tokens: expected 6 labels \(weights.shape\[3\]\), got 7"),
    ],
)
def test_grid_rejects_labels_that_do_not_match(tmp_path, query_tokens, key_tokens, message):
    with pytest.raises(ValueError, match=message):
        plot_attention_grid(
            attention_weights(1, 1, 5, 6), query_tokens, key_tokens, tmp_path / "x.png"
        )
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(5, 6), (0, 2, 5, 6)])
def test_grid_rejects_weights_that_are_not_4d_or_empty(tmp_path, shape):
    with pytest.raises(ValueError, match=r"weights: expected 4 non-empty dims") as error:
        plot_attention_grid(torch.rand(shape), tokens(5), tokens(6), tmp_path / "x.png")
    assert f"got shape {shape}" in str(error.value)


def test_writes_leave_no_temporary_files(tmp_path):
    path = tmp_path / "grid.png"
    plot_attention_grid(attention_weights(1, 1, 2, 2), tokens(2), tokens(2), path)
    plot_attention_grid(attention_weights(1, 1, 3, 3), tokens(3), tokens(3), path)  # overwrite
    plot_curves([], tmp_path / "curves.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "grid.png"]


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing_behind(tmp_path, monkeypatch):
    path = plot_curves([], tmp_path / "curves.png")
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail)
    with pytest.raises(RuntimeError, match="disk full"):
        plot_curves(train_and_val_records(), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["curves.png"]


def train_and_val_records() -> list[dict]:
    records = [
        {
            "kind": "train",
            "step": s,
            "loss": 5.0 / (1 + s / 100),
            "lr": 4e-4,
            "tokens_per_second": 5000.0,
        }
        for s in range(0, 1001, 50)
    ]
    records += [
        {"kind": "val", "step": s, "loss": 4.0 / (1 + s / 100), "bleu": s / 50} for s in (500, 1000)
    ]
    records.append({"kind": "config", "d_model": 16})  # other kinds are ignored
    return records


@pytest.mark.parametrize(
    "records",
    [train_and_val_records(), [r for r in train_and_val_records() if r["kind"] == "train"], []],
    ids=["train+val", "train only", "none"],
)
def test_curves_write_a_png(tmp_path, records):
    path = plot_curves(iter(records), tmp_path / "curves.png", title="run")
    assert path == tmp_path / "curves.png"
    height, width = image_size(path)
    assert height > 100 and width > 200


def test_curves_take_a_zero_loss_on_a_linear_axis(tmp_path):
    records = [{"kind": "train", "step": 0, "loss": 1.0}, {"kind": "train", "step": 1, "loss": 0.0}]
    assert image_size(plot_curves(records, tmp_path / "c.png"))[0] > 0


def write_lines(path, text: str):
    path.write_text(text, encoding="utf-8")
    return path


def test_read_metrics_skips_blank_lines_and_a_partial_last_line(tmp_path):
    records = [{"kind": "train", "step": 1, "loss": 2.0}, {"kind": "val", "step": 2, "bleu": 3.0}]
    text = "\n".join(json.dumps(r) for r in records) + "\n\n" + '{"kind": "tra'
    assert read_metrics(write_lines(tmp_path / "m.jsonl", text)) == records


def test_read_metrics_keeps_a_complete_last_line_without_newline(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"step": 1}\n{"step": 2}')
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]


def test_read_metrics_raises_on_a_corrupt_middle_line(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"step": 1}\n{"step": \n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        read_metrics(path)


def test_read_metrics_raises_on_a_corrupt_last_line_with_its_newline(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", '{"step": 1}\n{"step": \n')
    with pytest.raises(ValueError, match=r"m\.jsonl:2: not valid JSON"):
        read_metrics(path)
