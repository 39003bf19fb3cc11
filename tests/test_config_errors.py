"""Error messages a new user meets (issue 15): a data file given as a model, a challenger
module beside the challengers file, an unreachable ClickHouse. Each is one clear line naming
the setting (ConfigError, exit 2)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from shadowpipe.config import ConfigError, Settings
from shadowpipe.processors.shadow.challengers import load, load_specs


def _specs(tmp_path: Path, body: str) -> list:
    config = tmp_path / "challengers.toml"
    config.write_text(body)
    return load_specs(Settings.load(env={}).replace(challengers=str(config)))


def test_a_csv_given_as_a_sklearn_model_says_it_is_not_a_model_file(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("mean radius,mean texture\n17.99,10.38\n")
    (spec,) = _specs(tmp_path, '[[challengers]]\nname = "m"\nversion = "1"\n'
                               'kind = "sklearn"\nlocation = "data.csv"\n')
    with pytest.raises(ConfigError) as err:
        load(spec)
    text = str(err.value)
    assert text.startswith("SHADOWPIPE_CHALLENGERS [shadow]: challenger 'm': ")
    assert f"{tmp_path / 'data.csv'} is not a model saved with joblib.dump() or pickle" in text
    assert "it is text: CSV or JSON data?" in text and "\n" not in text


def test_challenger_modules_resolve_beside_the_challengers_file(tmp_path: Path) -> None:
    module = f"h3_models_{uuid.uuid4().hex[:8]}"  # new to sys.modules and to sys.path
    (tmp_path / f"{module}.py").write_text("def answer(features):\n    return 'yes'\n")
    specs = _specs(tmp_path, f'''
[[challengers]]
name = "mine"
version = "1"
kind = "callable"
location = "{module}:answer"

[[challengers]]
name = "gone"
version = "1"
kind = "callable"
location = "not_{module}:answer"
''')
    assert load(specs[0]).predict_one({}) == "yes"
    with pytest.raises(ConfigError) as err:
        load(specs[1])
    assert (f"challenger 'gone': cannot load callable from 'not_{module}:answer': "
            f"ModuleNotFoundError: no module named 'not_{module}' beside the challengers file "
            "or on the Python path") in str(err.value)


def test_relative_model_files_resolve_beside_the_challengers_file(tmp_path: Path) -> None:
    import joblib
    from sklearn.linear_model import LinearRegression

    joblib.dump(LinearRegression().fit([[0.0], [1.0]], [0.0, 2.0]), tmp_path / "reg.joblib")
    (spec,) = _specs(tmp_path, '[[challengers]]\nname = "r"\nversion = "1"\nkind = "sklearn"\n'
                               'location = "reg.joblib"\nfeatures = ["x"]\n')
    assert spec.location == str(tmp_path / "reg.joblib")
    assert load(spec).predict_one({"x": 1.0})["value"] == pytest.approx(2.0)


def test_unreachable_clickhouse_is_one_line_without_library_warnings() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SHADOWPIPE_CLICKHOUSE_URL": f"http://127.0.0.1:{port}"}
    done = subprocess.run([sys.executable, "-m", "shadowpipe.cli", "compare"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"shadowpipe: error: SHADOWPIPE_CLICKHOUSE_URL [compare]: ClickHouse at "
        f"http://127.0.0.1:{port} unusable: Connection refused"]
