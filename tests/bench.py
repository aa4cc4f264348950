"""``make bench``: container start cost of l3net against Docker's bridge, measured side by side.

Prints, from one run on this machine:
  * median wall time of ``docker run --rm --net <net> busybox true`` for an l3net network, for
    ``--net bridge`` (the baseline) and for a user-defined bridge network, interleaved so all
    see the same machine load, and the ratios (goal vs --net bridge: <= 1.10). The second
    baseline matters: dockerd gives every container on a user-defined network (any driver,
    l3net included) its embedded DNS server, set up with iptables inside the container,
    which the default bridge network skips;
  * the plugin's own time per container: RequestAddress + CreateEndpoint + Join +
    Program/RevokeExternalConnectivity + Leave + DeleteEndpoint + ReleaseAddress as logged by
    the plugin (goal <= 15 ms median).
"""

import re
import statistics
import subprocess
import sys
import time
import uuid

from tests.conftest import TEST_IMAGE, Etcd, Plugin, docker

RUNS = 25
CALLS = ["IpamDriver.RequestAddress", "NetworkDriver.CreateEndpoint", "NetworkDriver.Join",
         "NetworkDriver.ProgramExternalConnectivity", "NetworkDriver.RevokeExternalConnectivity",
         "NetworkDriver.Leave", "NetworkDriver.DeleteEndpoint", "IpamDriver.ReleaseAddress"]
LINE = re.compile(r"POST /(\S+) 200 ([0-9.]+)ms")


def timed_run(net):
    start = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", "--net", net, TEST_IMAGE, "true"], check=True,
                   capture_output=True, timeout=120)
    return time.perf_counter() - start


def plugin_times(logpath):
    per_call = {c: [] for c in CALLS}
    with open(logpath) as f:
        for line in f:
            m = LINE.search(line)
            if m and m.group(1) in per_call:
                per_call[m.group(1)].append(float(m.group(2)))
    counts = {len(v) for v in per_call.values()}
    if len(counts) != 1:
        raise SystemExit(f"unexpected call counts in the plugin log: { {k: len(v) for k, v in per_call.items()} }")
    return [sum(vals) for vals in zip(*per_call.values())], {c: statistics.median(v) for c, v in per_call.items()}


def main():
    if docker("image", "inspect", TEST_IMAGE, check=False).returncode != 0:
        subprocess.run(["scripts/test-image.sh"], check=True)
    etcd = Etcd()
    plugin = Plugin(etcd.url, f"/l3bench-{uuid.uuid4().hex[:6]}")
    net = f"l3bench-{uuid.uuid4().hex[:6]}"
    user_bridge = f"l3bench-br-{uuid.uuid4().hex[:6]}"
    try:
        docker("network", "create", "-d", Plugin.name, "--ipam-driver", Plugin.name,
               "--subnet", "10.91.0.0/16", net)
        docker("network", "create", user_bridge)
        for _ in range(3):          # warm up every path (image cache, plugin activation)
            for n in (net, "bridge", user_bridge):
                timed_run(n)
        mark = sum(1 for _ in open(plugin.logpath))
        l3, br, ubr = [], [], []
        for _ in range(RUNS):
            l3.append(timed_run(net))
            br.append(timed_run("bridge"))
            ubr.append(timed_run(user_bridge))
        with open(plugin.logpath) as f:
            tail = f.readlines()[mark:]
        with open(plugin.logpath + ".bench", "w") as f:
            f.writelines(tail)
        per_container, per_call = plugin_times(plugin.logpath + ".bench")
    finally:
        docker("network", "rm", net, user_bridge, check=False)
        plugin.stop()
        etcd.stop()

    l3_med, br_med, ubr_med = statistics.median(l3), statistics.median(br), statistics.median(ubr)
    ratio = l3_med / br_med
    own = statistics.median(per_container)
    print(f"\nl3net bench, {RUNS} interleaved runs each, medians")
    rows = [
        ("docker run --rm --net bridge", f"{br_med * 1000:7.1f} ms", "baseline"),
        ("docker run --rm --net <user-defined bridge>", f"{ubr_med * 1000:7.1f} ms", "baseline 2"),
        ("docker run --rm --net <l3net network>", f"{l3_med * 1000:7.1f} ms", ""),
        ("ratio l3net / bridge", f"{ratio:7.3f}   ", "goal <= 1.10: " + ("OK" if ratio <= 1.10 else "MISSED")),
        ("ratio l3net / user-defined bridge", f"{l3_med / ubr_med:7.3f}   ", ""),
        ("plugin time per container", f"{own:7.1f} ms", "goal <= 15 ms: " + ("OK" if own <= 15 else "MISSED")),
    ] + [(f"  {call}", f"{ms:7.1f} ms", "") for call, ms in per_call.items()]
    for label, value, note in rows:
        print(f"  {label:45s} {value}  {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
