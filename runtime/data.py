"""Korean text sets by name (NSMC reviews, KLUE sentences) or from a user's .txt / .jsonl file.

Every named set is split by a hash of its item id into a calibration part and an evaluation part,
so that the texts a model is calibrated (or its vocabulary counted) on never judge it.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.errors import KoedgeError

NAMED_SETS = ("nsmc", "klue", "ko")  # ko = both registers: informal reviews and formal KLUE sentences
SPLITS = ("calib", "eval", "all")
EVAL_SHARE = 10  # one item in ten (by id hash) is for evaluation only


@dataclass(frozen=True)
class Review:
    review_id: str
    rating: int
    text: str


def data_root() -> Path:
    """`shared/data/ko` beside the project (or KOEDGE_DATA); looked for upward from cwd and this file."""
    if env := os.environ.get("KOEDGE_DATA"):
        return Path(env)
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data" / "ko"
            if candidate.is_dir():
                return candidate
    raise KoedgeError("Korean data not found: set KOEDGE_DATA to a folder holding nsmc/ and klue/")


def split_of(item_id: str) -> str:
    bucket = int(hashlib.sha1(item_id.encode()).hexdigest()[:8], 16) % EVAL_SHARE
    return "eval" if bucket == 0 else "calib"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise KoedgeError(f"unknown split '{split}' (choose from {', '.join(SPLITS)})")


def nsmc_rows(split: str = "all", limit: int | None = None) -> list[Review]:
    """Naver movie reviews with ratings 1–10."""
    _check_split(split)
    path = data_root() / "nsmc" / "reviews.tsv"
    if not path.is_file():
        raise KoedgeError(f"NSMC data missing: {path}")
    rows: list[Review] = []
    with open(path, encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE):
            if split != "all" and split_of("nsmc:" + record["review_id"]) != split:
                continue
            text = (record["review"] or "").strip()
            if text:
                rows.append(Review(record["review_id"], int(record["rating"]), text))
            if limit is not None and len(rows) >= limit:
                break
    return rows


def klue_sentences(split: str = "all") -> list[str]:
    """Unique formal sentences from the KLUE NLI and STS dev sets (premises, hypotheses, pairs)."""
    _check_split(split)
    root = data_root() / "klue"
    seen: dict[str, None] = {}
    for name, fields in (("klue-nli-v1.1_dev.json", ("premise", "hypothesis")),
                         ("klue-sts-v1.1_dev.json", ("sentence1", "sentence2"))):
        path = root / name
        if not path.is_file():
            raise KoedgeError(f"KLUE data missing: {path}")
        for item in json.loads(path.read_text(encoding="utf-8")):
            for key in fields:
                text = item[key].strip()
                if text and (split == "all" or split_of("klue:" + text) == split):
                    seen.setdefault(text)
    return list(seen)


def read_text_file(path: Path) -> list[str]:
    """A user's texts: .txt (one per line) or .jsonl (a `text` field per line)."""
    if not path.is_file():
        raise KoedgeError(f"text file not found: {path}")
    try:
        raw = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise KoedgeError(f"{path} is not UTF-8 text (byte {err.start} is invalid)") from err
    texts: list[str] = []
    for number, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise KoedgeError(f"{path}:{number} is not valid JSON: {err.msg}") from err
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise KoedgeError(f"{path}:{number} has no string 'text' field")
            line = record["text"]
        texts.append(line.strip())
    texts = [text for text in texts if text]
    if not texts:
        raise KoedgeError(f"{path} holds no text")
    return texts


def load_texts(source: str, split: str = "calib") -> list[str]:
    """Texts from a named set (split applies) or a user's file (used whole)."""
    if source == "nsmc":
        return [row.text for row in nsmc_rows(split)]
    if source == "klue":
        return klue_sentences(split)
    if source == "ko":
        return interleave(klue_sentences(split), [row.text for row in nsmc_rows(split)])
    path = Path(source).expanduser()
    if path.suffix in (".txt", ".jsonl") or path.exists():
        return read_text_file(path)
    raise KoedgeError(f"unknown text source '{source}': use {', '.join(NAMED_SETS)} or a .txt/.jsonl file")


def interleave(first: list[str], second: list[str]) -> list[str]:
    """Alternate two lists so any prefix holds both registers."""
    out: list[str] = []
    for index in range(max(len(first), len(second))):
        out.extend(items[index] for items in (first, second) if index < len(items))
    return out
