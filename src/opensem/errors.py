"""User-facing errors: one clear line, a non-zero exit, no traceback (``--debug`` shows it)."""


class OpenSEMError(Exception):
    """An error the user can fix. The message is a single line that names the file, key or value."""

    exit_code = 2


class ConfigError(OpenSEMError):
    pass


class NoDocuments(OpenSEMError):
    """The documents folder holds nothing readable (the forge stops; the judge leaves out its retrieval rows)."""


class StageInterrupted(OpenSEMError):
    """Raised after a stage saved its work on Ctrl-C or a budget stop."""

    exit_code = 130
