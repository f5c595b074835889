"""SIGINT/SIGTERM as a request: the trainer finishes its step, checkpoints, then stops."""

import signal


class StopRequest:
    def __init__(self):
        self.signal_number = None
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signal_number, frame):
        if self.signal_number is not None:  # a second signal: stop now, the old way
            signal.default_int_handler(signal_number, frame)
        self.signal_number = signal_number

    def __bool__(self) -> bool:
        return self.signal_number is not None

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
