"""The offline default base model: a small Llama that Pollinate pretrains on Python's stdlib on first use."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from filelock import FileLock

from fedlm.settings import ConfigError, EmbeddedBaseSettings

EOS, PAD = "<|endoftext|>", "<|pad|>"
# Third-party code is the clients' data, tests are repetitive fixtures, and encodings/ is 1.6M characters
# of generated codec tables: none of it teaches the base to write Python.
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3",
                  "encodings"}
_HOLDOUT_EVERY = 50  # every 50th file (2%) is held out for the perplexity figure
_MAX_EVAL_WINDOWS = 64  # enough held-out windows for a stable figure, a second or two to compute
_INFO = "build_info.json"
_RECIPE = 2
"""Bump when the build recipe (corpus, tokenizer, training) changes, so caches of the old one are not reused."""


def embedded_base_dir(settings: EmbeddedBaseSettings, cache_root: Path) -> Path:
    """Where the base built from `settings` lives: one directory per distinct settings hash."""
    blob = json.dumps({**dataclasses.asdict(settings), "recipe": _RECIPE}, sort_keys=True).encode()
    return Path(cache_root) / f"embedded-{hashlib.sha256(blob).hexdigest()[:12]}"


def _is_built(path: Path, settings: EmbeddedBaseSettings) -> bool:
    try:
        info = json.loads((path / _INFO).read_text())
    except (OSError, ValueError):
        return False
    return info.get("settings") == dataclasses.asdict(settings) and (path / "config.json").is_file()


def ensure_embedded_base(settings: EmbeddedBaseSettings, cache_root: Path,
                         log: Callable[[str], None] = print) -> Path:
    """Return the directory of the trained embedded base, building it once if needed.

    Concurrent callers (threads or processes) serialise on a file lock; the build goes into a
    temporary sibling that is renamed into place only when complete, so a crash never leaves a
    directory that looks finished.

    Args:
        settings: Model, tokenizer and pretraining sizes.
        cache_root: Directory that holds built bases (created if missing).
        log: Receives progress lines.

    Returns:
        A directory loadable with `AutoModelForCausalLM/AutoTokenizer.from_pretrained`.
    """
    final = embedded_base_dir(settings, cache_root)
    if _is_built(final, settings):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / (final.name + ".lock"))):
        if _is_built(final, settings):  # another process built it while we waited
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # left by a crashed build
            shutil.rmtree(stale, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)  # incomplete: no valid marker
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _build(settings, tmp, log)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _stdlib_corpus(max_chars: int) -> list[str]:
    """The stdlib's own `.py` sources in sorted path order, capped at `max_chars` characters in total."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted((p for p in root.rglob("*.py")
                    if not _EXCLUDED_DIRS & set(p.relative_to(root).parts[:-1])),
                   key=lambda p: p.relative_to(root).as_posix())
    texts, total = [], 0
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text[: max_chars - total])
        total += len(texts[-1])
        if total >= max_chars:
            break
    return texts


def _build(s: EmbeddedBaseSettings, out: Path, log: Callable[[str], None]) -> None:
    """Train tokenizer and model from scratch and save both, plus `build_info.json`, into `out`."""
    import tokenizers
    import transformers
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    start, threads = time.perf_counter(), torch.get_num_threads()
    texts = _stdlib_corpus(s.corpus_max_chars)
    held_idx = set(range(_HOLDOUT_EVERY - 1, len(texts), _HOLDOUT_EVERY)) or {len(texts) - 1}
    held = [texts[i] for i in sorted(held_idx)]
    train = [t for i, t in enumerate(texts) if i not in held_idx]
    log(f"embedded base: {len(texts)} stdlib files, {sum(map(len, texts)):,} chars "
        f"({len(held)} held out); training tokenizer (vocab {s.vocab_size})")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(train, vocab_size=s.vocab_size, min_frequency=2,  # 2: no one-off merges
                            special_tokens=[EOS, PAD], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS,
                                  pad_token=PAD, model_max_length=s.context_length,
                                  clean_up_tokenization_spaces=False)  # cleanup would alter code
    eos = tok.eos_token_id

    def stream(docs: list[str]) -> torch.Tensor:
        ids = [x for enc in bpe.encode_batch(docs) for x in (*enc.ids, eos)]
        return torch.tensor(ids, dtype=torch.long)

    train_ids, held_ids = stream(train), stream(held)
    if len(train_ids) <= s.context_length or len(held_ids) <= s.context_length:
        raise ConfigError(f"model.embedded.corpus_max_chars={s.corpus_max_chars} yields too few tokens "
                          f"for context_length={s.context_length}; raise it (default 10000000)")

    config = LlamaConfig(vocab_size=len(tok), hidden_size=s.hidden_size, num_hidden_layers=s.num_layers,
                         num_attention_heads=s.num_heads, num_key_value_heads=s.num_heads,
                         intermediate_size=s.intermediate_size, max_position_embeddings=s.context_length,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=eos,
                         pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():  # seed the init without changing the caller's global RNG
        torch.manual_seed(s.seed)
        model = LlamaForCausalLM(config).float()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on norm gains
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=s.learning_rate, betas=(0.9, 0.95))
    warmup = max(1, round(0.05 * s.pretrain_steps))  # 5% linear warmup, then cosine decay to zero
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: (k + 1) / warmup if k < warmup else
                                              0.5 * (1 + math.cos(math.pi * (k - warmup) /
                                                                  max(1, s.pretrain_steps - warmup))))
    gen = torch.Generator().manual_seed(s.seed)
    offsets = torch.arange(s.context_length)
    log(f"embedded base: {n_params:,} params, {len(train_ids):,} train tokens; pretraining "
        f"{s.pretrain_steps} steps of {s.batch_size}x{s.context_length}")
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        model.train()
        losses, t0, every = [], time.perf_counter(), max(1, s.pretrain_steps // 10)
        for step in range(1, s.pretrain_steps + 1):
            starts = torch.randint(0, len(train_ids) - s.context_length, (s.batch_size, 1), generator=gen)
            batch = train_ids[starts + offsets]
            loss = model(input_ids=batch, labels=batch).loss  # every token is real: no padding to mask
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(loss.item())
            if step % every == 0 or step == s.pretrain_steps:
                secs, left = time.perf_counter() - t0, s.pretrain_steps - step
                log(f"embedded base: step {step}/{s.pretrain_steps} loss {losses[-1]:.3f} "
                    f"{step * batch.numel() / secs:,.0f} tok/s ETA {secs / step * left:.0f}s")
        train_secs = time.perf_counter() - t0
        model.eval()
        n_win = min(_MAX_EVAL_WINDOWS, len(held_ids) // s.context_length)
        windows = held_ids[: n_win * s.context_length].view(n_win, s.context_length)
        with torch.no_grad():
            held_loss = sum(model(input_ids=w, labels=w).loss.item() * len(w)
                            for w in windows.split(s.batch_size)) / n_win
    finally:
        torch.set_num_threads(threads)
    tail = losses[-max(1, len(losses) // 20):]  # mean of the last 5% of steps smooths batch noise
    info = {"settings": dataclasses.asdict(s), "train_seconds": round(train_secs, 2),
            "build_seconds": round(time.perf_counter() - start, 2), "initial_train_loss": losses[0],
            "final_train_loss": sum(tail) / len(tail), "held_out_loss": held_loss,
            "held_out_perplexity": math.exp(held_loss), "held_out_windows": n_win, "n_params": n_params,
            "corpus_files": len(texts), "corpus_chars": sum(map(len, texts)),
            "corpus_tokens": len(train_ids) + len(held_ids), "train_tokens": len(train_ids),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "tokenizers": tokenizers.__version__}
    model.save_pretrained(out)  # transformers 5 always writes safetensors
    tok.save_pretrained(out)
    (out / _INFO).write_text(json.dumps(info, indent=2, sort_keys=True))  # written last: the done marker
    log(f"embedded base: built in {info['build_seconds']:.0f}s, train loss {losses[0]:.2f} -> "
        f"{info['final_train_loss']:.2f}, held-out perplexity {info['held_out_perplexity']:.1f}")
