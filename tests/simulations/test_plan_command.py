"""`python -m simulations.plan`: every client's privacy plan, printed from the run's real data, without training."""

import re

import pytest

from simulations.plan import main


def test_the_plan_command_prints_one_row_per_client_from_its_real_data(tiny_llama_dir, text_folder, capsys):
    main([f"model.name_or_path={tiny_llama_dir}", f"dataset.path={text_folder}", "dataset.partitioner=natural",
          "dataset.seq_len=32", "dataset.min_train_sequences=4", "dataset.min_eval_sequences=1",
          "federation.num_clients=3", "federation.clients_per_round=2", "federation.rounds=6",
          "train.local_steps=2", "privacy.accountant=rdp", "privacy.target_epsilon=2", "secagg=disabled"])
    out = capsys.readouterr().out
    assert "each client is asked to join 4 of 6 rounds (2 of 3 per round) and takes 2 steps in each" in out
    rows = re.findall(r"^\| (\d) \| (\d+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| (\d+) \| ([^|]+) \| ([\d.]+) \|$",
                      out, re.M)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    for _, n, rate, batch, noise, steps, _, epsilon in rows:
        assert float(batch) == pytest.approx(float(rate) * int(n), abs=0.1) and int(steps) == 8
        assert float(noise) > 0 and 1.9 <= float(epsilon) <= 2.0  # the plan spends (nearly) all of the budget


def test_the_plan_command_refuses_a_run_without_privacy(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["privacy=disabled"])
    assert stop.value.code == 2
    assert "privacy=disabled: there is no privacy plan to print" in capsys.readouterr().err
