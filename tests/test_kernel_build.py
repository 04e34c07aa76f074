"""Where the CPU kernels' compiled library comes from (mistral/cpu/kernels.py): built once into a cache folder only
this user can write, privately where there is none, never loaded from a folder others can write, rebuilt when
damaged, and torch used without a compiler."""
import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

from mistral.cpu import kernels


pytestmark = pytest.mark.usefixtures("c_compiler")


@pytest.fixture
def fresh_build(monkeypatch):
    """The kernels as in a new process: nothing loaded yet (and the real build loaded again afterwards)."""
    kernels.load.cache_clear()
    yield
    monkeypatch.undo()
    kernels.load.cache_clear()


def test_without_a_compiler_torch_is_used(fresh_build, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    with caplog.at_level(logging.WARNING, logger="mistral.cpu.kernels"):
        assert not kernels.available()
    assert "no-such-compiler" in caplog.text
    assert not kernels.usable(x, w) and not kernels.takes_rows(x)


def test_a_cache_folder_that_cannot_be_made_builds_privately(fresh_build, monkeypatch, tmp_path):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))  # ~/.cache/mistral cannot be made under a file
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert kernels.available()
    assert list((tmp_path / "tmp").iterdir()) == []  # built in a private folder of its own, removed once loaded
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    torch.testing.assert_close(kernels.matvec(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def _planted(tmp_path, marker) -> bytes:
    """A shared library that, once loaded, writes the file `marker`: what another local user could plant."""
    src = tmp_path / "planted.c"
    src.write_text('#include <stdio.h>\n__attribute__((constructor)) static void planted(void) '
                   f'{{ FILE *f = fopen("{marker}", "w"); if (f) fclose(f); }}\n')
    subprocess.run([os.environ.get("CC") or "cc", "-shared", "-fPIC", str(src), "-o", str(tmp_path / "planted.so")],
                   check=True)
    return (tmp_path / "planted.so").read_bytes()


def _build_name() -> str:
    """The name a build gets (the first set of flags), which anyone can compute."""
    import hashlib

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    key = hashlib.sha256(b"\0".join([kernels.SOURCE.read_bytes(), cc.encode(), " ".join(kernels.FLAG_SETS[0]).encode(),
                                     kernels._cpu_id().encode()]))
    return f"kernels-{key.hexdigest()[:16]}.so"


def test_a_library_planted_in_a_shared_folder_is_never_loaded(fresh_build, monkeypatch, tmp_path):
    """With the home folder unwritable and TMPDIR a folder everyone can write, earlier versions built into, and loaded
    from, $TMPDIR/kernels-<hash>.so: another user who put a file there first ran code in our process. And a cache folder
    that others can write is not a safe place either."""
    marker = tmp_path / "planted-code-ran"
    planted = _planted(tmp_path, marker)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    (shared / _build_name()).write_bytes(planted)
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a-file"))
    monkeypatch.setattr(tempfile, "tempdir", str(shared))
    assert kernels.available() and not marker.exists()
    # A cache folder others may write to: not used, its planted file not loaded.
    kernels.load.cache_clear()
    (tmp_path / "open" / "mistral").mkdir(parents=True)
    (tmp_path / "open" / "mistral").chmod(0o777)
    (tmp_path / "open" / "mistral" / _build_name()).write_bytes(planted)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "open"))
    assert kernels.available() and not marker.exists()
    x, w = torch.randn(2, 16), torch.randn(8, 16)
    torch.testing.assert_close(kernels.matvec(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)
    # the planted library is a real one: it would have run, had it been loaded
    ctypes.CDLL(str(tmp_path / "planted.so"))
    assert marker.exists()


def test_a_damaged_cached_build_is_built_again(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "a"))
    assert kernels.available()
    (name,) = [p.name for p in (tmp_path / "a" / "mistral").iterdir()]
    # A second cache whose file of that name is damaged (the loaded one must not be touched: it is mapped).
    (tmp_path / "b" / "mistral").mkdir(parents=True)
    (tmp_path / "b" / "mistral" / name).write_bytes(b"not a shared library")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    kernels.load.cache_clear()
    assert kernels.available()
    assert (tmp_path / "b" / "mistral" / name).read_bytes() == (tmp_path / "a" / "mistral" / name).read_bytes()
    x, w = torch.randn(3, 16), torch.randn(8, 16)
    torch.testing.assert_close(kernels.matvec(x, w).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)


def test_ctrl_c_while_the_kernels_compile_leaves_them_on(monkeypatch):
    from mistral.cpu import kernels

    kernels.load.cache_clear()
    real = kernels._build

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernels, "_build", interrupted)
    monkeypatch.setenv("XDG_CACHE_HOME", str(Path(os.environ.get("TMPDIR", "/tmp")) / f"fresh-{os.getpid()}"))
    with pytest.raises(KeyboardInterrupt):
        kernels.load()
    monkeypatch.setattr(kernels, "_build", real)
    assert kernels.available()  # the next use builds them: nothing was kept of the interrupted attempt
    monkeypatch.undo()
    kernels.load.cache_clear()
