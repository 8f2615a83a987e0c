"""The model registry: named models, each a `Classifier` plus its micro-batcher, swappable live.

A *source* is what the user passed: a bundle dir, a model dir (`<name>/<version>/`) or a dir of
model dirs (`bundle.model_sources`). A model is (re)loaded from the newest version of its source that
loads and warms up (broken versions are skipped, logged and counted), and only then put in the
registry with one dict assignment, so requests that already hold the old `LoadedModel` finish on
it and new requests get the new one: a reload never fails a request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from food_classifier.bundle import BundleError, load_bundle, load_newest
from food_classifier.inference import Classifier
from food_classifier.serving import memory
from food_classifier.serving.batching import MicroBatcher
from food_classifier.serving.errors import NotReady, ReloadFailed, UnknownModel
from food_classifier.serving.metrics import ServingMetrics
from food_classifier.serving.settings import ServeSettings

log = logging.getLogger("food_classifier.serving")


@dataclass
class LoadedModel:
    name: str
    source: Path
    classifier: Classifier
    batcher: MicroBatcher
    variant: str
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.classifier.version

    @property
    def labels(self) -> list[str]:
        return self.classifier.labels

    def info(self, default: bool = False) -> dict[str, Any]:
        b = self.classifier.bundle
        m = b.meta
        return {"name": self.name, "version": self.version, "default": default, "variant": self.variant,
                "variants": sorted(b.variants), "labels": self.labels, "arch": m.arch,
                "created_at": m.created_at, "metrics": m.to_json_dict().get("metrics", {}),
                "preprocessing": b.preprocessing.to_dict(), "temperature": b.temperature,
                "abstain_threshold": self.classifier.abstain_threshold, "builtin": m.builtin,
                "description": m.description,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}


class ModelRegistry:
    def __init__(self, sources: list[Path], settings: ServeSettings, metrics: ServingMetrics | None = None):
        self.sources = list(sources)
        self.settings = settings
        self.metrics = metrics
        self.executor = ThreadPoolExecutor(settings.inference_workers, thread_name_prefix="fc-infer")
        self._models: dict[str, LoadedModel] = {}
        self.default_name: str | None = settings.default_model
        self.state = "loading"
        self.error: str | None = None
        self._reload_lock: asyncio.Lock | None = None

    # --- loading -------------------------------------------------------------------------------------
    def _build(self, source: Path) -> tuple[Classifier, str, list[str]]:
        """Load and warm the newest version of `source` that works (blocking: run it in a thread);
        also returns the newer versions skipped as broken."""
        skipped: list[str] = []

        def skip(path: Path, exc: BundleError) -> None:
            skipped.append(f"{path.name} ({exc})")
            if self.metrics:
                self.metrics.skipped_versions.labels(str(source)).inc()

        clf, variant = load_newest(source, self._open, on_skip=skip)
        return clf, variant, skipped

    def _open(self, version: Path) -> tuple[Classifier, str]:
        bundle = load_bundle(version)
        s = self.settings
        clf = Classifier(bundle, threads=s.ort_threads, variant=s.variant_for(bundle.name), top_k=s.top_k,
                         max_pixels=s.max_pixels)
        variant = clf.variant
        if s.warmup:
            try:
                clf.warm_up(sorted({1, s.batch_max_size}))
            except Exception as e:  # e.g. a graph whose input size is not the preprocessing crop
                raise BundleError(f"{clf.bundle.model_file(variant)}: warm-up run failed: "
                                  f"{str(e).strip().splitlines()[0]}") from None
        return clf, variant

    def _wrap(self, source: Path, clf: Classifier, variant: str) -> LoadedModel:
        s = self.settings
        observer = self.metrics.batch_observer(clf.name) if self.metrics else None
        batcher = MicroBatcher(clf.infer, self.executor, max_size=s.batch_max_size,
                               max_wait_ms=s.batch_max_wait_ms, max_concurrent=s.inference_workers,
                               on_batch=observer)
        return LoadedModel(clf.name, source, clf, batcher, variant)

    async def load_all(self, warm: Callable[[list[LoadedModel]], Awaitable[None]] | None = None) -> None:
        """Load every source, then `warm` the loaded models (e.g. the decode path); then /readyz is green."""
        try:
            for source in self.sources:
                clf, variant, _ = await asyncio.to_thread(self._build, source)
                if clf.name in self._models:
                    raise BundleError(f"two sources provide a model named {clf.name!r}: "
                                      f"{self._models[clf.name].source} and {source}")
                self._models[clf.name] = self._wrap(source, clf, variant)
                log.info("loaded model %s version %s (%s) from %s", clf.name, clf.version, variant, source)
            if not self._models:
                raise BundleError("no models to serve")
            if self.default_name is None:
                self.default_name = next(iter(self._models))
            elif self.default_name not in self._models:
                raise BundleError(f"default model {self.default_name!r} is not among the loaded models "
                                  f"({', '.join(self._models)})")
            for m in self._models.values():
                self._publish(m)
            if warm is not None:
                await warm(self.models())
            memory.release()  # what loading and warm-up freed
            self.state = "ready"
        except Exception as exc:
            self.state, self.error = "failed", f"{exc.__class__.__name__}: {exc}"
            log.error("model loading failed: %s", self.error)
            raise

    def _publish(self, model: LoadedModel, previous: LoadedModel | None = None) -> None:
        if self.metrics:
            self.metrics.set_model(model.name, model.version, model.variant, model.name == self.default_name,
                                   previous.version if previous else None, previous.variant if previous else None)

    # --- lookup --------------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def names(self) -> list[str]:
        return list(self._models)

    def get(self, name: str | None = None) -> LoadedModel:
        if not self.ready:
            raise NotReady(f"models are {self.state}" + (f": {self.error}" if self.error else ""))
        key = self.default_name if name is None else name
        model = self._models.get(key) if key is not None else None
        if model is None:
            raise UnknownModel(f"no model named {name!r}; available: {', '.join(self._models) or 'none'}")
        return model

    def models(self) -> list[LoadedModel]:
        return list(self._models.values())

    # --- reload --------------------------------------------------------------------------------------
    async def reload(self, name: str) -> dict[str, Any]:
        """Load the newest version from the model's source and swap it in atomically."""
        old = self.get(name)
        if self._reload_lock is None:
            self._reload_lock = asyncio.Lock()
        async with self._reload_lock:
            old = self.get(name)
            try:
                clf, variant, skipped = await asyncio.to_thread(self._build, old.source)
                if clf.name != name:
                    raise BundleError(f"newest bundle under {old.source} is named {clf.name!r}, not {name!r}")
                if skipped and clf.version == old.version:  # what was published is broken: say so
                    raise BundleError(f"newer version(s) skipped as broken: {'; '.join(skipped)}")
            except Exception as exc:
                if self.metrics:
                    self.metrics.reloads.labels(name, "failed").inc()
                log.error("reload of %s failed, keeping version %s: %s", name, old.version, exc)
                raise ReloadFailed(f"{exc.__class__.__name__}: {exc}; still serving version {old.version}") from None
            new = self._wrap(old.source, clf, variant)
            self._models[name] = new  # the swap: one assignment on the event loop
            self._publish(new, old)
            if self.metrics:
                self.metrics.reloads.labels(name, "ok").inc()
            log.info("reloaded model %s: %s -> %s", name, old.version, new.version)
            loop = asyncio.get_running_loop()
            for delay in (1.0, 10.0):  # once the requests still holding the old model are done
                loop.call_later(delay, memory.release)
            return {"model": name, "previous_version": old.version, "version": new.version,
                    "variant": new.variant}

    async def reload_all(self) -> list[dict[str, Any]]:
        results = []
        for name in self.names():
            try:
                results.append(await self.reload(name))
            except ReloadFailed as exc:
                results.append({"model": name, **exc.to_dict()})
        return results

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
