"""fpm.cpu.allocator: which malloc a training command re-executes itself with."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fpm.cpu import allocator
from fpm.errors import FpmError

ROOT = Path(__file__).resolve().parent.parent


def libdir(tmp_path: Path, *names: str) -> list[Path]:
    for name in names:
        (tmp_path / name).write_bytes(b"")
    return [tmp_path]


def test_auto_prefers_tcmalloc_and_prepends_to_ld_preload(tmp_path):
    dirs = libdir(tmp_path, "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    env = allocator.preload_env({"LD_PRELOAD": "/opt/other.so"}, dirs)
    assert env["LD_PRELOAD"] == f"{tmp_path / 'libtcmalloc_minimal.so.4'}:/opt/other.so"
    assert env["FPM_ALLOCATOR_PRELOADED"] == "tcmalloc"


def test_auto_falls_back_to_jemalloc_and_explicit_choice_is_honoured(tmp_path):
    dirs = libdir(tmp_path, "libjemalloc.so.2", "libtcmalloc_minimal.so.4")
    assert allocator.preload_env({"FPM_ALLOCATOR": "jemalloc"}, dirs)["LD_PRELOAD"] == str(tmp_path / "libjemalloc.so.2")
    (tmp_path / "je").mkdir()
    only_je = libdir(tmp_path / "je", "libjemalloc.so.2")
    assert allocator.preload_env({}, only_je)["FPM_ALLOCATOR_PRELOADED"] == "jemalloc"


@pytest.mark.parametrize("environ", [{"FPM_ALLOCATOR": "system"}, {"FPM_ALLOCATOR_PRELOADED": "tcmalloc"},
                                     {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}])
def test_no_reexec_when_chosen_off_already_done_or_already_preloaded(tmp_path, environ):
    assert allocator.preload_env(environ, libdir(tmp_path, "libtcmalloc_minimal.so.4")) is None


def test_nothing_found_is_quiet_for_auto_and_an_error_when_asked_for(tmp_path):
    assert allocator.preload_env({}, [tmp_path]) is None
    with pytest.raises(FpmError, match="FPM_ALLOCATOR=tcmalloc: none of libtcmalloc_minimal.so.4.*apt install"):
        allocator.preload_env({"FPM_ALLOCATOR": "tcmalloc"}, [tmp_path])
    with pytest.raises(FpmError, match="FPM_ALLOCATOR='bogus': expected auto, tcmalloc, jemalloc or system"):
        allocator.preload_env({"FPM_ALLOCATOR": "bogus"}, [tmp_path])


@pytest.mark.cli
@pytest.mark.parametrize("kind", ["tcmalloc", "jemalloc"])
def test_reexec_really_runs_the_process_on_the_allocator(kind):
    if allocator.find(kind) is None:
        pytest.skip(f"no {kind} library on this machine (apt install "
                    f"{'libtcmalloc-minimal4' if kind == 'tcmalloc' else 'libjemalloc2'})")
    code = ("import os; from fpm.cpu import allocator; print('pid', os.getpid(), flush=True); allocator.reexec(); "
            "print('pid', os.getpid(), allocator.in_use(), os.environ['FPM_ALLOCATOR_PRELOADED'])")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "FPM_ALLOCATOR_PRELOADED")}
    out = subprocess.run([sys.executable, "-c", code], env={**env, "FPM_ALLOCATOR": kind}, cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=True).stdout.splitlines()
    # the re-executed process runs the code again from the start: its first line is printed twice
    assert len(out) == 3, out
    first, second = out[0].split(), out[2].split()
    assert first[1] == second[1]  # exec: same process, so torchrun and SLURM keep watching it
    assert second[2:] == [kind, kind]  # the library is mapped into the re-executed process
    # the plain interpreter (no re-exec) is on glibc
    plain = subprocess.run([sys.executable, "-c", "from fpm.cpu import allocator; print(allocator.in_use())"],
                           env={**env, "FPM_ALLOCATOR": "system"}, cwd=ROOT, capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    assert plain == "glibc"
