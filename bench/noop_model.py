"""A pyfunc that does no work: it answers with the number of rows it was sent.

Served by `mlflow models serve` exactly like the real model, it measures the server's own floor
(HTTP, JSON parsing, the DataFrame round trip) for bench/serve_speed.py. MLflow loads it as a
"model from code": this file is copied into the model and run by the server, so nothing is pickled.
"""

import mlflow
from mlflow.pyfunc import PythonModel


class NoOpModel(PythonModel):
    def predict(self, context, model_input, params=None):
        return [len(model_input)]


mlflow.models.set_model(NoOpModel())
