"""User-facing errors: one clear message, no traceback, non-zero exit from the CLI."""


class UserError(Exception):
    """A mistake the user can fix (config, data, model files). The CLI prints str(e) and exits 2."""


class ConfigError(UserError):
    """A bad config key, value or combination."""


class DataError(UserError):
    """A bad dataset file, row or field; the message names the file, the row index and the field."""


class ModelError(UserError):
    """An unsupported or inconsistent model checkpoint (config.json, safetensors, tokenizer)."""


class NumericsError(UserError):
    """Training diverged (non-finite loss or gradients for too many steps in a row)."""


class StorageError(UserError):
    """The output folder's storage failed in a way the user fixes (a full disk); the message names the path."""
