"""`make demo`: a 3-host l3net cluster on this machine, shown working; `make demo-down` ends it.

Each host is a network namespace with its own dockerd and l3net-plugin (see tests/testbed.py);
they share one etcd and exchange routes with BGP.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.testbed import Testbed, wait_until  # noqa: E402

STATE = "/run/l3net-demo.json"


def show(title, text):
    print(f"\n=== {title}\n{text.rstrip()}")


def up():
    if os.path.exists(STATE):
        sys.exit(f"a demo is already running (state in {STATE}); run `make demo-down` first")
    print("building 3 hosts (namespaces l3demo1..3, underlay 198.18.1.0/24, one etcd) ...")
    bed = Testbed(3, workdir="/var/lib/l3net-demo", prefix="/l3demo", tag="l3demo",
                  net="198.18.1", etcd_port=23800).up()
    bed.save(STATE)
    for host in bed.hosts:     # BGP sessions up everywhere before anything is shown
        wait_until(lambda: host.sh("birdc", "-s", "/run/l3net/bird.ctl", "show", "protocols")
                   .stdout.count("Established") == 2, 30, f"BGP sessions of {host.name}")
    containers = []
    for host in bed.hosts:
        host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                    "--subnet", "10.40.0.0/16", "web")
        for n in (1, 2):
            name = f"web-{host.index}-{n}"
            host.docker("run", "-d", "--name", name, "--net", "web", "l3net-test/busybox", "sleep", "1d")
            nets = json.loads(host.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", name).stdout)
            containers.append((host, name, nets["web"]["IPAddress"]))
    show("containers", "\n".join(f"{h.name:7s} {n:10s} {ip}" for h, n, ip in containers))
    src_host, src, _ = containers[0]
    lines = []
    for host, name, ip in containers[1:]:
        res = src_host.docker("exec", src, "ping", "-c3", "-W2", ip, check=False)
        rtt = res.stdout.split("time=")[-1].split()[0] + " ms" if res.returncode == 0 else "FAILED"
        lines.append(f"{src} ({src_host.name}) -> {name} {ip} ({host.name}): {rtt}")
    show("cross-host ping", "\n".join(lines))
    h1 = bed.hosts[0]
    show(f"routing table of {h1.name} (ip route)", h1.sh("ip", "route").stdout)
    remote = containers[-1][2]
    show(f"ip route get {remote} on {h1.name}", h1.sh("ip", "route", "get", remote).stdout)
    show(f"BGP sessions of {h1.name} (birdc show protocols)",
         h1.sh("birdc", "-s", "/run/l3net/bird.ctl", "show", "protocols").stdout)
    db_ip, ctl = policy_demo(bed, containers[0])
    tags_demo(bed, db_ip, ctl)
    print(f"\nthe cluster keeps running; try: nsenter -t {h1.anchor.pid} -m -n docker ps")
    print("tear it down with: make demo-down")


def policy_demo(bed, web):
    """A second application, db, on host 2: closed to web until a policy opens its port."""
    h2 = bed.hosts[1]
    web_host, web_name, _ = web
    for host in bed.hosts:
        host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                    "--subnet", "10.50.0.0/16", "db")
    h2.docker("run", "-d", "--name", "db-2", "--net", "db", "l3net-test/busybox",
              "nc", "-ll", "-p", "5432", "-e", "/bin/echo", "hello from db-2")
    db_ip = json.loads(h2.docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", "db-2").stdout)["db"]["IPAddress"]
    ctl = [os.path.join(os.path.dirname(sys.executable), "l3netctl"), "--etcd-endpoints", bed.etcd_url,
           "--etcd-prefix", bed.prefix]

    def attempt():
        tcp = web_host.docker("exec", web_name, "sh", "-c", f"echo | nc -w 2 {db_ip} 5432", check=False)
        ping = web_host.docker("exec", web_name, "ping", "-c1", "-W1", db_ip, check=False)
        return (f"  {web_name} -> db-2 {db_ip} tcp/5432: {tcp.stdout.strip() or 'no answer (dropped)'}\n"
                f"  {web_name} -> db-2 {db_ip} ping:     {'answered' if ping.returncode == 0 else 'no answer (dropped)'}")
    before = attempt()
    env = {**os.environ, "DOCKER_HOST": h2.docker_host}
    allow = subprocess.run([*ctl, "policy", "allow", "--from", "web", "--to", "db", "--proto", "tcp",
                            "--port", "5432"], capture_output=True, text=True, env=env, timeout=60)
    wait_until(lambda: "hello" in web_host.docker("exec", web_name, "sh", "-c",
                                                  f"echo | nc -w 1 {db_ip} 5432", check=False).stdout,
               10, "the policy in force")
    show("isolation: web and db are two applications (networks)",
         f"before any policy:\n{before}\n"
         f"$ l3netctl policy allow --from web --to db --proto tcp --port 5432\n{allow.stdout.rstrip()}\n"
         f"after it:\n{attempt()}")
    show("policies (l3netctl policy list)",
         subprocess.run([*ctl, "policy", "list"], capture_output=True, text=True, timeout=60).stdout)
    show(f"what {h2.name} enforces for its containers (iptables -S L3NET-TO-CONTAINER)",
         h2.sh("iptables", "-S", "L3NET-TO-CONTAINER").stdout)
    return db_ip, ctl


def tags_demo(bed, db_ip, ctl):
    """A third application, api, tagged needs-db when created: one policy naming the tag opens
    db to every application that carries it, now and later."""
    h3 = bed.hosts[2]
    for host in bed.hosts:
        host.docker("network", "create", "-d", "l3net", "--ipam-driver", "l3net",
                    "--subnet", "10.60.0.0/16", "-o", "l3net.tags=needs-db", "api")
    h3.docker("run", "-d", "--name", "api-3", "--net", "api", "l3net-test/busybox", "sleep", "1d")

    def attempt():
        tcp = h3.docker("exec", "api-3", "sh", "-c", f"echo | nc -w 2 {db_ip} 5432", check=False)
        return f"  api-3 -> db-2 {db_ip} tcp/5432: {tcp.stdout.strip() or 'no answer (dropped)'}"
    before = attempt()
    allow = subprocess.run([*ctl, "policy", "allow", "--from", "tag:needs-db", "--to", "10.50.0.0/16",
                            "--proto", "tcp", "--port", "5432"], capture_output=True, text=True, timeout=60)
    wait_until(lambda: "hello" in h3.docker("exec", "api-3", "sh", "-c", f"echo | nc -w 1 {db_ip} 5432",
                                            check=False).stdout, 10, "the tag's policy in force")
    show("tags: api was created with -o l3net.tags=needs-db",
         f"before a policy names the tag:\n{before}\n"
         f"$ l3netctl policy allow --from tag:needs-db --to 10.50.0.0/16 --proto tcp --port 5432\n"
         f"{allow.stdout.rstrip()}\nafter it:\n{attempt()}\n"
         "(l3netctl tag add NETWORK needs-db opens db to another application; tag remove closes it)")
    show("tags (l3netctl tag list)",
         subprocess.run([*ctl, "tag", "list"], capture_output=True, text=True, timeout=60).stdout)


def down():
    if not os.path.exists(STATE):
        print("no demo running")
        return
    Testbed.load(STATE).cleanup()
    os.unlink(STATE)
    print("demo torn down")


if __name__ == "__main__":
    down() if sys.argv[1:] == ["down"] else up()
