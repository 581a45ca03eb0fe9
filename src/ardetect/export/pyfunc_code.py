"""The registered model's pyfunc code (MLflow's models from code): MLflow copies this file beside the export and runs it to
load the model, so the registered model holds no pickled object, only this code and the export's files."""

from mlflow.models import set_model

from ardetect.export.registry import AttributionModel

set_model(AttributionModel())
