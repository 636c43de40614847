"""Subprocess helper of tests/test_distribute.py (TensorFlow's set-up must precede its start).

    python _distribute_worker.py mirrored OUT.json
        two logical CPUs, MirroredStrategy: a two-replica step with injected draws vs the
        single-device step on the same global batch and draws; model.fit under the strategy,
        with 1 and with 4 steps per execution.
    python _distribute_worker.py multiworker INDEX PORT0,PORT1 OUT.npz
        one worker of a two-worker MultiWorkerMirroredStrategy cluster on 127.0.0.1 (TF_CONFIG
        set here): tiny ``SmoothedModel.fit`` runs; writes the final weights and losses.
    python _distribute_worker.py single OUT.npz
        the same runs on one device (the reference for the multi-worker runs).
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

GLOBAL_BATCH = 16
SIGMA = 0.25
CLASSES = 3


def configure_two_cpus() -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


def toy_data(n: int, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, n)
    x = np.full((n, 6, 6, 1), 0.1, np.float32)
    for c in range(CLASSES):  # class c lights up rows 2c, 2c+1
        x[y == c, 2 * c: 2 * c + 2] = 0.9
    x += rng.uniform(0.0, 0.05, x.shape).astype(np.float32)
    return x, y.astype(np.int64)


def tiny_base(seed: int = 0):
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((6, 6, 1))
    h = keras.layers.Flatten()(inp)
    h = keras.layers.Dense(12, activation="tanh", name="hidden")(h)
    return keras.Model(inp, keras.layers.Dense(CLASSES, name="logits")(h))


def deterministic_gaussian():
    """Gaussian objective whose 'noise' is a fixed function of the image (no seed, no replica id).

    Each replica then draws exactly its slice of the global draw, so a multi-worker run can be
    compared with a one-device run step for step.
    """
    import tensorflow as tf

    from smoothmix_tf.objectives import Gaussian

    class DeterministicNoise(Gaussian):
        def draw(self, x, sigma, seed):
            copies = [tf.sin(37.0 * x + 11.0 * i) for i in range(self.noise_samples)]
            return {"noise": sigma * tf.stack(copies)}

    return DeterministicNoise(noise_samples=2)


def objectives_under_test() -> dict:
    """Gaussian always; SmoothMix when smoothmix_tf.objectives provides it."""
    import importlib.util

    from smoothmix_tf import objectives

    if importlib.util.find_spec("smoothmix_tf.objectives.smoothmix") is not None:
        importlib.import_module("smoothmix_tf.objectives.smoothmix")  # registers "smoothmix"
    found = {"gaussian": objectives.Gaussian(noise_samples=2)}
    if "smoothmix" in objectives.REGISTRY:
        try:
            found["smoothmix"] = objectives.get("smoothmix", noise_samples=2, attack_steps=2,
                                                step_size=0.5, eta=2.0, one_step_adversary=False)
        except TypeError:  # different hyperparameter names: the defaults are fine here
            found["smoothmix"] = objectives.get("smoothmix")
    return found


def build_model(objective, optimizer_momentum: float = 0.9, steps_per_execution: int = 1):
    import keras

    from smoothmix_tf.model import SmoothedModel

    model = SmoothedModel(tiny_base(0), sigma=SIGMA, objective=objective, weight_decay=1e-3, seed=3)
    model.compile(optimizer=keras.optimizers.SGD(0.1, momentum=optimizer_momentum),
                  steps_per_execution=steps_per_execution)
    model.optimizer.build(model.trainable_variables)
    return model


def batch_axes(objective, x) -> dict:
    """Batch axis of every draw: the one axis whose size follows the batch size."""
    import tensorflow as tf

    seed = tf.constant([1, 2], tf.int64)
    full = objective.draw(x, SIGMA, seed)
    half = objective.draw(x[: x.shape[0] // 2], SIGMA, seed)
    axes = {}
    for key in full:
        changed = [a for a, (p, q) in enumerate(zip(full[key].shape, half[key].shape)) if p != q]
        if len(changed) != 1:
            raise RuntimeError(f"cannot tell the batch axis of draw {key!r}: "
                               f"{full[key].shape} vs {half[key].shape}")
        axes[key] = changed[0]
    return axes


def run_mirrored(out: str) -> None:
    configure_two_cpus()
    import numpy as np
    import tensorflow as tf

    from smoothmix_tf.distribute import make_strategy, split_for_replicas

    strategy = make_strategy("mirrored")
    replicas = strategy.num_replicas_in_sync
    x_np, y_np = toy_data(GLOBAL_BATCH, seed=1)
    x, y = tf.constant(x_np), tf.constant(y_np)
    report: dict = {"replicas": replicas, "objectives": {}}
    for name, objective in objectives_under_test().items():
        single = build_model(objective)
        with strategy.scope():
            mirrored = build_model(objective)
        initial = [w.numpy().copy() for w in single.trainable_weights]
        same_init = max(float(np.max(np.abs(a.numpy() - b))) for a, b in
                        zip(mirrored.trainable_weights, initial))
        axes = batch_axes(objective, x)

        @tf.function
        def mirrored_step(dist_args):
            return strategy.run(mirrored.apply_objective, args=dist_args)

        single_step = tf.function(single.apply_objective)
        for step in range(3):
            draws = objective.draw(x, SIGMA, tf.constant([7, step], tf.int64))
            single_step(x, y, draws)

            def per_replica(ctx, draws=draws):
                rid = ctx.replica_id_in_sync_group
                return (split_for_replicas(x, 0, rid, replicas),
                        split_for_replicas(y, 0, rid, replicas),
                        {k: split_for_replicas(v, axes[k], rid, replicas)
                         for k, v in draws.items()})

            mirrored_step(strategy.experimental_distribute_values_from_function(per_replica))
        diffs = [float(np.max(np.abs(a.numpy() - b.numpy())))
                 for a, b in zip(mirrored.trainable_weights, single.trainable_weights)]
        moved = [float(np.max(np.abs(w.numpy() - w0)))
                 for w, w0 in zip(single.trainable_weights, initial)]
        report["objectives"][name] = {"max_weight_diff": max(diffs), "max_moved": max(moved),
                                      "initial_diff": same_init,
                                      "steps_single": int(single.optimizer.iterations.numpy()),
                                      "steps_mirrored": int(mirrored.optimizer.iterations.numpy())}

    # plain model.fit under the strategy (random draws, Keras' own dataset distribution)
    from smoothmix_tf.objectives import Gaussian

    x_fit, y_fit = toy_data(96, seed=2)
    with strategy.scope():
        model = build_model(Gaussian(noise_samples=2))
    ds = tf.data.Dataset.from_tensor_slices((x_fit, y_fit)).batch(GLOBAL_BATCH)
    history = model.fit(ds, epochs=5, validation_data=ds.take(2), verbose=0).history
    report["fit"] = {"loss": history["loss"], "noisy_accuracy": history["noisy_accuracy"],
                     "val_noisy_accuracy": history["val_noisy_accuracy"]}

    # steps_per_execution under the strategy: 4 steps per call (6 steps per epoch: a full and a
    # partial call) against 1, random draws; the same weights are expected. Keras 3.15 fails here
    # (keras-team/keras#19246), which is why TrainConfig refuses the combination: record it.
    runs, initial = {}, {}
    try:
        for steps_per_execution in (1, 4):
            with strategy.scope():
                model = build_model(Gaussian(noise_samples=2),
                                    steps_per_execution=steps_per_execution)
            initial[steps_per_execution] = [w.numpy().copy() for w in model.trainable_weights]
            history = model.fit(ds, epochs=2, verbose=0).history
            runs[steps_per_execution] = ([w.numpy() for w in model.trainable_weights], history,
                                         int(model.optimizer.iterations.numpy()))
    except Exception as error:  # any failure is reported, not fatal to the other tests
        lines = str(error).splitlines() or [type(error).__name__]
        report["steps_per_execution"] = {
            "error": f"{type(error).__name__}: "
                     + next((line.strip() for line in lines if "placeholder" in line), lines[0])}
    else:
        (one, history_one, steps_one), (four, history_four, steps_four) = runs[1], runs[4]
        report["steps_per_execution"] = {
            "error": None,
            "max_weight_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(one, four)),
            "max_moved": max(float(np.max(np.abs(a - b))) for a, b in zip(one, initial[1])),
            "max_initial_diff": max(float(np.max(np.abs(a - b)))
                                    for a, b in zip(initial[1], initial[4])),
            "loss_one": history_one["loss"], "loss_four": history_four["loss"],
            "iterations": [steps_one, steps_four]}
    with open(out, "w") as f:
        json.dump(report, f)


def train_runs(strategy, save_to: str | None = None) -> dict:
    """Tiny SmoothedModel.fit runs (deterministic-draw and random Gaussian); final weights.

    ``save_to``: also ``model.save`` the Gaussian run there (every worker saves, as training does).
    """
    import numpy as np
    import tensorflow as tf

    from smoothmix_tf.distribute import enable_multiworker_fit, shard_by_data
    from smoothmix_tf.objectives import Gaussian

    x, y = toy_data(64, seed=4)
    x_val, y_val = toy_data(37, seed=5)  # 37: an uneven last validation batch
    results = {}
    for name, objective in (("deterministic", deterministic_gaussian()),
                            ("gaussian", Gaussian(noise_samples=2))):
        with strategy.scope():
            model = build_model(objective)
        enable_multiworker_fit(model, strategy)
        train = shard_by_data(tf.data.Dataset.from_tensor_slices((x, y))
                              .batch(GLOBAL_BATCH, drop_remainder=True))
        val = shard_by_data(tf.data.Dataset.from_tensor_slices((x_val, y_val)).batch(GLOBAL_BATCH))
        history = model.fit(train, epochs=2, validation_data=val, verbose=0).history
        for i, w in enumerate(model.trainable_weights):
            results[f"{name}/w{i}"] = w.numpy()
        results[f"{name}/loss"] = np.array(history["loss"])
        results[f"{name}/val_loss"] = np.array(history["val_loss"])
        results[f"{name}/iterations"] = np.array(int(model.optimizer.iterations.numpy()))
        results[f"{name}/rng_step"] = np.array(int(model.rng_step.numpy()))
        if save_to and name == "gaussian":
            model.save(save_to)
    results["replicas"] = np.array(strategy.num_replicas_in_sync)
    return results


def run_multiworker(index: int, ports: str, out: str) -> None:
    workers = [f"127.0.0.1:{p}" for p in ports.split(",")]
    os.environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": workers},
                                          "task": {"type": "worker", "index": index}})
    import numpy as np

    from smoothmix_tf.distribute import is_multi_worker, make_strategy, worker_index

    strategy = make_strategy("multiworker")
    results = train_runs(strategy, save_to=out[: -len(".npz")] + ".keras")
    results["multi_worker"] = np.array(is_multi_worker(strategy))
    results["worker_index"] = np.array(worker_index(strategy))
    np.savez(out, **results)


def run_single(out: str) -> None:
    import numpy as np

    from smoothmix_tf.distribute import make_strategy

    np.savez(out, **train_runs(make_strategy("default")))


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "mirrored":
        run_mirrored(*args)
    elif mode == "multiworker":
        run_multiworker(int(args[0]), args[1], args[2])
    elif mode == "single":
        run_single(*args)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
