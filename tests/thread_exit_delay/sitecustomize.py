"""A busy machine's timing at exit, for the `elm serve` processes of tests/test_serve_models.py
(this folder first on their PYTHONPATH; glibc only). Each thread, once its run() returns, sleeps
ELM_TEST_THREAD_EXIT_DELAY seconds among its C++ thread-exit destructors, before those of the
thread_local objects it made meanwhile, so these run after join() has returned, as the
interpreter shuts down. MLX state a thread has not released (`release_thread`), such as its
random key, then takes the GIL in its destructor, and the process aborts ("terminate called
without an active exception") or crashes."""

import ctypes
import os
import threading

DELAY = float(os.environ.get("ELM_TEST_THREAD_EXIT_DELAY", "0"))


def _install(delay: float) -> None:
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "__cxa_thread_atexit_impl"):  # not glibc
        return
    usleep = ctypes.cast(libc.usleep, ctypes.c_void_p)
    at_thread_exit = libc.__cxa_thread_atexit_impl  # what a thread_local's constructor calls
    at_thread_exit.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    microseconds = int(delay * 1e6)
    run = threading.Thread.run

    def run_then_delay_exit(self: threading.Thread) -> None:
        try:
            run(self)
        finally:  # registered after the thread's thread_locals: runs before their destructors
            at_thread_exit(usleep, microseconds, usleep)

    threading.Thread.run = run_then_delay_exit  # type: ignore[method-assign]


if DELAY > 0:
    _install(DELAY)
