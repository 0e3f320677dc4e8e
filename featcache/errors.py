"""Errors a user can cause and fix. The CLI prints their message on one line, without a traceback."""


class LstError(Exception):
    """Base class: a user-facing problem with a message that says what to do next."""


class DatasetError(LstError):
    """The dataset path, its columns, or its rows are not usable."""


class BackboneError(LstError):
    """The backbone cannot be loaded or is not supported."""


class StoreError(LstError):
    """The feature store is missing, incomplete, or does not match what was asked."""


class TrainConfigError(LstError):
    """A training option is invalid for this store or backbone."""


class SweepError(LstError):
    """A sweep cannot start or go on (storage, study, store or its trials)."""


def expected(what: str, got: object, hint: str = "") -> str:
    """The house style for messages: 'Expected X. Got Y. Hint.'"""
    msg = f"Expected {what}. Got {got}."
    return f"{msg} {hint}" if hint else msg
