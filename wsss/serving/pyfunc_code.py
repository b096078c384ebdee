"""MLflow "models from code" entry point of the U-Net pyfunc: MLflow runs this file; wsss never imports it.

Logged with ``python_model=<this file>``, so the model object is built here at load time instead of
being cloudpickled into the model. ``wsss`` itself travels in the model's ``code/`` folder.
"""

from mlflow.models import set_model

from wsss.serving.pyfunc import UnetPyfunc

set_model(UnetPyfunc())
