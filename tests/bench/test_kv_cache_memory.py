"""benchmarks/kv_cache_memory.py at tiny size: each layout's cached decoding matches a full
pass, grouped and windowed caches hold the fraction of full attention's bytes they should,
and both files are written."""

import pytest

from .scripts import load_script, read_results

kv_cache_memory = load_script("kv_cache_memory")


def test_cache_bytes_per_layout_and_step_are_written(tmp_path):
    kv_cache_memory.main(["--d-model", "16", "--n-heads", "4", "--n-kv-heads", "2",
                          "--n-layers", "1", "--window", "4", "--source-length", "3",
                          "--steps", "12", "6", "--out", str(tmp_path)])
    [json_file] = tmp_path.glob("kv-cache-memory-*.json")
    report, markdown = read_results(json_file.with_suffix(""), "kv_cache_memory")
    rows = {(row["layout"], row["steps"]): row for row in report["rows"]}
    assert len(rows) == 5 * 2 and {steps for _, steps in rows} == {6, 12}
    assert rows["MHA (4 KV heads)", 12]["vs_mha"] == 1
    assert rows["GQA (2 KV heads)", 12]["vs_mha"] == pytest.approx(0.5)
    assert rows["MQA (1 KV head)", 6]["vs_mha"] == pytest.approx(0.25)
    # 12 steps of one layer: keys and values of 4 heads × 4 dims, float32, held whole;
    # a window of 4 holds fewer positions than the 12 steps.
    assert rows["MHA (4 KV heads)", 12]["self_held"] == 2 * 12 * 16 * 4
    assert rows["MHA, window 4", 12]["self_held"] < rows["MHA (4 KV heads)", 12]["self_held"]
    assert rows["MHA (4 KV heads)", 6]["cross"] == 2 * 3 * 16 * 4  # the source's, once
    assert rows["MHA (4 KV heads)", 12]["cross"] == rows["MHA (4 KV heads)", 6]["cross"]
    assert "| GQA (2 KV heads) | 12 |" in markdown


def test_bad_arguments_are_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        kv_cache_memory.main(["--steps", "0"])
    assert "argument --steps: expected a positive int, got 0" in capsys.readouterr().err
