"""Parallel corpora: line-aligned text files (Multi30k's gzip files among them).

A corpus is a list of ``(source, target)`` sentence pairs. Files may be gzip-compressed
(``.gz``); lines are stripped of surrounding whitespace and pairs with an empty side are
dropped (with their count reported by :func:`read_parallel`'s caller if it cares).
"""

from __future__ import annotations

import gzip
from pathlib import Path

__all__ = ["read_lines", "read_parallel"]


def read_lines(path: str | Path) -> list[str]:
    """Lines of a UTF-8 text file (gzip if the name ends in ``.gz``), without line ends."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # utf-8-sig: a byte-order mark (left by some Windows editors) is not part of the text.
        with opener(path, "rt", encoding="utf-8-sig", newline=None) as file:
            return [line.rstrip("\r\n") for line in file]
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: expected UTF-8 text, got bytes that are not "
                         f"({error.reason} at byte {error.start})") from None


def read_parallel(paths: list[str] | tuple[str, ...] | list[Path],
                  name: str = "paths") -> list[tuple[str, str]]:
    """Sentence pairs from ``[source_file, target_file]`` (line-aligned) or ``[tsv_file]``.

    A tab-separated file holds ``source<TAB>target`` on each line. Mismatched line counts or
    a line without exactly one tab raise ``ValueError`` naming the file and line; ``name``
    is what the errors call ``paths`` (a config's ``data.train``, say).
    """
    paths = [Path(p) for p in paths]
    if len(paths) == 2:
        source, target = read_lines(paths[0]), read_lines(paths[1])
        if len(source) != len(target):
            raise ValueError(f"{name}: {paths[0]} has {len(source)} lines but {paths[1]} has "
                             f"{len(target)}; expected line-aligned files")
        rows = zip(source, target, strict=True)
    elif len(paths) == 1:
        rows = []
        for number, line in enumerate(read_lines(paths[0]), start=1):
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(f"{paths[0]}:{number}: expected source<TAB>target, got "
                                 f"{len(fields)} tab-separated fields")
            rows.append((fields[0], fields[1]))
    else:
        raise ValueError(f"{name}: expected [source_file, target_file] or [tsv_file], got "
                         f"{len(paths)} paths")
    pairs = [(s.strip(), t.strip()) for s, t in rows]
    return [(s, t) for s, t in pairs if s and t]
