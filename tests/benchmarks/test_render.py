"""benchmarks/render.py: BENCHMARKS.md is rendered from benchmarks/results/*.json, and its verdicts follow the figures."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # the scripts' folder, as when they run (an installed `benchmarks` exists)

import render  # noqa: E402
from common import RESULTS, ROOT, write_result  # noqa: E402

PROVENANCE = {"command": "python benchmarks/x.py", "date": "2030-01-01 00:00 UTC", "commit": "abc1234",
              "versions": "Python 3.11", "machine": "a CPU", "load_start": 0.1, "load_end": 0.2}


def rendered(tmp_path: Path, **sections: dict) -> str:
    """BENCHMARKS.md rendered from only `sections` (name -> figures), each with the same provenance."""
    for name, figures in sections.items():
        write_result(name, PROVENANCE, figures, tmp_path)
    return render.render(tmp_path)


def section(text: str, number: str) -> str:
    return re.search(rf"\n## {re.escape(number)}\. .*?(?=\n## |\Z)", text, re.S).group(0)


def committed(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())["figures"]


def fixture_quality() -> dict:
    """Section 7's figures of 2026-12-02 (every row measured at no DP and epsilon 8): the verdict tests' numbers."""
    return json.loads((Path(__file__).parent / "quality_2026-12-02.json").read_text())


def test_committed_results_render_the_committed_benchmarks_md():
    # BENCHMARKS.md is never edited by hand: re-measure (or change the renderer) and re-render.
    text = (ROOT / "BENCHMARKS.md").read_text()
    assert render.render(RESULTS, render.header_of(text)) == text, "run `python benchmarks/render.py`"


def test_every_published_section_is_rendered():
    published = {m for path in (ROOT / "benchmarks").glob("*.py")
                 for m in re.findall(r'publish\(\s*"([\w-]+)"', path.read_text())}
    published |= {"throughput", "federation", "dp", "secagg"}  # run.py publishes them by name from a dict
    shown = {name for _, name, _, _ in render.SECTIONS} | {"dp_sweep_federations"}
    assert published <= shown
    assert {p.stem for p in RESULTS.glob("*.json")} <= shown


def test_secagg_verdict_follows_the_ratio_at_20_clients(tmp_path):
    figures = copy.deepcopy(committed("secagg"))
    assert "target, at most 1.3x round time at 20 clients: **met**" in rendered(tmp_path, secagg=figures)
    next(r for r in figures["rows"] if r["clients"] == 20)["time_ratio"] = 1.45
    assert "20 clients: **not met**" in rendered(tmp_path, secagg=figures)
    figures["rows"] = [r for r in figures["rows"] if r["clients"] != 20]
    assert "20 clients: not measured" in rendered(tmp_path, secagg=figures)


def test_quality_gain_kept_is_computed_and_its_verdict_flips(tmp_path):
    figures = fixture_quality()
    text = section(rendered(tmp_path, quality=figures), "7")
    # packages: (240.5 - 207.9) / (240.5 - 161.9) of the geomean, (363.3 - 251.8) / (363.3 - 182.4) of the mean
    assert "DP-SGD on each client at ε=8 keeps 41 % of the non-private federated gain over the base by the " \
           "geometric mean (target 80 %): **not met**; by the mean client, 62 %." in text
    assert "Why DP costs this much learning here" in text
    cells = figures["datasets"][0]["cells"]
    cells["8"]["federated"].update(mean=200.0, geomean=170.0)  # (363.3 - 200) / 180.9 = 90 %; 70.5 / 78.6 = 90 %
    text = section(rendered(tmp_path, quality=figures), "7")
    assert "DP-SGD on each client at ε=8 keeps 90 % of the non-private federated gain over the base by the " \
           "geometric mean (target 80 %): met; by the mean client, 90 %." in text
    assert text.count("Why DP costs this much learning here") == 1  # only the other data set still misses it
    assert "one client carries the mean" not in text  # the measures now agree on packages
    # The distributed row's own target, 90 %: (240.5 - 170.5) / 78.6 = 89 % misses it, 168.0 (92 %) meets it.
    cells["8"]["distributed"] = dict(cells["8"]["federated"], mean=190.0, geomean=170.5)
    assert "(distributed) at ε=8 keeps 89 % of the non-private federated gain over the base by the geometric " \
           "mean (target 90 %): **not met**" in section(rendered(tmp_path, quality=figures), "7")
    cells["8"]["distributed"].update(geomean=168.0)
    assert "keeps 92 % of the non-private federated gain over the base by the geometric mean (target 90 %): met" \
           in section(rendered(tmp_path, quality=figures), "7")


def test_quality_federated_against_local_only_and_missing_cells(tmp_path):
    figures = fixture_quality()
    cells = figures["datasets"][0]["cells"]
    cells["0"]["federated"].update(mean=100.0, geomean=100.0)
    text = section(rendered(tmp_path, quality=figures), "7")
    assert "Federated beats local-only for the mean client: no DP: yes, ε=8: **no**." in text
    assert "Not measured yet: ε=1, ε=4" in text
    figures["epsilons_offered"] = [0, 8]
    assert "Not measured yet" not in section(rendered(tmp_path, quality=figures), "7").split("### descriptions")[0]


def test_levers_target_is_computed_per_measure(tmp_path):
    figures = copy.deepcopy(committed("levers"))
    text = section(rendered(tmp_path, levers=figures), "7.1")
    assert "`privacy.max_grad_norm=0.1` keeps the most by the geometric mean, 42 %." in text
    assert "By the mean client, the 80 % target is reached by `defaults` (89 %)." in text
    assert "By the geometric mean, the 80 % target is reached by none of them." in text
    assert "With 352-1,077 training sequences per client" in text
    figures["settings"][2]["private"].update(geomean=200.0)  # (240.5 - 200) / (240.5 - 206.1) = 118 %
    text = section(rendered(tmp_path, levers=figures), "7.1")
    assert "`train.batch_size=128 train.local_steps=3` keeps the most by the geometric mean, 118 %." in text
    assert "With 352-1,077 training sequences" not in text


def test_memory_states_only_what_was_measured(tmp_path):
    figures = copy.deepcopy(committed("memory"))
    text = section(rendered(tmp_path, memory=figures), "8")
    assert "nice" not in text  # not measured then: not claimed
    assert "**300 clients registered, 50 per round** (2.89 GiB)" in text
    assert "the peak grew by -51 MiB (under 5 %) from 100 to 300" in text
    figures["worker_nice"] = [0]
    figures["federations"][-1]["total"] = 20.0
    text = section(rendered(tmp_path, memory=figures), "8")
    assert "Ray ran its workers at nice 0" in text
    assert "under the 16 GiB ceiling: **100 clients registered, 20 per round**" in text
    assert "a straight line through the two largest runs" in text


def test_section_headings_and_texts_take_their_figures_from_the_json(tmp_path):
    figures = copy.deepcopy(committed("strategies"))
    figures.update(rounds=7, num_clients=12, clients_per_round=6)
    text = rendered(tmp_path, strategies=figures)
    assert "## 5. Strategies on the default federation (7 rounds)" in text
    assert "12 clients, 6 per round, 7 rounds" in text
    assert "8 clients" not in text


def test_provenance_says_what_was_not_recorded(tmp_path):
    write_result("bytes", {"command": "python benchmarks/compare_strategies.py --bytes", "date": "2026-11-24"},
                 committed("bytes"), tmp_path)
    text = render.render(tmp_path)
    assert ("_Produced by `python benchmarks/compare_strategies.py --bytes` on 2026-11-24; versions not recorded; "
            "machine not recorded; load average not recorded._") in text
    for name in ("strategies", "deployment"):  # sections 5 and 6 had no provenance line before
        p = json.loads((RESULTS / f"{name}.json").read_text())["provenance"]
        assert p["date"].startswith("2026-11-24") and p["machine"] and p["versions"] is None


def test_write_keeps_the_header_and_replaces_the_rest(tmp_path):
    output = tmp_path / "B.md"
    output.write_text("# Mine\n\nHand-written intro.\n\n## 4. Old section\n\nstale figures\n")
    write_result("secagg", PROVENANCE, committed("secagg"), tmp_path / "results")
    render.write(output, tmp_path / "results")
    text = output.read_text()
    assert text.startswith("# Mine\n\nHand-written intro.\n\n## 4. SecAgg+ cost")
    assert "stale figures" not in text
