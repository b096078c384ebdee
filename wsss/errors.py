"""User-facing errors. The CLI prints these as one clear message (no traceback) and exits non-zero."""


class WsssError(Exception):
    """Base class: a problem the user can fix (bad input, missing file, bad params)."""

    exit_code = 1


class ConfigError(WsssError):
    """params.yaml (or a CLI override) is invalid."""

    exit_code = 2


class DataError(WsssError):
    """Input data is missing or unusable."""


class MissingDependencyError(WsssError):
    """An optional component (pydensecrf, ImageNet weights, ...) is not available."""


class TrackingError(WsssError):
    """The MLflow tracking store, or the Optuna storage of a tuning command, cannot be reached or used before a
    stage starts its work."""

    exit_code = 4
