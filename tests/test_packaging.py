"""The pack imports as ComfyUI imports it (also beside another pack's top-level `backend`),
standalone as `spo_studio`, and install.py behaves: torch kept and pinned, idempotent, clear errors,
the lock applied by its rule and refreshed only by a passing suite (no network: pip is faked)."""

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


def _fake_python(tmp_path: Path) -> Path:
    python = tmp_path / "venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.touch()
    return python


def _constraints(argv: tuple) -> list[str]:
    """The contents of every `-c FILE` in a pip call (read during the call: they are temporary files)."""
    return [Path(argv[i + 1]).read_text() for i, a in enumerate(argv) if a == "-c"]


class PipCall(tuple):
    """A fake pip call's arguments, with `.constraints`: the contents of its `-c` files."""


def _fake_env(install, monkeypatch, installed: dict[str, str] | None = None, pip_ok=lambda argv: True):
    """install.py against a fake environment: torch 2.13.0+cpu, the lock's Python, `installed` packages;
    returns the list that collects pip's calls (PipCall)."""
    calls = []

    def fake_pip(python, *argv, check=True):
        call = PipCall(argv)
        call.constraints = _constraints(argv)
        calls.append(call)
        ok = pip_ok(call)
        if not ok and check:
            install.fail("pip failed")
        return ok

    monkeypatch.setattr(install, "pip", fake_pip)
    monkeypatch.setattr(install, "has_module", lambda python, module: {
        "torch": "2.13.0+cpu", "spo_studio.backend": "0.1.0"}.get(module))
    monkeypatch.setattr(install, "python_version", lambda python: install.read_lock(install.LOCK)[0])
    monkeypatch.setattr(install, "installed_versions", lambda python: dict(installed or {}))
    monkeypatch.setattr(install, "installed_root", lambda python: str(install.ROOT))
    return calls


def test_install_keeps_torch_pins_it_and_is_idempotent(tmp_path, monkeypatch):
    install = _load_install()
    monkeypatch.setattr(install, "ROOT", ROOT)
    calls = _fake_env(install, monkeypatch)
    fake_python = _fake_python(tmp_path)

    install.setup(str(fake_python), with_tests=True)
    assert calls, "first run installs"
    assert not any("torch==" in a for argv in calls for a in argv if not a.startswith("-")), "torch kept"
    assert all(call.constraints[0] == "torch==2.13.0+cpu\n" for call in calls)
    assert any(str(ROOT / "requirements-test.txt") in argv for argv in calls)
    assert (tmp_path / "venv" / install.STAMP_NAME).exists()

    calls.clear()
    install.setup(str(fake_python), with_tests=True)
    assert calls == [], "second run with the same requirements installs nothing"


def test_a_shared_environment_is_pointed_at_this_checkout(tmp_path, monkeypatch, capsys):
    """Two checkouts in one environment: the stamp of this one matches, but spo_studio is imported from the
    other, so setup installs this one again (editable) and says so; if it still shadows, setup fails."""
    install = _load_install()
    monkeypatch.setattr(install, "ROOT", ROOT)
    calls = _fake_env(install, monkeypatch)
    python = str(_fake_python(tmp_path))
    install.setup(python, with_tests=False)
    calls.clear()
    where = {"root": str(tmp_path / "other_checkout")}

    def fake_pip(python, *argv, check=True):
        calls.append(argv)
        if "-e" in argv:
            where["root"] = argv[-1]
        return True

    monkeypatch.setattr(install, "pip", fake_pip)
    monkeypatch.setattr(install, "installed_root", lambda python: where["root"])
    install.setup(python, with_tests=False)
    assert ("-e", str(ROOT)) == calls[-1][-2:]
    assert f"checkout at {tmp_path / 'other_checkout'}; pointing it at {ROOT}" in capsys.readouterr().out
    monkeypatch.setattr(install, "pip", lambda python, *argv, check=True: True)  # the other one stays first
    where["root"] = str(tmp_path / "other_checkout")
    with pytest.raises(SystemExit):
        install.setup(python, with_tests=False)
    assert "imports spo_studio from" in capsys.readouterr().err


def test_install_adds_torch_only_when_missing(tmp_path, monkeypatch):
    install = _load_install()
    state = {"torch": None}
    calls = []

    def fake_pip(python, *argv, check=True):
        calls.append(argv)
        if argv == (install.DEFAULT_TORCH,):
            state["torch"] = "2.13.0+cpu"
        return True

    monkeypatch.setattr(install, "pip", fake_pip)
    monkeypatch.setattr(install, "has_module",
                        lambda python, module: {"torch": state["torch"], "spo_studio.backend": "0.1.0"}.get(module))
    monkeypatch.setattr(install, "python_version", lambda python: install.read_lock(install.LOCK)[0])
    monkeypatch.setattr(install, "installed_root", lambda python: str(install.ROOT))
    install.setup(str(_fake_python(tmp_path)), with_tests=False)
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
# The lock
# ----------------------------------------------------------------------------------------------


def _requirements(path: Path):
    from packaging.requirements import Requirement

    lines = [ln.split("#")[0].strip() for ln in path.read_text().splitlines()]
    return [Requirement(ln) for ln in lines if ln]


def test_locks_are_exact_complete_and_satisfy_the_requirements():
    install = _load_install()
    made_with, locked = install.read_lock(install.LOCK)
    assert made_with and made_with.count(".") == 1, "the lock records the Python it was made with"
    assert not set(locked) & {"torch", "torchvision", "torchaudio", "pip", "spo-studio"}
    for req in _requirements(ROOT / "requirements.txt") + _requirements(ROOT / "requirements-test.txt"):
        name = install.canonical(req.name)
        if name == "torch":
            continue
        assert name in locked, f"{req} is not in requirements.lock"
        assert req.specifier.contains(locked[name], prereleases=True), f"{req}: locked {locked[name]}"
    comfy_made_with, comfy_locked = install.read_lock(install.COMFYUI_LOCK)
    assert comfy_made_with == made_with
    assert not set(comfy_locked) & set(locked), "tests/comfyui.lock holds only what ComfyUI adds"
    assert not set(comfy_locked) & {"torch", "torchvision", "torchaudio"}


def test_read_lock_rejects_a_line_that_is_not_an_exact_pin(tmp_path, capsys):
    install = _load_install()
    bad = tmp_path / "bad.lock"
    bad.write_text("# python: 3.11\nnumpy==2.4.6\npandas>=2\n")
    with pytest.raises(SystemExit):
        install.read_lock(bad)
    assert "bad.lock:3: expected `name==version`" in capsys.readouterr().err


def test_own_env_gets_every_locked_version(tmp_path, monkeypatch):
    install = _load_install()
    calls = _fake_env(install, monkeypatch, installed={"numpy": "1.26.0"})
    install.setup(str(_fake_python(tmp_path)), with_tests=True)
    requirements_call = next(argv for argv in calls if "-r" in argv)
    torch_pin, locked = requirements_call.constraints
    assert torch_pin == "torch==2.13.0+cpu\n"
    assert locked.splitlines() == [f"{n}=={v}" for n, v in sorted(install.read_lock(install.LOCK)[1].items())]


def test_managed_env_keeps_what_is_installed(tmp_path, monkeypatch, capsys):
    install = _load_install()
    _fake_env(install, monkeypatch, installed={"numpy": "1.26.0", "transformers": "4.57.0", "pillow": "10.0"})
    locked = install.read_lock(install.LOCK)[1]
    applied = install.lock_to_apply("/comfy/python", install.LOCK, own_env=False)
    assert not {"numpy", "transformers", "pillow"} & set(applied), "installed packages are never forced"
    assert applied == {n: v for n, v in locked.items() if n not in ("numpy", "transformers", "pillow")}
    assert "3 packages already installed here are kept" in capsys.readouterr().out
    assert install.lock_to_apply("/comfy/python", install.LOCK, own_env=True) == locked
    assert install.lock_to_apply("/comfy/python", None, own_env=True) == {}


def test_lock_not_applied_on_another_python(monkeypatch, capsys):
    install = _load_install()
    _fake_env(install, monkeypatch)
    monkeypatch.setattr(install, "python_version", lambda python: "3.99")
    assert install.lock_to_apply("/x/python", install.LOCK, own_env=True) == {}
    assert "this is Python 3.99" in capsys.readouterr().out


def test_managed_env_falls_back_to_ranges_when_the_lock_clashes(tmp_path, monkeypatch, capsys):
    install = _load_install()
    monkeypatch.setattr(install, "ROOT", tmp_path)  # the managed env's stamp goes to ROOT/.cache
    for f in ("requirements.txt", "requirements-test.txt", "pyproject.toml"):
        (tmp_path / f).write_text((ROOT / f).read_text())
    python = str(_fake_python(tmp_path))
    monkeypatch.setattr(install.sys, "executable", python)  # installing into the running (managed) Python
    calls = _fake_env(install, monkeypatch, installed={"numpy": "1.26.0"},
                      pip_ok=lambda call: len(call.constraints) < 2)  # pip fails with the lock
    install.setup(python, with_tests=False)
    with_lock, without_lock = [argv for argv in calls if "-r" in argv]
    assert len(with_lock.constraints) == 2 and without_lock.constraints == ["torch==2.13.0+cpu\n"]
    assert "installing from the requirement files' ranges instead" in capsys.readouterr().out


def test_own_env_fails_loudly_when_the_lock_does_not_install(tmp_path, monkeypatch):
    install = _load_install()
    _fake_env(install, monkeypatch, pip_ok=lambda call: "-r" not in call)
    with pytest.raises(SystemExit):
        install.setup(str(_fake_python(tmp_path)), with_tests=False)


def test_stamp_includes_the_lock(tmp_path, monkeypatch):
    install = _load_install()
    lock = tmp_path / "requirements.lock"
    lock.write_text(install.LOCK.read_text())
    monkeypatch.setattr(install, "LOCK", lock)
    calls = _fake_env(install, monkeypatch)
    python = str(_fake_python(tmp_path))
    install.setup(python, with_tests=False, lock=lock)
    calls.clear()
    install.setup(python, with_tests=False, lock=lock)
    assert calls == []
    lock.write_text(lock.read_text().replace("\npeft==", "\npeft==0.0.0\n# was peft==", 1))
    install.setup(python, with_tests=False, lock=lock)
    assert calls, "a changed lock installs again"


@pytest.mark.parametrize("suite_passes", [True, False])
def test_refresh_writes_the_locks_only_when_the_suite_passes(tmp_path, monkeypatch, suite_passes):
    install = _load_install()
    lock, comfy_lock = tmp_path / "requirements.lock", tmp_path / "comfyui.lock"
    lock.write_text("# python: 3.11\nold==1\n")
    comfy_lock.write_text("# python: 3.11\nold-comfy==1\n")
    monkeypatch.setattr(install, "LOCK", lock)
    monkeypatch.setattr(install, "COMFYUI_LOCK", comfy_lock)
    monkeypatch.setenv("COMFYUI_DIR", "/somewhere/else")
    setups, runs = [], []
    monkeypatch.setattr(install.venv, "EnvBuilder", lambda **kw: type("B", (), {"create": lambda self, d: None})())
    monkeypatch.setattr(install, "setup", lambda python, with_tests, lock: setups.append((with_tests, lock)))
    monkeypatch.setattr(install, "python_version", lambda python: "3.11")
    monkeypatch.setattr(install, "installed_versions", lambda python: {
        "numpy": "2.4.6", "torch": "2.13.0+cpu", "pip": "25.0", "spo-studio": "0.1.0"})

    def fake_run(cmd, **kwargs):
        runs.append((cmd, kwargs.get("env")))
        if "comfyui_env.py" in " ".join(cmd):  # the helper: unpacks, installs, writes its lock
            dest = Path(cmd[cmd.index("--dest") + 1])
            (dest / "ComfyUI").mkdir(parents=True)
            Path(cmd[cmd.index("--write-lock") + 1]).write_text("# python: 3.11\nav==18.1.0\n")
            assert "--unlocked" in cmd
        return subprocess.CompletedProcess(cmd, 0 if suite_passes or "pytest" not in cmd else 1)

    monkeypatch.setattr(install.subprocess, "run", fake_run)
    if suite_passes:
        assert install.refresh_lock(["-x"]) == 0
        assert install.read_lock(lock) == ("3.11", {"numpy": "2.4.6"})
        assert install.read_lock(comfy_lock) == ("3.11", {"av": "18.1.0"})
    else:
        with pytest.raises(SystemExit):
            install.refresh_lock([])
        assert lock.read_text() == "# python: 3.11\nold==1\n" and "old-comfy" in comfy_lock.read_text()
    assert setups == [(True, None)], "the scratch environment is built from the unpinned requirements"
    pytest_cmd, env = next((c, e) for c, e in runs if "pytest" in c)
    assert env["COMFYUI_DIR"].endswith("ComfyUI") and env["COMFYUI_DIR"] != "/somewhere/else"
