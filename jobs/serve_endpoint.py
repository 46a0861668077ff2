"""Serve the search-augmented model: an OpenAI-compatible endpoint on Ray Serve (see pipelines/serve.py for the API).

    stepray serve --config configs/serve/cpu.yaml          # local: starts Ray and Serve, blocks until Ctrl-C
    serve run configs/serve/cpu.yaml                       # the same config through Ray's own CLI
    serve deploy configs/serve/gpu.yaml --address http://<head>:8265   # onto a running cluster

The config is a Ray Serve config file: `applications[].args` are ServeConfig fields, `deployments:` sets each
deployment's autoscaling_config and resources. Models named `smollm2`/`tiny` are prepared first if missing.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from pipelines import config as C
from pipelines import inputs
from pipelines.config import InputError
from pipelines.runtime import cli_main


@cli_main("stepray serve")
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stepray serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", required=True, help="Ray Serve config YAML (import_path pipelines.serve:build_app)")
    args = ap.parse_args(argv)
    path = inputs.input_file(args.config, "serve config", "give a Ray Serve config YAML, e.g. configs/serve/cpu.yaml")
    import pydantic
    import yaml
    from ray.serve.schema import ServeDeploySchema

    from pipelines.models import load_path
    from pipelines.serve import ServeConfig

    try:
        schema = ServeDeploySchema.model_validate(yaml.safe_load(path.read_bytes()))
    except (yaml.YAMLError, UnicodeDecodeError, pydantic.ValidationError) as e:
        raise InputError(f"serve config {path}: not a Ray Serve config ({inputs.first_line(e)}); see "
                         f"configs/serve/cpu.yaml") from None
    for app in schema.applications:  # what the deployments will load, checked before Serve starts
        try:
            cfg = C.load_config(ServeConfig, base=dict(app.args))
        except C.ConfigError as e:
            raise InputError(f"serve config {path}: {e}") from None
        load_path(cfg.engine.model)
        if cfg.prm:
            inputs.reward_model_folder(cfg.prm, f"serve config {path}: prm")
    serve_cli = shutil.which("serve") or str(Path(sys.executable).parent / "serve")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # `serve run` is what honours the config's per-deployment options; hand over to it.
    os.execv(serve_cli, [serve_cli, "run", str(path)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
