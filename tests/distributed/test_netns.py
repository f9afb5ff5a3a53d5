"""A 2-stage pipeline across a network: each stage in its own network namespace (``ip netns``), joined by a veth
pair, launched by torchrun as node 0 and node 1 of a 2-node job. Needs root and ``ip``; skipped otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid

import pytest

from dist_util import HERE, child_env

SCRIPT = str(HERE / "pipeline_run.py")


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)


@pytest.fixture
def two_hosts():
    """``((ns_a, if_a, addr_a), (ns_b, if_b, addr_b))``: two namespaces on a private /24, removed afterwards."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2 (ip netns)")
    tag = uuid.uuid4().hex[:6]
    a, b = f"tvlm-a-{tag}", f"tvlm-b-{tag}"
    va, vb = f"tva{tag}", f"tvb{tag}"
    if _ip("netns", "add", a).returncode != 0:
        pytest.skip("cannot create network namespaces here")
    try:
        subnet = f"10.{200 + int(tag[:2], 16) % 50}.{int(tag[2:4], 16)}"
        steps = [("netns", "add", b), ("link", "add", va, "type", "veth", "peer", "name", vb),
                 ("link", "set", va, "netns", a), ("link", "set", vb, "netns", b),
                 ("-n", a, "addr", "add", f"{subnet}.1/24", "dev", va),
                 ("-n", b, "addr", "add", f"{subnet}.2/24", "dev", vb),
                 ("-n", a, "link", "set", va, "up"), ("-n", b, "link", "set", vb, "up"),
                 ("-n", a, "link", "set", "lo", "up"), ("-n", b, "link", "set", "lo", "up")]
        for step in steps:
            r = _ip(*step)
            if r.returncode != 0:
                pytest.skip(f"ip {' '.join(step)}: {r.stderr.strip()}")
        yield (a, va, f"{subnet}.1"), (b, vb, f"{subnet}.2")
    finally:
        _ip("netns", "del", a)
        _ip("netns", "del", b)


def test_two_stages_in_separate_network_namespaces(tied_qwen2, two_hosts, tmp_path):
    import prompts

    import torchvlm
    from torchvlm.generation.loop import generate

    model, processor = torchvlm.load(tied_qwen2, dtype="fp32")
    want = generate(model, **prompts.text_batch(processor), max_new_tokens=6).sequences.tolist()
    (ns_a, if_a, addr_a), (ns_b, if_b, _) = two_hosts
    procs = []
    for rank, (ns, ifname) in enumerate(((ns_a, if_a), (ns_b, if_b))):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               "--nproc-per-node=1", f"--node-rank={rank}", f"--master-addr={addr_a}", "--master-port=29611",
               "--max-restarts=0", SCRIPT, str(tied_qwen2), str(tmp_path), "--text"]
        # gloo binds to the veth (the namespace's only route to the other host)
        procs.append(subprocess.Popen(cmd, env=child_env(GLOO_SOCKET_IFNAME=ifname), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outs)
    assert json.loads((tmp_path / "rank0.json").read_text())["sequences"] == want
    assert (tmp_path / "rank1.json").is_file()
