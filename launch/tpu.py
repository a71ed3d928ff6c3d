"""Cloud TPU launcher: create a TPU VM (or a queued resource, one slice or several), put the project on every
worker, start `python -m contextblip_jax.train` on all of them, follow it, and tear it down.

    launch/tpu.sh [--dry-run] create|setup|run|logs|status|delete --name=N --zone=Z --project=P --type=T [...]
    launch/tpu.sh run --name=N --zone=Z --project=P --type=v5litepod-16 -- --config=configs/imagecode.py ...

Every action is a `gcloud` command; `--dry-run` prints them, one per line, and runs nothing. The standard library
only, so the launcher runs from any Python 3.9+ on a laptop without the project's requirements.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys

RUNTIME_VERSIONS = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
"""Default TPU VM runtime image per accelerator family (gcloud's accelerator type before the dash)."""

REMOTE_DIR = "contextblip_jax"
"""Where the project lives on each worker, under the login user's home."""

LOG_DIR = "contextblip_logs"
"""Per-worker training output on the VM (`train.log`), kept after the ssh session ends."""


def runtime_version(accelerator_type: str) -> str:
    family = accelerator_type.split("-")[0]
    if family not in RUNTIME_VERSIONS:
        raise SystemExit(
            f"no default runtime image for {accelerator_type!r}; pass --version (known families: "
            f"{', '.join(sorted(RUNTIME_VERSIONS))})"
        )
    return RUNTIME_VERSIONS[family]


def node_names(args: argparse.Namespace) -> list[str]:
    """The TPU VM(s) of the job: the name itself, or `NAME-0 … NAME-{slices-1}` for a multi-slice queued resource."""
    if args.slices > 1:
        return [f"{args.name}-{i}" for i in range(args.slices)]
    return [args.name]


def _where(args: argparse.Namespace) -> list[str]:
    return [f"--zone={args.zone}", f"--project={args.project}"]


def create(args: argparse.Namespace) -> list[list[str]]:
    version = args.version or runtime_version(args.type)
    capacity = ["--spot"] if args.spot else ["--reserved"] if args.reserved else []
    if not args.queued:
        if args.slices > 1:
            raise SystemExit("several slices (--slices) need a queued resource: add --queued")
        command = ["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *_where(args)]
        return [[*command, f"--accelerator-type={args.type}", f"--version={version}", *capacity]]
    nodes = (
        [f"--node-count={args.slices}", f"--node-prefix={args.name}"] if args.slices > 1 else [f"--node-id={args.name}"]
    )
    command = ["gcloud", "compute", "tpus", "queued-resources", "create", args.name, *_where(args)]
    return [[*command, f"--accelerator-type={args.type}", f"--runtime-version={version}", *nodes, *capacity]]


def _ssh(args: argparse.Namespace, node: str, worker: str, remote: str) -> list[str]:
    command = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", node, *_where(args), f"--worker={worker}"]
    return [*command, f"--command={remote}"]


PROJECT_FILES = ("contextblip_jax", "configs", "launch", "README.md", "constraints.txt", "pyproject.toml")
"""What a worker needs of the project (no virtual environments, work folders or data)."""


def setup(args: argparse.Namespace) -> list[list[str]]:
    """Mounts `--bucket` (data and workdirs shared by all workers), puts the project on every worker (copied from
    `--source`, or cloned from `--repo` at `--ref`), then installs the project with its `tpu` extra (jax's TPU
    build at the pinned version) in a virtual environment there."""
    install = f"cd ~/{REMOTE_DIR} && python3 -m venv .venv && .venv/bin/pip install -q -e '.[tpu]' -c constraints.txt"
    commands = []
    for node in node_names(args):
        if args.bucket:
            mount = (
                f"sudo mkdir -p /mnt/{args.bucket} && sudo chown $(id -u):$(id -g) /mnt/{args.bucket} && "
                f"(mountpoint -q /mnt/{args.bucket} || gcsfuse --implicit-dirs {args.bucket} /mnt/{args.bucket})"
            )
            commands.append(_ssh(args, node, "all", mount))
        if args.repo:
            clone = f"rm -rf ~/{REMOTE_DIR} && git clone --depth=1 --branch={args.ref} {args.repo} ~/{REMOTE_DIR}"
            commands.append(_ssh(args, node, "all", clone))
        else:
            files = [os.path.join(os.path.abspath(args.source), name) for name in PROJECT_FILES]
            commands.append(_ssh(args, node, "all", f"mkdir -p ~/{REMOTE_DIR}"))
            scp = ["gcloud", "compute", "tpus", "tpu-vm", "scp", "--recurse", *files, f"{node}:~/{REMOTE_DIR}/"]
            commands.append([*scp, *_where(args), "--worker=all"])
        commands.append(_ssh(args, node, "all", install))
    return commands


def run(args: argparse.Namespace) -> list[list[str]]:
    """Starts the trainer on every worker of every slice, detached from ssh (output in ~/LOG_DIR/train.log per
    worker), then follows worker 0 of the first slice unless --detach. `--coordinator=auto` makes every worker
    start `jax.distributed` and find the others from the TPU metadata (unless the flags name a coordinator)."""
    flags = list(args.train_args)
    if not any(flag.startswith("--coordinator") for flag in flags):
        flags.append("--coordinator=auto")
    train = shlex.join([".venv/bin/python", "-m", "contextblip_jax.train", *flags])
    start = (
        f"mkdir -p ~/{LOG_DIR} && cd ~/{REMOTE_DIR} && setsid nohup {train} > ~/{LOG_DIR}/train.log 2>&1 < /dev/null &"
    )
    commands = [_ssh(args, node, "all", start) for node in node_names(args)]
    if not args.detach:
        commands.append(follow_log(args, worker=0, slice_index=0, follow=True))
    return commands


def follow_log(args: argparse.Namespace, worker: int, slice_index: int, follow: bool) -> list[str]:
    """The last lines of one worker's training output, followed until interrupted when `follow`."""
    node = node_names(args)[slice_index]
    tail = f"tail -n 200 {'-F ' if follow else ''}~/{LOG_DIR}/train.log"
    return _ssh(args, node, str(worker), tail)


def status(args: argparse.Namespace) -> list[list[str]]:
    kind = "queued-resources" if args.queued else "tpu-vm"
    commands = [["gcloud", "compute", "tpus", kind, "describe", args.name, *_where(args)]]
    running = "pgrep -fa contextblip_jax.train || echo 'no trainer running'"
    return commands + [_ssh(args, node, "all", running) for node in node_names(args)]


def delete(args: argparse.Namespace) -> list[list[str]]:
    if args.queued:  # --force deletes the TPU VMs the queued resource created as well
        return [["gcloud", "compute", "tpus", "queued-resources", "delete", args.name, *_where(args), "--force"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *_where(args)]]


def parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM name (the queued resource and node prefix too)")
    common.add_argument("--zone", required=True, help="e.g. us-central2-b (v4), us-west4-a (v5e), us-east5-a (v5p)")
    common.add_argument("--project", required=True, help="Google Cloud project id")
    common.add_argument("--type", required=True, help="gcloud accelerator type: v4-32, v5litepod-16, v5p-8, v6e-8")
    common.add_argument("--queued", action="store_true", help="a queued resource rather than a plain TPU VM")
    common.add_argument("--slices", type=int, default=1, help="multi-slice: this many slices (needs --queued)")
    main = argparse.ArgumentParser(prog="launch/tpu.sh", description=__doc__.split("\n\n")[0])
    main.add_argument("--dry-run", action="store_true", help="print each gcloud command, one per line; run nothing")
    sub = main.add_subparsers(dest="subcommand", required=True)
    create_parser = sub.add_parser("create", parents=[common], help="create the TPU VM or queued resource")
    create_parser.add_argument("--version", help="runtime image (default: by accelerator family)")
    capacity = create_parser.add_mutually_exclusive_group()
    capacity.add_argument("--spot", action="store_true", help="spot capacity (preemptible; the trainer resumes)")
    capacity.add_argument("--reserved", action="store_true", help="capacity from a reservation")
    setup_parser = sub.add_parser("setup", parents=[common], help="copy the project to every worker and install")
    setup_parser.add_argument(
        "--source", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), help="project folder to copy"
    )
    setup_parser.add_argument("--repo", help="git URL to clone on each worker instead of copying --source")
    setup_parser.add_argument("--ref", default="main", help="branch or tag of --repo")
    setup_parser.add_argument(
        "--bucket",
        help="mount this Cloud Storage bucket at /mnt/BUCKET on every worker, for the data (gcsfuse must be "
        "installed); give the workdir as gs://BUCKET/PATH",
    )
    run_parser = sub.add_parser("run", parents=[common], help="start the trainer on all workers: run -- ARGS")
    run_parser.add_argument("--detach", action="store_true", help="start and return without following worker 0")
    run_parser.add_argument(
        "train_args", nargs=argparse.REMAINDER, help="after --: the trainer's flags (--workdir=gs://BUCKET/PATH)"
    )
    logs_parser = sub.add_parser("logs", parents=[common], help="show (and follow) one worker's training output")
    logs_parser.add_argument("--worker", type=int, default=0)
    logs_parser.add_argument("--slice", type=int, default=0)
    logs_parser.add_argument("--no-follow", dest="follow", action="store_false")
    sub.add_parser("status", parents=[common], help="the resource's state and each worker's trainer process")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM or queued resource")
    return main


def commands(argv: list[str]) -> tuple[argparse.Namespace, list[list[str]]]:
    args = parser().parse_args(argv)
    if args.slices < 1:
        raise SystemExit("--slices must be at least 1")
    if args.slices > 1 and not args.queued:
        raise SystemExit("several slices (--slices) need a queued resource: add --queued")
    if args.subcommand == "run":
        if args.train_args[:1] == ["--"]:
            args.train_args = args.train_args[1:]
        if not args.train_args:
            raise SystemExit("run needs the trainer's flags after --, e.g. run ... -- --config=configs/imagecode.py")
    build = {"create": create, "setup": setup, "run": run, "status": status, "delete": delete}
    if args.subcommand == "logs":
        if not 0 <= args.slice < args.slices:
            raise SystemExit(f"--slice {args.slice} is outside 0..{args.slices - 1}")
        return args, [follow_log(args, args.worker, args.slice, args.follow)]
    return args, build[args.subcommand](args)


def main(argv: list[str]) -> int:
    args, planned = commands(argv)
    for command in planned:
        if args.dry_run:
            print(shlex.join(command))
            continue
        print("+", shlex.join(command), file=sys.stderr, flush=True)
        returncode = subprocess.call(command)
        if returncode:
            return returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
