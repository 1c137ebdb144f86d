"""Deployment: the mount(8)/umount(8) helper (option translation, real `mount -t
fuse.shufflefs`, an fstab file, `umount`), the restart of a dead daemon under consumers in
other mount namespaces, the container entrypoint's SIGTERM path as PID 1, the systemd
notification, and the Kubernetes manifests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from shufflefs import mount_helper
from shufflefs.mount_helper import HelperError, helper_command, translate_options
from shufflefs.testing.mounting import Mount, daos_objects, is_mounted, run_cli, store_objects

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


# -- option translation ----------------------------------------------------------------------------


def test_options_become_flags_and_generic_ones_are_ignored():
    flags, env = translate_options(
        [
            "rw",
            "defaults",
            "_netdev",
            "nofail",
            "auto",
            "noauto",
            "x-systemd.automount",
            "cache_size=20G",
            "commit=async",
            "cache_dir=/var/cache/sfs",
            "noatime",
            "s3_endpoint_url=http://h:8333",
            "upload_workers=4",
            "aws_profile=spark",
            "log_level=debug",
            "comment=hello",
            "uid=185",
            "user=spark",
            "leave_mount",
            "metrics_addr=:9464",
        ]
    )
    assert flags == [
        "--cache-size",
        "20G",
        "--commit",
        "async",
        "--cache-dir",
        "/var/cache/sfs",
        "--s3-endpoint-url",
        "http://h:8333",
        "--upload-workers",
        "4",
        "--log-level",
        "debug",
        "--leave-mount",
        "--metrics-addr",
        ":9464",
        "--owner",
        "185:185",
    ]
    assert env == {"AWS_PROFILE": "spark"}


@pytest.mark.parametrize(
    "option, needle",
    [
        ("bogus", "unknown mount option 'bogus'"),
        ("metrics_addr=9464x", "invalid metrics address"),
        ("cache_size", "cache_size needs a value"),
        ("cache_size=", "cache_size needs a value"),
        ("ro", "read-only mounts are not supported"),
        ("foreground", "not allowed"),
        ("cache_size=lots", "invalid value in mount option 'cache_size=lots': invalid size 'lots'"),
        ("commit=maybe", "invalid value in mount option 'commit=maybe': use one of sync, async"),
        ("uid=spark", "invalid value in mount option 'uid=spark': use a number"),
        ("uid=4294967295", "at most 4294967294"),
        ("gid=99999999999", "at most 4294967294"),
        ("cache_size=99999999999999999T", "too big"),
        ("upload_workers=100000000", "at most 1024"),
        ("store_timeout=inf", "above 0"),
        (
            "s3_endpoint_url=http://user:s3cr3t@h:8333",
            "invalid value in mount option s3_endpoint_url: the S3 endpoint URL must not contain credentials",
        ),
        ("upload_workers=0", "must be at least 1"),
    ],
)
def test_bad_options_are_refused(option, needle):
    with pytest.raises(HelperError) as info:
        translate_options([option])
    assert needle in str(info.value)
    assert "s3cr3t" not in str(info.value)


def test_sloppy_ignores_unknown_options():
    assert translate_options(["bogus", "commit=sync"], sloppy=True) == (["--commit", "sync"], {})


def test_invocation_as_mount_and_as_umount():
    call, command, env = helper_command(
        "mount.fuse.shufflefs", ["s3://b/p", "/mnt/x", "-n", "-o", "rw,commit=async", "-t", "fuse.shufflefs"]
    )
    assert command[1:] == ["-m", "shufflefs", "mount", "s3://b/p", "/mnt/x", "--commit", "async"]
    assert not call.fake
    call, command, _ = helper_command("mount.shufflefs", ["s3://b", "/mnt/x", "-fv", "-ocommit=sync"])
    assert call.fake and call.verbose and command[-2:] == ["--commit", "sync"]
    _, command, _ = helper_command("umount.fuse.shufflefs", ["/mnt/x", "-n", "-f", "-t", "fuse.shufflefs"])
    assert command[1:] == ["-m", "shufflefs", "umount", "/mnt/x"]  # -f (force) still drains
    _, command, _ = helper_command("umount.fuse.shufflefs", ["/mnt/x", "-l"])
    assert command[1:] == ["-m", "shufflefs", "umount", "/mnt/x", "--lazy"]
    assert translate_options(["gid=7"]) == (["--owner", "7:7"], {})
    for argv in ([], ["only-one"], ["a", "b", "c"], ["a", "b", "-o"], ["a", "b", "-N", "ns"], ["a", "b", "-q"]):
        with pytest.raises(HelperError):
            helper_command("mount.fuse.shufflefs", argv)


def test_repo_helper_is_the_installed_one(tmp_path):
    with open(os.path.join(REPO, "mount-helpers", "mount.shufflefs")) as f:
        assert f.read() == mount_helper.HELPER_SCRIPT.format(python='"${SHUFFLEFS_PYTHON:-python3}"')
    result = run_cli("install-mount-helper", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(os.listdir(tmp_path)) == sorted(mount_helper.HELPER_NAMES)
    assert os.readlink(tmp_path / "umount.shufflefs") == "mount.fuse.shufflefs"
    assert os.access(tmp_path / "mount.fuse.shufflefs", os.X_OK)
    result = run_cli("install-mount-helper", "--dir", str(tmp_path / "missing"))
    assert result.returncode == 1 and "cannot install the mount helper" in result.stderr


# -- the helper run by mount(8) and umount(8) ---------------------------------------------------------


@pytest.fixture
def installed_helper():
    """The helper installed where mount(8) looks (/sbin), and whatever was there put back."""
    directory = "/sbin"
    saved = {}
    for name in mount_helper.HELPER_NAMES:
        path = os.path.join(directory, name)
        if os.path.lexists(path):
            saved[name] = path + ".shufflefs-test-saved"
            os.replace(path, saved[name])
    try:
        result = run_cli("install-mount-helper", "--dir", directory)
        assert result.returncode == 0, result.stderr
        yield directory
    finally:
        for name in mount_helper.HELPER_NAMES:
            path = os.path.join(directory, name)
            if os.path.lexists(path):
                os.unlink(path)
            if name in saved:
                os.replace(saved[name], path)


def mount8(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["mount", *args], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, env=env
    )


def test_node_install_puts_shufflefs_on_the_path_with_its_runtime_dependencies_only(tmp_path):
    """mount-helpers/install.sh: what a user installs on a node (README, "Install")."""
    install = os.path.join(REPO, "mount-helpers", "install.sh")
    prefix, bin_dir, helper_dir = tmp_path / "opt", tmp_path / "bin", tmp_path / "sbin"
    result = subprocess.run(
        ["bash", install, "--prefix", str(prefix), "--bin-dir", str(bin_dir), "--helper-dir", str(helper_dir)],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr
    version = subprocess.run([str(bin_dir / "shufflefs"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("shufflefs ")
    assert sorted(os.listdir(helper_dir)) == sorted(mount_helper.HELPER_NAMES)
    with open(helper_dir / mount_helper.HELPER_NAMES[0]) as f:
        assert str(prefix / "bin" / "python") in f.read()  # the helper runs the installed copy
    for test_tool in ("pytest", "pyspark"):
        assert (
            subprocess.run(
                [str(prefix / "bin" / "python"), "-c", f"import {test_tool}"], capture_output=True
            ).returncode
            != 0
        ), f"{test_tool} is a test tool"
    refused = subprocess.run(["bash", install, "--prefix"], capture_output=True, text=True)
    assert refused.returncode == 2 and len(refused.stderr.splitlines()) == 1, refused.stderr


def test_mount_t_fuse_shufflefs_and_umount(installed_helper, tmp_path, file_store):
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    result = mount8(
        "-t",
        "fuse.shufflefs",
        f"file://{file_store}",
        str(mnt),
        "-o",
        f"cache_dir={cache},cache_size=64M,commit=async,_netdev,nofail,x-systemd.requires=x",
    )
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(str(mnt))  # live when mount returned
        os.makedirs(mnt / "blockmgr-10000000-0000-4000-8000-000000000000" / "00")
        (mnt / "blockmgr-10000000-0000-4000-8000-000000000000" / "00" / "shuffle_0_0_0.index").write_bytes(b"\1" * 16)
        status = Mount(f"file://{file_store}", mnt, cache)
        assert status.log().count("commit=async") == 1
        result = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert not is_mounted(str(mnt))
        # umount went through the helper (`shufflefs umount`: SIGTERM, drain, unmount)
        assert "SIGTERM: draining" in status.log()
        assert store_objects(str(file_store)) == {
            "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index": b"\1" * 16
        }
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_fstab_line(installed_helper, tmp_path, file_store):
    mnt, cache = tmp_path / "mnt", tmp_path / "cache"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(
        f"# a comment\nfile://{file_store}  {mnt}  fuse.shufflefs  "
        f"defaults,_netdev,nofail,noauto,cache_dir={cache},commit=sync  0 0\n"
    )
    result = mount8("-T", str(fstab), str(mnt))
    try:
        assert result.returncode == 0, result.stderr
        assert is_mounted(str(mnt))
        assert Mount(f"file://{file_store}", mnt, cache).log().count("commit=sync") == 1
        assert run_cli("umount", str(mnt)).returncode == 0
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def test_mount_errors_are_one_line(installed_helper, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = mount8("-t", "fuse.shufflefs", "file:///tmp", str(mnt), "-o", "bogus=1")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "mount.fuse.shufflefs: unknown mount option 'bogus=1' (shufflefs options: aws_profile, cache_dir, "
        "cache_size, commit, executor_lease, fuse, gid, heartbeat, late_window, leave_mount, log_file, log_level, "
        "metrics_addr, no_passthrough, owner, s3_endpoint_url, store_timeout, "
        "uid, upload_workers; mount(8)'s generic ones are ignored)"
    ]
    result = mount8("-t", "fuse.shufflefs", "nosuch://x", str(mnt), "-o", f"cache_dir={tmp_path / 'c'}")
    assert result.returncode == 32
    assert len(result.stderr.strip().splitlines()) == 1 and "unsupported store URL scheme" in result.stderr
    assert not is_mounted(str(mnt))


# -- restart under consumers in other mount namespaces -------------------------------------------------

CONSUMER = r"""
import errno, json, os, sys, time
mnt, log_path, stop_path = sys.argv[1:4]
names = sys.argv[4:]
with open(log_path, "a", buffering=1) as log:
    while not os.path.exists(stop_path):
        for name in names:
            try:
                with open(os.path.join(mnt, name), "rb") as f:
                    size = len(f.read())
                result = {"name": name, "ok": size}
            except OSError as exc:
                result = {"name": name, "errno": errno.errorcode.get(exc.errno, exc.errno)}
            log.write(json.dumps({"t": time.time(), **result}) + "\n")
        time.sleep(0.05)
"""


@pytest.fixture
def shared_dir(tmp_path):
    """A directory that is a shared mount, as Kubernetes makes a Bidirectional volume's source:
    mounts made below it reach mount namespaces that copied it as slaves."""
    base = tmp_path / "shared"
    base.mkdir()
    subprocess.run(["mount", "--bind", str(base), str(base)], check=True)
    subprocess.run(["mount", "--make-shared", str(base)], check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base)], capture_output=True)


def read_log(path) -> list[dict]:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
    "view, ending",
    [("slave-namespace", "sigkill"), ("bind-of-mountpoint", "sigkill"), ("bind-of-mountpoint", "sigterm-leave-mount")],
)
def test_consumer_survives_daemon_restart(view, ending, shared_dir, tmp_path, file_store):
    """slave-namespace: a process in its own mount namespace that copied the tree as slave
    (`unshare --propagation slave`). bind-of-mountpoint: in such a namespace, a bind mount of
    the mountpoint itself made read-slave, which is how kubelet gives a container a
    HostToContainer volume. Both must read again once the daemon is started again, after a
    crash (SIGKILL) or after a graceful stop with --leave-mount (a DaemonSet update)."""
    mnt, cache = shared_dir / "mnt", tmp_path / "cache"
    mount = Mount(f"file://{file_store}", mnt, cache, *(["--leave-mount"] if ending != "sigkill" else []))
    consumer = None
    stop, log_path = tmp_path / "stop", tmp_path / "consumer.log"
    names = [
        "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data",
        "blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index",
    ]
    with mount:
        os.makedirs(mnt / "blockmgr-10000000-0000-4000-8000-000000000000" / "00")
        (mnt / names[0]).write_bytes(os.urandom(100_000))
        (mnt / names[1]).write_bytes(b"\0" * 16)
        try:
            # what a container with a HostToContainer volume is: its own mount namespace, slave
            consume = [PY, "-c", CONSUMER, str(mnt), str(log_path), str(stop), *names]
            if view == "bind-of-mountpoint":
                bound = tmp_path / "bound"
                bound.mkdir()
                consume[3] = str(bound)
                consume = [
                    "sh",
                    "-c",
                    f'mount --rbind {mnt} {bound} && mount --make-rslave {bound} && exec "$@"',
                    "consumer",
                    *consume,
                ]
            consumer = subprocess.Popen(["unshare", "--mount", "--propagation", "slave", *consume], cwd="/")
            deadline = time.monotonic() + 30
            while not any("ok" in r for r in (read_log(log_path) if log_path.exists() else [])):
                assert time.monotonic() < deadline and consumer.poll() is None, "the consumer cannot read"
                time.sleep(0.1)
            if ending == "sigkill":
                mount.kill_only()
            else:
                os.kill(mount.pid, signal.SIGTERM)  # drains, then exits leaving the mount
                mount.wait_exit()
                assert "leaving the mount for the next daemon" in mount.log()
            assert is_mounted(str(mnt))
            killed = time.time()
            time.sleep(0.5)
            assert consumer.poll() is None
            restarting = time.time()
            mount.start()  # the same command on the same cache dir: mounts over the dead mount
            restarted = time.time()
            deadline = time.monotonic() + 30
            while True:
                after = [r for r in read_log(log_path) if r["t"] > restarted]
                if {r["name"] for r in after if "ok" in r} == set(names):
                    break
                assert time.monotonic() < deadline, f"the consumer did not recover: {after[-4:]}"
                time.sleep(0.1)
        finally:
            stop.touch()
            if consumer is not None:
                consumer.wait(30)
        records = read_log(log_path)
        during = [r for r in records if killed < r["t"] < restarting]
        assert during and all("errno" in r for r in during), "while the daemon is dead reads fail"
        assert {r["errno"] for r in during} <= {"ENOTCONN", "ECONNABORTED", "ENOENT"}
        later = [r for r in records if r["t"] > restarted and "ok" in r]
        assert {r["name"]: r["ok"] for r in later} == {names[0]: 100_000, names[1]: 16}
        assert consumer.returncode == 0


# -- the container entrypoint: `shufflefs mount --foreground` as PID 1 ---------------------------------


def child_pids(pid: int) -> list[int]:
    children = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/children") as f:
            children += [int(p) for p in f.read().split()]
    return children


@pytest.mark.daos
def test_entrypoint_as_pid1_drains_on_sigterm(daos, tmp_path):
    """The image's entrypoint is PID 1 of its container, where no signal has a default action:
    SIGTERM must still drain the pending uploads, unmount, and exit 0."""
    fake = daos.require_fake()
    url, mnt = daos.url(), tmp_path / "mnt"
    mnt.mkdir()
    entry = subprocess.Popen(
        [
            "unshare",
            "--pid",
            "--fork",
            PY,
            "-m",
            "shufflefs",
            "mount",
            "--foreground",
            url,
            str(mnt),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--commit",
            "async",
        ],
        env={**os.environ, **daos.env},
        stdin=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(str(mnt)):
            assert entry.poll() is None and time.monotonic() < deadline, entry.stderr.read()
            time.sleep(0.1)
        (daemon,) = child_pids(entry.pid)
        with open(f"/proc/{daemon}/status") as f:
            assert "NSpid:" in (ns := next(line for line in f if line.startswith("NSpid:")))
        assert ns.split()[-1] == "1", ns  # it really is PID 1 of its namespace
        fake.inject("kv_put", "DER_UNREACH", times=-1)  # uploads stay pending until cleared
        os.makedirs(mnt / "blockmgr-10000000-0000-4000-8000-000000000000" / "00")
        (mnt / "blockmgr-10000000-0000-4000-8000-000000000000" / "00" / "shuffle_0_0_0.data").write_bytes(b"d" * 5000)
        os.kill(daemon, signal.SIGTERM)
        time.sleep(1.5)
        assert is_mounted(str(mnt)) and entry.poll() is None, "it must drain before unmounting"
        fake.clear_faults()
        assert entry.wait(120) == 0
        assert not is_mounted(str(mnt))
        assert daos_objects(url) == {"blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.data": b"d" * 5000}
        assert "SIGTERM: draining" in entry.stderr.read()
    finally:
        fake.clear_faults()
        if entry.poll() is None:
            entry.kill()
            entry.wait()
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def systemd_exec_start(unit: str, instance: str, env: dict) -> list[str]:
    """ExecStart= of a unit file, expanded as systemd does: %i, ${VAR} as one word, $VAR split."""
    import configparser

    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(unit)
    assert parser["Service"]["Type"] == "notify" and parser["Service"]["KillSignal"] == "SIGTERM"
    words = []
    for word in parser["Service"]["ExecStart"].replace("%i", instance).split():
        if re.fullmatch(r"\$\{\w+\}", word):
            words.append(env[word[2:-1]])
        elif re.fullmatch(r"\$\w+", word):
            words.extend(env[word[1:]].split())
        else:
            words.append(word)
    return words


def test_systemd_unit_is_ready_when_mounted_and_drains_on_stop(tmp_path, file_store):
    """The unit's ExecStart, run the way systemd runs a Type=notify service: READY=1 once the
    mount is live; on stop (SIGTERM) STOPPING=1, drain, unmount, exit 0."""
    import socket

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    env = {
        "SHUFFLEFS_STORE": f"file://{file_store}",
        "SHUFFLEFS_MOUNTPOINT": str(mnt),
        "SHUFFLEFS_OPTIONS": "--commit async --cache-size 64M",
    }
    command = systemd_exec_start(os.path.join(REPO, "mount-helpers", "shufflefs@.service"), "test", env)
    assert command[:3] == ["/usr/local/bin/shufflefs", "mount", "--foreground"]
    assert set(a for a in command if a.startswith("--")) <= mount_flags()
    command = [PY, "-m", "shufflefs", *command[1:]]
    command[command.index("--cache-dir") + 1] = str(tmp_path / "cache")  # not /var/lib here
    address = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(address)
        sock.settimeout(30)
        daemon = subprocess.Popen(
            command, env={**os.environ, "NOTIFY_SOCKET": address}, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            ready = sock.recv(4096).decode()
            assert ready.startswith("READY=1\n") and is_mounted(str(mnt))
            (mnt / "shuffle_0_0_0.index").write_bytes(b"\0" * 16)
            daemon.send_signal(signal.SIGTERM)
            assert sock.recv(4096).decode().startswith("STOPPING=1\n")
            assert daemon.wait(60) == 0 and not is_mounted(str(mnt))
            assert store_objects(str(file_store)) == {"shuffle_0_0_0.index": b"\0" * 16}
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


@pytest.fixture
def public_dir():
    """A directory every user can reach (pytest's tmp_path is root's only)."""
    import tempfile

    path = tempfile.mkdtemp(prefix="shufflefs-test-")
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        for name in os.listdir(path):
            subprocess.run(["fusermount3", "-u", "-z", os.path.join(path, name)], capture_output=True)
        shutil.rmtree(path, ignore_errors=True)


def test_owner_lets_spark_user_write_the_root(tmp_path, public_dir, file_store):
    """Spark's container images run executors as uid 185, not root: --owner gives them the
    mount's root (and what is learned from the store)."""
    directory = '"$1/blockmgr-10000000-0000-4000-8000-000000000000/00"'
    write = f"mkdir -p {directory} && head -c 16 /dev/zero > {directory}/shuffle_0_0_0.index"
    user = dict(user=65534, group=65534, capture_output=True, text=True, cwd="/")
    with Mount(f"file://{file_store}", f"{public_dir}/a", tmp_path / "cache-a") as mount:
        refused = subprocess.run(["sh", "-c", write, "sh", mount.path], **user)
        assert refused.returncode != 0 and "Permission denied" in refused.stderr
    with Mount(f"file://{file_store}", f"{public_dir}/b", tmp_path / "cache-b", "--owner", "65534:65534") as mount:
        assert os.stat(mount.path).st_uid == 65534
        written = subprocess.run(["sh", "-c", write, "sh", mount.path], **user)
        assert written.returncode == 0, written.stderr
    with Mount(f"file://{file_store}", tmp_path / "c", tmp_path / "cache-c", "--owner", "65534") as mount:
        learned = os.stat(
            f"{mount.path}/blockmgr-10000000-0000-4000-8000-000000000000/00/shuffle_0_0_0.index"
        )  # from the store
        assert (learned.st_uid, learned.st_gid) == (65534, 65534)
    result = run_cli("mount", f"file://{file_store}", str(tmp_path / "d"), "--owner", "spark")
    assert result.returncode == 2 and "invalid owner 'spark'" in result.stderr


# -- Kubernetes manifests and the image ------------------------------------------------------------

K8S = os.path.join(REPO, "k8s")
#: the oldest Kubernetes the manifests are for (native sidecars are on by default from 1.29)
K8S_VERSIONS = ("1.29.0", "1.37.0")


def manifests(name: str) -> list[dict]:
    import yaml

    with open(os.path.join(K8S, name)) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


def one(items: list[dict], **match) -> dict:
    found = [i for i in items if all(i.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, items)
    return found[0]


def mount_flags() -> set[str]:
    return set(re.findall(r"(--[a-z][a-z0-9-]+)", run_cli("mount", "--help").stdout))


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(K8S) if n.endswith(".yaml")))
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifest_validates_against_the_kubernetes_schema(name, version):
    import kubernetes_validate

    docs = manifests(name)
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on any unknown or wrong field


def check_mounter(container: dict, volumes: list[dict], config: dict) -> tuple[str, str]:
    """What every shufflefs container needs; returns (mountpoint, its volume's name)."""
    assert container["securityContext"] == {"privileged": True} or container["securityContext"]["privileged"]
    args = container["args"]
    mountpoint = args[1]
    flags = [a for a in args if a.startswith("--")]
    assert set(flags) <= mount_flags(), "every flag exists"
    for variable in re.findall(r"\$\((\w+)\)", " ".join(args)):
        assert variable in config["data"], f"$({variable}) is not in the ConfigMap"
    assert [r["configMapRef"]["name"] for r in container["envFrom"] if "configMapRef" in r] == [
        config["metadata"]["name"]
    ]
    mounts = container["volumeMounts"]
    shared = next(m for m in mounts if mountpoint == m["mountPath"] or mountpoint.startswith(m["mountPath"] + "/"))
    assert shared["mountPropagation"] == "Bidirectional"
    cache_dir = args[args.index("--cache-dir") + 1]
    assert not cache_dir.startswith(mountpoint + "/"), "the cache dir must not be inside the mount"
    assert any(cache_dir.startswith(m["mountPath"]) for m in mounts), "the cache dir is on a volume"
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"][:3] == ["shufflefs", "stats", mountpoint]
        assert container[probe]["timeoutSeconds"] >= 5, "the default 1 s is shorter than Python's start-up"
    assert "livenessProbe" not in container, "a liveness kill would cut a drain short"
    assert one(volumes, name=shared["name"])
    return mountpoint, shared


def test_daemonset_mounts_on_the_host_and_drains_on_stop():
    (config, secret) = manifests("shufflefs-config.yaml")
    (daemonset,) = manifests("daemonset.yaml")
    pod = daemonset["spec"]["template"]["spec"]
    container = one(pod["containers"], name="shufflefs")
    mountpoint, shared = check_mounter(container, pod["volumes"], config)
    assert [r["secretRef"]["name"] for r in container["envFrom"] if "secretRef" in r] == [secret["metadata"]["name"]]
    assert {"name": "fuse", "mountPath": "/dev/fuse"} in container["volumeMounts"]
    assert one(pod["volumes"], name="fuse")["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    # preStop drains while still serving; SIGTERM then ends the daemon, leaving the mount for
    # the next one (so executors that bound it keep working across an update)
    assert container["lifecycle"]["preStop"]["exec"]["command"][:4] == ["shufflefs", "stats", mountpoint, "--sync"]
    assert "--leave-mount" in container["args"]
    assert pod["terminationGracePeriodSeconds"] >= 600
    assert pod["hostPID"] is True  # executors' thread ids, for the recovery plugin's views
    # the executors' template points at this mountpoint on the host
    host_dir = one(pod["volumes"], name=shared["name"])["hostPath"]["path"]
    host_mountpoint = host_dir + mountpoint[len(shared["mountPath"]) :]
    (template,) = manifests("executor-pod-template.yaml")
    volume = one(template["spec"]["volumes"], name="spark-local-dir-1")
    assert volume["hostPath"] == {"path": host_mountpoint}, "no type: kubelet must not stat a dead mount"
    executor = one(template["spec"]["containers"], name="spark-kubernetes-executor")
    wait = one(template["spec"]["initContainers"], name="wait-for-shufflefs")
    for consumer in (executor, wait):
        local = one(consumer["volumeMounts"], name="spark-local-dir-1")
        assert local["mountPropagation"] == "HostToContainer"
    assert f" {one(wait['volumeMounts'], name='spark-local-dir-1')['mountPath']} fuse.shufflefs " in wait["command"][2]


def test_gc_cronjob_runs_a_valid_gc_of_the_configured_store_unprivileged():
    from shufflefs.cli import build_parser

    (config, secret) = manifests("shufflefs-config.yaml")
    (cronjob,) = manifests("gc-cronjob.yaml")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    command = [re.sub(r"\$\((\w+)\)", lambda m: config["data"][m.group(1)], arg) for arg in container["command"]]
    assert command[:2] == ["shufflefs", "gc"]
    args = build_parser().parse_args(command[1:])  # exits on anything the real parser refuses
    assert args.store_url == config["data"]["STORE_URL"] and args.delete and args.older_than >= 86400
    assert [r["secretRef"]["name"] for r in container["envFrom"] if "secretRef" in r] == [secret["metadata"]["name"]]
    assert not container["securityContext"].get("privileged") and "volumes" not in pod


def test_sidecar_template_needs_no_host_path():
    (config, _secret) = manifests("shufflefs-config.yaml")
    (template,) = manifests("executor-sidecar-pod-template.yaml")
    pod = template["spec"]
    sidecar = one(pod["initContainers"], name="shufflefs")
    assert sidecar["restartPolicy"] == "Always", "a native sidecar"
    assert pod["shareProcessNamespace"] is True  # the executor's thread ids, for the views
    mountpoint, shared = check_mounter(sidecar, pod["volumes"], config)
    assert shared["name"] == "spark-local-dir-1" and "emptyDir" in one(pod["volumes"], name="spark-local-dir-1")
    assert mountpoint != shared["mountPath"], "a directory of the volume: the volume itself stays stat-able"
    assert sidecar["command"][:2] == ["sh", "-c"] and "exec shufflefs mount --foreground" in sidecar["command"][2]
    executor = one(pod["containers"], name="spark-kubernetes-executor")
    local = one(executor["volumeMounts"], name="spark-local-dir-1")
    assert local["mountPropagation"] == "HostToContainer"
    assert local["subPath"] == mountpoint[len(shared["mountPath"]) + 1 :]
    assert not [v for v in pod["volumes"] if "hostPath" in v]
    assert pod["terminationGracePeriodSeconds"] >= 300


@pytest.mark.parametrize("template", ["executor-pod-template.yaml", "executor-sidecar-pod-template.yaml"])
def test_the_fallback_path_of_the_recipe_is_on_every_executors_mount(template):
    """Decommission onto the mount (docs/RECOVERY.md) needs the fallback path inside the
    executor's shufflefs local dir, at the same path in every executor."""
    with open(os.path.join(K8S, "README.md")) as f:
        (recipe,) = set(re.findall(r"fallbackStorage\.path=file://(\S+)", f.read()))
    assert recipe.endswith("/"), "Spark appends {appId}/... to the path as it is"
    (pod,) = manifests(template)
    with open(os.path.join(K8S, template)) as f:
        assert f"fallbackStorage.path=file://{recipe}" in f.read()
    executor = one(pod["spec"]["containers"], name="spark-kubernetes-executor")
    local = one(executor["volumeMounts"], name="spark-local-dir-1")
    assert recipe.startswith(local["mountPath"] + "/")
    assert pod["spec"]["terminationGracePeriodSeconds"] >= 300, "time to copy the map outputs"


@pytest.mark.parametrize("template", ["executor-pod-template.yaml", "executor-sidecar-pod-template.yaml"])
def test_the_recovery_plugin_scan_reaches_the_block_managers(template):
    """Spark's recovery plugin lists parent(parent(local dir))/spark-*/*/*/*/* (docs/RECOVERY.md):
    with the executor's local dir mounted as <root>/spark-*/<dir>, that is
    <dir>/blockmgr-*/<hash>/<file>, where Spark keeps its map outputs."""
    (pod,) = manifests(template)
    executor = one(pod["spec"]["containers"], name="spark-kubernetes-executor")
    path = one(executor["volumeMounts"], name="spark-local-dir-1")["mountPath"]
    parent = os.path.dirname(path)
    assert os.path.basename(parent).startswith("spark-") and os.path.dirname(parent) not in ("", "/"), path
    with open(os.path.join(K8S, "README.md")) as f:
        readme = f.read()
    assert "spark.shuffle.sort.io.plugin.class=org.apache.spark.shuffle.KubernetesLocalDiskShuffleDataIO" in readme
    assert "spark.kubernetes.driver.reusePersistentVolumeClaim=true" in readme


def test_dockerfile():
    with open(os.path.join(K8S, "Dockerfile")) as f:
        text = f.read()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert bases and all(re.fullmatch(r"debian:\d+-slim", b) for b in bases)
    final = text[text.rindex("\nFROM ") :]
    assert re.search(r"apt-get install[^\n]*\bfuse3\b", final), "the final image has fuse3 (fusermount3)"
    assert "pip install --no-cache-dir /src" in text
    assert re.search(r'^ENTRYPOINT \["shufflefs", "mount", "--foreground"\]$', text, re.M)


def test_mountpoint_may_be_a_volume(tmp_path, file_store):
    """A container's emptyDir volume is a bind mount: shufflefs mounts on its root."""
    volume = tmp_path / "volume"
    volume.mkdir()
    subprocess.run(["mount", "--bind", str(volume), str(volume)], check=True)
    try:
        with Mount(f"file://{file_store}", volume, tmp_path / "cache") as mount:
            (volume / "shuffle_0_0_0.index").write_bytes(bytes(16))
            assert mount.umount().returncode == 0
        assert store_objects(str(file_store)) == {"shuffle_0_0_0.index": bytes(16)}
    finally:
        subprocess.run(["umount", "-l", str(volume)], capture_output=True)


def test_directories_survive_a_restart(tmp_path, file_store):
    """Spark caches the directories it created (DiskBlockManager's subdirectories) and never
    creates them again: after a restart they must still be there, empty or not."""
    mount = Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache")
    with mount:
        mnt = mount.path
        os.makedirs(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000/0c")
        os.makedirs(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000/3f")
        os.makedirs(f"{mnt}/spark-2/userFiles-3")
        os.chmod(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000/3f", 0o700)
        os.rename(f"{mnt}/spark-2", f"{mnt}/spark-9")
        os.makedirs(f"{mnt}/gone")
        os.rmdir(f"{mnt}/gone")
        (tmp_path / "mnt" / "blockmgr-10000000-0000-4000-8000-000000000000" / "0c" / "temp_shuffle_1").write_bytes(
            b"scratch"
        )  # local only
        mount.kill_only()
        mount.start()
        assert sorted(os.listdir(mnt)) == ["blockmgr-10000000-0000-4000-8000-000000000000", "spark-9"]
        assert sorted(os.listdir(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000")) == ["0c", "3f"]
        assert (
            os.listdir(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000/0c") == []
        )  # scratch files do not survive a crash
        assert os.stat(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000/3f").st_mode & 0o777 == 0o700
        assert os.listdir(f"{mnt}/spark-9") == ["userFiles-3"]
        with open(f"{mnt}/blockmgr-10000000-0000-4000-8000-000000000000/3f/shuffle_0_0_0.index", "wb") as f:
            f.write(bytes(16))
        assert mount.umount().returncode == 0
    # a clean unmount forgets them: their users went with the mount
    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache") as again:
        assert sorted(os.listdir(again.path)) == ["blockmgr-10000000-0000-4000-8000-000000000000"]
        assert os.listdir(f"{again.path}/blockmgr-10000000-0000-4000-8000-000000000000") == ["3f"]


def test_umount_refuses_a_live_mount_whose_daemon_it_cannot_see(tmp_path, file_store):
    from shufflefs.places import run_file

    with Mount(f"file://{file_store}", tmp_path / "mnt", tmp_path / "cache") as mount:
        pid_file = run_file(mount.path, "json")
        os.rename(pid_file, pid_file + ".hidden")  # as from the host, for a daemon in a container
        try:
            result = run_cli("umount", mount.path)
            assert result.returncode == 1 and "not visible from here" in result.stderr
            assert is_mounted(mount.path) and os.statvfs(mount.path)  # still live, nothing detached
        finally:
            os.rename(pid_file + ".hidden", pid_file)
