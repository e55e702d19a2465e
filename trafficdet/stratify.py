"""A seeded multi-label train/validation split of any size: exact validation count, every class on both sides.

Hand-written because no library in the lock does this (and the well-known ones do not
either: scikit-learn stratifies single labels; scikit-multilearn's iterative stratification
hits neither an exact validation count nor a guarantee that a class with two images lands on
both sides, which is what breaks small datasets of many classes). Three steps:

1. the validation count is ``round(N x val_fraction)``, half up, of the decimal written in
   params.yaml (exact integer arithmetic: 50 x 0.29 gives 15, where the float product
   14.499999... gave 14), then raised to 1 or lowered to N-1 when N >= 2 so that neither side
   is empty (N=2, val_fraction 0.1: 1, not 0);
2. *placement*: for every class with at least two images, one image on each side, rarest
   classes first. A greedy pick settles nearly every case; when it cannot, an exact search
   (depth-first over the images of the least-coverable class, images with the same classes
   tried once) looks for a placement of every requirement met so far plus the new one,
   within the side sizes. A requirement no placement can meet is skipped, so the result
   meets every requirement whenever all can be met together (searches are bounded by
   ``budget`` nodes: more than small datasets need; large ones rarely search at all);
3. *fill*: the other images by iterative stratification (Sechidis et al., 2011): the class
   with the fewest unplaced images first, each image to the side that still wants that class
   most, within the side sizes, so each class is split close to ``val_fraction``.

Everything is ordered by a ``random.Random(seed)`` shuffle: same input and seed, same split,
on any machine.
"""

from __future__ import annotations

import random
from collections import defaultdict
from fractions import Fraction

VAL, TRAIN = "val", "train"
SIDES = (VAL, TRAIN)


class _OutOfBudgetError(Exception):
    pass


def validation_size(n: int, val_fraction: float) -> int:
    """``round(n x val_fraction)`` half up, kept within [1, n-1] when n >= 2 (both sides non-empty).

    Computed on the decimal the user wrote, exactly: ``repr`` of a float is the shortest decimal
    that reads back as it (0.29 stays '0.29', not 0.28999999999999998), and the rounding is
    integer arithmetic on that fraction, so no float product can land a hair below a half.
    """
    fraction = Fraction(repr(val_fraction))
    size = (2 * n * fraction.numerator + fraction.denominator) // (2 * fraction.denominator)  # floor(n x f + 1/2)
    return min(max(size, 1), n - 1) if n >= 2 else min(size, n)


def stratified_split(classes_of: dict[int, set[int]], val_fraction: float, seed: int, budget: int = 200_000) -> set[int]:
    """The validation image ids: exactly ``validation_size(N, val_fraction)`` of them, seeded."""
    rng = random.Random(seed)
    order = sorted(classes_of)
    rng.shuffle(order)
    n = len(order)
    capacity = {VAL: validation_size(n, val_fraction), TRAIN: n - validation_size(n, val_fraction)}
    members: dict[int, list[int]] = defaultdict(list)  # class -> its images, in seeded order
    for image in order:
        for cls in sorted(classes_of[image]):
            members[cls].append(image)
    placed = _Placement(classes_of, members, capacity, order, budget).run()
    _fill(placed, classes_of, members, capacity, order, rng)
    return {image for image, side in placed.items() if side == VAL}


class _Placement:
    """Step 2: one image per side for each class with two or more images, where the side sizes allow."""

    def __init__(
        self,
        classes_of: dict[int, set[int]],
        members: dict[int, list[int]],
        capacity: dict[str, int],
        order: list[int],
        budget: int,
    ) -> None:
        self.members, self.capacity, self.budget = members, capacity, budget
        self.rank = {image: position for position, image in enumerate(order)}
        required = sorted((cls for cls in members if len(members[cls]) >= 2), key=lambda cls: (len(members[cls]), cls))
        self.requirements = [(cls, side) for cls in required for side in SIDES]
        self.required = set(required)
        # Only required classes matter here: images alike in them are interchangeable.
        self.relevant = {image: frozenset(classes & self.required) for image, classes in classes_of.items()}
        self.useful = [image for image in order if self.relevant[image]]

    def run(self) -> dict[int, str]:
        placed: dict[int, str] = {}
        met: list[tuple[int, str]] = []
        for requirement in self.requirements:
            if self._covered(requirement, placed):
                met.append(requirement)
                continue
            image = self._greedy_pick(requirement, placed, self.requirements)
            if image is not None:
                placed[image] = requirement[1]
                met.append(requirement)
                continue
            found = self._search([*met, requirement])
            if found is not None:
                placed = found
                met.append(requirement)
        return placed

    def _covered(self, requirement: tuple[int, str], placed: dict[int, str]) -> bool:
        cls, side = requirement
        return any(placed.get(image) == side for image in self.members[cls])

    def _gain(self, image: int, open_classes: set[int]) -> int:
        """How many open requirements of one side placing ``image`` there would meet."""
        return len(self.relevant[image] & open_classes)

    def _greedy_pick(self, requirement: tuple[int, str], placed: dict[int, str], requirements: list) -> int | None:
        """The unplaced image of the class that meets the most still-open requirements on that side."""
        cls, side = requirement
        if sum(1 for s in placed.values() if s == side) >= self.capacity[side]:
            return None
        open_classes = {c for c, s in requirements if s == side and not self._covered((c, s), placed)}
        candidates = [image for image in self.members[cls] if image not in placed]
        if not candidates:
            return None
        return max(candidates, key=lambda image: (self._gain(image, open_classes), -self.rank[image]))

    def _search(self, requirements: list[tuple[int, str]]) -> dict[int, str] | None:
        """An exact depth-first search for a placement meeting all ``requirements``, or None."""
        classes = {cls for cls, _ in requirements}
        placed: dict[int, str] = {}
        used = dict.fromkeys(SIDES, 0)
        on_side = {side: dict.fromkeys(classes, 0) for side in SIDES}
        unplaced = {cls: len(self.members[cls]) for cls in classes}
        dead_ends: set[frozenset] = set()
        nodes = 0

        def assign(image: int, side: str, step: int) -> None:
            if step > 0:
                placed[image] = side
            else:
                del placed[image]
            used[side] += step
            for cls in self.relevant[image] & classes:
                on_side[side][cls] += step
                unplaced[cls] -= step

        def room_for_open(requirements: list[tuple[int, str]]) -> bool:
            """A bound: the open requirements of a side need (open / most any one image meets) more images."""
            for side in SIDES:
                open_classes = {c for c, s in requirements if s == side and not on_side[s][c]}
                if not open_classes:
                    continue
                most = max((len(self.relevant[i] & open_classes) for i in self.useful if i not in placed), default=0)
                if most == 0 or most * (self.capacity[side] - used[side]) < len(open_classes):
                    return False
            return True

        def solve() -> bool:
            nonlocal nodes
            nodes += 1
            if nodes > self.budget:
                raise _OutOfBudgetError
            state = frozenset(placed.items())
            if state in dead_ends:
                return False
            best: tuple[int, str] | None = None
            for cls, side in requirements:
                if on_side[side][cls]:
                    continue
                if unplaced[cls] == 0 or used[side] >= self.capacity[side]:
                    dead_ends.add(state)
                    return False
                if best is None or unplaced[cls] < unplaced[best[0]]:
                    best = (cls, side)
            if best is None:
                return True
            if not room_for_open(requirements):
                dead_ends.add(state)
                return False
            cls, side = best
            open_classes = {c for c, s in requirements if s == side and not on_side[s][c]}
            candidates = sorted(
                (image for image in self.members[cls] if image not in placed),
                key=lambda image: (-self._gain(image, open_classes), self.rank[image]),
            )
            tried: set[frozenset] = set()
            for image in candidates:
                if self.relevant[image] in tried:
                    continue
                tried.add(self.relevant[image])
                assign(image, side, 1)
                if solve():
                    return True
                assign(image, side, -1)
            dead_ends.add(state)
            return False

        try:
            return dict(placed) if solve() else None
        except _OutOfBudgetError:
            return None


def _fill(
    placed: dict[int, str],
    classes_of: dict[int, set[int]],
    members: dict[int, list[int]],
    capacity: dict[str, int],
    order: list[int],
    rng: random.Random,
) -> None:
    """Step 3: iterative stratification of the unplaced images, within the side sizes (in place)."""
    n = len(order)
    share = {VAL: capacity[VAL] / n if n else 0.0, TRAIN: capacity[TRAIN] / n if n else 0.0}
    wanted = {side: {cls: len(images) * share[side] for cls, images in members.items()} for side in SIDES}
    left = dict(capacity)
    remaining = {cls: len(images) for cls, images in members.items()}

    def put(image: int, side: str) -> None:
        placed[image] = side
        left[side] -= 1
        for cls in classes_of[image]:
            wanted[side][cls] -= 1
            remaining[cls] -= 1

    for image, side in list(placed.items()):
        del placed[image]
        put(image, side)
    while True:
        open_classes = [cls for cls, count in remaining.items() if count > 0]
        if not open_classes:
            break
        cls = min(open_classes, key=lambda c: (remaining[c], c))
        for image in members[cls]:
            if image in placed:
                continue
            sides = [side for side in SIDES if left[side] > 0]
            side = max(sides, key=lambda s: (wanted[s][cls], left[s] / capacity[s], rng.random()))
            put(image, side)
    for image in order:  # images without classes, if any
        if image not in placed:
            put(image, VAL if left[VAL] > 0 else TRAIN)
