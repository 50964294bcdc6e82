"""vidtag.threads: threads from the cores really available, never more."""

import os

import torch

from vidtag import threads


def test_available_cores_follows_a_cgroup_quota(tmp_path, monkeypatch):
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(threads, "CGROUP_CPU_MAX", cpu_max)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    assert threads.available_cores() == 4  # no cgroup file: the affinity
    cpu_max.write_text("max 100000\n")
    assert threads.available_cores() == 4
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs of quota
    assert threads.available_cores() == 1
    cpu_max.write_text("800000 100000\n")  # a quota above the affinity does not add cores
    assert threads.available_cores() == 4


def test_set_threads_never_exceeds_the_available_cores(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(threads, "available_cores", lambda: 2)
    try:
        assert threads.set_threads(1) == 1 and torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
        assert threads.set_threads(64) == 2 and torch.get_num_threads() == 2
        assert threads.set_threads(0) == 2
    finally:
        torch.set_num_threads(before)
        monkeypatch.setenv("OMP_NUM_THREADS", str(before))
