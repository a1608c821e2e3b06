"""The multi-node command itself: `deepspeed --hostfile H --num_nodes 2` through DeepSpeed's
default pdsh launcher, over ssh to two loopback "nodes" (127.0.0.1 and 127.0.0.2) served
by a private sshd that the test starts and stops. Nothing outside tmp_path is touched:
host key, client key, authorized_keys, sshd_config and ssh client config all live there,
and pdsh's ssh picks the client config up from PDSH_SSH_ARGS_APPEND."""

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from launching import DEEPSPEED, ROOT, launch_env, records, train_losses

from rskdist.comm import free_port

pytestmark = [pytest.mark.slow, pytest.mark.integration]

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
RUN = ["--config", "configs/debug.yaml", "run.max_steps=3", "run.log_every=1", "run.save_every=0",
       "eval.every_epochs=-1"]


def _run(cmd, env, timeout=600):
    # Own session: on a timeout the whole tree (pdsh, ssh clients) goes, and DeepSpeed's
    # runner never reaches its `pkill -f` clean-up, which would hit every run on the machine.
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)
        out, _ = proc.communicate()
        pytest.fail(f"timed out after {timeout} s: {' '.join(cmd)}\n{out[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-4000:]}"
    return out


@pytest.fixture(scope="module")
def loopback_nodes(tmp_path_factory):
    """A private sshd on 127.0.0.1 and 127.0.0.2 (one free port); yields the ssh client
    config file. Stops sshd and every session it still serves at the end."""
    missing = [name for name, path in (("sshd", SSHD), ("pdsh", shutil.which("pdsh")),
                                       ("ssh", shutil.which("ssh")), ("ssh-keygen", shutil.which("ssh-keygen")))
               if not path or not os.access(path, os.X_OK)]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (apt-get install openssh-server pdsh)")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    shutil.copy(d / "client_key.pub", d / "authorized_keys")
    port = free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d / 'host_key'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nPidFile {d / 'sshd.pid'}\n"
        # StrictModes would refuse keys under /tmp (a world-writable parent).
        "StrictModes no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
        "PermitRootLogin prohibit-password\nUsePAM no\n")
    client = d / "ssh_config"
    client.write_text(
        f"Host 127.0.0.1 127.0.0.2\n  Port {port}\n  IdentityFile {d / 'client_key'}\n  IdentitiesOnly yes\n"
        f"  StrictHostKeyChecking no\n  UserKnownHostsFile {d / 'known_hosts'}\n  BatchMode yes\n  LogLevel ERROR\n")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    log = open(d / "sshd.log", "w")
    sshd = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=log, stderr=subprocess.STDOUT)
    try:
        reached = False
        for _ in range(50):
            probe = subprocess.run(["ssh", "-F", str(client), "127.0.0.2", "true"], capture_output=True, text=True,
                                   stdin=subprocess.DEVNULL, timeout=30)
            if probe.returncode == 0:
                reached = True
                break
            if sshd.poll() is not None:
                break
            time.sleep(0.2)
        if not reached:
            pytest.skip(f"ssh to 127.0.0.2 through a private sshd failed: {probe.stderr.strip()[-300:]} | "
                        f"sshd log: {(d / 'sshd.log').read_text()[-300:]}")
        yield client
    finally:
        sessions = psutil.Process(sshd.pid).children(recursive=True) if sshd.poll() is None else []
        sshd.terminate()
        for p in sessions:  # ranks left behind by a failed run are ours alone: end them by pid
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        sshd.wait(timeout=30)
        log.close()


@pytest.mark.timeout(1800)
def test_pdsh_two_nodes_over_ssh_match_one_node(loopback_nodes, tmp_path):
    # Reference: the same config as 2 processes on one node.
    one_node = tmp_path / "one_node"
    _run([DEEPSPEED, "--num_gpus", "2", "--master_port", str(free_port()), "rskdist/train.py", *RUN,
          f"run.output_dir={one_node}"], launch_env())

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    two_nodes = tmp_path / "two_nodes"  # this run's own folder and port
    # The runner's own ssh check ignores PDSH_SSH_ARGS_APPEND (it reads ~/.ssh/config
    # only): skip it; the fixture has checked ssh to 127.0.0.2 already.
    out = _run([DEEPSPEED, "--hostfile", str(hostfile), "--num_nodes", "2", "--num_gpus", "1", "--no_ssh_check",
                "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "rskdist/train.py", *RUN,
                f"run.output_dir={two_nodes}"],
               # The remote side gets PYTHONPATH from the runner (it exports every PYTHON* variable
               # and prepends its cwd), so the checkout under test is the one imported there too.
               launch_env(PDSH_RCMD_TYPE="ssh", PDSH_SSH_ARGS_APPEND=f"-F {loopback_nodes}"))

    # pdsh prefixes every line with the host it came from: both launched a node.
    assert "127.0.0.1: " in out and "127.0.0.2: " in out
    assert "node_rank=0" in out and "node_rank=1" in out
    run = two_nodes / "debug"
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    train = records(run, "train")
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(len(r["rss_peak_mb_per_rank"]) == 2 and min(r["rss_peak_mb_per_rank"]) > 0 for r in train)
    reference = train_losses(one_node / "debug")
    for r in train:  # same global batch, rank-ordered, on two nodes as on one
        assert r["loss"] == pytest.approx(reference[r["step"]], abs=1e-6), r["step"]
