"""The exception hierarchy: one base class, specific subclasses, built-in bases kept."""

from __future__ import annotations

import pytest

import erllama
from erllama import errors

ALL_ERRORS = [getattr(errors, name) for name in errors.__all__]


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_derives_from_the_base(cls: type[Exception]) -> None:
    assert issubclass(cls, errors.ErllamaError)
    assert issubclass(cls, Exception)


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_exported_at_top_level(cls: type[Exception]) -> None:
    assert getattr(erllama, cls.__name__) is cls
    assert cls.__name__ in erllama.__all__


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_is_documented_and_lives_in_erllama_errors(cls: type[Exception]) -> None:
    # The native module looks the classes up by name in erllama.errors.
    assert cls.__module__ == "erllama.errors"
    assert cls.__doc__
    assert cls.__doc__.strip()


@pytest.mark.parametrize(
    ("cls", "bases"),
    [
        (errors.InvalidInputError, (errors.ErllamaError, ValueError)),
        (errors.TokenOutOfRangeError, (errors.InvalidInputError, ValueError)),
        (errors.ContextOverflowError, (errors.InvalidInputError, ValueError)),
        (errors.EmptyInputError, (errors.InvalidInputError, ValueError)),
        (errors.ModelLoadError, (errors.ErllamaError,)),
        (errors.ModelFileNotFoundError, (errors.ModelLoadError, FileNotFoundError, OSError)),
        (errors.NotFoundError, (errors.ErllamaError, KeyError, LookupError)),
        (errors.AlreadyLoadedError, (errors.ErllamaError,)),
        (errors.ContextError, (errors.ErllamaError,)),
        (errors.DecodeError, (errors.ErllamaError,)),
        (errors.KvStateError, (errors.ErllamaError,)),
        (errors.NotSupportedError, (errors.ErllamaError,)),
        (errors.WorkerError, (errors.ErllamaError,)),
        (errors.ModelFetchError, (errors.ErllamaError,)),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else "",
)
def test_specific_bases(cls: type[Exception], bases: tuple[type[BaseException], ...]) -> None:
    for base in bases:
        assert issubclass(cls, base), f"{cls.__name__} should derive from {base.__name__}"


@pytest.mark.parametrize(
    "cls",
    [
        errors.ModelLoadError,
        errors.ContextError,
        errors.DecodeError,
        errors.KvStateError,
        errors.WorkerError,
        errors.ModelFetchError,
    ],
    ids=lambda c: c.__name__,
)
def test_runtime_errors_are_not_value_errors(cls: type[Exception]) -> None:
    # `except ValueError` must catch bad input only, not engine failures.
    assert not issubclass(cls, ValueError)


def test_model_file_not_found_is_caught_as_file_not_found() -> None:
    with pytest.raises(FileNotFoundError, match="no such model"):
        raise errors.ModelFileNotFoundError("no such model: /x.gguf")


def test_invalid_input_is_caught_as_value_error() -> None:
    with pytest.raises(ValueError, match="token id 99999"):
        raise errors.TokenOutOfRangeError("token id 99999 is out of range")


def test_not_found_message_is_plain_text() -> None:
    # KeyError would render repr() of the message; ours reads as a sentence.
    exc = errors.NotFoundError("model 'm1' is not loaded")
    assert str(exc) == "model 'm1' is not loaded"
    with pytest.raises(KeyError):
        raise exc


def test_catch_all_with_the_base() -> None:
    with pytest.raises(errors.ErllamaError):
        raise errors.ContextOverflowError("prompt of 300 tokens does not fit in n_ctx 256")
