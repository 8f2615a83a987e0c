"""Champion and challenger: two versions of a model scored on the same labelled photos, paired.

Why paired: both versions answer the very same photos, so the question "is B better than A" is read
from the photos where they disagree (McNemar's exact test) and from a bootstrap of the per-photo
difference, not from two accuracies measured on different test sets. The photos are the test tier
of the manifest the newer version was trained on (a re-split keeps a test photo in test: data.py),
plus labelled kept photos (`DATA/<class>/`, written by the label page) that neither trained on.
Serving side: ONNX Runtime through `inference.Classifier`, no torch, no scipy (the binomial tail is
summed with `math.comb`).
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from food_classifier.answer import Answer, Options
from food_classifier.bundle import BundleError
from food_classifier.inference import Classifier
from food_classifier.preprocessing import ImageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp"}
DEFAULT_MARGIN = 0.02  # largest accuracy drop `--if-better` tolerates when it is not significant


@dataclass(frozen=True)
class Photo:
    path: Path
    label: str
    sha256: str
    source: str  # "test tier" or "labelled"


@dataclass
class PhotoSet:
    photos: list[Photo]
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    manifest: Path | None = None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not {"path", "label", "tier", "sha256"} <= set(reader.fieldnames or ()):
            raise BundleError(f"{path} is not a manifest (header {reader.fieldnames}); pass --data with labelled "
                              "photos instead")
        return list(reader)


def labelled_photos(manifest: Path | None, data: Path | None) -> PhotoSet:
    """The test tier of `manifest` plus every photo in `data/<class>/` the manifest does not put in train or
    validation (a model never is judged on photos it was fitted on). Deduplicated by sha256."""
    out = PhotoSet([], defaultdict(int), manifest)
    seen: set[str] = set()
    fitted: set[str] = set()
    if manifest is not None:
        for r in _manifest_rows(manifest):
            if r["tier"] != "test":
                fitted.add(r["sha256"])
            elif not Path(r["path"]).is_file():
                out.skipped["test photo missing on disk"] += 1
            elif r["sha256"] not in seen:
                seen.add(r["sha256"])
                out.photos.append(Photo(Path(r["path"]), r["label"], r["sha256"], "test tier"))
    if data is not None:
        if not data.is_dir():
            raise BundleError(f"--data {data}: no such folder (labelled photos go in DATA/<class>/)")
        for cls in sorted(d for d in data.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for f in sorted(cls.iterdir()):
                if f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES or not f.is_file():
                    continue
                h = _sha256(f)
                if h in fitted:
                    out.skipped["labelled photo in the manifest's train/validation"] += 1
                elif h not in seen:
                    seen.add(h)
                    out.photos.append(Photo(f.resolve(), cls.name, h, "labelled"))
    out.skipped = dict(out.skipped)
    return out


@dataclass
class Scored:
    version: str
    predicted: list[str]       # the best class, whatever the threshold
    answered: np.ndarray       # bool: at or above the version's abstention threshold
    threshold: float | None

    def take(self, keep: list[int]) -> Scored:
        return Scored(self.version, [self.predicted[i] for i in keep], self.answered[keep], self.threshold)


def score(clf: Classifier, photos: list[Photo], batch_size: int = 32) -> tuple[Scored, set[int]]:
    """Each photo's best class and whether the version would answer it (its own threshold; the not-food rule is
    off: these photos are labelled food), and the indices of photos that could not be read."""
    answers: list[Answer | None] = []
    opts = Options(reject_not_food=False)
    for i in range(0, len(photos), batch_size):
        chunk = [p.path for p in photos[i:i + batch_size]]
        try:
            answers += clf.predict_batch(chunk, opts)
        except (ImageError, OSError):  # one bad file: score this chunk photo by photo
            for path in chunk:
                try:
                    answers.append(clf.predict(path, opts))
                except (ImageError, OSError):
                    answers.append(None)
    bad = {i for i, a in enumerate(answers) if a is None}
    return Scored(clf.version, [clf.labels[a.label_idx] if a else "" for a in answers],
                  np.array([a is not None and not a.abstained for a in answers], dtype=bool),
                  clf.abstain_threshold), bad


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under "equally good" the photos only one version gets right split
    Binomial(n, 1/2); p = P(a split at least this lopsided)."""
    n = a_only + b_only
    if n == 0:
        return 1.0
    k = min(a_only, b_only)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def bootstrap_ci(diff: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean paired difference, photos resampled with replacement."""
    if len(diff) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class Comparison:
    a: Scored
    b: Scored
    labels: list[str]           # the true label of each photo
    skipped: dict[str, int]
    n_only_a: int
    n_only_b: int
    p_value: float
    ci: tuple[float, float]

    @property
    def n(self) -> int:
        return len(self.labels)

    def correct(self, s: Scored) -> np.ndarray:
        return np.array([p == y for p, y in zip(s.predicted, self.labels, strict=True)], dtype=bool)

    def accuracy(self, s: Scored) -> float:
        return float(self.correct(s).mean()) if self.n else math.nan

    @property
    def difference(self) -> float:
        return self.accuracy(self.b) - self.accuracy(self.a)

    def per_class(self) -> list[tuple[str, int, float, float]]:
        """(class, photos, accuracy of A, accuracy of B) per true class."""
        ca, cb, y = self.correct(self.a), self.correct(self.b), np.array(self.labels)
        return [(c, int((y == c).sum()), float(ca[y == c].mean()), float(cb[y == c].mean())) for c in sorted(set(y))]

    def selective(self, s: Scored) -> tuple[float, float]:
        """(coverage, accuracy of the answered photos) at the version's own threshold."""
        answered = s.answered
        cov = float(answered.mean()) if self.n else math.nan
        acc = float(self.correct(s)[answered].mean()) if answered.any() else math.nan
        return cov, acc


def compare(a: Classifier, b: Classifier, photos: PhotoSet, n_boot: int = 2000, seed: int = 0) -> Comparison:
    """Score both versions on the same photos and pair them up."""
    if not photos.photos:
        raise BundleError("no labelled photos to compare on: the manifest's test tier is missing and --data has "
                          "no labelled photos (DATA/<class>/...)")
    (sa, bad_a), (sb, bad_b) = score(a, photos.photos), score(b, photos.photos)
    keep = [i for i in range(len(photos.photos)) if i not in bad_a | bad_b]  # both score the same photos
    skipped = dict(photos.skipped)
    if len(keep) < len(photos.photos):
        skipped["unreadable photo"] = len(photos.photos) - len(keep)
    if not keep:
        raise BundleError("none of the labelled photos could be read")
    sa, sb = sa.take(keep), sb.take(keep)
    labels = [photos.photos[i].label for i in keep]
    ca = np.array([p == y for p, y in zip(sa.predicted, labels, strict=True)])
    cb = np.array([p == y for p, y in zip(sb.predicted, labels, strict=True)])
    only_a, only_b = int((ca & ~cb).sum()), int((cb & ~ca).sum())
    return Comparison(sa, sb, labels, skipped, only_a, only_b, mcnemar_exact(only_a, only_b),
                      bootstrap_ci(cb.astype(float) - ca.astype(float), n_boot, seed))


def verdict(c: Comparison, margin: float = DEFAULT_MARGIN, alpha: float = 0.05) -> tuple[bool, str]:
    """Is B (the challenger) not worse than A? Yes when its accuracy is at least A's; when lower, only if the
    drop is not significant (McNemar p >= alpha) and the interval's low end stays above -margin."""
    d, (lo, _) = c.difference, c.ci
    if d >= 0:
        return True, f"{c.b.version} is not worse: {d:+.1%} on {c.n} photos (McNemar p = {c.p_value:.3g})"
    if c.p_value < alpha:
        return False, (f"{c.b.version} is worse: {d:+.1%} on {c.n} photos, McNemar p = {c.p_value:.3g} < {alpha} "
                       f"({c.n_only_a} photos only {c.a.version} gets right, {c.n_only_b} only {c.b.version})")
    if lo < -margin:
        return False, (f"{c.b.version} may be worse: {d:+.1%} on {c.n} photos, 95 % interval down to {lo:+.1%} "
                       f"(tolerated: -{margin:.1%}); label more photos to decide (`food-classifier label`)")
    return True, f"{c.b.version} is not worse within {margin:.1%}: {d:+.1%} (95 % interval from {lo:+.1%})"


def _pct(x: float) -> str:
    return "  n/a" if math.isnan(x) else f"{100 * x:5.1f}"


def format_comparison(c: Comparison) -> str:
    """The report `models compare` prints."""
    lines = [f"A (champion):   {c.a.version}", f"B (challenger): {c.b.version}"]
    lines.append(f"photos: {c.n} labelled" + "".join(f"; skipped {n} ({why})" for why, n in c.skipped.items()))
    lines += ["", f"accuracy  A {_pct(c.accuracy(c.a))} %   B {_pct(c.accuracy(c.b))} %",
              f"B - A     {100 * c.difference:+.1f} points, bootstrap 95 % interval "
              f"[{100 * c.ci[0]:+.1f}, {100 * c.ci[1]:+.1f}]",
              f"McNemar   exact p = {c.p_value:.3g}  ({c.n_only_a} photos only A gets right, "
              f"{c.n_only_b} only B)", ""]
    width = max([len("class"), *(len(x) for x, *_ in c.per_class())])
    lines.append(f"{'class':<{width}}  {'photos':>6}  {'A %':>5}  {'B %':>5}  {'B - A':>6}")
    for cls, n, acc_a, acc_b in c.per_class():
        lines.append(f"{cls:<{width}}  {n:>6}  {_pct(acc_a)}  {_pct(acc_b)}  {100 * (acc_b - acc_a):+6.1f}")
    lines.append("")
    for name, s in (("A", c.a), ("B", c.b)):
        cov, acc = c.selective(s)
        thr = "none" if s.threshold is None else f"{s.threshold:.3f}"
        lines.append(f"{name} at its threshold {thr}: answers {_pct(cov)} % of photos, {_pct(acc)} % of those right")
    return "\n".join(lines)


def manifest_of(clf: Classifier) -> Path | None:
    """The manifest the version was trained on, if it is still on disk (imported models have none)."""
    ds = clf.bundle.meta.dataset
    path = Path(ds.manifest) if ds and ds.manifest else None
    return path if path is not None and path.is_file() and os.access(path, os.R_OK) else None


def champion(model: Path, challenger: str) -> str | None:
    """The version `challenger` would replace: the promoted one, else the newest valid version other than it
    (what was served before the challenger was published)."""
    from food_classifier.bundle import load_bundle, promoted_version, published_versions

    pinned = promoted_version(model)
    if pinned and pinned != challenger:
        return pinned
    for p in published_versions(model):
        if p.name != challenger:
            try:
                load_bundle(p)
                return p.name
            except BundleError:
                continue
    return None


def compare_versions(models_dir: str | Path, name: str, a: str | None = None, b: str | None = None,
                     data: Path | None = None, threads: int | None = None) -> Comparison:
    """`models compare`: B defaults to the newest published version (the challenger), A to the version it would
    replace (`champion`). The photos come from the manifest the newer of the two was trained on, plus `data`."""
    from food_classifier.bundle import published_versions
    from food_classifier.versions import model_dir

    d = model_dir(models_dir, name)
    newest = published_versions(d)
    b = b or (newest[0].name if newest else None)
    a = a or (champion(d, b) if b else None)
    if a is None or b is None:
        raise BundleError(f"{name}: needs two versions to compare, has {', '.join(p.name for p in newest) or 'none'}")
    if a == b:
        raise BundleError(f"{name}: A and B are both {a}; name two versions (`models list` shows them)")
    for v in (a, b):
        if v.startswith(".") or "/" in v or not (d / v).is_dir():
            raise BundleError(f"{name} has no version {v!r} (versions: {', '.join(p.name for p in newest)})")
    ca, cb = Classifier(d / a, threads=threads), Classifier(d / b, threads=threads)
    newer = max((ca, cb), key=lambda c: (c.bundle.meta.created_at or "", c.version))
    return compare(ca, cb, labelled_photos(manifest_of(newer), data))
