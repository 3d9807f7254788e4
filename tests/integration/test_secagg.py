"""SecAgg+ on Flower's real Simulation Engine: the secure sum equals plain FedAvg; dropouts; abandoned rounds."""

import sys

import numpy as np
import pytest
import ray.cloudpickle
from flwr.app import Context, Message, MessageType
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server.strategy import FedAvg
from safetensors.numpy import load_file

from tests.conftest import make_text, wire_of
from fedlm.model import apply_lora, load_base_model
from fedlm.settings import ModelSettings, LoraSettings, RunSettings, settings_from_dict
from simulations.launch import simulate

pytestmark = [pytest.mark.integration, pytest.mark.slow]
# Ray ships the fault-injection mod to its workers by value: they cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLIENTS = 10
# Values are quantized to 2^30 levels over [-8, 8] (step 1.5e-8) after scaling by weights near 0.02:
# the average of ten clients is off by about 1e-7.
TOLERANCE = 1e-6


class FailTraining:
    """A mod that makes the given clients fail their training reply (at SecAgg+'s masked-vector stage)."""

    def __init__(self, partitions: set[int]) -> None:
        self.partitions = partitions

    def __call__(self, msg: Message, context: Context, call_next) -> Message:
        if msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] in self.partitions:
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if configs is None or configs[Key.STAGE] == Stage.COLLECT_MASKED_VECTORS:
                raise RuntimeError("injected failure")
        return call_next(msg, context)


@pytest.fixture(scope="module")
def many_texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    for i in range(2 * CLIENTS):
        (root / f"doc{i:02d}.txt").write_text(make_text(500 + i, 400))
    return root


def _settings(tmp_path, model_dir, data_dir, name, secagg) -> RunSettings:
    return settings_from_dict(RunSettings, {
        "model": {"name_or_path": str(model_dir)},
        "dataset": {"path": str(data_dir), "seq_len": 32, "min_train_sequences": 4, "min_eval_sequences": 1},
        "federation": {"num_clients": CLIENTS, "clients_per_round": CLIENTS, "rounds": 1},
        "train": {"local_steps": 2, "batch_size": 4, "learning_rate": 0.01, "max_eval_sequences": 4},
        "secagg": {"name": "secaggplus" if secagg else "disabled", "timeout": 60.0},
        "privacy": {"name": "disabled"},  # DP noise would make the two runs' updates differ
        "output_dir": str(tmp_path / name),
    })


def _adapter(outcome) -> list[np.ndarray]:
    tensors = load_file(outcome.output_dir / "adapter" / "adapter_model.safetensors")
    return [tensors[k] for k in sorted(tensors)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_llama_dir, many_texts):
    """Plain and secure runs, each with and without client 3 failing, recording what aggregate_fit receives."""
    tmp = tmp_path_factory.mktemp("secagg")
    seen: dict[str, list] = {}
    original = FedAvg.aggregate_fit
    out = {}
    for secagg in (False, True):
        for failing in (frozenset(), frozenset({3})):
            name = f"{'secure' if secagg else 'plain'}-{len(failing)}"

            def recording(self, server_round, results, failures, _name=name):
                seen[_name] = [res.parameters.tensors for _, res in results]
                return original(self, server_round, results, failures)

            FedAvg.aggregate_fit = recording
            try:
                out[name] = simulate(_settings(tmp, tiny_llama_dir, many_texts, name, secagg),
                                     client_mods=(FailTraining(set(failing)),))
            finally:
                FedAvg.aggregate_fit = original
    return out, seen


def test_secure_aggregate_equals_plain_fedavg_of_the_same_replies(runs):
    out, _ = runs
    assert out["secure-0"].rows[1]["clients_ok"] == CLIENTS
    for secure, plain in zip(_adapter(out["secure-0"]), _adapter(out["plain-0"])):
        np.testing.assert_allclose(secure, plain, atol=TOLERANCE, rtol=0)


def test_a_client_failing_at_the_masked_vector_stage_leaves_the_survivors_average(runs):
    out, _ = runs
    assert out["secure-1"].rows[1]["clients_ok"] == CLIENTS - 1
    assert out["plain-1"].rows[1]["clients_ok"] == CLIENTS - 1
    for secure, plain in zip(_adapter(out["secure-1"]), _adapter(out["plain-1"])):
        np.testing.assert_allclose(secure, plain, atol=TOLERANCE, rtol=0)
    # ...and it is not the average with that client in it.
    assert any(np.abs(a - b).max() > 10 * TOLERANCE for a, b in zip(_adapter(out["secure-1"]), _adapter(out["plain-0"])))


def test_the_strategy_only_ever_sees_the_unmasked_aggregate(runs):
    _, seen = runs
    individual = seen["plain-0"]
    assert len({tuple(t) for t in individual}) == CLIENTS  # plain: ten different updates
    secure = seen["secure-0"]
    assert len(secure) == CLIENTS and all(t == secure[0] for t in secure)  # every reply replaced by the sum
    assert all(secure[0] != update for update in individual)


def test_too_many_failures_abandon_the_round_and_keep_the_adapter_bitwise(tmp_path, tiny_llama_dir, many_texts):
    settings = _settings(tmp_path, tiny_llama_dir, many_texts, "abandoned", secagg=True)
    outcome = simulate(settings, client_mods=(FailTraining(set(range(CLIENTS - 2))),))  # 2 of 10 survive
    row = outcome.rows[1]
    assert row["clients_ok"] == 0 and row["clients_failed"] == CLIENTS - 2
    # Flower only logs "Secure aggregation halted."; the record names the stage and why.
    assert row["abandoned"] and row["abandoned_stage"] == "secagg collect-masked-vectors (local training)"
    assert row["abandoned_reason"].startswith("SecAgg+ halted: 2 of 10 clients still active")
    assert "WARNING: 1 of 1 rounds were abandoned (rounds 1)" in outcome.summary()
    assert "1 of 1 rounds were abandoned and changed nothing" in (outcome.output_dir / "report.md").read_text()
    fresh = apply_lora(load_base_model(ModelSettings(name_or_path=str(tiny_llama_dir)))[0], LoraSettings(),
                       seed=settings.seed)
    initial = wire_of(fresh).to_arrays(fresh)
    final = load_file(outcome.output_dir / "adapter" / "adapter_model.safetensors")
    assert len(final) == len(initial)
    assert sorted(a.tobytes() for a in final.values()) == sorted(a.tobytes() for a in initial)
