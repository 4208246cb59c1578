"""``one_interrupt``'s signal handling in one process, each case in a fresh interpreter so
pytest's own handlers are never touched: the first SIGTERM stops the command once even when
Prefect's flow engine puts the handler back, and a caller that runs commands in its own
process gets its handlers back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_second_sigterm_under_prefects_engine_does_not_cut_the_clean_up():
    # Prefect's capture_sigterm saves the handler it finds and restores it when the flow
    # ends, which undid the SIG_IGN set by the first signal
    out = _run("""
        import os, signal
        from prefect.utilities.engine import capture_sigterm
        from flows.cli_env import Terminated, one_interrupt
        seen = []
        with one_interrupt(keep_ignoring=False) as answer:
            try:
                with capture_sigterm():
                    os.kill(os.getpid(), signal.SIGTERM)
                    signal.pthread_sigmask(signal.SIG_BLOCK, [])   # let it be delivered
            except BaseException as exc:
                seen.append(type(exc).__name__)
            try:                       # the clean-up: a later SIGTERM must not raise
                os.kill(os.getpid(), signal.SIGTERM)
                signal.pthread_sigmask(signal.SIG_BLOCK, [])
                seen.append("clean-up done")
            except BaseException as exc:
                seen.append("cut: " + type(exc).__name__)
        print(answer.pressed, answer.signum == signal.SIGTERM, seen)
    """)
    pressed, sigterm, seen = out.split(" ", 2)
    assert pressed == "True" and sigterm == "True", out
    assert "clean-up done" in seen and "cut" not in seen, out


def test_a_caller_running_commands_in_its_process_gets_its_handlers_back():
    out = _run("""
        import os, signal
        from flows.cli_env import one_interrupt

        def handlers():
            return signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

        def command(keep_ignoring, sig=None):
            try:
                with one_interrupt(keep_ignoring=keep_ignoring):
                    if sig is not None:
                        os.kill(os.getpid(), sig)
                        signal.pthread_sigmask(signal.SIG_BLOCK, [])
            except KeyboardInterrupt:
                pass
            return handlers()

        before = handlers()
        after = command(False, signal.SIGTERM)
        quiet = command(True)      # no interrupt: handlers back whatever the mode
        kept = command(True, signal.SIGINT)
        print(after == before, quiet == before, kept == (signal.SIG_IGN, signal.SIG_IGN))
    """)
    assert out == "True True True", out
