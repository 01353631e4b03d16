"""Project exceptions: one small hierarchy, each message says what to do."""


class WdmoeError(Exception):
    """Base class of every error wdmoe raises on purpose."""


class ConfigError(WdmoeError, ValueError):
    """A configuration value is out of its allowed range."""


class ModelNotFoundError(WdmoeError, FileNotFoundError):
    """A checkpoint path or the default model's weights package is missing."""


class ModelFolderError(ConfigError):
    """A model folder or weights file is there but unreadable or malformed (names file and fault)."""


class UnsupportedModelError(WdmoeError):
    """The checkpoint is not a Mixture-of-Experts model wdmoe has an adapter for."""


class PromptError(WdmoeError, ValueError):
    """The prompt is empty or does not fit the model's context."""


class UnknownNameError(WdmoeError, KeyError):
    """A registry was asked for a name it does not hold."""

    def __init__(self, kind: str, name: str, known: list[str]) -> None:
        self.kind, self.name, self.known = kind, name, known
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(known))}")

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class SelectionError(WdmoeError, AssertionError):
    """A policy broke an invariant (selected a non-candidate or kept no expert)."""
