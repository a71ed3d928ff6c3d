"""A real single-node SLURM cluster on localhost for tests: its own munge socket, configuration, state and logs
in one folder, daemons started in the foreground and stopped by the PIDs this object started.

`gpus=N` gives the node N GPUs as generic resources backed by empty files: SLURM schedules and binds them like
real ones, so GPU requests (`--gpus-per-node`) are checked against a node, though nothing can compute on them.

Needs Debian's `slurmctld slurmd slurm-client munge` (`.ci/run` installs them) and root (the daemons switch
users). `start()` raises `Unavailable` with the reason when the cluster cannot come up.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scancel", "sinfo")


class Unavailable(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


class LocalSlurm:
    def __init__(self, folder: str, cpus: int = 8, gpus: int = 0):
        self.folder = folder
        self.cpus = cpus
        self.gpus = gpus
        self.host = socket.gethostname().split(".")[0]
        self.processes: list[subprocess.Popen] = []
        self.conf = os.path.join(folder, "slurm.conf")
        self.munge_socket = os.path.join(folder, "munge", "munge.socket")

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM's client commands (sbatch, squeue, ...) against this cluster."""
        return {**os.environ, "SLURM_CONF": self.conf}

    def start(self) -> LocalSlurm:
        missing = [name for name in DAEMONS if shutil.which(name) is None]
        if missing:
            raise Unavailable(f"SLURM/munge programs not installed: {missing}")
        if os.geteuid() != 0:
            raise Unavailable("the SLURM daemons need root")
        self._write_config()
        munge_dir = os.path.dirname(self.munge_socket)
        self._spawn(
            ["munged", "-F", "--force", f"--socket={self.munge_socket}", f"--pid-file={munge_dir}/munged.pid",
             f"--seed-file={munge_dir}/munged.seed", f"--log-file={munge_dir}/munged.log"],
        )  # fmt: skip
        self._wait(lambda: os.path.exists(self.munge_socket), "munged did not create its socket")
        self._spawn(["slurmctld", "-D", "-f", self.conf])
        self._spawn(["slurmd", "-D", "-f", self.conf])
        self._wait(self._node_idle, "the node did not become idle")
        return self

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.processes.clear()

    def run(self, *command: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(command, env=self.env, capture_output=True, text=True, check=False, timeout=timeout)

    def submit(self, *arguments: str, env: dict[str, str] | None = None, cwd: str | None = None) -> int:
        """`sbatch --parsable ARGUMENTS`; returns the job id."""
        result = subprocess.run(
            ["sbatch", "--parsable", *arguments], env={**self.env, **(env or {})}, cwd=cwd, capture_output=True,
            text=True, check=False, timeout=60,
        )  # fmt: skip
        if result.returncode:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return int(result.stdout.strip().split(";")[0])

    def state(self, job: int) -> str | None:
        """The job's state (PENDING, RUNNING, ...), or None once it has left the queue."""
        result = self.run("squeue", "-h", "-j", str(job), "-o", "%T")
        return result.stdout.strip() or None

    def wait_until_done(self, job: int, timeout: float) -> None:
        self._wait(lambda: self.state(job) is None, f"job {job} still queued after {timeout:.0f}s", timeout)

    def log(self, daemon: str) -> str:
        path = os.path.join(self.folder, f"{daemon}.log")
        if not os.path.exists(path):
            return ""
        with open(path) as f:
            return f.read()

    def _spawn(self, command: list[str]) -> None:
        with open(os.path.join(self.folder, f"{command[0]}.stdout"), "w") as log:  # the daemon keeps its own handle
            self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _node_idle(self) -> bool:
        for process in self.processes:
            if process.poll() is not None:
                raise Unavailable(f"{process.args[0]} exited with {process.returncode}: {self.log('slurmctld')[-800:]}")
        return "idle" in self.run("sinfo", "-h", "-o", "%T").stdout

    def _wait(self, ready, message: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            time.sleep(0.5)
        raise Unavailable(message)

    def _write_config(self) -> None:
        for sub in ("state", "spool", "munge"):
            os.makedirs(os.path.join(self.folder, sub), exist_ok=True)
        os.chmod(os.path.join(self.folder, "munge"), 0o700)
        f = self.folder
        settings = {
            "ClusterName": "contextblip-test",
            "SlurmctldHost": self.host,
            "SlurmctldPort": _free_port(),
            "SlurmdPort": _free_port(),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge",
            "AuthInfo": f"socket={self.munge_socket}",
            "StateSaveLocation": f"{f}/state",
            "SlurmdSpoolDir": f"{f}/spool",
            "SlurmctldPidFile": f"{f}/slurmctld.pid",
            "SlurmdPidFile": f"{f}/slurmd.pid",
            "SlurmctldLogFile": f"{f}/slurmctld.log",
            "SlurmdLogFile": f"{f}/slurmd.log",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "AccountingStorageType": "accounting_storage/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "MpiDefault": "none",
            "MailProg": "/bin/true",
            "SlurmdParameters": "config_overrides",
            "ReturnToService": 2,
            "KillWait": 60,
        }
        lines = [f"{key}={value}" for key, value in settings.items()]
        gres = ""
        if self.gpus:
            devices = [os.path.join(f, f"fake-gpu{i}") for i in range(self.gpus)]
            for device in devices:
                open(device, "w").close()
            with open(os.path.join(f, "gres.conf"), "w") as out:  # read from slurm.conf's folder
                out.writelines(f"NodeName={self.host} Name=gpu File={device}\n" for device in devices)
            lines.append("GresTypes=gpu")
            gres = f" Gres=gpu:{self.gpus}"
        lines += [
            f"NodeName={self.host} CPUs={self.cpus}{gres} State=UNKNOWN",
            f"PartitionName=test Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        with open(self.conf, "w") as out:
            out.write("\n".join(lines) + "\n")
