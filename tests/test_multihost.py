"""Three workers as three hosts: Linux network namespaces joined by a bridge.

This is what a reader does when moving from one laptop to three machines:
manual workers at their own addresses (``TFEWorker(host="10.x.y.z:PORT",
auto_managed=False)``), started with the commands the cluster prints. The
serving process and the client run in the root namespace and reach the
workers over the bridge; they advertise the bridge address to the workers
with HELPERS_DRIVER_HOST. Skipped, with the reason, where namespaces cannot
be created (no root, no iproute2).
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import LOGIT_TOLERANCE, spawn_helpers
from helpers import TFECluster, TFEWorker, processes
from helpers.ports import free_ports

pytestmark = pytest.mark.integration
SUBNET = "10.231.77"
BRIDGE_IP = f"{SUBNET}.254"


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture
def three_hosts():
    """Create three namespaces on a bridge; yield their names and addresses."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 ('ip') is not installed: cannot create network namespaces")
    tag = f"{os.getpid() % 100000}"
    bridge = f"tfebr{tag}"
    hosts = [(f"tfehost{tag}{i}", f"tv{tag}h{i}", f"tv{tag}n{i}", f"{SUBNET}.{i + 1}")
             for i in range(3)]
    made = []
    try:
        _ip("link", "add", bridge, "type", "bridge")
        made.append(("link", bridge))
        _ip("addr", "add", f"{BRIDGE_IP}/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for namespace, host_end, ns_end, address in hosts:
            _ip("netns", "add", namespace)
            made.append(("netns", namespace))
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            made.append(("link", host_end))
            _ip("link", "set", ns_end, "netns", namespace)
            _ip("link", "set", host_end, "master", bridge)
            _ip("link", "set", host_end, "up")
            for args in (("addr", "add", f"{address}/24", "dev", ns_end),
                         ("link", "set", ns_end, "up"), ("link", "set", "lo", "up")):
                _ip("netns", "exec", namespace, "ip", *args)
    except (subprocess.CalledProcessError, OSError) as exc:
        reason = getattr(exc, "stderr", "") or str(exc)
        _teardown(made)
        pytest.skip(f"cannot create network namespaces here ({reason.strip()}); "
                    "this test needs root and iproute2")
    try:
        yield [(namespace, address) for namespace, _, _, address in hosts]
    finally:
        _teardown(made)


def _teardown(made):
    for kind, name in reversed(made):
        subprocess.run(["ip", kind, "del", name], capture_output=True, timeout=30)


def test_share_serve_and_query_across_three_hosts(three_hosts, tmp_path, seed_weights, capsys):
    port = free_ports(1)[0]
    workers = [TFEWorker(host=f"{address}:{port}", auto_managed=False, name=name)
               for (_, address), name in zip(three_hosts, ("alice", "bob", "carol"))]
    cluster = TFECluster(*workers)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(dict(cluster.hostmap)))
    # Each "host" runs the command the cluster prints for it.
    launched = []
    try:
        for role, (namespace, _) in zip(("server0", "server1", "server2"), three_hosts):
            with open(tmp_path / f"{role}.log", "w") as log:
                launched.append(subprocess.Popen(
                    ["ip", "netns", "exec", namespace, sys.executable, "-m",
                     processes.WORKER_MODULE, role, "--config", "config.json"],
                    cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT))
        with pytest.warns(UserWarning, match="not loopback"):
            cluster.start(timeout=120)
        printed = capsys.readouterr().out
        assert "python -m helpers.worker server1 --config config.json" in printed
        assert f"{three_hosts[2][1]}:{port}" in printed

        env = dict(os.environ, HELPERS_DRIVER_HOST=BRIDGE_IP)
        server = spawn_helpers("serve", "--config", config, "--weights", seed_weights,
                               "--requests", 3, "--timeout", 300, env=env)
        client = spawn_helpers("query", "--config", config, "--weights", seed_weights,
                               "--images", 3, "--json", "--timeout", 300, env=env)
        client_out, client_err = client.communicate(timeout=600)
        _, server_err = server.communicate(timeout=300)
        assert client.returncode == 0, client_err[-3000:]
        assert server.returncode == 0, server_err[-3000:]
        rows = [json.loads(line) for line in client_out.splitlines() if line.startswith("{")]
        assert len(rows) == 3
        for row in rows:
            assert np.abs(np.array(row["logits"]) - np.array(row["plaintext"])).max() < LOGIT_TOLERANCE
    finally:
        for proc in launched:
            processes.terminate(proc.pid, None, grace=5, child=proc)
