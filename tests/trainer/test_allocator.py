"""The allocator keeps freed activation memory for the next step, unless the user chose otherwise."""

import ctypes.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from trainer.allocator import PRELOADS, configure_allocator

ROOT = Path(__file__).resolve().parents[2]
glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")

STEPS = """
import json, resource, sys
sys.path.insert(0, {root!r})
if {configure}:
    from trainer.allocator import PRELOADS, configure_allocator
    configure_allocator()
import torch
torch.manual_seed(0)
w1 = torch.randn(512, 2048, requires_grad=True)
w2 = torch.randn(2048, 512, requires_grad=True)
def step():
    x = torch.randn(4096, 512)
    ((x @ w1).relu() @ w2).square().mean().backward()
step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(json.dumps(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before))
"""


def page_faults_of_training_steps(configure: bool) -> int:
    """Minor page faults of four forward+backward passes of a small MLP on 32 MiB activations."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "EMBTRAIN_ALLOCATOR", "LD_PRELOAD"))}
    done = subprocess.run([sys.executable, "-c", STEPS.format(root=str(ROOT), configure=configure)],
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@glibc
def test_training_steps_reuse_freed_memory_instead_of_faulting_it_in_again():
    default, configured = page_faults_of_training_steps(False), page_faults_of_training_steps(True)
    assert default > 10_000  # glibc's defaults map every large activation afresh
    assert configured < 0.4 * default  # (about 0.2 here; a MiniLM step: 0.03)


@glibc
def test_on_glibc_it_says_what_it_did(monkeypatch):
    for name in ("EMBTRAIN_ALLOCATOR", "LD_PRELOAD", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_MAX_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    assert configure_allocator() == "glibc: heap only, never trimmed"


@pytest.mark.parametrize("name, value, said", [
    ("EMBTRAIN_ALLOCATOR", "default", "default (EMBTRAIN_ALLOCATOR=default)"),
    ("LD_PRELOAD", "/usr/lib/libjemalloc.so.2", "preloaded (/usr/lib/libjemalloc.so.2)"),
    ("MALLOC_TRIM_THRESHOLD_", "0", "as set by MALLOC_TRIM_THRESHOLD_"),
])
def test_the_users_own_choice_is_left_alone(monkeypatch, name, value, said):
    monkeypatch.setenv(name, value)
    assert configure_allocator() == said


PRELOAD = """
import os, sys
sys.path.insert(0, {root!r})
from trainer.allocator import preload_allocator
preload_allocator()
maps = open("/proc/self/maps").read()
print(os.environ.get("LD_PRELOAD", ""), "|", "tcmalloc" in maps or "jemalloc" in maps, "|", os.environ.get("TCMALLOC_RELEASE_RATE", ""), os.environ.get("MALLOC_CONF", ""))
"""


def preload_run(**env) -> list[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "EMBTRAIN_ALLOCATOR", "LD_PRELOAD", "TCMALLOC_"))}
    done = subprocess.run([sys.executable, "-c", PRELOAD.format(root=str(ROOT))], capture_output=True, text=True,
                          env={**clean, **env}, check=True)
    return [part.strip() for part in done.stdout.strip().splitlines()[-1].split("|")]


installed = [name for name, _ in PRELOADS if ctypes.util.find_library(name)]


@pytest.mark.skipif(platform.system() != "Linux" or not installed, reason="no tcmalloc or jemalloc installed")
def test_an_installed_allocator_is_preloaded_and_told_to_keep_freed_memory():
    preloaded, mapped, settings = preload_run()
    assert installed[0] in preloaded and mapped == "True"
    assert settings in ("0", "dirty_decay_ms:-1,muzzy_decay_ms:-1")


@pytest.mark.parametrize("env", [{"EMBTRAIN_ALLOCATOR": "glibc"}, {"EMBTRAIN_ALLOCATOR_PRELOADED": "x"},
                                 {"MALLOC_TRIM_THRESHOLD_": "0"}, {"MALLOC_CONF": "narenas:1"}])
def test_no_preload_where_the_user_chose_or_it_was_done(env):
    preloaded, mapped, _ = preload_run(**env)
    assert preloaded == "" and mapped == "False"


RELEASE = """
import json, sys
sys.path.insert(0, {root!r})
from trainer.allocator import configure_allocator, release_free_memory
configure_allocator()
import torch

def resident_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS:")) / 1024

big = torch.ones(64, 2**20)  # 256 MiB, touched
after = torch.ones(1024)  # a block above it, so that only freeing inside the heap can return it
del big
kept = resident_mib()
released = release_free_memory()
print(json.dumps([kept, resident_mib(), released]))
"""


@glibc
def test_free_memory_goes_back_to_the_kernel_when_asked():
    """Training keeps freed memory (above); before an evaluation it is handed back."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "EMBTRAIN_ALLOCATOR", "LD_PRELOAD"))}
    done = subprocess.run([sys.executable, "-c", RELEASE.format(root=str(ROOT))], capture_output=True, text=True, env=env, check=True)
    kept, after, released = json.loads(done.stdout.strip().splitlines()[-1])
    assert released and kept - after > 200  # MiB
