"""The served ensemble: an MLflow pyfunc that averages the class probabilities of several trained
networks, then applies one temperature (logged by the register stage; the choice is champion.py's).

Each member is an ImageClassifier (serve.py) loaded from its own weights and config.json, so it
crops, resizes and normalises with the settings it was trained with (members may differ in
architecture and image size) and flips when its config says so. Requests and answers are
serve.py's: the same input, output, 4xx answers and per-request caps as a single model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from .config import UserError
from .serve import TEMPERATURE, ImageClassifier, ServedClassifier, log_pyfunc

SPEC = "ensemble"  # artifact key of ensemble.json: class names, temperature, members


def member_keys(index: int) -> tuple[str, str]:
    """Artifact keys of member `index`'s weights and config.json."""
    return f"weights_{index}", f"config_{index}"


class EnsembleClassifier(ServedClassifier):
    """The mean of the members' probabilities, then softmax(log(mean) / temperature)."""

    def load_context(self, context) -> None:
        spec = json.loads(Path(context.artifacts[SPEC]).read_text())
        self.class_names = spec["class_names"]
        self.temperature = float(spec[TEMPERATURE])
        self.members = []
        for index in range(len(spec["members"])):
            weights, config = member_keys(index)
            member = ImageClassifier().load(Path(context.artifacts[weights]), Path(context.artifacts[config]))
            if member.class_names != self.class_names:
                raise UserError(f"ensemble member {index} has classes {member.class_names}, the ensemble "
                                f"{self.class_names}; log the ensemble again from runs of one manifest")
            self.members.append(member)

    def probabilities(self, images: list) -> np.ndarray:
        from .calibration import temperature_scaled

        mean = np.mean([member.probabilities(images) for member in self.members], axis=0)
        return temperature_scaled(mean, self.temperature)


def log_ensemble_model(members: list[tuple[Path, dict]], spec: dict, name: str = "model"):
    """Log an EnsembleClassifier under the active run.

    `members`: (weights.pt, config.json content) per member, the config already carrying the
    member's `tta` and temperature 1 (serve.with_serving_options); `spec`: ensemble.json's content,
    at least `class_names`, `temperature` and one `members` entry per member (what each is).
    """
    if len(spec["members"]) != len(members):
        raise ValueError(f"spec lists {len(spec['members'])} members, {len(members)} given")
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {SPEC: str(Path(tmp) / "ensemble.json")}
        Path(artifacts[SPEC]).write_text(json.dumps(spec, indent=2))
        for index, (weights, config) in enumerate(members):
            weights_key, config_key = member_keys(index)
            config_path = Path(tmp) / f"config_{index}.json"
            config_path.write_text(json.dumps(config, indent=2))
            artifacts[weights_key], artifacts[config_key] = str(weights), str(config_path)
        croppers = tuple(config["preprocess"]["cropper"] for _, config in members)
        return log_pyfunc(EnsembleClassifier(), artifacts, spec["class_names"], croppers, name=name)
