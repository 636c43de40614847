"""Recorded noise votes: every estimation vote of CERTIFY, kept so that the sequential procedures
can be replayed exactly, without the network (bench/sequential_certify.py, bench/sequential_frontier.py).

For image ``idx`` of a dataset, seeded as ``smoothmix certify`` seeds it (``input_seed(seed, idx)``),
one pass draws CERTIFY's n0 selection samples (ĉ_A = their top class) and its N estimation samples,
and stores, for every estimation sample j < N, whether the network voted ĉ_A. That is all CERTIFY,
certify_at and certify_sequential ever read: the sequential procedures look at the votes of samples
[0, n_k) — CERTIFY's own first n_k samples (the noise is counter-addressed; docs/sequential.md) — so
a procedure run on the recorded bits through the library's own code
(``sequential.certify_sequential_from_votes`` with :func:`recorded_sampler`) returns what
``Smooth.certify_sequential`` returns on the network, sample for sample (bench/sequential_certify.py
checks that on the images it times).

The record (``<cache>/<name>.npz``) grows image by image and is resumable; it stores its settings
and the checkpoint's sha256 and refuses to mix runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_file(checkpoint: str) -> Path:
    path = Path(checkpoint)
    return path / "checkpoint.keras" if path.is_dir() else path


class VoteRecorder:
    """The network side: ĉ_A and the per-sample votes for it of one image, in TF ops that use the
    library's noise addressing (sample j of a lone image is sample j of its stream)."""

    def __init__(self, smooth, batch_size: int = 1000):
        import tensorflow as tf

        from smoothmix_tf import sampling
        from smoothmix_tf.certify import _ESTIMATION, _SELECTION, _stream_seed

        self.smooth, self.batch_size = smooth, int(batch_size)
        shape = [None, *(smooth.image_shape or (None, None, None))]

        def selection(image, seed, n0):
            return smooth.sample_counts(image, n0, _stream_seed(seed, _SELECTION),
                                        self.batch_size)

        def votes(image, seed, guess, start, rows):
            key, counter = sampling._stream(_stream_seed(seed, _ESTIMATION))
            noise = sampling._noise(key, counter, start, rows, image)
            one_hot = smooth._votes(image + smooth.sigma * noise)
            return tf.cast(one_hot[:, guess], tf.bool)

        scalar = tf.TensorSpec([], tf.int64)
        self._selection = tf.function(selection, autograph=False, input_signature=[
            tf.TensorSpec(shape, tf.float32), scalar, scalar])
        self._votes = tf.function(votes, autograph=False, input_signature=[
            tf.TensorSpec(shape, tf.float32), scalar, scalar, scalar, scalar])

    def record(self, image: np.ndarray, seed: int, n0: int, n: int) -> dict[str, Any]:
        import tensorflow as tf

        image = tf.constant(image[np.newaxis], tf.float32)
        seed_t = tf.constant(seed, tf.int64)
        counts0 = self._selection(image, seed_t, tf.constant(n0, tf.int64)).numpy()[0]
        guess = int(np.argmax(counts0))
        bits = np.empty(n, bool)
        for start in range(0, n, self.batch_size):
            rows = min(self.batch_size, n - start)
            bits[start:start + rows] = self._votes(
                image, seed_t, tf.constant(guess, tf.int64), tf.constant(start, tf.int64),
                tf.constant(rows, tf.int64)).numpy()
        return {"guess": guess, "counts0": counts0, "bits": bits}


def record_votes(checkpoint: str, x: np.ndarray, y: np.ndarray, indices: list[int], *, n0: int,
                 n: int, seed: int, batch_size: int, cache: Path,
                 progress: bool = True) -> dict[str, np.ndarray]:
    """The recorded votes of ``indices`` for ``checkpoint`` (computing what the cache lacks).

    Returns ``idx``, ``label``, ``guess``, ``counts0`` [I, C], ``bits`` (packed, [I, ⌈N/8⌉]),
    ``seconds`` (wall-clock of each image's pass: the cost of CERTIFY's sampling), ``sigma``.
    """
    from smoothmix_tf.ownership import hold_lock
    from smoothmix_tf.training import load_trained

    settings = {"checkpoint_sha256": file_sha256(checkpoint_file(checkpoint)), "n0": n0, "n": n,
                "seed": seed}
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"{Path(checkpoint).resolve().name}-n{n}-seed{seed}.npz"
    base, sigma, _ = load_trained(checkpoint)
    with hold_lock(path):  # one writer per record ("in use by pid N" for a second one)
        rows = _load(path, settings)
        missing = [i for i in indices if i not in rows]
        if missing:
            _record(base, sigma, x, y, missing, rows, path, settings, n0=n0, n=n, seed=seed,
                    batch_size=batch_size, progress=progress)
    keep = [rows[i] for i in indices]
    return {"idx": np.array(indices), "sigma": float(sigma),
            **{name: np.stack([np.asarray(r[name]) for r in keep])
               for name in ("label", "guess", "counts0", "bits", "seconds")}}


def _load(path: Path, settings: dict) -> dict[int, dict]:
    """The rows of an existing record (none if there is none); other settings -> an error."""
    rows: dict[int, dict] = {}
    if path.exists():
        with np.load(path) as stored:
            if json.loads(str(stored["settings"])) != settings:
                raise SystemExit(f"{path} holds votes of other settings "
                                 f"({json.loads(str(stored['settings']))} != {settings}); "
                                 "pass another --cache")
            for k, idx in enumerate(stored["idx"]):
                rows[int(idx)] = {name: stored[name][k] for name in
                                  ("label", "guess", "counts0", "bits", "seconds")}
    return rows


def _record(base, sigma: float, x: np.ndarray, y: np.ndarray, missing: list[int], rows: dict,
            path: Path, settings: dict, *, n0: int, n: int, seed: int, batch_size: int,
            progress: bool) -> None:
    """Record the images ``missing`` into ``rows``, saving ``path`` every 10 images."""
    from smoothmix_tf.certify import Smooth
    from smoothmix_tf.evaluation import input_seed

    smooth = Smooth(base, num_classes=int(base.output_shape[-1]), sigma=sigma)
    recorder = VoteRecorder(smooth, batch_size)
    recorder.record(x[missing[0]], 10 ** 9, n0, min(n, batch_size))  # trace, untimed
    for done, i in enumerate(missing, 1):
        start = time.perf_counter()
        out = recorder.record(x[i], input_seed(seed, i), n0, n)
        rows[i] = {"label": int(y[i]), "guess": out["guess"], "counts0": out["counts0"],
                   "bits": np.packbits(out["bits"]), "seconds": time.perf_counter() - start}
        if done % 10 == 0 or done == len(missing):
            _save(path, rows, settings)
        if progress:
            print(f"\rσ={sigma}: recorded {done}/{len(missing)} images "
                  f"({rows[i]['seconds']:.1f} s/image)", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)


def _save(path: Path, rows: dict[int, dict], settings: dict) -> None:
    order = sorted(rows)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, settings=json.dumps(settings), idx=np.array(order),
             **{name: np.stack([np.asarray(rows[i][name]) for i in order])
                for name in ("label", "guess", "counts0", "bits", "seconds")})
    os.replace(tmp, path)


def vote_prefix(bits: np.ndarray, n: int) -> np.ndarray:
    """Packed bits [I, ⌈n/8⌉] -> prefix counts int32 [I, n + 1] (prefix[i, j] = votes for ĉ_A
    among samples [0, j) of image i)."""
    unpacked = np.unpackbits(bits, axis=1, count=n).astype(np.int32)
    return np.concatenate([np.zeros((len(bits), 1), np.int32), np.cumsum(unpacked, axis=1,
                                                                         dtype=np.int32)], axis=1)


def recorded_sampler(prefix):
    """A ``sequential.VoteSampler`` over recorded votes: (start [B], stop [B]) -> votes for ĉ_A
    on samples [start_i, stop_i) of image i (0 for an empty range), int64."""
    import tensorflow as tf

    prefix = tf.convert_to_tensor(prefix, tf.int32)

    def sample_votes(start, stop):
        stop = tf.maximum(stop, start)
        votes = (tf.gather(prefix, stop, axis=1, batch_dims=1)
                 - tf.gather(prefix, start, axis=1, batch_dims=1))
        return tf.cast(votes, tf.int64)
    return sample_votes
