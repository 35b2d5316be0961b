"""A module imported at its first use: what lets planning read the attack registry without torch.

Every ``snakemake`` call plans by importing the attack plugins (``advalign.attacks``) to read
what each attack declares, and every cluster job's own ``snakemake`` does too; none of that
needs torch, whose import costs 1.3 s on a fast CPU and 4–5 s on a slow one. The modules on
that path therefore write::

    torch = lazy_module("torch", __name__)
    F = lazy_module("torch.nn.functional", __name__)

instead of ``import torch``. The stand-in imports the module at the first attribute read
(``torch.zeros``) and then puts the real module in its place in the owner module's globals,
so later reads in that module are ordinary global lookups, as with ``import torch``. Module
level code of such a file must not touch it (class bases, decorators, default arguments):
that would import it at once. ``tests/test_imports.py`` checks that the planning modules and
the attack registry import no torch, ``tests/test_planning.py`` that a second plan imports
neither torch nor timm.
"""

from __future__ import annotations

import importlib
import sys
import types


class _LazyModule(types.ModuleType):
    def __init__(self, name: str, owner: str):
        super().__init__(name)
        self._lazy_owner = owner

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__name__)
        owner = sys.modules.get(self._lazy_owner)
        if owner is not None:
            for key, value in list(vars(owner).items()):
                if value is self:
                    setattr(owner, key, module)
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (imported at first use by {self._lazy_owner})>"


def lazy_module(name: str, owner: str) -> types.ModuleType:
    """``name`` itself if it is imported already, else a stand-in that imports it at first use
    and then replaces itself in module ``owner`` (pass ``__name__``)."""
    return sys.modules.get(name) or _LazyModule(name, owner)
