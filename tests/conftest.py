"""Shared fixtures: tiny models, tokenizers and data sets built in-process (nothing is downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import dp_accounting
import pytest
import torch
from dp_accounting.pld import PLDAccountant
from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

WORDS = ("def return import class self value items for in if else while yield lambda print data model "
         "client server round adapter train loss tensor").split()


def pld_epsilon(noise: float, rate: float, steps: int, delta: float) -> float:
    """Epsilon of `steps` Poisson-subsampled Gaussian steps by Google's dp_accounting PLD accountant, which
    shares no code with Opacus' PRV and RDP accountants that Pollinate uses."""
    event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(noise))
    accountant = PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, steps))
    return accountant.get_epsilon(delta)


def make_text(seed: int, n_words: int = 400) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


def build_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([make_text(i) for i in range(20)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>", model_max_length=64)


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def save_tiny_llama(path: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, intermediate_size=128, max_position_embeddings=64,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_gpt2(path: Path, tokenizer: PreTrainedTokenizerFast) -> Path:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=4, n_positions=64,
                        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"), tokenizer)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tokenizer) -> Path:
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2"), tokenizer)


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> Path:
    """Six .txt files in three subfolders (three natural sources)."""
    root = tmp_path_factory.mktemp("texts")
    for i in range(6):
        sub = root / f"site{i % 3}"
        sub.mkdir(exist_ok=True)
        (sub / f"doc{i}.txt").write_text(make_text(100 + i, 600))
    return root


def fit_reply(arrays: list, n: int, server_round: int = 1, node: str = "1", **metrics) -> tuple:
    """A (proxy, FitRes) pair as a fit workflow hands it to `aggregate_fit`; the proxy only carries its node id."""
    from types import SimpleNamespace

    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

    metrics = {"train_loss": 1.0, "train_seconds": 1.0, "train_tokens": 1, "round": server_round} | metrics
    return SimpleNamespace(cid=node), FitRes(Status(Code.OK, ""), ndarrays_to_parameters(arrays), n, metrics)


def wire_of(model, rank: int | None = None):
    """A test adapter's wire format: at its own rank unless a global `rank` is given; frozen A as the model has it."""
    from fedlm.adapter import WireFormat

    frozen_a = not any(p.requires_grad for n, p in model.named_parameters() if ".lora_A." in n)
    return WireFormat.of(model, rank or model.peft_config[model.active_adapter].r, frozen_a=frozen_a)
