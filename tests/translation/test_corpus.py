"""Parallel corpus readers: line-aligned pairs of files, TSV, gzip, and the errors a user sees."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from attention.translation.config import multi30k_files
from attention.translation.data.corpus import read_lines, read_parallel

SOURCE = ["Ein Mann fährt Fahrrad.", "Zwei Hunde spielen im Schnee.", "Die Straße ist nass."]
TARGET = ["A man rides a bike.", "Two dogs play in the snow.", "The street is wet."]


def write(path: Path, lines: list[str], newline: str = "\n") -> Path:
    data = "".join(line + newline for line in lines).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def test_two_line_aligned_files(tmp_path):
    src, tgt = write(tmp_path / "train.de", SOURCE), write(tmp_path / "train.en", TARGET)
    assert read_parallel([src, tgt]) == list(zip(SOURCE, TARGET, strict=True))
    assert read_parallel([str(src), str(tgt)]) == list(zip(SOURCE, TARGET, strict=True))


def test_tsv_file(tmp_path):
    tsv = write(tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in zip(SOURCE, TARGET, strict=True)])
    assert read_parallel([tsv]) == list(zip(SOURCE, TARGET, strict=True))


def test_gzip_files(tmp_path):
    src, tgt = write(tmp_path / "a.de.gz", SOURCE), write(tmp_path / "a.en.gz", TARGET)
    assert gzip.decompress(src.read_bytes())  # really compressed
    assert read_lines(src) == SOURCE
    assert read_parallel([src, tgt]) == list(zip(SOURCE, TARGET, strict=True))
    tsv = write(tmp_path / "a.tsv.gz", [f"{s}\t{t}" for s, t in zip(SOURCE, TARGET, strict=True)])
    assert read_parallel([tsv]) == list(zip(SOURCE, TARGET, strict=True))


def test_mismatched_line_counts_name_both_files(tmp_path):
    src, tgt = write(tmp_path / "x.de", SOURCE), write(tmp_path / "x.en", TARGET[:2])
    with pytest.raises(ValueError) as error:
        read_parallel([src, tgt])
    message = str(error.value)
    assert str(src) in message and str(tgt) in message
    assert f"{src} has 3 lines" in message and f"{tgt} has 2" in message


@pytest.mark.parametrize("bad", ["no tab here", "one\ttwo\tthree"])
def test_tsv_line_without_exactly_one_tab_names_file_and_line(tmp_path, bad):
    # the blank line 2 is skipped but still counted: the number is the line in an editor
    tsv = write(tmp_path / "bad.tsv", ["ein\tone", "", bad, "drei\tthree"])
    with pytest.raises(ValueError, match="source<TAB>target") as error:
        read_parallel([tsv])
    assert f"{tsv}:3:" in str(error.value)


def test_pairs_with_an_empty_side_are_dropped_and_whitespace_stripped(tmp_path):
    src = write(tmp_path / "s.txt", ["  eins  ", "", "drei", "   ", "fünf"])
    tgt = write(tmp_path / "t.txt", ["one", "two", "", "four", " five\t"])
    assert read_parallel([src, tgt]) == [("eins", "one"), ("fünf", "five")]
    tsv = write(tmp_path / "p.tsv", ["eins\tone", "zwei\t", "\tthree", "  ", "vier \t four"])
    assert read_parallel([tsv]) == [("eins", "one"), ("vier", "four")]


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_crlf_line_endings(tmp_path, suffix):
    src = write(tmp_path / f"s.txt{suffix}", SOURCE, newline="\r\n")
    tgt = write(tmp_path / f"t.txt{suffix}", TARGET, newline="\r\n")
    assert read_lines(src) == SOURCE
    assert read_parallel([src, tgt]) == list(zip(SOURCE, TARGET, strict=True))
    tsv = write(tmp_path / f"p.tsv{suffix}", [f"{s}\t{t}" for s, t in zip(SOURCE, TARGET,
                                                                          strict=True)], "\r\n")
    assert read_parallel([tsv]) == list(zip(SOURCE, TARGET, strict=True))


def test_unicode_survives(tmp_path):
    source = ["L'élève mange une crêpe à Noël.", "Größe – „Zitat“", "日本語の文。", "emoji 🙂 ok"]
    target = ["The pupil eats a crêpe at Christmas.", "size — “quote”", "A Japanese sentence.",
              "emoji 🙂 ok"]
    src, tgt = write(tmp_path / "u.fr", source), write(tmp_path / "u.en", target)
    assert read_parallel([src, tgt]) == list(zip(source, target, strict=True))


def test_wrong_number_of_paths(tmp_path):
    files = [write(tmp_path / f"{i}.txt", SOURCE) for i in range(3)]
    with pytest.raises(ValueError, match="paths: expected .*got 3 paths"):
        read_parallel(files)
    with pytest.raises(ValueError, match="got 0 paths"):
        read_parallel([])


def test_multi30k_files():
    assert multi30k_files("/data/m30k", "train", "de", "en") == (
        Path("/data/m30k/train.de.gz"), Path("/data/m30k/train.en.gz"))
    assert multi30k_files("m", "test", "en", "fr") == (
        Path("m/test_2016_flickr.en.gz"), Path("m/test_2016_flickr.fr.gz"))
    with pytest.raises(ValueError, match="split: expected one of .*'dev'"):
        multi30k_files("m", "dev", "de", "en")
