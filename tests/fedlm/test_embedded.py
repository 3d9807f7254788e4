"""Tests for the embedded base model: a tiny build, its loading path, caching and crash safety."""

from __future__ import annotations

import dataclasses
import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlm.embedded import embedded_base_dir, ensure_embedded_base
from fedlm.settings import EmbeddedBaseSettings

TINY = EmbeddedBaseSettings(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                            context_length=32, pretrain_steps=30, batch_size=4, corpus_max_chars=200_000)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    """One tiny build shared by the tests that only read it: (cache root, model dir, log lines)."""
    root = tmp_path_factory.mktemp("cache")
    lines: list[str] = []
    return root, ensure_embedded_base(TINY, root, log=lines.append), lines


def test_loads_as_llama_with_requested_sizes(built: tuple[Path, Path, list[str]]) -> None:
    root, path, _ = built
    assert path == embedded_base_dir(TINY, root) and path.parent == root
    model = AutoModelForCausalLM.from_pretrained(path)
    cfg = model.config
    assert cfg.model_type == "llama" and cfg.tie_word_embeddings
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.intermediate_size, cfg.max_position_embeddings) == (300, 32, 1, 2, 64, 32)
    assert next(model.parameters()).dtype.is_floating_point and str(model.dtype) == "torch.float32"


def test_tokenizer_round_trips_python_and_has_specials(built: tuple[Path, Path, list[str]]) -> None:
    tok = AutoTokenizer.from_pretrained(built[1])
    snippet = 'def f(x: int) -> str:\n\treturn  f"{x!r}" . strip()  # naïve ✓\n\n'
    assert tok.decode(tok.encode(snippet)) == snippet
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
    assert tok.pad_token_id != tok.eos_token_id and tok.model_max_length == 32


def test_training_lowered_the_loss_and_info_is_recorded(built: tuple[Path, Path, list[str]]) -> None:
    info = json.loads((built[1] / "build_info.json").read_text())
    assert info["settings"] == dataclasses.asdict(TINY)
    assert info["final_train_loss"] < info["initial_train_loss"]
    assert info["held_out_perplexity"] > 1 and info["n_params"] > 0 and info["corpus_chars"] <= 200_000
    assert any("step 30/30" in line for line in built[2])


def test_second_call_reuses_the_build(built: tuple[Path, Path, list[str]]) -> None:
    root, path, _ = built
    mtime = (path / "build_info.json").stat().st_mtime_ns
    lines: list[str] = []
    start = time.perf_counter()
    assert ensure_embedded_base(TINY, root, log=lines.append) == path
    assert time.perf_counter() - start < 0.5 and not lines
    assert (path / "build_info.json").stat().st_mtime_ns == mtime


def test_different_settings_get_a_different_dir(tmp_path: Path) -> None:
    other = dataclasses.replace(TINY, seed=1)
    assert embedded_base_dir(other, tmp_path) != embedded_base_dir(TINY, tmp_path)
    assert embedded_base_dir(TINY, tmp_path) == embedded_base_dir(dataclasses.replace(TINY), tmp_path)


def test_crash_leftovers_do_not_count_as_built(tmp_path: Path) -> None:
    settings = dataclasses.replace(TINY, pretrain_steps=5)
    final = embedded_base_dir(settings, tmp_path)
    stale = tmp_path / f".{final.name}.tmp-999-dead"  # a temp build that a crash left behind
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    final.mkdir()  # and a final dir without a valid marker
    (final / "build_info.json").write_text("{trunc")
    assert ensure_embedded_base(settings, tmp_path, log=lambda _: None) == final
    assert not stale.exists() and not list(tmp_path.glob(".*.tmp-*"))
    assert json.loads((final / "build_info.json").read_text())["settings"]["pretrain_steps"] == 5
    AutoModelForCausalLM.from_pretrained(final)


def test_concurrent_callers_build_once(tmp_path: Path) -> None:
    settings = dataclasses.replace(TINY, pretrain_steps=5)
    lines: list[str] = []
    with ThreadPoolExecutor(2) as pool:
        dirs = list(pool.map(lambda _: ensure_embedded_base(settings, tmp_path, log=lines.append), range(2)))
    assert dirs[0] == dirs[1] == embedded_base_dir(settings, tmp_path)
    assert sum("pretraining" in line for line in lines) == 1
