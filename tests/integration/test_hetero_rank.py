"""Heterogeneous LoRA ranks on Flower's Simulation Engine: a rank-2 and a rank-4 client federate a rank-4 adapter."""

import sys
from pathlib import Path

import pytest
import ray
from flwr.app import Context, Message, MessageType
from safetensors.torch import load_file

from fedlm.settings import RunSettings, settings_from_dict
from simulations.launch import simulate
from strategies import strategy_spec

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Ray ships the recording mod to its workers by value: they cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class RecordRank:
    """A mod that, after each training reply, appends `partition-id rank-of-its-model` to a file."""

    def __init__(self, settings: RunSettings, path: Path) -> None:
        self.settings, self.path = settings, path

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN:
            from peft import get_peft_model_state_dict

            from client.lora_client import worker_model
            s, pid = self.settings, int(context.node_config["partition-id"])
            rank = s.lora.client_rank(pid)
            lower = (rank,) if rank < s.lora.r else ()  # the key LoraClient used: a cache hit, not a new model
            before = worker_model.cache_info().hits
            model, _ = worker_model(s.model, s.lora, s.seed, s.cache_dir, strategy_spec(s.strategy.name).frozen_a, *lower)
            assert worker_model.cache_info().hits == before + 1
            ranks = {t.shape[0] for k, t in get_peft_model_state_dict(model).items() if ".lora_A." in k}
            with self.path.open("a") as f:
                f.write(f"{pid} {sorted(ranks)}\n")
        return reply


def test_clients_of_ranks_2_and_4_train_the_rank_4_global_adapter(tmp_path, tiny_llama_dir, text_folder):
    settings = settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(tiny_llama_dir)},
        "lora": {"r": 4, "alpha": 8.0, "client_ranks": [2, 4]},
        "dataset": {"path": str(text_folder), "seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": 2, "clients_per_round": 2, "rounds": 2},
        "train": {"local_steps": 3, "batch_size": 4, "learning_rate": 0.01},
        "output_dir": str(tmp_path / "run"),
        "privacy": {"name": "disabled"}, "secagg": {"name": "disabled"},  # for speed: both are mean-compatible
    })
    log = tmp_path / "ranks.txt"
    outcome = simulate(settings, client_mods=(RecordRank(settings, log),))
    assert sorted(log.read_text().splitlines()) == ["0 [2]", "0 [2]", "1 [4]", "1 [4]"]  # each client, each round
    for row in outcome.rows[1:]:
        assert row["clients_ok"] == row["clients_sampled"] == 2
    saved = load_file(outcome.output_dir / "adapter" / "adapter_model.safetensors")
    a_keys, b_keys = [k for k in saved if ".lora_A." in k], [k for k in saved if ".lora_B." in k]
    assert a_keys and len(a_keys) == len(b_keys)
    assert {saved[k].shape[0] for k in a_keys} == {saved[k].shape[1] for k in b_keys} == {4}
    # Only the rank-4 client trains B's columns 2-3 (B starts at zero), so they moved, and so did 0-1.
    assert any(saved[k][:, 2:].abs().sum() > 0 for k in b_keys)
    assert any(saved[k][:, :2].abs().sum() > 0 for k in b_keys)
