"""`dvc repro split` for machines without dvc and click (the GPU machine): crop data/raw into
data/cropped and write the split manifest, with the same functions and params the stages use.

    PYTHONPATH=src python bench/prepare_data.py [--params params.yaml]

It does not record anything in dvc.lock; where dvc is installed, use `dvc repro split`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transfer_study.config import load_params
from transfer_study.preprocess import preprocess_dataset
from transfer_study.split import write_manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    params = load_params(args.params)
    cropped = Path(params.paths.cropped)
    preprocess_dataset(Path(params.paths.raw), cropped, params.preprocess)  # prints its summary
    manifest = write_manifest(cropped, Path(params.paths.manifest), params.split)
    print(f"manifest: {len(manifest)} rows → {params.paths.manifest}")


if __name__ == "__main__":
    main()
