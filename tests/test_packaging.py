"""The pack imports as ComfyUI imports it (also beside another pack's top-level `backend`),
standalone as `spo_studio`, and install.py behaves: torch kept and pinned, idempotent, clear errors."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_as_comfyui_custom_node_beside_foreign_backend(tmp_path):
    custom_nodes = tmp_path / "custom_nodes"
    other = custom_nodes / "other_pack"
    (other / "backend").mkdir(parents=True)
    (other / "backend" / "__init__.py").write_text("FOREIGN = True\n")
    (custom_nodes / "ComfyUI-SPO").symlink_to(ROOT, target_is_directory=True)
    script = textwrap.dedent(f"""
        import importlib.util, sys
        sys.path.insert(0, {str(other)!r})      # another pack exposes a top-level `backend`
        import backend
        assert backend.FOREIGN
        pack = {str(custom_nodes / "ComfyUI-SPO")!r}
        # what ComfyUI's nodes.load_custom_node does
        spec = importlib.util.spec_from_file_location("ComfyUI-SPO", pack + "/__init__.py",
                                                      submodule_search_locations=[pack])
        module = importlib.util.module_from_spec(spec)
        sys.modules["ComfyUI-SPO"] = module
        spec.loader.exec_module(module)
        assert isinstance(module.NODE_CLASS_MAPPINGS, dict)
        import importlib
        models = importlib.import_module("ComfyUI-SPO.backend.models")
        diffusion = importlib.import_module("ComfyUI-SPO.backend.diffusion")
        assert diffusion.DiffusionModel is models.DiffusionModel
        assert sys.modules["backend"].FOREIGN      # the foreign module was not replaced
        assert "backend.models" not in sys.modules
        print("ok")
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().endswith("ok")


def test_standalone_package_and_cli():
    import spo_studio
    from spo_studio.backend import cli

    assert spo_studio.NODE_CLASS_MAPPINGS == {} or isinstance(spo_studio.NODE_CLASS_MAPPINGS, dict)
    help_text = cli.build_parser().format_help()
    assert "info" in help_text and "sample" in help_text
    res = subprocess.run([sys.executable, "-m", "spo_studio.backend.cli", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "SPO Studio" in res.stdout


def _load_install():
    spec = importlib.util.spec_from_file_location("spo_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_install_rejects_unsupported_python(capsys):
    install = _load_install()
    with pytest.raises(SystemExit) as exc:
        install.check_python((3, 8))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Python 3.8 is not supported" in err and "3.10 to 3.13" in err
    install.check_python((3, 11))  # supported: no exit


def test_install_keeps_torch_pins_it_and_is_idempotent(tmp_path, monkeypatch):
    install = _load_install()
    monkeypatch.setattr(install, "ROOT", ROOT)
    calls = []
    pinned = []

    def fake_pip(python, *argv):
        calls.append(argv)
        if "-c" in argv:
            pinned.append(Path(argv[argv.index("-c") + 1]).read_text())

    versions = {"torch": "2.13.0+cpu", "spo_studio.backend": "0.1.0", "torchvision": None}
    monkeypatch.setattr(install, "pip", fake_pip)
    monkeypatch.setattr(install, "has_module", lambda python, module: versions[module])
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.touch()

    install.setup(str(fake_python), with_tests=True)
    assert calls, "first run installs"
    assert not any("torch==" in a for argv in calls for a in argv if not a.startswith("-")), "torch kept, not reinstalled"
    assert all(p == "torch==2.13.0+cpu\n" for p in pinned) and len(pinned) == len(calls)
    assert any(str(ROOT / "requirements-test.txt") in argv for argv in calls)
    assert (tmp_path / "venv" / install.STAMP_NAME).exists()

    calls.clear()
    install.setup(str(fake_python), with_tests=True)
    assert calls == [], "second run with the same requirements installs nothing"


def test_install_adds_torch_only_when_missing(tmp_path, monkeypatch):
    install = _load_install()
    state = {"torch": None}
    calls = []

    def fake_pip(python, *argv):
        calls.append(argv)
        if argv == (install.DEFAULT_TORCH,):
            state["torch"] = "2.13.0+cpu"

    monkeypatch.setattr(install, "pip", fake_pip)
    monkeypatch.setattr(install, "has_module",
                        lambda python, module: {"torch": state["torch"], "spo_studio.backend": "0.1.0"}.get(module))
    fake_python = tmp_path / "venv" / "bin" / "python"
    fake_python.parent.mkdir(parents=True)
    fake_python.touch()
    install.setup(str(fake_python), with_tests=False)
    assert calls[0] == ("torch==2.13.0",)


def test_requirements_pin_no_torch_beyond_floor_and_no_torchvision():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "requirements.txt").read_text().splitlines()]
    lines = [ln for ln in lines if ln]
    torch_lines = [ln for ln in lines if ln.startswith("torch") and not ln.startswith("torchvision")]
    assert torch_lines == ["torch>=2.4"]
    assert not any(ln.startswith(("torchvision", "open_clip", "open-clip")) for ln in lines)
    gradio = [ln for ln in lines if ln.startswith("gradio")]
    assert gradio and all("==" in ln for ln in gradio), "gradio is pinned exactly"


# ----------------------------------------------------------------------------------------------
# The shape of the package: no import cycle, no oversized module
# ----------------------------------------------------------------------------------------------

MAX_MODULE_LINES = 600
PACKAGE_DIRS = ("backend", "comfyui_nodes", "webui")


def _module_name(path: Path) -> str:
    parts = ["spo_studio", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_time_imports(tree) -> list:
    """The import statements that run when the module is imported: at module level, in class bodies and
    in top-level if / try / with blocks, but not inside functions (run later) nor under `if TYPE_CHECKING`."""
    import ast

    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            todo += node.orelse
        else:
            todo += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
    return found


def _import_graph() -> dict[str, set[str]]:
    import ast

    files = [ROOT / "__init__.py"] + [p for d in PACKAGE_DIRS for p in sorted((ROOT / d).rglob("*.py"))]
    modules = {_module_name(p): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = graph.setdefault(name, set())
        for node in _import_time_imports(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
                continue
            if node.level == 0:
                base = node.module
            else:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            submodules = {f"{base}.{a.name}" for a in node.names} & modules.keys()
            if len(submodules) < len(node.names):  # some names come from `base` itself (its __init__)
                submodules.add(base)
            edges |= {t for t in submodules if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_and_module_sizes():
    """Checks two properties of the package's shape.

    1. No cycle among import-time imports of the package's modules (the repo-root `__init__.py` and
       everything under backend/, comfyui_nodes/, webui/): imports at module level, in class bodies and
       in top-level if/try/with blocks. Imports inside functions run on call, after every module is
       loaded, and are not counted; `from pkg import name` counts as an import of `pkg` and, when `name`
       is a module, of `pkg.name`.
    2. No .py file of the project is over MAX_MODULE_LINES lines (tests/ and bench/ excepted).
    Also, counting imports inside functions too: the trainer (backend/train/) and the SPM code
    (backend/preference/) never import the pocket package, they reach it through `backend/sources.py`;
    and the training loop imports no method (it knows only the contract in `train/method.py`).
    """
    graph = _import_graph()
    assert "spo_studio.backend.jobs" in graph and graph["spo_studio.backend.train.spo"]  # the walk saw the package
    assert _cycles(graph) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]  # the check itself works

    skip = {"tests", "bench", ".venv", ".git"}
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in ROOT.rglob("*.py") if not skip & set(p.relative_to(ROOT).parts)}
    assert "backend/jobs.py" in sizes
    assert {p: n for p, n in sizes.items() if n > MAX_MODULE_LINES} == {}

    import re

    pocket_imports = re.compile(
        r"^\s*(from\s+(\.\.|spo_studio\.backend\.)pocket\b|import\s+spo_studio\.backend\.pocket)", re.M)
    offenders = [p.relative_to(ROOT).as_posix() for d in ("backend/train", "backend/preference")
                 for p in (ROOT / d).rglob("*.py") if pocket_imports.search(p.read_text(encoding="utf-8"))]
    assert offenders == []
    loop = (ROOT / "backend" / "train" / "loop.py").read_text(encoding="utf-8")
    assert not re.search(r"^\s*from\s+\.(spo|dpo|rpo|methods)\b", loop, re.M)
