"""`rredcot compare`'s Ctrl-C: the signal reaches the running train once, and compare waits for it to end.

The real thing (a train checkpointed by Ctrl-C, then continued by the same command) is in
test_compare_cli.py, marked slow; this is its cheap part: a stand-in child that counts the signals it gets.
"""

import os
import signal
import sys
import threading
import time

import pytest

from rredcot.compare import Forward
from rredcot.ui import console

CHILD = """
import signal, sys, time
got = []
signal.signal(signal.SIGINT, lambda *a: got.append(1))
open(sys.argv[1], "w").close()
while not got:
    time.sleep(0.01)
time.sleep(0.5)  # a train finishing its step: compare must wait, and must not signal again
print(f"got {len(got)}")
sys.exit(130)
"""


def test_ctrl_c_is_passed_on_to_the_child_once_and_compare_waits_for_it(tmp_path):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    ready, before = tmp_path / "ready", signal.getsignal(signal.SIGINT)

    def ctrl_c():  # as a terminal's Ctrl-C: to compare (the child has its own session, so not to it)
        deadline = time.time() + 60
        while not ready.exists() and time.time() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=ctrl_c, daemon=True).start()
    with Forward(console) as stop:
        t = time.time()
        proc = stop.run([sys.executable, "-c", CHILD, str(ready)], "grpo seed 0")
    assert proc.returncode == 130 and proc.stdout.strip() == "got 1" and stop.count == 1
    assert time.time() - t > 0.5  # it waited for the child
    assert signal.getsignal(signal.SIGINT) == before  # restored
