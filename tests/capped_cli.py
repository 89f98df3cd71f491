"""``leantune ARGV`` under a memory cap, for the crafted-input tests (issue 22).

One server process imports torch and leantune once; each command then runs in a child
forked from it, which first sets ``RLIMIT_AS`` to its own address-space size plus
``cap_bytes`` (so a regression that allocates gigabytes fails with MemoryError, reported as
``internal:``, instead of taking the machine down), redirects stdout / stderr to files and
calls ``leantune.cli.main``. The parent reports the exit status (``-N`` for a signal), the
two outputs and the child's peak RSS above the server's RSS at fork.

    with CappedCLI() as cli:
        code, out, err, grown = cli.run(["import-gguf", path, out_dir])
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GB = 1 << 30
ROOT = Path(__file__).resolve().parents[1]

SERVER = r'''
import json, os, resource, signal, sys, time
os.environ["TOKENIZERS_PARALLELISM"] = "false"
import torch
torch.set_num_threads(1)
import leantune.cli
import leantune.peft_core.checkpoint, leantune.peft_core.tokenizer, leantune.peft_core.generate
import leantune.peft_core.gguf_import, leantune.train.data, leantune.train.curation, leantune.train.loop


def status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


for line in sys.stdin:
    req = json.loads(line)
    rss0 = status_kb("VmRSS")
    pid = os.fork()
    if pid == 0:
        try:
            out = os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            err = os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(out, 1)
            os.dup2(err, 2)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            if req.get("cwd"):
                os.chdir(req["cwd"])
            cap = status_kb("VmSize") * 1024 + req["cap"]
            resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
            try:
                code = leantune.cli.main(req["argv"])
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
        except BaseException as e:
            try:
                os.write(2, f"server child: {type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(99)
    deadline = time.monotonic() + req["timeout"]
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            done, status, usage = os.wait4(pid, 0)
            status = -1000
            break
        time.sleep(0.01)
    code = -1000 if status == -1000 else (os.waitstatus_to_exitcode(status))
    grown = max(0, usage.ru_maxrss - rss0) * 1024
    print(json.dumps({"code": code, "grown": grown}), flush=True)
'''


class CappedCLI:
    """A server process; ``run`` sends it one command at a time."""

    def __init__(self, cap_bytes: int = 3 * GB // 2):
        self.cap = cap_bytes
        self.tmp = tempfile.TemporaryDirectory(prefix="capped-cli-")
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", MALLOC_ARENA_MAX="2")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))

    def run(self, argv, timeout: float = 60, cwd=None, cap_bytes: int | None = None):
        """(exit status, stdout, stderr, peak RSS growth in bytes); status -1000: timed out."""
        out, err = Path(self.tmp.name) / "out", Path(self.tmp.name) / "err"
        req = {"argv": [str(a) for a in argv], "out": str(out), "err": str(err), "timeout": timeout,
               "cap": self.cap if cap_bytes is None else cap_bytes, "cwd": str(cwd) if cwd else None}
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the capped CLI server died (exit {self.proc.wait()})")
        res = json.loads(line)
        return (res["code"], out.read_text(errors="replace"), err.read_text(errors="replace"), res["grown"])

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
