"""The U-Net as a self-contained, pickle-free MLflow model (docs/artefacts.md#mlflow-model).

``unet_format``: the files (safetensors weights + JSON metadata) and their checked loading;
``pyfunc``: the MLflow ``PythonModel`` that turns an image into a mask; ``export``: logging it;
``loader``: the one safe loader for folders and ``models:/`` / ``runs:/`` URIs. ``pyfunc_code.py`` is
never imported: MLflow runs it as the model's code ("models from code").
"""
