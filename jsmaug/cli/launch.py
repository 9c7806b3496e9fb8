"""Start a multi-process (multi-host) training run on one machine: N JAX processes of K CPU devices each, joined
through a coordinator on a free local port, so the pod path can be tried on a laptop.

    jsmaug launch --processes 2 --devices_per_process 4 -- CONFIG.yaml [key=value ...]
    jsmaug launch --processes 2 --devices_per_process 4 -- pairs sample --model M --input P --out OUT ...

Each process runs `python -m jsmaug.train CONFIG [key=value ...] distributed.coordinator_address=127.0.0.1:PORT
distributed.num_processes=N distributed.process_id=i` (or `jsmaug pairs sample ... --coordinator_address
127.0.0.1:PORT --num_processes N --process_id i`) with `--xla_force_host_platform_device_count=K`; its
output lines come prefixed by `[pI]`. SIGTERM or SIGINT to the launcher goes to every process (SIGTERM is a
preemption: they save the same step and exit with 143). When a process ends with an error, the others get
`--grace` seconds to end on their own (they stop by themselves once `distributed.heartbeat_timeout` has
passed), then are killed. The exit code is the first non-zero one, else 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
    env.setdefault("JAX_PLATFORMS", "cpu")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _pump(stream, prefix: str, out) -> None:
    for line in iter(stream.readline, ""):
        out.write(f"{prefix} {line}")
        out.flush()


def command(args: list[str], address: str, processes: int, i: int, python: str = sys.executable) -> list[str]:
    """Process i's command line: a training run (`CONFIG [key=value ...]`) with the `distributed.*` overrides, or
    `pairs sample ...` with its `--coordinator_address/--num_processes/--process_id` flags."""
    if args[:2] == ["pairs", "sample"]:
        return [python, "-m", "jsmaug.cli.main", *args, "--coordinator_address", address, "--num_processes",
                str(processes), "--process_id", str(i)]
    if args and args[0] in ("pairs", "train"):
        if args[0] == "pairs":
            raise SystemExit("error: jsmaug launch runs a training run or `pairs sample`, not `pairs "
                             f"{' '.join(args[1:2])}` (it needs no other processes)")
        args = args[1:]
    return [python, "-m", "jsmaug.train", *args, f"distributed.coordinator_address={address}",
            f"distributed.num_processes={processes}", f"distributed.process_id={i}"]


def launch(processes: int, devices: int, train_args: list[str], port: int | None = None, grace: float = 30.0,
           python: str = sys.executable) -> int:
    port = port or free_port()
    env = _env(devices)
    procs, pumps = [], []
    for i in range(processes):
        cmd = command(train_args, f"127.0.0.1:{port}", processes, i, python)
        p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)  # signals reach a process only through the launcher
        procs.append(p)
        for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
            t = threading.Thread(target=_pump, args=(stream, f"[p{i}]", out), daemon=True)
            t.start()
            pumps.append(t)
    print(f"[launch] {processes} processes x {devices} CPU devices, coordinator 127.0.0.1:{port}", flush=True)

    def forward(signum, frame):
        print(f"[launch] {signal.Signals(signum).name}: passing it to every process", flush=True)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_error, deadline = None, None
    try:
        while any(p.poll() is None for p in procs):
            for i, p in enumerate(procs):
                if p.returncode not in (None, 0) and first_error is None:
                    first_error = (i, p.returncode)
                    deadline = time.time() + grace
                    print(f"[launch] process {i} exited with code {p.returncode}; the others get {grace:.0f}s "
                          "to stop", flush=True)
            if deadline is not None and time.time() > deadline:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        print(f"[launch] killing process {i}", flush=True)
                        p.kill()
            time.sleep(0.2)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    for t in pumps:
        t.join(timeout=5)
    codes = [p.returncode for p in procs]
    if first_error is None:
        first_error = next(((i, c) for i, c in enumerate(codes) if c), None)
    print(f"[launch] exit codes {codes}", flush=True)
    return 0 if first_error is None else (first_error[1] if first_error[1] > 0 else 128 - first_error[1])


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        print(__doc__)
        print("usage: jsmaug launch --processes N --devices_per_process K -- CONFIG [key=value ...] | pairs sample ...")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--devices_per_process", type=int, default=4)
    ap.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds the others get after one process fails")
    args = ap.parse_args(argv[:cut])
    if args.processes < 1 or args.devices_per_process < 1:
        ap.error("--processes and --devices_per_process must be >= 1")
    return launch(args.processes, args.devices_per_process, argv[cut + 1:], args.port, args.grace)


if __name__ == "__main__":
    sys.exit(main())
