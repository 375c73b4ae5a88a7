"""A build environment whose cmake is too old, or that lacks cmake or ninja, is refused by setup.py
before CMake runs, with a message that names the tool it found and what to install. Configuring
with Debian 12's cmake 3.25.1 would otherwise fail deep in CMake ("requires the language dialect
CUDA20"). The fake tools are shell scripts; nothing here compiles or needs CUDA."""

import importlib.util
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DEBIAN_12_CMAKE = "3.25.1"
INSTALL_HINT = "pip install 'cmake>="


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: importing it must not run setup()."""
    spec = importlib.util.spec_from_file_location("tkpy_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_tool(folder, name, *lines):
    """An executable `name` in `folder` that prints `lines`, as `cmake --version` prints its version."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / name
    script.write_text("#!/bin/sh\n" + "".join(f"echo {shlex.quote(line)}\n" for line in lines))
    script.chmod(0o755)
    return script


def fake_cmake(folder, version):
    return fake_tool(folder, "cmake", f"cmake version {version}", "",
                     "CMake suite maintained and supported by Kitware (kitware.com/cmake).")


@pytest.fixture
def bare_env(tmp_path, monkeypatch):
    """(environment's bin, PATH's folder), both empty: a Python without pip's cmake and a PATH with nothing."""
    env_bin, path_bin = tmp_path / "env" / "bin", tmp_path / "path"
    env_bin.mkdir(parents=True)
    path_bin.mkdir()
    monkeypatch.setattr(sys, "executable", str(env_bin / "python"))
    monkeypatch.setenv("PATH", str(path_bin))
    return env_bin, path_bin


def test_minimum_is_the_build_requirement(setup_py):
    """pyproject.toml's build requirement (what an isolated build installs) is CMakeLists.txt's minimum."""
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    (cmake,) = [Requirement(r) for r in requires if Requirement(r).name == "cmake"]
    assert str(cmake.specifier) == f">={setup_py.cmake_minimum()}"


def test_debian_12_cmake_is_refused_by_name(setup_py, bare_env):
    _, path_bin = bare_env
    old = fake_cmake(path_bin, DEBIAN_12_CMAKE)
    with pytest.raises(RuntimeError) as refused:
        setup_py.find_cmake()
    message = str(refused.value)
    assert f"tkpy needs CMake >= {setup_py.cmake_minimum()}" in message
    assert f"found {old} version {DEBIAN_12_CMAKE}" in message
    assert INSTALL_HINT in message


def test_cmake_at_the_minimum_is_accepted(setup_py, bare_env):
    _, path_bin = bare_env
    minimum = setup_py.cmake_minimum()
    cmake = fake_cmake(path_bin, minimum)
    assert setup_py.find_cmake() == (str(cmake), minimum)


def test_environment_cmake_comes_before_path(setup_py, bare_env):
    """pip's cmake in the build's environment wins over an older one on PATH (Debian's /usr/bin/cmake)."""
    env_bin, path_bin = bare_env
    fake_cmake(path_bin, DEBIAN_12_CMAKE)
    pips = fake_cmake(env_bin, "4.4.4")
    assert setup_py.find_cmake() == (str(pips), "4.4.4")


def test_cmake_without_a_version_is_refused(setup_py, bare_env):
    _, path_bin = bare_env
    garbage = fake_tool(path_bin, "cmake", "Segmentation fault")
    with pytest.raises(RuntimeError, match="printed no CMake version") as refused:
        setup_py.find_cmake()
    assert str(garbage) in str(refused.value)
    assert "Segmentation fault" in str(refused.value)


def test_missing_cmake_is_refused(setup_py, bare_env):
    with pytest.raises(RuntimeError, match="no cmake was found beside .* or on PATH") as refused:
        setup_py.find_cmake()
    assert INSTALL_HINT in str(refused.value)


@pytest.fixture(scope="module")
def python_without_build_tools(tmp_path_factory):
    """A Python whose environment has this one's packages (setuptools) but not its cmake and ninja,
    like one that relies on the tools on PATH."""
    env = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120)
    python = env / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    (Path(purelib) / "tkpy_build_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


@pytest.mark.parametrize("cmake_version, with_ninja, refusal", [
    (DEBIAN_12_CMAKE, True, "tkpy needs CMake >= "),
    (None, True, "no cmake was found"),
    ("minimum", False, "no ninja was found"),
])
def test_build_is_refused_before_cmake_runs(setup_py, python_without_build_tools, tmp_path, cmake_version,
                                            with_ninja, refusal):
    """`setup.py build_ext`, as pip runs it, stops with the refusal and configures nothing."""
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("setup.py", "CMakeLists.txt", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    path_bin = tmp_path / "path"
    path_bin.mkdir()
    if cmake_version is not None:
        fake_cmake(path_bin, setup_py.cmake_minimum() if cmake_version == "minimum" else cmake_version)
    if with_ninja:
        fake_tool(path_bin, "ninja", "1.13.2")
    proc = subprocess.run([str(python_without_build_tools), "setup.py", "build_ext"], cwd=tree,
                          env={"PATH": str(path_bin)}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert refusal in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert not list(tree.glob("build/*/CMakeCache.txt"))
