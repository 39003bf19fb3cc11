"""The onnx, mlflow and oip challenger kinds score the demo's models as scikit-learn does.

Each kind is loaded from a challengers file (the worker's own loading path) and run
through the worker's :class:`Runner` (its isolation and deadline); the OIP kind talks to
a real MLServer started here. A kind's tests skip only when its optional extra is absent.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shadowpipe.config import ConfigError
from shadowpipe.demo.world import World
from shadowpipe.processors.shadow.challengers import ChallengerSpec, load, load_specs
from shadowpipe.processors.shadow.models import SklearnModel
from shadowpipe.processors.shadow.runner import Result, Runner

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def world() -> World:
    return World.build()


@pytest.fixture(scope="module")
def records(world: World) -> list[dict[str, Any]]:
    return [{"request_id": r.request_id, "num_features": r.features, "cat_features": {},
             "null_features": []} for r in world.requests(400, seed=3)]


def reference(model: Any, names: list[str], records: list[dict[str, Any]]) -> list[Result]:
    return score(SklearnModel(model, names), records)


def score(model: Any, records: list[dict[str, Any]], timeout_ms: int = 30_000) -> list[Result]:
    runner = Runner("kind", model, timeout_ms)
    try:
        return runner.collect(runner.submit(records))
    finally:
        runner.close()


def assert_same(got: list[Result], want: list[Result]) -> None:
    assert len(got) == len(want)
    assert all(r.error is None for r in got), [r.error for r in got if r.error][:3]
    assert [r.output["label"] for r in got] == [r.output["label"] for r in want]
    for g, w in zip(got, want, strict=True):
        assert list(g.output["probabilities"]) == list(w.output["probabilities"])
        diff = max(abs(g.output["probabilities"][c] - p)
                   for c, p in w.output["probabilities"].items())
        assert diff <= TOLERANCE


def from_file(tmp_path: Path, body: str) -> Any:
    """The single challenger of a challengers file holding ``body``, loaded."""
    from shadowpipe.config import Settings

    path = tmp_path / "challengers.toml"
    path.write_text('[[challengers]]\nname = "c"\nversion = "1"\n' + body)
    (spec,) = load_specs(Settings.load(env={"SHADOWPIPE_CHALLENGERS": str(path)}))
    return load(spec)


def toml_list(names: list[str]) -> str:
    return "[" + ", ".join(f'"{n}"' for n in names) + "]"


# -- onnx ------------------------------------------------------------------------------


def primary_onnx(world: World, tmp_path: Path, **options: Any) -> str:
    """The demo's primary converted to ``tmp_path/m.onnx``; the challenger body naming it."""
    from skl2onnx import to_onnx

    cols = [world.names.index(n) for n in world.primary_features]
    onnx = to_onnx(world.primary, world.x[:1, cols].astype(np.float32), options=options)
    (tmp_path / "m.onnx").write_bytes(onnx.SerializeToString())
    return f'kind = "onnx"\nlocation = "m.onnx"\nfeatures = {toml_list(world.primary_features)}\n'


def test_onnx_scores_the_demo_models_as_sklearn(world: World, records: list[dict[str, Any]],
                                                tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from skl2onnx import to_onnx

    cols = [world.names.index(n) for n in world.primary_features]
    cases = [(world.primary, world.primary_features, world.x[:1, cols]),
             (world.challenger, world.names, world.x[:1])]
    for i, (estimator, names, sample) in enumerate(cases):
        file = tmp_path / f"m{i}.onnx"
        file.write_bytes(to_onnx(estimator, sample.astype(np.float32)).SerializeToString())
        model = from_file(tmp_path, f'kind = "onnx"\nlocation = "{file.name}"\n'
                                    f"features = {toml_list(names)}\n")
        assert not model._zipmap  # the ZipMap was replaced by its probability tensor
        assert_same(score(model, records), reference(estimator, names, records))


def test_onnx_zipmap_read_as_maps_without_the_onnx_package(
        world: World, records: list[dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("onnxruntime")
    body = primary_onnx(world, tmp_path)
    monkeypatch.setitem(sys.modules, "onnx", None)  # onnxruntime alone: the ZipMap stays
    model = from_file(tmp_path, body)
    assert model._zipmap
    want = reference(world.primary, world.primary_features, records)
    assert_same(score(model, records), want)


def test_onnx_probability_tensor_needs_classes(world: World, records: list[dict[str, Any]],
                                               tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    base = primary_onnx(world, tmp_path, zipmap=False)
    with pytest.raises(ConfigError, match="challenger 'c': .*set classes"):
        from_file(tmp_path, base)
    classes = [str(c) for c in world.primary.classes_]
    model = from_file(tmp_path, base + f"classes = {toml_list(classes)}\n")
    want = reference(world.primary, world.primary_features, records)
    assert_same(score(model, records), want)


def test_onnx_record_missing_a_feature_fails_alone(world: World, records: list[dict[str, Any]],
                                                   tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = from_file(tmp_path, primary_onnx(world, tmp_path))
    broken = dict(records[1], num_features={
        k: v for k, v in records[1]["num_features"].items() if k != "mean_radius"})
    got = score(model, [records[0], broken, records[2]])
    assert [r.error_kind for r in got] == [None, "exception", None]
    assert "missing feature" in got[1].error


# -- mlflow ----------------------------------------------------------------------------


def _save_mlflow(world: World, folder: Path) -> None:
    import mlflow.sklearn
    import pandas as pd
    from mlflow.models import infer_signature

    x = pd.DataFrame(world.x[:50, [world.names.index(n) for n in world.primary_features]],
                     columns=world.primary_features)
    mlflow.sklearn.save_model(
        world.primary, folder, serialization_format="pickle",
        signature=infer_signature(x, world.primary.predict_proba(x)),
        pyfunc_predict_fn="predict_proba")


def test_mlflow_directory_scores_the_demo_model_as_sklearn(
        world: World, records: list[dict[str, Any]], tmp_path: Path) -> None:
    pytest.importorskip("mlflow")
    _save_mlflow(world, tmp_path / "model")
    base = 'kind = "mlflow"\nlocation = "model"\n'
    with pytest.raises(ConfigError, match="challenger 'c': .*set classes"):
        from_file(tmp_path, base)
    classes = [str(c) for c in world.primary.classes_]
    # features: from the model's signature
    model = from_file(tmp_path, base + f"classes = {toml_list(classes)}\n")
    want = reference(world.primary, world.primary_features, records)
    assert_same(score(model, records), want)


def test_mlflow_registry_uri_with_tracking_uri(
        world: World, records: list[dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    import mlflow
    import mlflow.sklearn

    # The file store is MLflow's serverless tracking backend (no SQL database needed).
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = (tmp_path / "mlruns").as_uri()
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    mlflow.set_experiment("kinds")
    with mlflow.start_run():
        mlflow.sklearn.log_model(world.primary, name="model", serialization_format="pickle",
                                 registered_model_name="demo-primary")
    mlflow.set_tracking_uri("")  # the challenger's own tracking_uri must do the resolving
    mlflow.set_registry_uri("")
    model = from_file(tmp_path, f'kind = "mlflow"\nlocation = "models:/demo-primary/1"\n'
                                f'tracking_uri = "{store}"\n'
                                f"features = {toml_list(world.primary_features)}\n")
    got = score(model, records)
    want = reference(world.primary, world.primary_features, records)
    assert [r.output["label"] for r in got] == [r.output["label"] for r in want]
    with pytest.raises(ConfigError, match="challenger 'c': cannot load mlflow"):
        from_file(tmp_path, f'kind = "mlflow"\nlocation = "models:/no-such-model/1"\n'
                            f'tracking_uri = "{store}"\n')


# -- oip -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mlserver(world: World, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    pytest.importorskip("mlserver_sklearn")
    pytest.importorskip("orjson")
    import joblib

    from tests import oip_server

    folder = tmp_path_factory.mktemp("mlserver")
    joblib.dump(world.primary, folder / "primary.joblib")
    joblib.dump(world.challenger, folder / "gbm.joblib")
    server = oip_server.start(folder, {"primary": folder / "primary.joblib",
                                       "gbm": folder / "gbm.joblib"})
    yield server
    server.stop()


def oip_body(url: str, names: list[str], classes: list[str], extra: str = "") -> str:
    return (f'kind = "oip"\nlocation = "{url}"\nfeatures = {toml_list(names)}\n'
            f'outputs = ["predict_proba"]\nclasses = {toml_list(classes)}\n{extra}')


def test_oip_scores_the_demo_models_as_sklearn(world: World, records: list[dict[str, Any]],
                                               mlserver: Any, tmp_path: Path) -> None:
    classes = [str(c) for c in world.primary.classes_]
    for name, estimator, names in (("primary", world.primary, world.primary_features),
                                   ("gbm", world.challenger, world.names)):
        model = from_file(tmp_path, oip_body(mlserver.url(name), names, classes,
                                             "max_batch = 150\n"))
        try:
            assert_same(score(model, records), reference(estimator, names, records))
        finally:
            model.close()


def test_oip_labels_only_without_requested_outputs(
        world: World, records: list[dict[str, Any]], mlserver: Any, tmp_path: Path) -> None:
    model = from_file(tmp_path, f'kind = "oip"\nlocation = "{mlserver.url("primary")}"\n'
                                f"features = {toml_list(world.primary_features)}\n")
    got = score(model, records[:50])
    model.close()
    assert [r.output["label"] for r in got] == list(world.primary.predict(np.array(
        [[r["num_features"][n] for n in world.primary_features] for r in records[:50]])))
    assert all(r.output["probabilities"] == {} for r in got)


def test_oip_wrong_model_or_url_stops_startup(world: World, mlserver: Any,
                                              tmp_path: Path) -> None:
    names = world.primary_features
    bad = [
        (mlserver.url("nope"), "challenger 'c': cannot load oip .*HTTP 404"),
        (f"http://127.0.0.1:{mlserver.port}/v1/models/primary:predict", "/v2/models/<name>"),
        ("ftp://example.com/v2/models/x", "is not an http"),
    ]
    for url, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_file(tmp_path, f'kind = "oip"\nlocation = "{url}"\n'
                                f"features = {toml_list(names)}\n")


def test_oip_unreachable_server_stops_startup(tmp_path: Path) -> None:
    pytest.importorskip("orjson")
    from shadowpipe.stack import free_port

    url = f"http://127.0.0.1:{free_port()}/v2/models/m"
    with pytest.raises(ConfigError, match="challenger 'c': cannot load oip .*cannot reach"):
        from_file(tmp_path, f'kind = "oip"\nlocation = "{url}"\nfeatures = ["a"]\n')


# -- misconfiguration --------------------------------------------------------------------


def test_missing_model_file_names_the_challenger(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="challenger 'c': cannot load onnx .*no ONNX model"):
        from_file(tmp_path, 'kind = "onnx"\nlocation = "gone.onnx"\nfeatures = ["a"]\n')
    with pytest.raises(ConfigError, match="challenger 'c': cannot load mlflow"):
        from_file(tmp_path, 'kind = "mlflow"\nlocation = "no-such-dir"\n')


@pytest.mark.parametrize(("kind", "module", "extra"), [
    ("onnx", "onnxruntime", "onnx"), ("mlflow", "mlflow", "mlflow"), ("oip", "orjson", "oip")])
def test_missing_extra_says_what_to_install(kind: str, module: str, extra: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import module` fail as if the package were not installed.
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)
    location = "http://127.0.0.1:1/v2/models/m" if kind == "oip" else __file__
    spec = ChallengerSpec("c", "1", kind, location, features=("a",))
    with pytest.raises(ConfigError) as err:
        load(spec)
    assert f"install the {extra} extra (pip install 'shadowpipe[{extra}]')" in str(err.value)
    assert "challenger 'c'" in str(err.value)


def test_oip_record_missing_or_nan_feature_fails_alone(
        world: World, records: list[dict[str, Any]], mlserver: Any, tmp_path: Path) -> None:
    classes = [str(c) for c in world.primary.classes_]
    model = from_file(tmp_path, oip_body(mlserver.url("primary"), world.primary_features,
                                         classes))
    missing = dict(records[1], num_features={
        k: v for k, v in records[1]["num_features"].items() if k != "mean_area"})
    nan = dict(records[3], num_features=dict(records[3]["num_features"],
                                             mean_texture=float("nan")))
    batch = [records[0], missing, records[2], nan, records[4]]
    got = score(model, batch)
    model.close()
    assert [r.error_kind for r in got] == [None, "exception", None, "exception", None]
    want = reference(world.primary, world.primary_features, [records[i] for i in (0, 2, 4)])
    assert_same([got[0], got[2], got[4]], want)


def test_docs_have_a_valid_example_of_each_kind() -> None:
    import re
    import tomllib

    from shadowpipe.processors.shadow.challengers import parse_specs

    docs = (Path(__file__).resolve().parents[1] / "docs" / "challengers.md").read_text()
    kinds = set()
    for block in re.findall(r"```toml\n(.*?)```", docs, re.S):
        for spec in parse_specs(tomllib.loads(block), 1000):
            kinds.add(spec.kind)
    assert {"onnx", "mlflow", "oip"} <= kinds


def test_oip_reopens_a_dropped_keep_alive_connection_once(
        world: World, records: list[dict[str, Any]], mlserver: Any, tmp_path: Path) -> None:
    import socket

    classes = [str(c) for c in world.primary.classes_]
    model = from_file(tmp_path, oip_body(mlserver.url("primary"), world.primary_features,
                                         classes))
    want = reference(world.primary, world.primary_features, records[:20])
    runner = Runner("kind", model, 30_000)
    try:
        assert_same(runner.collect(runner.submit(records[:20])), want)
        # as when the server closes an idle connection: the next call must not fail for it
        model._idle[0].sock.shutdown(socket.SHUT_RDWR)
        assert_same(runner.collect(runner.submit(records[:20])), want)
    finally:
        runner.close()
