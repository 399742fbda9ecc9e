"""The base of every config section: typed, unknown keys refused, checked on assignment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A config section. Each role folder owns its section; `cluster.config` composes them."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
