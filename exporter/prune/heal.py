"""The heal pass: distil the unpruned model (teacher) into the pruned one (student) on Korean text.

Structured pruning alone costs gemma-3-270m several percent of bits per byte per cut (docs/pruning.md);
a short knowledge-distillation run wins much of it back. The loss is the teacher-student KL at a
temperature (logit KD, scaled by T²) plus the usual next-token loss. Training goes through LoRA adapters
on the student's linear layers (merged into the weights at the end, so export and quantization see an
ordinary checkpoint) or through full fine-tuning of the decoder (`method = "full"`).

The loop is plain `accelerate`: on this CPU it runs in one process; `accelerate launch` runs the same
pass on one or several GPUs (each process holds a teacher copy; the data loader is sharded by accelerate).
Checkpoints (`accelerator.save_state` plus the step) go to a work folder every `save_every` steps, so
an interrupted heal resumes to the same state. Training texts are the calibration split of the named
sets, never the evaluation split the pass is judged on.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from runtime.errors import KoedgeError

METHODS = ("lora", "full")
STATE_FILE = "heal-state.json"


@dataclass
class HealConfig:
    method: str = "lora"  # lora: adapters on every decoder linear layer, merged at the end; full: the decoder
    steps: int = 300  # optimizer steps (the step budget)
    minutes: float | None = None  # time budget: stop (and finish) when this run has used it
    seq_len: int = 128  # tokens per training sequence (texts are packed)
    batch_size: int = 8
    learning_rate: float | None = None  # None: 1e-3 for lora, 1e-4 for full
    warmup_steps: int = 10
    temperature: float = 2.0
    kd_weight: float = 1.0  # weight of T² · KL(teacher ‖ student)
    lm_weight: float = 0.5  # weight of the next-token cross entropy
    lora_rank: int = 16
    lora_alpha: int = 32
    corpus: str = "ko"  # named set (its calib split) or a .txt/.jsonl file
    eval_corpus: str = "ko"  # named set (its eval split) or a .txt/.jsonl file
    eval_texts: int = 60  # held-out texts scored before and after (bits per byte, KL to the teacher)
    gradient_checkpointing: bool = False
    save_every: int = 50  # steps between resumable checkpoints
    seed: int = 0

    def check(self) -> None:
        if self.method not in METHODS:
            raise KoedgeError(f"heal: unknown method '{self.method}' (choose from {', '.join(METHODS)})")
        for name in ("steps", "seq_len", "batch_size", "save_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise KoedgeError(f"heal: {name} must be at least 1, got {getattr(self, name)}")
        if self.minutes is not None and self.minutes <= 0:
            raise KoedgeError(f"heal: minutes must be positive, got {self.minutes}")
        if self.temperature <= 0 or self.kd_weight < 0 or self.lm_weight < 0 or self.kd_weight + self.lm_weight == 0:
            raise KoedgeError("heal: temperature must be positive and kd_weight/lm_weight non-negative, not both 0")
        if self.eval_texts < 0:
            raise KoedgeError("heal: eval_texts must be 0 or more")

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (1e-3 if self.method == "lora" else 1e-4)

    def key(self) -> str:
        """What a checkpoint must match to be resumed (the budgets and bookkeeping may change)."""
        relevant = {k: v for k, v in asdict(self).items() if k not in ("minutes", "save_every", "eval_texts",
                                                                        "eval_corpus")}
        return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# --- models ---------------------------------------------------------------------------------------

def _token_map(folder: Path, vocab: int) -> list[int]:
    """New id -> id in the original vocabulary (identity for a model whose vocabulary was never pruned)."""
    from exporter.prune.vocab import TOKEN_MAP_FILE

    path = folder / TOKEN_MAP_FILE
    return json.loads(path.read_text(encoding="utf-8"))["new_to_original"] if path.is_file() else list(range(vocab))


def teacher_rows(teacher: Path, teacher_vocab: int, student: Path, student_vocab: int) -> list[int] | None:
    """Rows of the teacher's vocabulary in the student's id order (None: the vocabularies are the same)."""
    student_map, teacher_map = _token_map(student, student_vocab), _token_map(teacher, teacher_vocab)
    if student_map == teacher_map:
        return None
    position = {original: row for row, original in enumerate(teacher_map)}
    missing = [original for original in student_map if original not in position]
    if missing or len(student_map) != student_vocab:
        raise KoedgeError(f"the teacher ({teacher_vocab:,} tokens) lacks {len(missing) or 'some'} of the student's "
                          f"tokens: give the model the student was pruned from")
    return [position[original] for original in student_map]


def load_pair(teacher, student):
    """(teacher, student) torch models on the student's vocabulary; the teacher frozen in eval mode."""
    from exporter.export.convert import load_torch_model
    from exporter.prune.vocab import VocabPlan, slice_embeddings

    student_model = load_torch_model(student, "fp32")
    teacher_model = load_torch_model(teacher, "fp32")
    rows = teacher_rows(teacher.path, teacher_model.get_input_embeddings().weight.shape[0], student.path,
                        student_model.get_input_embeddings().weight.shape[0])
    if rows is not None:
        slice_embeddings(teacher_model, VocabPlan(rows, teacher_model.get_input_embeddings().weight.shape[0], {}))
    teacher_model.eval().requires_grad_(False)
    return teacher_model, student_model


def wrap_student(model, config: HealConfig):
    """LoRA adapters on every linear layer of the decoder (not the LM head), or the decoder itself trainable
    (the embedding, tied to the LM head, stays frozen in both)."""
    if config.method == "lora":
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                          target_modules="all-linear", bias="none")
        model = get_peft_model(model, lora)
    else:
        model.requires_grad_(True)
        model.get_input_embeddings().requires_grad_(False)
        head = model.get_output_embeddings()
        if head is not None:
            head.requires_grad_(False)
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.method == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


# --- data -----------------------------------------------------------------------------------------

def _texts(source: str, split: str) -> list[str]:
    from runtime.data import load_texts

    texts = load_texts(source, split=split)
    if not texts:
        raise KoedgeError(f"heal: no texts in '{source}'")
    return texts


def _bos(folder: Path, model) -> int | None:
    path = folder / "tokenizer_config.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return None if data.get("add_bos_token") is False else model.config.bos_token_id


def training_blocks(tokenizer_file: Path, texts: list[str], config: HealConfig, bos: int | None, needed: int):
    """Texts shuffled by the seed, each with its BOS, packed into `seq_len` blocks (a LongTensor [n, seq_len]).
    Stops once `needed` blocks are full (a heal of N steps never tokenizes the whole corpus)."""
    import torch
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    order = list(range(len(texts)))
    random.Random(config.seed).shuffle(order)
    stream: list[int] = []
    target = needed * config.seq_len
    for start in range(0, len(order), 2048):
        chunk = [texts[i] for i in order[start:start + 2048]]
        for encoding in tokenizer.encode_batch(chunk, add_special_tokens=False):
            stream.extend(([bos] if bos is not None else []) + encoding.ids)
        if len(stream) >= target:
            break
    count = min(needed, len(stream) // config.seq_len)
    if count == 0:
        raise KoedgeError(f"heal: the corpus holds fewer than {config.seq_len} tokens")
    return torch.tensor(stream[: count * config.seq_len], dtype=torch.long).view(count, config.seq_len)


# --- loss -----------------------------------------------------------------------------------------

def heal_loss(student_logits, teacher_logits, input_ids, config: HealConfig) -> tuple:
    """(total, kd, lm): T²·KL(teacher ‖ student) per token at temperature T, plus next-token cross entropy."""
    import torch.nn.functional as F

    vocab = student_logits.shape[-1]
    student = student_logits[:, :-1].reshape(-1, vocab).float()
    teacher = teacher_logits[:, :-1].reshape(-1, vocab).float()
    t = config.temperature
    kd = F.kl_div(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="batchmean") * t * t
    lm = F.cross_entropy(student, input_ids[:, 1:].reshape(-1))
    return config.kd_weight * kd + config.lm_weight * lm, kd, lm


# --- scoring --------------------------------------------------------------------------------------

def _scorer(student_folder: Path, student_model, config: HealConfig):
    from exporter.prune.sensitivity import EvalSet, Scorer

    texts = _texts(config.eval_corpus, "eval")[: config.eval_texts]
    evalset = EvalSet.from_texts(student_folder / "tokenizer.json", texts, _bos(student_folder, student_model))
    return Scorer(evalset, student_model.config.vocab_size, keep_reference=True)


# --- the pass -------------------------------------------------------------------------------------

def _save(accelerator, work: Path, step: int, tokens: int, key: str) -> None:
    """accelerate's state (model, optimizer, scheduler, RNG) and the step, replacing the last checkpoint."""
    partial = work / "checkpoint.partial"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial), safe_serialization=False)
    if accelerator.is_main_process:
        (partial / STATE_FILE).write_text(json.dumps({"step": step, "tokens": tokens, "config_key": key}))
        final = work / "checkpoint"
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    accelerator.wait_for_everyone()


def _resume(accelerator, work: Path, key: str) -> tuple[int, int]:
    """(step, tokens) of the checkpoint in `work`, loaded into the prepared objects; (0, 0) without one."""
    folder = work / "checkpoint"
    if not (folder / STATE_FILE).is_file():
        return 0, 0
    state = json.loads((folder / STATE_FILE).read_text())
    if state.get("config_key") != key:
        raise KoedgeError(f"{work} holds a heal checkpoint of another configuration; remove it to start over")
    accelerator.load_state(str(folder))
    return state["step"], state["tokens"]


def heal_checkpoint(teacher, student, out: Path, config: HealConfig, work: Path,
                    progress: Callable[[str], None] = lambda message: None,
                    on_step: Callable[[int, float], None] | None = None) -> dict:
    """Distil `teacher` (a ResolvedModel) into `student` (a ResolvedModel of a pruned checkpoint) and
    write the healed checkpoint to `out` (a new folder). Resumes from a checkpoint in `work`, which is
    removed once `out` is written. `on_step(step, loss)` is called after every optimizer step."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from exporter.export.convert import CHECKPOINT_PASSES
    from exporter.prune.pipeline import _copy_tokenizer_and_extras
    from runtime.bundle import PassRecord

    config.check()
    if out.exists():
        raise KoedgeError(f"{out} exists; choose a new folder for the healed checkpoint")
    started = time.perf_counter()
    accelerator = Accelerator()
    set_seed(config.seed)
    progress(f"loading teacher {teacher.name} and student {student.path.name}")
    teacher_model, student_model = load_pair(teacher, student)
    results: dict = {"method": config.method, "parameters": sum(p.numel() for p in student_model.parameters()),
                     "teacher_parameters": sum(p.numel() for p in teacher_model.parameters())}
    scorer = None
    if config.eval_texts:
        scorer = _scorer(student.path, student_model, config)
        progress(f"scoring teacher and student on {config.eval_texts} held-out texts")
        results["eval_teacher"] = scorer.score(teacher_model)
        results["eval_before"] = scorer.score(student_model)
    model = wrap_student(student_model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]
    results["trainable_parameters"] = sum(p.numel() for p in trainable)
    blocks = training_blocks(student.path / "tokenizer.json", _texts(config.corpus, "calib"), config,
                             _bos(student.path, student_model),
                             config.steps * config.batch_size * accelerator.num_processes)
    loader = torch.utils.data.DataLoader(blocks, batch_size=config.batch_size, shuffle=False, drop_last=True)
    if len(loader) == 0:
        raise KoedgeError(f"heal: fewer than {config.batch_size} training sequences of {config.seq_len} tokens")
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, config.steps), config.steps)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    teacher_model.to(accelerator.device)
    work.mkdir(parents=True, exist_ok=True)
    key = config.key()
    step, tokens = _resume(accelerator, work, key)
    if step:
        progress(f"resuming from step {step} ({tokens:,} tokens) in {work}")
    run_started, run_tokens, losses = time.perf_counter(), 0, []
    bar = tqdm(total=config.steps, initial=step, desc="heal", unit="step", disable=not accelerator.is_local_main_process)
    stopped_by_time = False
    while step < config.steps and not stopped_by_time:
        epoch_offset = step % len(loader)
        batches = accelerator.skip_first_batches(loader, epoch_offset) if epoch_offset else loader
        for input_ids in batches:
            with torch.no_grad():
                teacher_logits = teacher_model(input_ids=input_ids, use_cache=False).logits
            logits = model(input_ids=input_ids, use_cache=False).logits
            loss, kd, lm = heal_loss(logits, teacher_logits, input_ids, config)
            accelerator.backward(loss)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            step += 1
            done = input_ids.numel() * accelerator.num_processes
            tokens, run_tokens = tokens + done, run_tokens + done
            losses.append(float(loss.detach()))
            elapsed = time.perf_counter() - run_started
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", kd=f"{float(kd.detach()):.3f}", lm=f"{float(lm.detach()):.3f}",
                            tok_s=f"{run_tokens / elapsed:.0f}")
            if step % config.save_every == 0 and step < config.steps:
                _save(accelerator, work, step, tokens, key)
            if on_step:
                on_step(step, losses[-1])
            if config.minutes is not None and elapsed >= config.minutes * 60:
                stopped_by_time = True
            if step >= config.steps or stopped_by_time:
                break
    bar.close()
    train_seconds = time.perf_counter() - run_started
    model = accelerator.unwrap_model(model)
    model.eval()
    if config.method == "lora":
        probe = blocks[:1].to(accelerator.device)
        with torch.no_grad():
            before = model(input_ids=probe, use_cache=False).logits
            model = model.merge_and_unload()
            after = model(input_ids=probe, use_cache=False).logits
        results["merge_max_logit_diff"] = float((before - after).abs().max())
    if config.gradient_checkpointing:
        model.gradient_checkpointing_disable()
    model = model.to("cpu")  # the scorer's batches and save_pretrained work on the CPU copy
    results.update({"steps": step, "stopped_by_time": stopped_by_time, "tokens": tokens,
                    "train_seconds_this_run": round(train_seconds, 1),
                    "tokens_per_second": round(run_tokens / train_seconds, 1) if train_seconds else None,
                    "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None})
    if scorer is not None:
        results["eval_after"] = scorer.score(model)
        before, after = results["eval_before"], results["eval_after"]
        base = results["eval_teacher"]["bits_per_byte"]
        for name, value in (("delta_bpb_pct_before", before), ("delta_bpb_pct_after", after)):
            results[name] = round(100 * (value["bits_per_byte"] / base - 1), 3)
        lost = results["delta_bpb_pct_before"]
        results["recovered_share"] = round(1 - results["delta_bpb_pct_after"] / lost, 4) if lost > 0 else None
        progress(f"bits per byte: teacher {base:.4f}, pruned {before['bits_per_byte']:.4f} "
                 f"({results['delta_bpb_pct_before']:+.2f}%, KL {before['kl']:.4f}), healed {after['bits_per_byte']:.4f} "
                 f"({results['delta_bpb_pct_after']:+.2f}%, KL {after['kl']:.4f})")
    if accelerator.is_main_process:
        partial = out.with_name(out.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        _copy_tokenizer_and_extras(student.path, partial)
        model.save_pretrained(partial)
        record = PassRecord("heal", {**asdict(config), "teacher": teacher.name}, round(time.perf_counter() - started, 1),
                            results)
        earlier = student.path / CHECKPOINT_PASSES
        history = json.loads(earlier.read_text(encoding="utf-8")) if earlier.is_file() else []
        (partial / CHECKPOINT_PASSES).write_text(json.dumps([*history, asdict(record)], indent=2, ensure_ascii=False))
        partial.rename(out)
        shutil.rmtree(work, ignore_errors=True)
    accelerator.wait_for_everyone()
    return results


def describe(results: dict) -> str:
    lines = [f"{results['method']}: {results['steps']} steps, {results['tokens']:,} tokens, "
             f"{results['tokens_per_second']} tokens/s this run, {results['trainable_parameters']:,} trainable parameters"]
    if "eval_after" in results:
        lines.append(f"bits per byte vs teacher: pruned {results['delta_bpb_pct_before']:+.2f}% -> healed "
                     f"{results['delta_bpb_pct_after']:+.2f}% (KL {results['eval_before']['kl']:.4f} -> "
                     f"{results['eval_after']['kl']:.4f})")
    if "merge_max_logit_diff" in results:
        lines.append(f"adapters merged (max |logit diff| {results['merge_max_logit_diff']:.2e})")
    return "\n".join(lines)
