"""Shared by the benchmarks: is the machine idle? (Other jobs can slow it 2–6×.)

Foreign CPU use = busy ticks of the whole machine minus this process's own ticks, from /proc.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_ticks() -> tuple[int, int]:
    """(busy ticks of the whole machine, ticks of this process incl. all its threads)."""
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    with open("/proc/self/stat") as f:
        own = f.read().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime


def foreign_cpu(busy0: int, own0: int, seconds: float) -> float:
    """CPU cores used by other processes since (busy0, own0), over ``seconds``."""
    busy, own = cpu_ticks()
    return max(0.0, ((busy - busy0) - (own - own0)) / CLOCK_TICKS / max(seconds, 1e-9))


def wait_until_idle(max_foreign: float, wait: float) -> float:
    """Sample foreign CPU over 1 s windows until below ``max_foreign`` or ``wait`` s passed."""
    deadline = time.time() + wait
    while True:
        busy0, own0 = cpu_ticks()
        time.sleep(1.0)
        foreign = foreign_cpu(busy0, own0, 1.0)
        if foreign <= max_foreign or time.time() > deadline:
            if foreign > max_foreign:
                print(f"warning: machine busy ({foreign:.2f} foreign cores, load "
                      f"{os.getloadavg()[0]:.2f}); timings are pessimistic", file=sys.stderr)
            return foreign
        time.sleep(4.0)


def timed_repeats(fn, repeats: int, max_foreign: float, wait: float) -> tuple[list[float], float]:
    """Run ``fn`` ``repeats`` times after an idle check each; (seconds per run, max foreign load)."""
    times, worst = [], 0.0
    for _ in range(repeats):
        worst = max(worst, wait_until_idle(max_foreign, wait))
        busy0, own0 = cpu_ticks()
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        times.append(elapsed)
        worst = max(worst, foreign_cpu(busy0, own0, elapsed))
    return times, worst


def median(values: list[float]) -> float:
    return statistics.median(values)


def epoch_timer(on_epoch):
    """A Keras callback timing each epoch and passing ``on_epoch`` a dict: ``train_s`` (from the
    epoch's start to its validation), ``steps_s`` (the train steps alone), ``validation_s`` (the
    per-epoch evaluation), ``steps``, and ``foreign_cpu`` (cores other processes used meanwhile)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()
            self.ticks = cpu_ticks()
            self.test_start = self.test_end = None
            self.steps_s = 0.0

        def on_train_batch_begin(self, batch, logs=None):
            self.step_start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            self.steps_s += time.perf_counter() - self.step_start

        def on_test_begin(self, logs=None):
            self.test_start = time.perf_counter()

        def on_test_end(self, logs=None):
            self.test_end = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            end = time.perf_counter()
            train_end = self.test_start if self.test_start is not None else end
            validation = (self.test_end - self.test_start) if self.test_end is not None else 0.0
            on_epoch({"epoch": epoch + 1, "train_s": train_end - self.start,
                      "steps_s": self.steps_s, "validation_s": validation,
                      "steps": self.params.get("steps"),
                      "foreign_cpu": round(foreign_cpu(*self.ticks, end - self.start), 3)})

    return EpochTimer()


def add_idle_arguments(parser) -> None:
    """``--max-foreign`` and ``--wait``: the idle check of ``timed_repeats``."""
    parser.add_argument("--max-foreign", type=float, default=0.3,
                        help="foreign CPU cores tolerated before waiting (default 0.3)")
    parser.add_argument("--wait", type=float, default=60.0,
                        help="seconds to wait for an idle machine")


def add_step_timing_arguments(parser) -> None:
    """Options shared by train_throughput.py and reference_torch.py (which it runs with them)."""
    parser.add_argument("--steps", type=int, default=20,
                        help="optimizer steps per timed run (MNIST)")
    parser.add_argument("--resnet-steps", type=int, default=3,
                        help="steps per timed run (ResNet-110)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per workload (median)")
    add_idle_arguments(parser)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table: the header, a separator, then one line per row of cells."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def publish_markdown(lines: list[str], out: str | None) -> str:
    """Join a report's lines, write them to ``out`` (atomically; None: nowhere) and print them."""
    text = "\n".join(lines) + "\n"
    if out:
        from smoothmix_tf.atomic import atomic_write_text

        atomic_write_text(out, text)
    print(text)
    return text


def machine_line(load: bool = True) -> str:
    """Processor and core count, and the 1-minute load average unless ``load=False``."""
    line = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    return f"{line}, load {os.getloadavg()[0]:.2f}" if load else line


def gemm_gflops(dtype: str = "float32", size: int = 4096, repeats: int = 5,
                max_foreign: float = 0.3, wait: float = 60.0) -> float:
    """The machine's dense matrix-product ceiling: GFLOP/s of a ``size``² × ``size``² TensorFlow
    (oneDNN) ``matmul`` in ``dtype``, median of ``repeats`` idle-checked runs.

    No convolution or training step computes faster than this; model FLOPs per second divided by
    it (``_flops``) say how much of the processor a rate uses.
    """
    import tensorflow as tf

    a = tf.cast(tf.random.stateless_normal([size, size], [0, 1]), dtype)
    b = tf.cast(tf.random.stateless_normal([size, size], [0, 2]), dtype)
    product = tf.function(lambda a, b: tf.matmul(a, b)[0, 0])
    product(a, b).numpy()
    times, _ = timed_repeats(lambda: product(a, b).numpy(), repeats, max_foreign, wait)
    return 2 * size ** 3 / median(times) / 1e9
