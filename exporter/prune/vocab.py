"""Vocabulary pruning: keep the tokens a Korean deployment uses, drop the rest of a huge vocabulary.

Gemma 3 270M spends 168M of its 268M parameters on a 262,144-token embedding (tied with the LM
head), yet Korean text uses about 7,000 of those tokens. We count token use with the model's own
tokenizer, keep the specials, the byte-fallback tokens, the chat markers and the most used tokens,
rewrite tokenizer.json so it can only emit kept tokens (anything else falls back to smaller kept
pieces or bytes, so every input still round-trips), and slice the embedding rows.

Exactness: a text whose original segmentation used only kept tokens is segmented identically —
for Unigram because the Viterbi search only loses paths it did not take (we keep the lowest-score
piece so the unknown-piece penalty does not move), for BPE because we keep every merge parent of a
kept token, so each merge the original applied is still there.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from runtime.errors import KoedgeError

TOKEN_MAP_FILE = "token_map.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
FILLS = ("ko-formal", "ko-en", "any", "none")
CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>", "<|im_start|>", "<|im_end|>", "<|endofturn|>",
                "<|system|>", "<|user|>", "<|assistant|>", "[|system|]", "[|user|]", "[|assistant|]", "[|endofturn|]")
CHAT_ROLES = ("user", "model", "assistant", "system")


@dataclass
class VocabConfig:
    vocab_size: int | None = None  # keep exactly this many tokens (fill beyond the counted ones)
    coverage: float | None = None  # keep the most used tokens until they cover this share of the corpus
    # named sets (calib split) or .txt/.jsonl files; both registers: informal reviews and formal sentences
    corpora: list[str] = field(default_factory=lambda: ["nsmc", "klue"])
    fill: str = "ko-formal"  # what fills --vocab-size past the counted tokens: ko-formal | ko-en | any | none
    max_texts: int | None = None  # per corpus; None: all
    balance: bool = True  # weigh every corpus's counts to the same total (4.5k KLUE sentences vs 108k reviews)
    hanja: int = 3000  # ko-formal: at most this many single Hanja pieces (by the tokenizer's prior)

    def check(self) -> None:
        if self.vocab_size is not None and self.coverage is not None:
            raise KoedgeError("give --vocab-size or --coverage, not both")
        if self.coverage is not None and not 0.0 < self.coverage <= 1.0:
            raise KoedgeError(f"--coverage must be in (0, 1], got {self.coverage}")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise KoedgeError(f"--vocab-size must be positive, got {self.vocab_size}")
        if self.fill not in FILLS:
            raise KoedgeError(f"unknown fill '{self.fill}' (choose from {', '.join(FILLS)})")
        if not self.corpora:
            raise KoedgeError("no corpus to count tokens on")
        if self.hanja < 0:
            raise KoedgeError(f"--hanja must be 0 or more, got {self.hanja}")


@dataclass
class VocabPlan:
    """Which original ids survive (ascending, so specials keep their low ids) and why."""

    kept: list[int]
    original_size: int
    stats: dict[str, Any]

    def old_to_new(self) -> dict[int, int]:
        return {old: new for new, old in enumerate(self.kept)}


# --- tokenizer.json access ---------------------------------------------------------------------------

def _model_pieces(tok: dict) -> list[str]:
    """Token strings by id for the model part of a tokenizer.json (Unigram or BPE)."""
    model = tok["model"]
    if model["type"] == "Unigram":
        return [piece for piece, _ in model["vocab"]]
    if model["type"] == "BPE":
        pieces = [""] * (max(model["vocab"].values()) + 1)
        for piece, index in model["vocab"].items():
            pieces[index] = piece
        return pieces
    raise KoedgeError(f"vocabulary pruning supports BPE and Unigram tokenizers, not {model['type']}")


def _pieces(tok: dict) -> list[str]:
    """All token strings by id: the model's, then added tokens that live past its vocabulary."""
    pieces = _model_pieces(tok)
    extra = [t for t in tok.get("added_tokens", []) if t["id"] >= len(pieces)]
    if extra:
        pieces += [""] * (max(t["id"] for t in extra) + 1 - len(pieces))
        for token in extra:
            pieces[token["id"]] = token["content"]
    return pieces


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model.get("merges", [])]


def _uses_byte_level(tok: dict) -> bool:
    return "ByteLevel" in json.dumps(tok.get("pre_tokenizer")) or "ByteLevel" in json.dumps(tok.get("decoder"))


# --- counting --------------------------------------------------------------------------------------

def corpus_texts(config: VocabConfig) -> dict[str, list[str]]:
    """Texts per corpus: named sets use their calibration split only (evaluation stays unseen)."""
    from runtime.data import load_texts

    out = {}
    for name in config.corpora:
        texts = load_texts(name, split="calib")[: config.max_texts]
        if not texts:
            raise KoedgeError(f"corpus '{name}' is empty")
        out[name] = texts
    return out


def count_tokens(tokenizer, texts: Iterable[str], batch: int = 4096) -> Counter:
    """Token id -> occurrences, with the tokenizer's own segmentation (no special tokens added)."""
    counts: Counter = Counter()
    chunk: list[str] = []
    for text in texts:
        chunk.append(text)
        if len(chunk) == batch:
            for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
                counts.update(encoding.ids)
            chunk = []
    for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False) if chunk else []:
        counts.update(encoding.ids)
    return counts


def merge_counts(per_corpus: list[Counter], balance: bool) -> Counter:
    """One count over several corpora; balanced, each corpus weighs as much as the largest (a small formal
    corpus then orders and covers as much as a large informal one)."""
    merged: Counter = Counter()
    largest = max((sum(c.values()) for c in per_corpus), default=0)
    for counts in per_corpus:
        total = sum(counts.values())
        weight = largest / total if balance and total else 1
        for token, count in counts.items():
            merged[token] += count * weight
    return merged


# --- choosing ------------------------------------------------------------------------------------

def required_ids(tok: dict, special_ids: Iterable[int], chat_ids: Iterable[int]) -> dict[str, set[int]]:
    """Tokens that must stay whatever the corpus says, by reason."""
    pieces = _pieces(tok)
    model = tok["model"]
    index = {piece: i for i, piece in enumerate(pieces)}
    need: dict[str, set[int]] = {
        "special": {t["id"] for t in tok.get("added_tokens", [])} | {i for i in special_ids if i is not None},
        "chat": set(chat_ids) | {index[m] for m in CHAT_MARKERS if m in index},
    }
    if model.get("byte_fallback"):
        need["bytes"] = {index[p] for p in (f"<0x{b:02X}>" for b in range(256)) if p in index}
    elif _uses_byte_level(tok):
        from tokenizers import pre_tokenizers

        need["bytes"] = {index[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in index}
    else:  # no fallback: keep every single character the original could emit
        need["bytes"] = {i for i, piece in enumerate(pieces) if len(piece) == 1}
    if model["type"] == "Unigram":
        scores = [score for _, score in model["vocab"]]
        need["unigram-min-score"] = {min(range(len(scores)), key=scores.__getitem__)}
        if model.get("unk_id") is not None:
            need["special"].add(model["unk_id"])
    elif model.get("unk_token") in index:
        need["special"].add(index[model["unk_token"]])
    return need


def _bpe_parents(tok: dict) -> dict[int, set[int]]:
    """For BPE: token id -> ids of every merge input that can produce it."""
    vocab = tok["model"]["vocab"]
    parents: dict[int, set[int]] = {}
    for left, right in _merges(tok["model"]):
        made = vocab.get(left + right)
        if made is not None and left in vocab and right in vocab:
            parents.setdefault(made, set()).update((vocab[left], vocab[right]))
    return parents


def _closure(ids: Iterable[int], parents: dict[int, set[int]], have: set[int]) -> set[int]:
    """`ids` plus all merge ancestors not already in `have`."""
    out: set[int] = set()
    stack = [i for i in ids if i not in have]
    while stack:
        token = stack.pop()
        if token in out or token in have:
            continue
        out.add(token)
        stack.extend(parents.get(token, ()))
    return out


def _fits_ko_en(piece: str) -> bool:
    """Hangul, ASCII, and common punctuation only: what Korean chat text with some English looks like."""
    text = piece.replace("\u2581", " ").replace("\u0120", " ")
    if not text or (text.startswith("<") and text.endswith(">") and len(text) > 2):
        return False
    for char in text:
        code = ord(char)
        if code < 128 or 0xAC00 <= code <= 0xD7A3 or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F:
            continue
        if 0x2000 <= code <= 0x206F or 0x3000 <= code <= 0x303F or 0xFF01 <= code <= 0xFF5E:
            continue
        if unicodedata.category(char).startswith("P"):
            continue
        return False
    return True


def _is_hanja(char: str) -> bool:
    code = ord(char)
    return 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or 0xF900 <= code <= 0xFAFF


def _formal_char(piece: str) -> str | None:
    """'hanja' or 'symbol' for a single character formal Korean writes (a Hanja; a number, symbol, punctuation
    mark, Latin or Greek letter of the basic plane: ℃, ㎞, ①, ·, é, α), else None."""
    text = piece.replace("\u2581", "").replace("\u0120", "")
    if len(text) != 1 or ord(text) < 128 or ord(text) >= 0x10000:
        return None
    if _is_hanja(text):
        return "hanja"
    category = unicodedata.category(text)
    if category[0] in "NSP" or (category[0] == "L" and (0x00C0 <= ord(text) <= 0x024F or 0x0370 <= ord(text) <= 0x03FF)):
        return "symbol"
    return None


def _is_hangul_piece(piece: str) -> bool:
    text = piece.replace("\u2581", "")
    return bool(text) and all(0xAC00 <= ord(c) <= 0xD7A3 for c in text)


def fill_order(tok: dict, config: VocabConfig) -> list[int]:
    """Ids in the order the fill tries them. ko-formal: every Hangul piece, then single Hanja (up to
    `config.hanja`) and formal symbols, then the ko-en pieces, each group in the tokenizer's prior order."""
    pieces = _pieces(tok)
    order = prior_order(tok)
    if config.fill == "any":
        return order
    ko_en = [i for i in order if _fits_ko_en(pieces[i])]
    if config.fill != "ko-formal":
        return ko_en
    hangul = [i for i in order if _is_hangul_piece(pieces[i])]
    kinds = [(i, _formal_char(pieces[i])) for i in order]
    hanja = [i for i, kind in kinds if kind == "hanja"][: config.hanja]
    symbols = [i for i, kind in kinds if kind == "symbol"]
    rank = {token: position for position, token in enumerate(order)}
    return hangul + sorted(hanja + symbols, key=rank.__getitem__) + ko_en


def prior_order(tok: dict) -> list[int]:
    """Ids most-likely-first by the tokenizer's own prior: Unigram score, else BPE id (merge order)."""
    model = tok["model"]
    if model["type"] == "Unigram":
        scores = [score for _, score in model["vocab"]]
        return sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(model["vocab"].values())


def choose_tokens(tok: dict, counts: Counter, config: VocabConfig, special_ids: Iterable[int] = (),
                  chat_ids: Iterable[int] = ()) -> VocabPlan:
    """The kept ids: required ones, then by corpus count (to the coverage or size), then by prior."""
    config.check()
    pieces = _pieces(tok)
    total = sum(counts.values())
    if total == 0:
        raise KoedgeError("the corpus produced no tokens (empty corpus)")
    need = required_ids(tok, special_ids, chat_ids)
    parents = _bpe_parents(tok) if tok["model"]["type"] == "BPE" else {}
    kept: set[int] = set()
    for ids in need.values():
        kept |= _closure(ids, parents, kept)
    required = len(kept)
    limit = config.vocab_size if config.vocab_size is not None else len(pieces)
    if required > limit:
        raise KoedgeError(f"--vocab-size {limit} keeps fewer tokens than must stay: {required} "
                          f"(specials, 256 byte-fallback tokens, chat markers)")
    target = (config.coverage if config.coverage is not None else 1.0) * total
    covered = sum(counts[i] for i in kept)
    skipped = 0
    for token, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        if covered >= target:
            break
        if token in kept:
            continue
        extra = _closure([token], parents, kept)
        if len(kept) + len(extra) > limit:
            skipped += 1
            continue
        kept |= extra
        covered += count
    counted = len(kept)
    if config.vocab_size is not None and config.fill != "none":
        for token in fill_order(tok, config):
            if len(kept) >= limit:
                break
            if token in kept:
                continue
            extra = _closure([token], parents, kept)
            if len(kept) + len(extra) <= limit:
                kept |= extra
    stats = {
        "original_vocab_size": len(pieces), "vocab_size": len(kept), "required": required,
        "required_by_reason": {reason: len(ids) for reason, ids in need.items()},
        "from_corpus": counted - required, "from_prior_fill": len(kept) - counted,
        "corpus_tokens": round(total), "corpus_distinct_tokens": len(counts),
        "corpus_coverage": round(sum(counts[i] for i in kept) / total, 6), "skipped_for_size": skipped,
    }
    return VocabPlan(sorted(kept), len(pieces), stats)


# --- rewriting -----------------------------------------------------------------------------------

def _remap_post_processor(node: Any, mapping: dict[int, int]) -> Any:
    """Special-token ids inside a post_processor (TemplateProcessing, Roberta/Bert, Sequence)."""
    if isinstance(node, list):
        return [_remap_post_processor(item, mapping) for item in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list) and all(isinstance(v, int) for v in value):
            out[key] = [mapping[v] for v in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            out[key] = [value[0], mapping[value[1]]]
        else:
            out[key] = _remap_post_processor(value, mapping)
    return out


def rewrite_tokenizer(tok: dict, plan: VocabPlan) -> dict:
    """A tokenizer.json that only knows the kept tokens, renumbered 0..n-1 in their original order."""
    mapping = plan.old_to_new()
    pieces = _model_pieces(tok)
    in_model = [old for old in plan.kept if old < len(pieces)]  # added tokens past the model come last
    kept_pieces = {pieces[i] for i in in_model}
    new = json.loads(json.dumps(tok))
    model = new["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [tok["model"]["vocab"][i] for i in in_model]
        if model.get("unk_id") is not None:
            model["unk_id"] = mapping[model["unk_id"]]
    else:
        model["vocab"] = {pieces[old]: mapping[old] for old in in_model}
        merges = [(a, b) for a, b in _merges(tok["model"]) if {a, b, a + b} <= kept_pieces]
        as_strings = tok["model"].get("merges") and isinstance(tok["model"]["merges"][0], str)
        model["merges"] = [f"{a} {b}" for a, b in merges] if as_strings else [[a, b] for a, b in merges]
    dropped = [t for t in new.get("added_tokens", []) if t["id"] not in mapping]
    if dropped:
        raise KoedgeError(f"added token {dropped[0]['content']!r} would be dropped")
    for token in new.get("added_tokens", []):
        token["id"] = mapping[token["id"]]
    if new.get("post_processor"):
        new["post_processor"] = _remap_post_processor(new["post_processor"], mapping)
    return new


def remap_token_fields(data: dict, mapping: dict[int, int]) -> dict:
    """`*_token_id` fields (int or list) and `added_tokens_decoder` keys in a config-like JSON."""
    out = dict(data)
    for key, value in data.items():
        if key.endswith("token_id") and isinstance(value, int):
            out[key] = mapping.get(value, value if value < 0 else None)
        elif key.endswith("token_id") and isinstance(value, list):
            out[key] = [mapping[v] for v in value if v in mapping]
        elif key == "added_tokens_decoder" and isinstance(value, dict):
            out[key] = {str(mapping[int(k)]): v for k, v in value.items() if int(k) in mapping}
    if "vocab_size" in data:
        out["vocab_size"] = len(mapping)
    return out


# --- the pass -------------------------------------------------------------------------------------

def chat_token_ids(source: Path) -> set[int]:
    """Ids in a rendered sample conversation, when the tokenizer has a chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    ids: set[int] = set()
    if tokenizer.chat_template:
        sample = [{"role": "user", "content": "안녕"}, {"role": "assistant", "content": "네"}]
        try:
            rendered = tokenizer.apply_chat_template(sample, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates may reject roles; the markers are still kept below
            rendered = ""
        ids |= set(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    return ids


def _marker_lines(tok: dict) -> list[str]:
    """Turn headers for the chat markers the vocabulary has (`<start_of_turn>user\\n`, ...)."""
    pieces = set(_pieces(tok))
    return [f"{marker}{role}\n" for marker in CHAT_MARKERS if marker in pieces for role in CHAT_ROLES] + \
           [f"{marker}\n" for marker in CHAT_MARKERS if marker in pieces]


def plan_vocabulary(source: Path, config: VocabConfig, special_ids: Iterable[int],
                    progress: Callable[[str], None]) -> VocabPlan:
    """Count over the corpora and choose the kept ids for the tokenizer in `source`."""
    from tokenizers import Tokenizer

    config.check()
    path = source / "tokenizer.json"
    if not path.is_file():
        raise KoedgeError(f"vocabulary pruning needs a fast tokenizer: {source} has no tokenizer.json")
    tok = json.loads(path.read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_file(str(path))
    found_per_corpus: dict[str, Counter] = {}
    per_corpus = {}
    for name, texts in corpus_texts(config).items():
        progress(f"counting tokens over {len(texts):,} texts of '{name}'")
        found_per_corpus[name] = count_tokens(tokenizer, texts)
        per_corpus[name] = {"texts": len(texts), "tokens": sum(found_per_corpus[name].values())}
    counts = merge_counts(list(found_per_corpus.values()), config.balance)
    chat = chat_token_ids(source) | set(count_tokens(tokenizer, _marker_lines(tok)))
    plan = choose_tokens(tok, counts, config, special_ids, chat)
    plan.stats["corpora"] = per_corpus
    plan.stats["config"] = asdict(config)
    return plan


def write_pruned_tokenizer(source: Path, target: Path, plan: VocabPlan) -> None:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for the kept ids."""
    mapping = plan.old_to_new()
    tok = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    (target / "tokenizer.json").write_text(json.dumps(rewrite_tokenizer(tok, plan), ensure_ascii=False),
                                           encoding="utf-8")
    config_path = source / "tokenizer_config.json"
    if config_path.is_file():
        config = remap_token_fields(json.loads(config_path.read_text(encoding="utf-8")), mapping)
        config.pop("vocab_size", None)
        (target / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                      encoding="utf-8")
    for name in ("special_tokens_map.json", "chat_template.jinja"):
        if (source / name).is_file():
            (target / name).write_bytes((source / name).read_bytes())


def slice_embeddings(model, plan: VocabPlan) -> None:
    """Keep the embedding rows (and untied LM head rows) of the kept ids; remap special ids in the config."""
    import torch

    index = torch.tensor(plan.kept, dtype=torch.long)
    embedding = model.get_input_embeddings()
    if embedding.weight.shape[0] < plan.original_size:
        raise KoedgeError(f"the embedding has {embedding.weight.shape[0]} rows but the tokenizer "
                          f"{plan.original_size} tokens")
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.weight.data_ptr()
    mapping = plan.old_to_new()
    with torch.no_grad():
        embedding.weight = torch.nn.Parameter(embedding.weight[index].clone())
        embedding.num_embeddings = len(plan.kept)
        if getattr(embedding, "padding_idx", None) is not None:
            embedding.padding_idx = mapping.get(embedding.padding_idx)
        if head is not None and tied:
            head.weight = embedding.weight
        elif head is not None:
            head.weight = torch.nn.Parameter(head.weight[index].clone())
            if head.bias is not None:
                head.bias = torch.nn.Parameter(head.bias[index].clone())
        if head is not None:
            head.out_features = len(plan.kept)
    model.config.vocab_size = len(plan.kept)
    for holder in (model.config, getattr(model, "generation_config", None)):
        if holder is None:
            continue
        for key, value in remap_token_fields(holder.to_dict(), mapping).items():
            if key.endswith("token_id"):
                setattr(holder, key, value)


def write_token_map(folder: Path, plan: VocabPlan, source: Path | None = None) -> str:
    """`token_map.json`: new id -> original id, for comparing with the unpruned model on shared tokens.

    When `source` was itself vocabulary-pruned (it has a token map), the maps are composed, so ids
    always point into the first, unpruned vocabulary.
    """
    ids, original_size = list(plan.kept), plan.original_size
    earlier = source / TOKEN_MAP_FILE if source else None
    if earlier and earlier.is_file():
        data = json.loads(earlier.read_text(encoding="utf-8"))
        ids = [data["new_to_original"][i] for i in ids]
        original_size = data["original_vocab_size"]
    data = {"format": "koedge-token-map", "original_vocab_size": original_size,
            "vocab_size": len(ids), "new_to_original": ids}
    (folder / TOKEN_MAP_FILE).write_text(json.dumps(data), encoding="utf-8")
    return TOKEN_MAP_FILE


def check_tokenizer(original_path: Path, pruned_path: Path, plan: VocabPlan, texts: list[str]) -> dict:
    """Round trip and segmentation checks on held-out texts: exact decode, only kept ids, same ids."""
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(original_path))
    pruned = Tokenizer.from_file(str(pruned_path))
    kept = set(plan.kept)
    round_trip = same = eligible = tokens_before = tokens_after = 0
    for text, before, after in zip(texts, original.encode_batch(texts, add_special_tokens=False),
                                   pruned.encode_batch(texts, add_special_tokens=False)):
        round_trip += pruned.decode(after.ids, skip_special_tokens=False) == original.decode(
            before.ids, skip_special_tokens=False)
        tokens_before += len(before.ids)
        tokens_after += len(after.ids)
        if all(i in kept for i in before.ids):
            eligible += 1
            same += [plan.kept[i] for i in after.ids] == before.ids
    return {"texts": len(texts), "round_trip_exact": round_trip, "texts_fully_kept": eligible,
            "same_segmentation_when_fully_kept": same, "tokens_before": tokens_before, "tokens_after": tokens_after}
