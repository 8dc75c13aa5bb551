"""Library boundaries and packaging: one installed package, shipped presets, a light core, no cycles."""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The library core: what `import vlm` users get. It reaches the applications above it (demo,
# training, serving) only through the entry-point registry, never by an import statement.
CORE = ("configuration", "modeling", "processing", "loading", "build", "data", "metrics", "registry",
        "images", "errors", "files", "engine", "image_text", "stage1_losses", "towers", "preprocess")
ABOVE_CORE = ("vlm.demo", "vlm.train", "vlm.serve")
HEAVY = ("onnx", "gguf", "gradio", *ABOVE_CORE)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel .` of the checkout."""
    out = tmp_path_factory.mktemp("wheel")
    leftover = not (ROOT / "build").exists()  # setuptools builds in the checkout's build/
    try:
        subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                        "-q", "-w", str(out)], check=True, capture_output=True, timeout=300)
    finally:
        if leftover:
            shutil.rmtree(ROOT / "build", ignore_errors=True)
    (path,) = out.glob("vlm-*.whl")
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel's files as an install puts them in site-packages (a pure-Python wheel unzips there)."""
    site = tmp_path_factory.mktemp("site-packages")
    zipfile.ZipFile(wheel).extractall(site)
    return site


def test_wheel_installs_one_package_with_the_presets(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"vlm"}
    for preset in ("stage1", "lora", "qlora", "bridge", "full", "align", "demo-easyvqa", "demo-easyvqa-align",
                   "demo-easyvqa-stage1", "demo-easyvqa-compare", "demo-easyvqa-heads"):
        assert f"vlm/configs/train/{preset}.yaml" in names
    for name in ("ddp", "fsdp", "deepspeed-zero2"):
        assert f"vlm/configs/accelerate/{name}.yaml" in names
    assert {"vlm/train/cli.py", "vlm/serve/chat.py", "vlm/train/demo/ship.py", "vlm/demo/text_chat.jsonl",
            "vlm/demo_weights/bridge.safetensors"} <= set(names)
    assert not [n for n in names if n.startswith("vlm/demo/") and n.endswith(("ship.py", "rehearsal.py"))]
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[vlm.models]\nvlm-demo = vlm.demo:demo_source" in text
    assert "[vlm.datasets]\neasyvqa = vlm.demo:easyvqa_data" in text


def test_pyproject_lists_every_package_of_the_checkout():
    """A package missing from [tool.setuptools] packages installs without its files (vlm.engine once
    did: a wheel built from a fresh venv had no vlm/engine/); a stale egg-info can hide it from a
    wheel built here, so the list itself is checked."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    homes = {"vlm": ROOT / "vlm", "vlm.train": ROOT / "train", "vlm.serve": ROOT / "serve",
             "vlm.configs": ROOT / "configs"}
    for name, folder in homes.items():
        for init in folder.rglob("__init__.py"):
            package = ".".join([name, *init.parent.relative_to(folder).parts])
            assert package in listed, f"{init.parent} is not installed: add {package!r} to pyproject's packages"


def test_print_config_of_a_preset_works_outside_the_checkout(tmp_path):
    result = subprocess.run([sys.executable, "-m", "vlm.cli", "train", "--print-config", "lora", "lora.r=4"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": ""})
    assert result.returncode == 0, result.stderr
    assert "  r: 4\n" in result.stdout and "recipe: lora\n" in result.stdout
    ddp = subprocess.run([sys.executable, "-m", "vlm.cli", "train", "--accelerate-config", "ddp"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert ddp.returncode == 0 and Path(ddp.stdout.strip()).is_file()
    assert "distributed_type: MULTI_GPU" in Path(ddp.stdout.strip()).read_text()


def test_importing_the_core_api_loads_nothing_above_it(tmp_path):
    code = (
        "import sys, vlm\n"
        "from vlm import load_pretrained, VisionLanguageModel, VLMProcessor, VLMConfig\n"
        "import vlm.data, vlm.metrics, vlm.build, vlm.registry\n"
        f"heavy = {HEAVY!r}\n"
        "print([m for m in sys.modules if m in heavy or m.startswith(tuple(h + '.' for h in heavy))])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# `vlm score` and `vlm build` are the torch code itself (a Dataset, the model composer): their
# --help still imports it. Every other command's help is instant.
FAST_HELP = ("chat", "serve", "caption", "train", "eval", "export")


@pytest.mark.parametrize("command", FAST_HELP)
def test_help_imports_no_torch(command, tmp_path):
    code = (
        "import contextlib, io, sys\n"
        "from vlm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
        f"    try: main([{command!r}, '--help'])\n"
        "    except SystemExit: pass\n"
        "print('usage:' in out.getvalue(), 'torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"], f"vlm {command} --help imported torch"


# -- static import graph of the installed package ------------------------------------------------------
def package_modules(folder: Path, name: str = "vlm") -> dict[str, Path]:
    """Every module of the package in `folder` (named `name`), subpackages included."""
    modules = {name: folder / "__init__.py"}
    for path in sorted(folder.iterdir()):
        if path.suffix == ".py" and path.name != "__init__.py":
            modules[f"{name}.{path.stem}"] = path
        elif (path / "__init__.py").is_file():
            modules.update(package_modules(path, f"{name}.{path.name}"))
    return modules


def imported_modules(module: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `module`'s import statements load, wherever they stand in the file."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            # Importing a.b.c runs a/__init__ and a/b/__init__ too (but not the importer's own packages).
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                name = ".".join(parts[:i])
                if name in known and name != module and not module.startswith(name + "."):
                    found.add(name)
    return found


def import_graph(site: Path) -> dict[str, set[str]]:
    modules = package_modules(site / "vlm")
    return {m: imported_modules(m, p, set(modules)) for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_installed_package_has_no_import_cycle(installed):
    graph = import_graph(installed)
    assert {"vlm.train.cli", "vlm.serve.chat", "vlm.demo.pipeline", "vlm.configs"} <= set(graph)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_core_imports_nothing_above_it(installed):
    graph = import_graph(installed)
    for core in CORE:
        name = f"vlm.{core}"
        seen, todo = set(), [n for n in graph if n == name or n.startswith(name + ".")]
        while todo:
            node = todo.pop()
            if node not in seen:
                seen.add(node)
                todo.extend(graph[node])
        above = sorted(n for n in seen if n.startswith(tuple(a + "." for a in ABOVE_CORE)) or n in ABOVE_CORE)
        assert not above, f"{name} reaches {above}"


def test_the_cycle_finder_finds_a_hidden_cycle(tmp_path):
    """The checks above can fail: a function-level relative import is an edge, and a loop is reported."""
    graph = {"vlm.a": {"vlm.b"}, "vlm.b": {"vlm.c"}, "vlm.c": {"vlm.a"}, "vlm.d": set()}
    assert find_cycle(graph) == ["vlm.a", "vlm.b", "vlm.c", "vlm.a"]
    module = tmp_path / "y.py"
    module.write_text("import os\n\ndef f():\n    from .z import thing\n    from ..registry import resolve_model\n")
    known = {"vlm", "vlm.x", "vlm.x.z", "vlm.registry", "vlm.serve"}
    assert imported_modules("vlm.x.y", module, known) == {"vlm.x.z", "vlm.registry"}


@pytest.mark.parametrize("group, name", [("vlm.models", "vlm-demo"), ("vlm.datasets", "easyvqa")])
def test_the_demo_is_a_registered_source(group, name):
    from vlm.registry import registered

    assert name in registered(group)


def test_a_plugin_source_resolves_by_name(tmp_path, tiny_vlm_dir):
    """A package that declares `vlm.models` / `vlm.datasets` entry points is usable by those names."""
    dist = tmp_path / "my_models-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-models\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vlm.models]\nmy-tiny = my_models:checkpoint\n\n[vlm.datasets]\nmine = my_models:data\n")
    (tmp_path / "0.png").write_bytes(b"")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"image": "0.png", "text": "a red circle"}) + "\n")
    (tmp_path / "my_models.py").write_text(
        f"def checkpoint():\n    return {str(tiny_vlm_dir)!r}\n\n"
        f"def data():\n    return {{'train': {str(tmp_path / 'rows.jsonl')!r}}}\n")
    code = ("from vlm import load_pretrained, VLMError\n"
            "from vlm.registry import resolve_dataset, resolve_model\n"
            "model, processor = load_pretrained('my-tiny', device='cpu')\n"
            "print(resolve_model('my-tiny'), type(model).__name__, resolve_dataset('mine:train'))\n"
            "try:\n    resolve_dataset('mine:test')\nexcept VLMError as e:\n    print(e)\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    first, second = result.stdout.splitlines()
    assert first.split() == [str(tiny_vlm_dir), "VisionLanguageModel", str(tmp_path / "rows.jsonl")]
    assert second == "mine:test: unknown mine split; use one of mine:train"


def test_registry_names_fall_through_to_paths_and_hub_ids(tmp_path):
    from vlm.registry import resolve_dataset, resolve_model

    assert resolve_model("Salesforce/blip2-opt-2.7b") == "Salesforce/blip2-opt-2.7b"
    (tmp_path / "vlm-demo").mkdir()
    os.chdir(tmp_path)
    try:
        assert resolve_model("vlm-demo") == "vlm-demo"  # a local folder of that name wins
    finally:
        os.chdir(ROOT)
    assert resolve_dataset("data.jsonl") is None and resolve_dataset("nosuchsource:train") is None
