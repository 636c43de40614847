"""Small client for a smoothmix-tf model served by TF Serving: REST (standard library only) and gRPC.

Standalone: it needs neither smoothmix_tf nor TensorFlow for REST (NumPy is optional: any nested
lists of pixels work). gRPC needs ``pip install tensorflow-serving-api`` (it brings grpcio and
tensorflow); it is imported only when used.

    # CERTIFY two synthetic digits through REST (server started with export/serve.sh)
    python export/client.py --server http://localhost:8501 --model smoothmix --signature certify --example
    # your own images: a .npy array [batch, H, W, C] (float in [0, 1], or uint8 with *_uint8)
    python export/client.py --server http://localhost:8501 --signature certify_seeded \\
        --images digits.npy --seed 11 12 13
    # sequential CERTIFY (export-time seed, alpha and max_n = n): is each image certified at a
    # radius (one per image, or one for all), or the largest radius, stopping early when easy
    python export/client.py --server http://localhost:8501 --signature certify_at \\
        --images digits.npy --radius 0.25 0.5 0.5
    python export/client.py --server http://localhost:8501 --signature certify_sequential --example
    # gRPC (port 8500)
    python export/client.py --grpc localhost:8500 --signature certify --example
    # regenerate the example request bodies in export/requests/
    python export/client.py --write-examples export/requests

REST bodies follow TF Serving's documented predict API
(https://www.tensorflow.org/tfx/serving/api_rest): the row format
``{"signature_name": S, "instances": [{"images": ..., "seed": ...}, ...]}`` (one object per image)
or the columnar format ``{"signature_name": S, "inputs": {"images": [...], "seed": [...]}}``
(``certify_at``: ``"radius"`` in place of ``"seed"``); answers come back as
``{"predictions": [...]}`` or ``{"outputs": {...}}``.
"""

from __future__ import annotations

import argparse
import json
import math
import numbers
import sys
import urllib.error
import urllib.request
from pathlib import Path
from collections.abc import Sequence
from typing import Any

IMAGES = "images"
SEED = "seed"
RADIUS = "radius"
SIGNATURES = ("serving_default", "predict", "predict_uint8", "predict_seeded",
              "predict_seeded_uint8", "certify", "certify_uint8", "certify_seeded",
              "certify_seeded_uint8", "probabilities", "probabilities_uint8",
              "certify_at", "certify_sequential")
# sequential CERTIFY (docs/sequential.md): float32 images only, the export-time seed, alpha and
# max_n = the export's n; no *_uint8 / *_seeded variants are exported
SEQUENTIAL = ("certify_at", "certify_sequential")
FLOAT32_MAX = 3.4028234663852886e38
SINGLE_OUTPUT = {"probabilities": "probabilities", "probabilities_uint8": "probabilities"}
LAYOUTS = ("instances", "inputs")
GRPC_INSTALL = ("gRPC needs the TF Serving API package: pip install tensorflow-serving-api "
                "(it brings grpcio and tensorflow). REST (--server) needs nothing extra.")


class ServingError(RuntimeError):
    """TF Serving answered with an error (e.g. INVALID_ARGUMENT for a bad request)."""


# ------------------------------------------------------------------------------------------------
# request bodies
# ------------------------------------------------------------------------------------------------
def takes_uint8(signature: str) -> bool:
    """``*_uint8`` signatures take uint8 pixels in [0, 255]; the others float32 in [0, 1]."""
    return signature.endswith("_uint8")


def takes_seed(signature: str) -> bool:
    """``*_seeded*`` signatures take a second input ``seed`` (int64, one per image)."""
    return "_seeded" in signature


def takes_radius(signature: str) -> bool:
    """``certify_at`` takes a second input ``radius`` (float32, one l2 radius >= 0 per image)."""
    return signature == "certify_at"


def _nested(value: Any, uint8: bool) -> Any:
    """Nested lists of Python numbers (ints for uint8 inputs) from NumPy arrays or lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        return [_nested(v, uint8) for v in value]
    if isinstance(value, bool):
        raise TypeError("pixel values must be numbers, not booleans")
    return int(value) if uint8 else float(value)


def _seeded_name(signature: str) -> str | None:
    """The ``*_seeded`` variant of a signature, if the export has one."""
    name = signature.replace("_uint8", "") + "_seeded" + ("_uint8" if takes_uint8(signature)
                                                           else "")
    return name if name in SIGNATURES else None


def _check_radii(radii: Any, batch: int, signature: str) -> list[float] | None:
    """One finite l2 radius >= 0 per image (a single number: every image), as Python floats."""
    if not takes_radius(signature):
        if radii is not None:
            hint = ("it finds the largest certified radius itself; to ask whether a given "
                    "radius is certified use signature certify_at"
                    if signature == "certify_sequential" else
                    "only certify_at takes radii: use signature certify_at (CLI: --signature "
                    "certify_at --radius R [R ...]), or drop the radii")
            raise ValueError(f"signature {signature} has no radius input: {hint}")
        return None
    if radii is None:
        raise ValueError(f"signature {signature} takes one l2 radius per image: pass radii "
                         f"({batch} numbers >= 0, or one number for every image; CLI: --radius "
                         f"R [R ...])")
    if hasattr(radii, "tolist"):
        radii = radii.tolist()
    if not isinstance(radii, (list, tuple)):
        radii = [radii] * batch
    if len(radii) != batch:
        raise ValueError(f"signature {signature} takes one radius per image: got {len(radii)} "
                         f"radii for {batch} images (pass {batch}, or one number for every "
                         f"image)")
    checked = []
    for i, radius in enumerate(radii):
        if isinstance(radius, bool) or not isinstance(radius, numbers.Real):
            raise TypeError(f"radius[{i}] = {radius!r} is not a number: pass l2 radii as "
                            "numbers >= 0")
        radius = float(radius)
        if not math.isfinite(radius) or radius < 0.0 or radius > FLOAT32_MAX:
            raise ValueError(f"radius[{i}] = {radius!r} is not a finite l2 radius >= 0 (in "
                             "[0, 1] pixel units, float32): pass e.g. 0.25")
        checked.append(radius)
    return checked


def _check_request(images: Sequence, signature: str, seeds: Sequence[int] | None,
                   radii: Any = None) -> list[float] | None:
    """Checks a request before it is sent; returns the radii (one float per image) or None."""
    if signature not in SIGNATURES:
        raise ValueError(f"unknown signature {signature!r}; choose one of {', '.join(SIGNATURES)}")
    if len(images) == 0:
        raise ValueError("no images: send a batch [batch, H, W, C] with at least one image")
    if takes_seed(signature):
        if seeds is None or len(seeds) != len(images):
            raise ValueError(f"signature {signature} takes one seed per image: pass "
                             f"{len(images)} seeds (got {None if seeds is None else len(seeds)})")
    elif seeds is not None:
        seeded = _seeded_name(signature)
        if seeded is not None:
            hint = f"use {seeded} to send seeds"
        elif signature in SEQUENTIAL:
            hint = ("it uses the export-time seed (returned as output seed); drop the seeds, or "
                    "use certify_seeded for CERTIFY with your own seeds")
        else:
            hint = "drop the seeds (the signature does not draw noise)"
        raise ValueError(f"signature {signature} has no seed input: {hint}")
    return _check_radii(radii, len(images), signature)


def rest_payload(images: Sequence, signature: str = "serving_default",
                 seeds: Sequence[int] | None = None, layout: str = "instances",
                 radii: Sequence[float] | float | None = None) -> dict:
    """The JSON body of a TF Serving REST predict request.

    ``layout="instances"`` (row format): one object ``{"images": H×W×C, "seed": s}`` per image;
    ``layout="inputs"`` (columnar format): ``{"images": B×H×W×C, "seed": [s, ...]}``.
    ``seeds`` only for ``*_seeded*``; ``radii`` (one l2 radius per image, or one number for every
    image) only and always for ``certify_at``, sent as ``"radius"``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    uint8 = takes_uint8(signature)
    images = _nested(images, uint8)
    radii = _check_request(images, signature, seeds, radii)
    extra: dict[str, list] = {}
    if seeds is not None:
        extra[SEED] = [int(s) for s in seeds]
    if radii is not None:
        extra[RADIUS] = radii
    if layout == "instances":
        rows = [{IMAGES: image, **{name: column[i] for name, column in extra.items()}}
                for i, image in enumerate(images)]
        return {"signature_name": signature, "instances": rows}
    return {"signature_name": signature, "inputs": {IMAGES: images, **extra}}


def parse_rest_response(body: dict, signature: str = "certify") -> dict[str, list]:
    """``{output name: list over images}`` from a REST answer in either format."""
    if "error" in body:
        raise ServingError(body["error"])
    single = SINGLE_OUTPUT.get(signature, "output")
    if "predictions" in body:
        rows = body["predictions"]
        if rows and isinstance(rows[0], dict):
            return {key: [row[key] for row in rows] for key in rows[0]}
        return {single: list(rows)}
    if "outputs" in body:
        outputs = body["outputs"]
        return dict(outputs) if isinstance(outputs, dict) else {single: outputs}
    raise ServingError(f"unexpected answer (no predictions/outputs): {str(body)[:200]}")


# ------------------------------------------------------------------------------------------------
# REST
# ------------------------------------------------------------------------------------------------
def predict_url(server: str, model: str, version: int | None = None) -> str:
    """``http://host:8501/v1/models/<model>[/versions/<version>]:predict``."""
    url = f"{server.rstrip('/')}/v1/models/{model}"
    return (f"{url}/versions/{int(version)}" if version is not None else url) + ":predict"


def post_json(url: str, payload: dict, timeout: float = 600.0) -> dict:
    """POST ``payload`` as JSON; the decoded answer (TF Serving's error text raised as
    :class:`ServingError`)."""
    request = urllib.request.Request(url, data=json.dumps(payload).encode("utf-8"),
                                     headers={"Content-Type": "application/json"},
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as error:
        text = error.read().decode("utf-8", "replace")
        try:
            text = json.loads(text).get("error", text)
        except ValueError:
            pass
        raise ServingError(f"HTTP {error.code}: {text}") from None


def rest_predict(server: str, model: str, images: Sequence, signature: str = "serving_default",
                 seeds: Sequence[int] | None = None, layout: str = "instances",
                 version: int | None = None, timeout: float = 600.0, *,
                 radii: Sequence[float] | float | None = None) -> dict[str, list]:
    """Send one REST predict request; ``{output: list over images}``. CERTIFY with n = 100,000
    takes seconds per image on a CPU: keep ``timeout`` (and the server's
    ``--rest_api_timeout_in_ms``) generous. ``radii``: for ``certify_at`` (see
    :func:`rest_payload`)."""
    body = post_json(predict_url(server, model, version),
                     rest_payload(images, signature, seeds, layout, radii), timeout)
    return parse_rest_response(body, signature)


# ------------------------------------------------------------------------------------------------
# gRPC (tensorflow-serving-api, imported lazily)
# ------------------------------------------------------------------------------------------------
def grpc_input_tensors(images: Sequence, signature: str = "serving_default",
                       seeds: Sequence[int] | None = None,
                       radii: Sequence[float] | float | None = None) -> dict:
    """``{input name: TensorProto}`` of a gRPC PredictRequest (needs tensorflow): ``images``,
    and ``seed`` int64 (``*_seeded*``) or ``radius`` float32 (``certify_at``) ``[batch]``."""
    import numpy as np
    import tensorflow as tf

    uint8 = takes_uint8(signature)
    array = np.asarray(images, dtype=np.uint8 if uint8 else np.float32)
    radii = _check_request(array, signature, seeds, radii)
    tensors = {IMAGES: tf.make_tensor_proto(array)}
    if seeds is not None:
        tensors[SEED] = tf.make_tensor_proto(np.asarray(seeds, dtype=np.int64))
    if radii is not None:
        tensors[RADIUS] = tf.make_tensor_proto(np.asarray(radii, dtype=np.float32))
    return tensors


def grpc_predict(target: str, model: str, images: Sequence, signature: str = "serving_default",
                 seeds: Sequence[int] | None = None, version: int | None = None,
                 timeout: float = 600.0, *,
                 radii: Sequence[float] | float | None = None) -> dict[str, Any]:
    """One gRPC Predict call to ``target`` (host:8500); ``{output: NumPy array}``."""
    try:
        import grpc
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc
    except ImportError as error:
        raise SystemExit(f"{GRPC_INSTALL} ({error})") from None
    request = predict_pb2.PredictRequest()
    request.model_spec.name = model
    request.model_spec.signature_name = signature
    if version is not None:
        request.model_spec.version.value = int(version)
    for name, tensor in grpc_input_tensors(images, signature, seeds, radii).items():
        request.inputs[name].CopyFrom(tensor)
    limit = 256 * 1024 * 1024
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    with grpc.insecure_channel(target, options=options) as channel:
        stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
        try:
            response = stub.Predict(request, timeout)
        except grpc.RpcError as error:
            raise ServingError(f"{error.code().name}: {error.details()}") from None
    return {name: tf.make_ndarray(tensor) for name, tensor in response.outputs.items()}


# ------------------------------------------------------------------------------------------------
# reading the answer
# ------------------------------------------------------------------------------------------------
def describe(outputs: dict, signature: str) -> list[str]:
    """One line per image: the class (or abstain / not certified), the radius, the votes (and
    samples used, for the sequential signatures) and the settings the answer holds for."""
    columns = {key: column.tolist() if hasattr(column, "tolist") else list(column)
               for key, column in outputs.items()}
    if "probabilities" in columns:
        return [f"image {i}: base-network probabilities "
                + " ".join(f"{p:.3f}" for p in row) for i, row in enumerate(columns["probabilities"])]
    lines = []
    for i, label in enumerate(columns["classes"]):
        value = {key: column[i] for key, column in columns.items()}
        settings = f"σ={value['sigma']}, n={value['n']}, α={value['alpha']}, seed={value['seed']}"
        if "n0" in value:
            settings += f", n0={value['n0']}"
        votes = f"{value.get('count')} of {value['n']} votes"
        if "samples" in value:  # sequential: stopped after `samples` of at most n
            votes = (f"{value['count']} of {value['samples']} votes, stopped after "
                     f"{value['samples']} of at most {value['n']} samples")
        if "certified" in value:  # certify_at
            radius = f"l2 radius {value['requested_radius']:.4f}"
            verdict = (f"class {label}, certified at {radius}" if value["certified"] else
                       f"not certified at {radius}")
            lines.append(f"image {i}: {verdict} (p_lower {value['p_lower']:.6f}, {votes}; "
                         f"{settings})")
        elif "radius" in value:  # certify, certify_sequential
            verdict = ("abstain" if label < 0 else
                       f"class {label}, certified l2 radius {value['radius']:.4f}")
            lines.append(f"image {i}: {verdict} (p_lower {value['p_lower']:.6f}, {votes}; "
                         f"{settings})")
        else:  # predict
            verdict = "abstain" if label < 0 else f"class {label}"
            lines.append(f"image {i}: {verdict} (top {value['top_count']} vs runner-up "
                         f"{value['runner_up_count']}, p-value {value['p_value']:.3g}; "
                         f"{settings})")
    return lines


# ------------------------------------------------------------------------------------------------
# example requests
# ------------------------------------------------------------------------------------------------
def example_images(height: int = 28, width: int = 28) -> list:
    """Two synthetic digit-like images [2, H, W, 1] in [0, 1]: a "1" (vertical bar) and a "7"."""
    one = [[[0.0] for _ in range(width)] for _ in range(height)]
    seven = [[[0.0] for _ in range(width)] for _ in range(height)]
    top, bottom = height // 5, height - height // 5
    for row in range(top, bottom):
        one[row][width // 2] = [1.0]
        one[row][width // 2 + 1] = [0.5]
        column = max(1, min(width - 1, width - 7 - (row - top) * 2 // 5))
        seven[row][column] = seven[row][column - 1] = [1.0]
    for column in range(width // 4, width - 6):
        seven[top][column] = seven[top + 1][column] = [1.0]
    return [one, seven]


EXAMPLE_SEEDS = (11, 12)
EXAMPLE_RADII = (0.25, 0.5)  # certify_at: the "1" at l2 radius 0.25, the "7" at 0.5


def example_extras(signature: str, batch: int) -> tuple[list[int] | None, list[float] | None]:
    """(seeds, radii) of the example request of ``signature`` for ``batch`` images (None where
    the signature does not take them; cycled when batch > 2)."""
    seeds = [EXAMPLE_SEEDS[i % len(EXAMPLE_SEEDS)] for i in range(batch)] \
        if takes_seed(signature) else None
    radii = [EXAMPLE_RADII[i % len(EXAMPLE_RADII)] for i in range(batch)] \
        if takes_radius(signature) else None
    return seeds, radii


def example_requests(images: Sequence | None = None) -> dict[str, dict]:
    """``{file name: body}`` of one example request per signature and layout."""
    images = example_images() if images is None else images
    uint8_images = [[[[round(v * 255) for v in pixel] for pixel in row] for row in image]
                    for image in images]
    bodies = {}
    for signature in SIGNATURES:
        pixels = uint8_images if takes_uint8(signature) else images
        seeds, radii = example_extras(signature, len(images))
        for layout in LAYOUTS:
            bodies[f"{signature}.{layout}.json"] = rest_payload(pixels, signature, seeds, layout,
                                                                radii)
    return bodies


def _compact(value: Any) -> Any:
    """Whole floats written as integers (JSON ``0`` is read as 0.0 by a float32 input)."""
    if isinstance(value, list):
        return [_compact(v) for v in value]
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    return int(value) if isinstance(value, float) and value.is_integer() else value


def write_example_requests(out_dir: str | Path) -> list[Path]:
    """Write :func:`example_requests` as compact JSON files (one per signature and layout)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, body in example_requests().items():
        path = out / name
        path.write_text(json.dumps(_compact(body), separators=(",", ":")) + "\n")
        written.append(path)
    return written


# ------------------------------------------------------------------------------------------------
def _load_images(path: str, uint8: bool):
    import numpy as np

    array = np.load(path) if path.endswith(".npy") else np.asarray(json.loads(Path(path).read_text()))
    if array.ndim == 3:
        array = array[None]
    return array.astype(np.uint8 if uint8 else np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="REST endpoint, e.g. http://localhost:8501")
    parser.add_argument("--grpc", help="gRPC endpoint, e.g. localhost:8500")
    parser.add_argument("--model", default="smoothmix", help="model name (default smoothmix)")
    parser.add_argument("--version", type=int, help="model version (default: the latest)")
    parser.add_argument("--signature", default="certify", choices=SIGNATURES,
                        help="signature to call (default certify)")
    parser.add_argument("--images", help=".npy or .json array [batch, H, W, C] (or [H, W, C])")
    parser.add_argument("--example", action="store_true",
                        help="send two synthetic 28×28 digits (with the example seeds / radii of "
                             "export/requests/ unless --seed / --radius is given)")
    parser.add_argument("--seed", type=int, nargs="+",
                        help="one seed per image for *_seeded signatures (one value: every image)")
    parser.add_argument("--radius", type=float, nargs="+", metavar="R",
                        help="certify_at only: one l2 radius >= 0 per image, in [0, 1] pixel "
                             "units (one value: every image)")
    parser.add_argument("--layout", choices=LAYOUTS, default="instances",
                        help="REST body format: row (instances) or columnar (inputs)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument("--print-request", action="store_true",
                        help="print the REST body instead of sending it")
    parser.add_argument("--write-examples", metavar="DIR",
                        help="write one example request per signature and layout to DIR, exit")
    args = parser.parse_args(argv)

    if args.write_examples:
        for path in write_example_requests(args.write_examples):
            print(path)
        return 0
    if bool(args.images) == bool(args.example):
        parser.error("pass --images FILE or --example")
    if args.radius is not None and not takes_radius(args.signature):
        parser.error(f"--radius is for --signature certify_at only (got --signature "
                     f"{args.signature}): use --signature certify_at, or drop --radius")
    if takes_radius(args.signature) and args.radius is None and not args.example:
        parser.error("--signature certify_at needs --radius R [R ...]: one l2 radius >= 0 per "
                     "image, or one for every image")
    if not args.print_request and not (args.grpc or args.server):
        parser.error("pass --server URL (REST) or --grpc HOST:PORT")
    uint8 = takes_uint8(args.signature)
    if args.example:
        images = example_images()
        if uint8:
            images = [[[[round(v * 255) for v in p] for p in row] for row in im] for im in images]
    else:
        images = _load_images(args.images, uint8)
    seeds, radii = args.seed, args.radius
    if args.example:
        example_seeds, example_radii = example_extras(args.signature, len(images))
        seeds = example_seeds if seeds is None else seeds
        radii = example_radii if radii is None else radii
    if seeds is not None and len(seeds) == 1 and len(images) > 1:
        seeds = seeds * len(images)
    if radii is not None and len(radii) == 1:
        radii = radii[0]  # one radius for every image
    try:
        if args.print_request:
            print(json.dumps(rest_payload(images, args.signature, seeds, args.layout, radii)))
            return 0
        if args.grpc:
            outputs = grpc_predict(args.grpc, args.model, images, args.signature, seeds,
                                   args.version, args.timeout, radii=radii)
        else:
            outputs = rest_predict(args.server, args.model, images, args.signature, seeds,
                                   args.layout, args.version, args.timeout, radii=radii)
    except (ServingError, ValueError, urllib.error.URLError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    for line in describe(outputs, args.signature):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
