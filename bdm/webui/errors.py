"""The one error type the WebUI extension shows its users."""
from __future__ import annotations


class BdmError(RuntimeError):
    """BDM was asked for and cannot be applied; the message is meant for the user and names what is
    wrong (the model, the file, the argument). `status_code` is what the WebUI's API answers with when
    this ends a generation (its error handler reads the attribute): 422 for a request's own mistake
    (bad arguments, a model that is not installed), 409 when the loaded checkpoint cannot take BDM,
    500 for a model file that cannot be used."""

    def __init__(self, message: str, status_code: int = 500):
        super().__init__(message)
        self.status_code = status_code
