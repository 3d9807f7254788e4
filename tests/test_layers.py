"""The architecture's one-way layers: fedlm <- strategies <- server; fedlm <- client; only launchers use Hydra."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# What each package may import from the project (itself always allowed).
ALLOWED = {
    "fedlm": set(),
    "strategies": {"fedlm"},
    "server": {"fedlm", "strategies"},
    "client": {"fedlm"},
    "simulations": {"fedlm", "strategies", "server", "client"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_layers_point_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        imported = _imports(path)
        forbidden = (imported & set(ALLOWED)) - ALLOWED[package] - {package}
        assert not forbidden, f"{path.relative_to(ROOT)} imports {forbidden}"
        if package != "simulations":
            assert not imported & {"hydra", "omegaconf"}, f"{path.relative_to(ROOT)} imports Hydra"
