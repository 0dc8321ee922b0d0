"""The layering written in docs/architecture.md holds: no module imports one above it."""

from __future__ import annotations

import subprocess
import sys

from scion.tools.imports import ARCHITECTURE, Import, all_imports, read_layers, room_of, upward


def test_no_module_imports_one_above_it():
    assert upward(all_imports(), read_layers()) == []


def test_imports_inside_functions_count():
    # scion.pretrain.steps imports the harness only inside train(), when a run asks for task scores
    assert any(i.importer == "scion.pretrain.steps" and i.imported == "scion.evaluate.harness" for i in all_imports())


def test_every_module_is_in_a_room_of_the_doc():
    layers = read_layers()
    modules = {imp.importer for imp in all_imports()} - {"scion"}
    assert [m for m in sorted(modules) if room_of(m, layers) is None] == []
    assert layers["scion.model"] < layers["scion.train"] < layers["scion.evaluate"] < layers["scion.cli"]


def test_the_check_finds_an_upward_import_even_inside_a_function(tmp_path):
    layers = read_layers()
    planted = [Import("scion.train.loop", "scion.evaluate.harness", 7), Import("scion.cli.eval", "scion.model", 3),
               Import("scion.newroom", "scion.model", 1)]
    problems = upward(planted, layers)
    assert any(p.startswith("scion.train.loop:7 imports scion.evaluate.harness: layer 3") for p in problems)
    assert any("scion.newroom: in no room" in p and ARCHITECTURE.name in p for p in problems)
    assert len(problems) == 2  # the command importing the model is allowed


def test_the_command_prints_the_graph_and_checks_it():
    check = subprocess.run([sys.executable, "-m", "scion.tools.imports", "--check"], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip() == "no upward imports"
    graph = subprocess.run([sys.executable, "-m", "scion.tools.imports"], capture_output=True, text=True).stdout
    assert "scion.train.loop: " in graph and "scion.evaluate" not in graph.split("scion.train.loop: ")[1].split("\n")[0]
