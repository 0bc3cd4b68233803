"""Progress of long work (training, sampling, evaluation, preparation). On a terminal: a tqdm
bar. Elsewhere (CI logs, files, pipes): a plain line every `every` seconds, so a log never
falls silent for long and never fills with carriage returns. A line is due when the next
update, as far off as the last one was, would come after the deadline: with steady steps
no gap exceeds `every` (a line only after `every` had passed made gaps of `every` plus a
step)."""
import sys
import time


class Progress:
    def __init__(self, total, desc, unit, initial=0, enabled=True, every=10.0, stream=None):
        self.total, self.desc, self.unit, self.done, self.every = total, desc, unit, initial, every
        self.units = unit[:-1] + "ies" if unit.endswith("y") else unit + ("es" if unit.endswith(("s", "ch")) else "s")
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.last = self.previous = time.monotonic()
        self.bar = None
        if enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def update(self, status=None, n=1):
        """Count n more; `status` is a callable giving extra text, evaluated only when a line is printed."""
        self.done += n
        now = time.monotonic()
        interval, self.previous = now - self.previous, now
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and now + interval - self.last >= self.every:
            total = f"/{self.total}" if self.total else ""
            self.write(f"{self.desc} {self.done:>6}{total} {self.units}" + (f"  {status()}" if status else ""))

    def write(self, message):
        if not self.enabled:
            return
        self.last = time.monotonic()
        if self.bar is not None:
            self.bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
