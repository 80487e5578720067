"""The models one server serves: lookup by id or alias, health as the probes report it, and the refusals a
lookup answers (an unknown model, embeddings or images asked of a model that has none)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from openrerank.engine.errors import ImagesNotSupportedError, NotAnEmbeddingModelError, UnknownModelError

if TYPE_CHECKING:
    from openrerank.engine.served import ServedModel


class ServedModels:
    """All models of one server.

    Health, as the probes report it: `ready` once every model (or, with `--allow-partial`, every model
    that could load) is loaded and warmed up, and while every scheduler worker is alive; `live` unless
    a worker died (then the process must be restarted). Messages stay short; details go to the log."""

    def __init__(self) -> None:
        self._models: dict[str, ServedModel] = {}
        self.expected: list[str] = []
        self.loaded = False  # the loader finished (some models may have failed: `failed`)
        self.load_error: str | None = None  # the loader gave up: nothing is served
        self.failed: dict[str, str] = {}  # served id -> short reason, models skipped by --allow-partial
        self.aliases: dict[str, str] = {}  # another id -> the served id it names (--alias, NIM's renamed ids)

    def add(self, model: ServedModel) -> None:
        self._models[model.name] = model

    @property
    def ready(self) -> bool:
        return self.loaded and bool(self._models) and self.live

    @property
    def live(self) -> bool:
        return not self.dead_workers()

    def dead_workers(self) -> list[str]:
        """Models whose scheduler worker is gone although it was never asked to stop."""
        return [m.name for m in self._models.values() if m.scheduler.failure is not None]

    def status(self) -> str:
        """One short line for health bodies (no exception text: that is in the log)."""
        if self.load_error:
            return "Model failed to load; see the server log."
        dead = self.dead_workers()
        if dead:
            return f"Model worker stopped ({', '.join(dead)}); restart the server."
        if not self.loaded:
            return "Model is loading."
        if self.failed:
            return f"Service is ready; {len(self.failed)} model(s) failed to load (see the server log)."
        return "Service is ready."

    @property
    def names(self) -> list[str]:
        """The served ids, in the order given, whether loaded yet or not (those that failed to load left out):
        the list a client reads (`/v1/models`) does not shrink once the first model has loaded."""
        listed = [n for n in self.expected if n not in self.failed]
        return [*listed, *(n for n in self._models if n not in listed)]

    @property
    def ids(self) -> list[str]:
        """Every id a request may name: the served ids, then the other ids they answer to (aliases). An alias of a
        model that failed to load (`--allow-partial`) names nothing, as that model's own id does: gRPC's
        ModelMetadata described it as served while every other route answered that it is not."""
        return [*self.names, *(alias for alias, name in self.aliases.items() if name not in self.failed)]

    def models(self) -> list[ServedModel]:
        return list(self._models.values())

    def get(self, name: str | None) -> ServedModel:
        """`None` (field omitted) picks the first model, as NIM does with its single model."""
        if name is None:
            if not self._models:
                raise UnknownModelError("<none>", self.names)
            return next(iter(self._models.values()))
        model = self._models.get(self.aliases.get(name, name))
        if model is None:
            raise UnknownModelError(name, self.names)
        return model

    @property
    def image_models(self) -> list[str]:
        """Ids of the served models whose passages may carry images."""
        return [m.name for m in self._models.values() if m.takes_images]

    def check_images(self, model: ServedModel) -> None:
        """Refuse an image for a text-only model, naming the served models that take one."""
        if not model.takes_images:
            raise ImagesNotSupportedError(model.name, model.loaded.family.id, self.image_models)

    @property
    def embedders(self) -> list[str]:
        """Ids of the served models that produce embeddings."""
        return [m.name for m in self._models.values() if m.embeds]

    @property
    def late_interaction(self) -> list[str]:
        """Ids of the served models with per-token (multi-vector) embeddings."""
        return [m.name for m in self._models.values() if m.loaded.multi_vector]

    def get_embedder(self, name: str | None) -> ServedModel:
        """The embedding model `name` (None: the first served embedding model, as NIM picks its one model)."""
        if name is None:
            embedders = self.embedders
            if not embedders:
                first = next(iter(self._models.values()), None)
                raise NotAnEmbeddingModelError(None, first.loaded.family.id if first else None, [])
            return self._models[embedders[0]]
        model = self._models.get(self.aliases.get(name, name))
        if model is None:
            raise UnknownModelError(name, self.embedders or self.names, "embedding models" if self.embedders
                                    else "models")
        if not model.embeds:
            raise NotAnEmbeddingModelError(name, model.loaded.family.id, self.embedders,
                                           multi_vector=model.loaded.multi_vector)
        return model

    def drain_by(self, ends_at: float) -> None:
        """The server is shutting down and answers what is unfinished at `ends_at` itself: every model's
        scheduler plans for it (`Scheduler.drain_by`)."""
        for m in self._models.values():
            m.scheduler.drain_by(ends_at)

    async def stop(self) -> None:
        for m in self._models.values():
            await m.scheduler.stop()
            m.loaded.close()
