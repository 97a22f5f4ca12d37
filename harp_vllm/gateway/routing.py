"""Which backend answers a request: by served model name, or an alias's weighted split."""

from __future__ import annotations

import random
from dataclasses import dataclass

from .backend_state import Backends, BackendState
from .config import Alias
from .openai_errors import GatewayError


@dataclass
class Route:
    backend: BackendState
    model: str  # the model name sent upstream


class Router:
    def __init__(self, backends: Backends, aliases: list[Alias], rng: random.Random):
        self.backends, self.rng = backends, rng
        self.aliases = {a.name: a for a in aliases}

    def _candidates(self, model: str) -> list[tuple[float, BackendState, str | None]]:
        alias = self.aliases.get(model)
        if alias is not None:
            return [(t.weight, self.backends.all[t.backend], t.model) for t in alias.targets]
        return [(1.0, b, model) for b in self.backends.all.values() if model in b.models]

    def route(self, model: str) -> Route:
        """Pick the backend for ``model``.

        Among several (replicas of one model, or an alias's arms) those known to be down are
        skipped; if all are down one is tried anyway and its failure reported. A model no
        backend serves is 404, unless some backend's models are not known yet (it was down
        since start): then 503 with ``Retry-After``, and a discovery round starts.
        """
        cands = self._candidates(model)
        if not cands:
            self.backends.kick()  # a backend may serve a new model since the last discovery
            unknown = [b.name for b in self.backends.all.values() if not b.discovered]
            if unknown:
                raise GatewayError(503, f"The model '{model}' is not available: backend(s) "
                                        f"{', '.join(unknown)} not reached yet, so their models "
                                        "are unknown", "backend_unavailable", "model",
                                   headers={"Retry-After": "5"})
            raise GatewayError(404, f"The model '{model}' does not exist", "model_not_found",
                               "model")
        if len(cands) > 1:
            live = [c for c in cands if c[1].up is not False]
            cands = live or cands
            _, backend, wanted = self.rng.choices(cands, weights=[c[0] for c in cands])[0]
        else:
            _, backend, wanted = cands[0]
        if wanted:
            return Route(backend, wanted)
        if backend.models:
            return Route(backend, backend.models[0])
        raise GatewayError(503, f"backend '{backend.name}' is unavailable (its model is not "
                                "known yet)", "backend_unavailable", headers={"Retry-After": "5"})
