"""Models-from-code entry point: MLflow loads the pyfunc by running this file, not by unpickling an object, so a
model version from the registry never deserialises Python objects."""

from mlflow.models import set_model

from pipeline.pyfunc import MultiTaskPyfunc

set_model(MultiTaskPyfunc())
