"""Named data sets of one kind (`DATASETS.TRAIN` / `DATASETS.TEST` values): a builder registered per name,
so a new data set is one registration beside its reader, not another branch in the task."""
from __future__ import annotations

from typing import Any, Callable

from detector.config import ConfigError


class DatasetError(ValueError):
    """A data set file or record that cannot be used; the message names the file, the record and the
    problem. Raised while the data set is built, before training starts; train_net reports it in one line."""


class DatasetCatalog:
    def __init__(self, kind: str):
        self.kind = kind
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, *names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Register a builder for `names`; it is called as builder(name, *args) and sees which one."""
        def add(builder: Callable[..., Any]) -> Callable[..., Any]:
            for name in names:
                if name in self._builders:
                    raise ValueError(f"{self.kind} data set {name!r} is registered twice")
                self._builders[name] = builder
            return builder

        return add

    def names(self) -> list[str]:
        return list(self._builders)

    def check(self, key: str, name: str) -> None:
        if name not in self._builders:
            raise ConfigError(f"'{key}' {name!r} is not a {self.kind} data set; expected one of "
                              f"{self.names()}")

    def build(self, key: str, name: str, *args: Any) -> Any:
        """The data set `name` (the value of config key `key`, named in the error if unknown)."""
        self.check(key, name)
        return self._builders[name](name, *args)
